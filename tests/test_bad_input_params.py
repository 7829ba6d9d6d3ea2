"""Bad input is refused in one line and exit code 2, with nothing written.

Params that YAML and pydantic would let through (NaN and inf, booleans for numbers, duplicate
keys, alias bombs), a training whose loss turns NaN, and model checkpoints that are not what
`xctsam predict` / `xctsam eval models` need. The CLI cases run the console script in a
subprocess, so what is checked is exactly what a user sees on stderr.
"""

from __future__ import annotations

import collections
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

from xctsam.cli import main
from xctsam.config.params import parse_params
from xctsam.data.datasets import IntensityWindow
from xctsam.data.volumes import write_volume
from xctsam.models.checkpoint import SEGMENTER_FORMAT, save_segmenter_checkpoint
from xctsam.models.factory import build_segmenter, model_meta
from xctsam.util import safe_yaml
from xctsam.util.errors import ConfigError, TrainingDiverged
from xctsam.util.finite import check_losses, check_weights

from .conftest import REPO, write_params

XCTSAM = Path(sys.executable).with_name("xctsam")  # the console script of this environment
PARAMS_TEXT = (REPO / "params.yaml").read_text()
SAM_LR = "    lr: 0.0003\n"  # train.sam.lr, the first key written with this indentation and value
SAM_STEPS = "    steps: 1000\n    epoch_steps: 100\n" + SAM_LR
SAM_WEIGHT_DECAY = "    weight_decay: 0.0001\n"  # train.sam.weight_decay, likewise
TRIAL = "  trial: {train.sam.steps: 300, train.sam.epoch_steps: 50}\n"


def run_cli(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "XCTSAM_NO_PROGRESS": "1", "MLFLOW_DISABLE_TELEMETRY": "true", **(env or {})}
    return subprocess.run([str(XCTSAM), *map(str, args)], cwd=cwd, env=environment, capture_output=True, text=True, timeout=300)


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The single `error: ...` line of a refused command (exit 2, no traceback)."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    return lines[0]


def params_variant(tmp_path: Path, old: str, new: str) -> Path:
    """The project's params.yaml with `old` (its first occurrence) replaced by `new`."""
    assert old in PARAMS_TEXT, old
    path = tmp_path / "params.yaml"
    path.write_text(PARAMS_TEXT.replace(old, new, 1))
    return path


def alias_bomb(levels: int, width: int = 10) -> str:
    """tune.trial as a "billion laughs": `levels` lists of `width` aliases of the list before."""
    names = [chr(ord("a") + level) for level in range(levels)]
    lines = ["  trial:", f"    a: &a [{', '.join(['x'] * width)}]"]
    lines += [f"    {name}: &{name} [{', '.join([f'*{previous}'] * width)}]" for previous, name in zip(names, names[1:])]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- params: through the CLI
PARAMS_CASES = {
    "lr-inf": (SAM_LR, "    lr: .inf\n", "params.yaml: train.sam.lr: must be a finite number, got inf"),
    "inf-in-list": ("  gaussian: [", "  gaussian: [.inf, ", "params.yaml: robustness.gaussian.0: must be a finite number, got inf"),
    "nan-in-tune-trial": (TRIAL, "  trial: {train.sam.lr: .nan}\n", "params.yaml: tune.trial.train.sam.lr: must be a finite number, got nan"),
    "steps-true": (SAM_STEPS, SAM_STEPS.replace("steps: 1000", "steps: true"), "params.yaml: train.sam.steps: must be a number, got true"),
    "weight-decay-false": (SAM_WEIGHT_DECAY, "    weight_decay: false\n", "params.yaml: train.sam.weight_decay: must be a number, got false"),
    "duplicate-key": (SAM_LR, SAM_LR + "    lr: 0.01\n", "params.yaml: train.sam.lr: written twice in one section (lines "),
    # 10^6 values once expanded: enough to pass the bound, small enough for the old loader to survive
    "alias-bomb-in-tune-trial": (TRIAL, alias_bomb(6), "params.yaml: tune.trial.d.7: YAML aliases expand to more than 10000 values; write the values out"),
}


@pytest.mark.parametrize("case", PARAMS_CASES, ids=list(PARAMS_CASES))
def test_bad_params_are_one_line_and_nothing_is_written(tmp_path: Path, case: str) -> None:
    old, new, expected = PARAMS_CASES[case]
    params = params_variant(tmp_path, old, new)
    before = params.read_text()
    line = one_line_error(run_cli("params", "apply", REPO / "configs" / "real-samgan.yaml", "--params", params, cwd=tmp_path))
    assert expected in line
    assert params.read_text() == before


@pytest.mark.parametrize(
    ("overlay", "expected"),
    [
        ("train.sam.lr: .inf\n", "bad.yaml: train.sam.lr: must be a finite number, got inf"),
        ("train.sam.lr: 0.1\nsam.lora.rank: 2\ntrain.sam.lr: 0.2\n", "bad.yaml: train.sam.lr: written twice in one section (lines 1 and 3); keep one"),
    ],
    ids=["inf", "duplicate"],
)
def test_bad_overlay_is_named_and_params_untouched(tmp_path: Path, overlay: str, expected: str) -> None:
    params = params_variant(tmp_path, SAM_LR, SAM_LR)
    (tmp_path / "bad.yaml").write_text(overlay)
    assert one_line_error(run_cli("params", "apply", "bad.yaml", "--params", params, cwd=tmp_path)) == f"error: {expected}"
    assert params.read_text() == PARAMS_TEXT


# ---------------------------------------------------------------- params: the loader and schema
def test_billion_laughs_is_refused_before_construction() -> None:
    text = "tune:\n" + alias_bomb(9)  # 10^9 values once expanded
    with pytest.raises(ConfigError, match=r"bomb\.yaml: tune\.trial\.d\.7: YAML aliases expand to more than 10000 values"):
        safe_yaml.load(text, "bomb.yaml")


def test_alias_inside_itself_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"loop\.yaml: tune\.trial\.x\.0: a YAML alias inside the section it names"):
        safe_yaml.load("tune:\n  trial: &t {x: [*t]}\n", "loop.yaml")


def test_modest_aliases_and_merge_keys_still_load() -> None:
    text = "base: &base {a: 1, b: [1, 2]}\nother:\n  <<: *base\n  b: [3]\nthird: *base\n"
    assert safe_yaml.load(text, "ok.yaml") == {"base": {"a": 1, "b": [1, 2]}, "other": {"a": 1, "b": [3]}, "third": {"a": 1, "b": [1, 2]}}


def test_non_finite_values_from_code_are_refused_by_the_schema(default_params: dict) -> None:
    default_params["fid"]["window"] = [0.0, math.inf]
    with pytest.raises(ConfigError, match=r"fid\.window\.1: must be a finite number, got inf"):
        parse_params(default_params)


def test_numbers_pyyaml_reads_as_strings_still_load(default_params: dict) -> None:
    # pydantic's strict mode would refuse these: PyYAML reads `1e-3` as the string "1e-3"
    default_params["train"]["sam"]["lr"] = "1e-3"
    default_params["train"]["sam"]["steps"] = 20.0
    config = parse_params(default_params).train.sam
    assert config.lr == 1e-3 and config.steps == 20


# ---------------------------------------------------------------- training that diverges
def test_check_losses_names_step_terms_and_hint() -> None:
    check_losses("train.sam", 3, {"loss": 0.9, "task_loss": 0.8, "aux_loss": 0.1}, "lower train.sam.lr")
    with pytest.raises(TrainingDiverged) as caught:
        check_losses("train.sam", 3, {"loss": math.nan, "task_loss": math.nan, "aux_loss": 0.0012}, "lower train.sam.lr or check the input data")
    assert str(caught.value) == "train.sam: loss is nan at step 3 (task_loss nan, aux_loss 0.0012); lower train.sam.lr or check the input data"


def test_check_weights_refuses_non_finite_weights() -> None:
    layer = torch.nn.Linear(2, 2)
    check_weights("train.unet", 4, layer, "lower train.unet.lr")
    with torch.no_grad():
        layer.bias[0] = math.inf
    with pytest.raises(TrainingDiverged, match=r"train\.unet: 1 weight tensors hold NaN or inf after step 4 \(bias\); lower"):
        check_weights("train.unet", 4, layer, "lower train.unet.lr")


def _coupon(rng: np.random.Generator, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A bright disc (material) with a few dark pores, plus noise."""
    z, y, x = np.indices(shape)
    labels = ((y - shape[1] / 2) ** 2 + (x - shape[2] / 2) ** 2 < (shape[1] / 2.6) ** 2).astype(np.uint8)
    labels[(z == 1) & ((y - 20) ** 2 + (x - 20) ** 2 < 4)] = 2
    image = np.choose(labels, [0.0, 0.5, 0.05, 1.0]) + rng.normal(0, 0.03, shape)
    return image.astype(np.float32), labels


def test_training_with_a_nan_loss_stops_at_once(tmp_path: Path, tiny_params: dict) -> None:
    rng = np.random.default_rng(0)
    for i in range(2):
        write_volume(tmp_path / "data" / "synthetic" / "Tr-GAN" / f"v{i}.h5", *_coupon(rng, (4, 40, 40)))
    # a finite lr (params refuse inf) so large that the first update overflows the weights
    tiny_params["train"]["unet"].update({"steps": 6, "epoch_steps": 3, "tile": 32, "batch": 2, "val_slices": 2, "warmup_steps": 1, "lr": 1e38})
    tiny_params["unet"] = {"context": 3, "filters": 4, "depth": 2}
    write_params(tmp_path / "params.yaml", tiny_params)
    store = {"MLFLOW_TRACKING_URI": (tmp_path / "mlruns").as_uri(), "MLFLOW_ALLOW_FILE_STORE": "true"}  # no SQLite migration logs
    line = one_line_error(run_cli("train", "unet", cwd=tmp_path, env=store))
    assert re.fullmatch(r"error: train\.unet: loss is (nan|inf) at step \d \(task_loss \S+, aux_loss \S+\); lower train\.unet\.lr or check the input data", line), line
    out = tmp_path / "models" / "unet"
    assert not (out / "training.json").exists()
    best = out / "best.pt"
    if best.exists():  # an epoch before the divergence may have been kept, but never with NaN weights
        state = torch.load(best, weights_only=True)["state_dict"]
        assert all(torch.isfinite(tensor).all() for tensor in state.values() if tensor.is_floating_point())


# ---------------------------------------------------------------- model checkpoints that do not fit
class Payload:
    """An arbitrary class: torch.load(weights_only=True) refuses to unpickle it."""


def _unet_params() -> dict:
    raw = yaml.safe_load(PARAMS_TEXT)
    raw["unet"] = {"context": 3, "filters": 4, "depth": 2}
    return raw


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small volume, a real U-Net checkpoint and the bad files made from it."""
    root = tmp_path_factory.mktemp("checkpoints")
    with h5py.File(root / "volume.h5", "w") as volume:
        volume["image"] = np.random.default_rng(0).random((3, 32, 32), dtype=np.float32)
        volume["labels"] = np.zeros((3, 32, 32), np.uint8)
    params = parse_params(_unet_params())
    model = build_segmenter("unet", params.unet, params.train.unet)
    meta = model_meta("unet", params.unet, params.train.unet, IntensityWindow(0.0, 1.0))
    save_segmenter_checkpoint(root / "good.pt", model, meta, {"step": 1})
    saved = torch.load(root / "good.pt", weights_only=True)
    torch.save({f"layer{i}.weight": torch.randn(3, 3) for i in range(4)}, root / "state_dict.pt")
    torch.save({"weights": torch.zeros(2), "epoch": 3}, root / "no_kind.pt")
    torch.save({**saved, "meta": {**saved["meta"], "kind": "banana"}}, root / "banana.pt")
    grown = {key: torch.zeros([size + 1 for size in tensor.shape]) for key, tensor in saved["state_dict"].items()}
    torch.save({**saved, "state_dict": grown}, root / "resized.pt")
    torch.save({"format": SEGMENTER_FORMAT, "payload": Payload(), "data": collections.OrderedDict()}, root / "pickled.pt")
    data = (root / "good.pt").read_bytes()
    (root / "truncated.pt").write_bytes(data[: len(data) // 2])
    return root


CHECKPOINT_CASES = {  # file stem -> how its refusal begins, after the file's path
    "state_dict": r"holds a plain state dict of 4 tensors and no 'kind' entry: not a checkpoint written by xctsam train",
    "no_kind": r"holds no 'kind' entry \(its keys: \[weights, epoch\]\): not a checkpoint written by xctsam train",
    "banana": r"a checkpoint of kind 'banana', which this xctsam cannot rebuild \(known: sam, unet\)",
    "resized": r"a unet checkpoint whose weights do not fit the unet model its meta describes: \d+ of another shape \[down\.0\.0\.weight \(5, 4, 4, 4\) not \(4, 3, 3, 3\)",
    "pickled": rf"not a PyTorch checkpoint of tensors: it holds a pickled {re.escape(__name__)}\.Payload object, which is not loaded",
    "truncated": r"not a PyTorch checkpoint: unreadable, corrupt or truncated",
    "missing": r"no such model checkpoint",
}


def refusal_of(files: Path, case: str) -> str:
    """The start of the one line `case` is refused with, as a regex."""
    return rf"error: {re.escape(str(files / case))}\.pt: {CHECKPOINT_CASES[case]}"


@pytest.mark.parametrize("case", CHECKPOINT_CASES, ids=list(CHECKPOINT_CASES))
def test_bad_checkpoint_for_predict_is_one_line(files: Path, tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.tif"
    code = main(["predict", str(files / "volume.h5"), "--model", str(files / f"{case}.pt"), "--out", str(out), "--params", str(REPO / "params.yaml")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert re.match(refusal_of(files, case), err), err
    assert "weights_only" not in err and not list(tmp_path.iterdir())


def test_good_checkpoint_predicts(files: Path, tmp_path: Path) -> None:
    assert main(["predict", str(files / "volume.h5"), "--model", str(files / "good.pt"), "--out", str(tmp_path / "out.tif"), "--params", str(REPO / "params.yaml")]) == 0


@pytest.mark.parametrize("case", ["pickled", "resized"])
def test_bad_checkpoint_through_the_console_script(files: Path, tmp_path: Path, case: str) -> None:
    line = one_line_error(run_cli("predict", files / "volume.h5", "--model", files / f"{case}.pt", "--out", "out.tif", "--params", REPO / "params.yaml", cwd=tmp_path))
    assert re.match(refusal_of(files, case), line) and "weights_only" not in line, line
    assert not list(tmp_path.iterdir())


def test_bad_checkpoint_for_eval_models_is_one_line(files: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["eval", "models", "--model", f"x={files / 'banana.pt'}", "--params", str(REPO / "params.yaml"), "--out", str(tmp_path / "eval.json")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"error: {files / 'banana.pt'}: a checkpoint of kind 'banana', which this xctsam cannot rebuild (known: sam, unet); give a best.pt written by `xctsam train sam` or `xctsam train unet`"
    assert not (tmp_path / "eval.json").exists()
