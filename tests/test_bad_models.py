"""Malformed trained models are refused when loaded, before any scan is read: one line naming
the file and what is wrong, exit code 2, for `xctsam predict`, `export` and `calibrate`.

ONNX exports whose metadata lies (context, tile, labelling rule, window, meta) or whose graph
does not give xctsam's four classes; checkpoints whose meta entries are of the wrong type, whose
intensity window is NaN, infinite or zero-width, or whose weights hold NaN or inf (a 1-class
graph, a NaN window and NaN weights all used to label every voxel background and exit 0).

One real export and one checkpoint are made per module; every bad file is derived from them
by editing its metadata or meta. Most cases call the CLI's `main` in-process (torch imported
once); one case per command runs the console script, where the exit code is the process's.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import onnx
import pytest
import torch
import yaml
from onnx import TensorProto, helper, numpy_helper

from tests.test_bad_input_data import assert_cli_error, assert_one_line_error, run_main, xctsam
from xctsam.config.params import load_params
from xctsam.data.datasets import IntensityWindow, InvalidWindow
from xctsam.data.volumes import write_volume
from xctsam.models.checkpoint import save_segmenter_checkpoint
from xctsam.models.export import PREFIX, export_onnx, load_onnx
from xctsam.models.factory import build_segmenter, model_meta, rebuild_segmenter
from xctsam.util.errors import InputError

from .conftest import REPO, write_params

TILE = 32


class Files(NamedTuple):
    folder: Path
    params: Path
    checkpoint: Path
    onnx: Path
    scan: Path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    """A tiny untrained 2.5D U-Net (one slice of context) as best.pt and as ONNX, its params,
    a scan to predict and a training split to calibrate on (two labelled volumes)."""
    folder = tmp_path_factory.mktemp("models")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["sam"]["checkpoint"] = None
    raw["unet"] = {"context": 1, "filters": 4, "depth": 2}
    raw["predict"] = {"tile": TILE, "overlap": 0.25, "batch": 4}
    params_path = write_params(folder / "params.yaml", raw)
    params = load_params(params_path)
    torch.manual_seed(0)
    model = build_segmenter("unet", params.unet, params.train.unet)
    meta = model_meta("unet", params.unet, params.train.unet, IntensityWindow(0.0, 1.0))
    save_segmenter_checkpoint(folder / "best.pt", model, meta, {"step": 0})
    export_onnx(model, IntensityWindow(0.0, 1.0), meta, folder / "model.onnx", TILE)
    rng = np.random.default_rng(0)
    write_volume(folder / "scan.h5", rng.random((2, TILE, TILE), dtype=np.float32))
    for name in ("v0", "v1"):  # train.unet.splits' default; the last one is held out for calibration
        write_volume(folder / "data" / "synthetic" / "Tr-GAN" / f"{name}.h5", rng.random((2, TILE, TILE), dtype=np.float32), rng.integers(0, 4, (2, TILE, TILE), dtype=np.uint8))
    return Files(folder, params_path, folder / "best.pt", folder / "model.onnx", folder / "scan.h5")


def predict_main(capsys: pytest.CaptureFixture[str], files: Files, model: Path, out: Path) -> tuple[int, str]:
    return run_main(capsys, "predict", files.scan, "--model", model, "--out", out, "--params", files.params)


# ---------------------------------------------------------------- ONNX files
def with_metadata(base: Path, out: Path, **changed: str) -> Path:
    """`base` saved as `out` with some of xctsam's metadata values replaced."""
    model = onnx.load(str(base))
    for prop in model.metadata_props:
        key = prop.key.removeprefix(PREFIX)
        if key in changed:
            prop.value = changed[key]
    onnx.save(model, str(out))
    return out


def graph_of_classes(base: Path, out: Path, classes: int) -> Path:
    """A graph shaped as an export (images (batch, 1, TILE, TILE) -> probabilities, labels)
    but with `classes` output channels (a 1x1 convolution, softmax, argmax), carrying `base`'s metadata."""
    weight = numpy_helper.from_array(np.linspace(-1, 1, classes, dtype=np.float32).reshape(classes, 1, 1, 1), "weight")
    nodes = [
        helper.make_node("Conv", ["images", "weight"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        helper.make_node("ArgMax", ["probabilities"], ["labels"], axis=1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "classes", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 1, TILE, TILE])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", classes, TILE, TILE]), helper.make_tensor_value_info("labels", TensorProto.INT64, ["batch", TILE, TILE])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)  # versions any recent onnxruntime reads
    model.metadata_props.extend(onnx.load(str(base)).metadata_props)
    onnx.save(model, str(out))
    return out


ONNX_METADATA_CASES: dict[str, tuple[dict[str, str], str]] = {  # id -> (metadata changed, phrase of the refusal)
    "context-not-a-number": ({"context": "three"}, "metadata xctsam.context is 'three', not a positive whole number"),
    "context-zero": ({"context": "0"}, "metadata xctsam.context is '0', not a positive whole number"),
    "context-not-the-graphs": ({"context": "3"}, "the graph's input images has 1 channels where metadata xctsam.context says 3"),
    "tile-not-a-number": ({"tile": "32.0"}, "metadata xctsam.tile is '32.0', not a positive whole number"),
    "tile-not-the-graphs": ({"tile": "16"}, f"the graph's input images has {TILE} rows where metadata xctsam.tile says 16"),
    "labelling-unknown": ({"labelling": "vote"}, "metadata xctsam.labelling is 'vote', not one of argmax, paint"),
    "window-not-json": ({"window": "{low: 0"}, "metadata xctsam.window is not JSON"),
    "window-a-list": ({"window": "[0, 1]"}, "metadata xctsam.window is a list, not a mapping with low and high"),
    "window-of-text": ({"window": '{"low": "0", "high": 1}'}, "metadata xctsam.window has low '0', not a finite number"),
    "window-nan": ({"window": '{"low": NaN, "high": 1}'}, "metadata xctsam.window has low nan, not a finite number"),
    "window-infinite": ({"window": '{"low": 0, "high": Infinity}'}, "metadata xctsam.window has high inf, not a finite number"),
    "window-zero-width": ({"window": '{"low": 1, "high": 1}'}, "metadata xctsam.window is [1, 1]: low must be below high"),
    "window-unknown-key": ({"window": '{"low": 0, "high": 1, "gamma": 2}'}, "metadata xctsam.window has keys ['gamma', 'high', 'low']"),
    "meta-not-json": ({"meta": "{'kind': 'unet'}"}, "metadata xctsam.meta is not JSON"),
    "meta-a-list": ({"meta": "[]"}, "metadata xctsam.meta is a JSON list, not an object"),
    "temperature-nan": ({"temperature": "nan"}, "metadata xctsam.temperature is 'nan', not a positive finite number"),
}


@pytest.mark.parametrize("case", ONNX_METADATA_CASES, ids=list(ONNX_METADATA_CASES))
def test_onnx_metadata_that_lies_is_one_line_before_any_scan_is_read(files: Files, tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str) -> None:
    changed, phrase = ONNX_METADATA_CASES[case]
    model = with_metadata(files.onnx, tmp_path / f"{case}.onnx", **changed)
    code, err = predict_main(capsys, files, model, tmp_path / "out.tif")
    line = assert_one_line_error(code, err, model, phrase)
    assert line.endswith("export it again with `xctsam export`") and not (tmp_path / "out.tif").exists()


@pytest.mark.parametrize("classes", [1, 3, 5])
def test_an_onnx_graph_without_four_classes_is_one_line(files: Files, tmp_path: Path, capsys: pytest.CaptureFixture[str], classes: int) -> None:
    model = graph_of_classes(files.onnx, tmp_path / f"classes{classes}.onnx", classes)
    code, err = predict_main(capsys, files, model, tmp_path / "out.tif")
    assert_one_line_error(code, err, model, f"the graph's output probabilities has {classes} classes, not xctsam's 4 (background, material, pore, inclusion)")
    assert not (tmp_path / "out.tif").exists()


def test_the_untouched_export_and_a_four_class_graph_load(files: Files, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The controls: what the cases above break is all that makes them fail."""
    assert predict_main(capsys, files, files.onnx, tmp_path / "out.tif") == (0, "")
    model, window, meta = load_onnx(graph_of_classes(files.onnx, tmp_path / "classes4.onnx", 4))
    assert (model.context, model.fixed_tile, window, meta["kind"]) == (1, TILE, IntensityWindow(0.0, 1.0), "unet")


def test_predict_with_a_one_class_graph_exits_2_through_the_console_script(files: Files, tmp_path: Path) -> None:
    model = graph_of_classes(files.onnx, tmp_path / "classes1.onnx", 1)
    result = xctsam("predict", files.scan, "--model", model, "--out", tmp_path / "out.tif", "--params", files.params, cwd=tmp_path)
    assert_cli_error(result, model, "has 1 classes, not xctsam's 4")
    assert not (tmp_path / "out.tif").exists()


# ---------------------------------------------------------------- checkpoints
def _nan_first(state: dict[str, torch.Tensor], value: float) -> dict[str, torch.Tensor]:
    name = next(iter(state))
    return {**state, name: torch.full_like(state[name], value)}


def _meta(saved: dict[str, Any], **changed: Any) -> dict[str, Any]:
    return {**saved, "meta": {**saved["meta"], **changed}}


CHECKPOINT_CASES: dict[str, tuple[Any, str]] = {  # id -> (the saved dict -> a broken one, phrase of the refusal)
    "config-a-list": (lambda saved: _meta(saved, config=["context", 1]), "a unet checkpoint whose meta config is a list, not the mapping of its unet section"),
    "window-a-string": (lambda saved: _meta(saved, window="0,1"), "a unet checkpoint whose intensity window (meta window) is a str, not a mapping with low and high"),
    "window-nan": (lambda saved: _meta(saved, window={"low": math.nan, "high": 1.0}), "intensity window (meta window) has low nan, not a finite number"),
    "window-infinite": (lambda saved: _meta(saved, window={"low": -math.inf, "high": 1.0}), "intensity window (meta window) has low -inf, not a finite number"),
    "window-zero-width": (lambda saved: _meta(saved, window={"low": 0.5, "high": 0.5}), "intensity window (meta window) is [0.5, 0.5]: low must be below high"),
    "window-peaks-reversed": (lambda saved: _meta(saved, window={"low": 0.0, "high": 1.0, "peaks": [0.8, 0.2]}), "the background level must be below the material level"),
    "class-weights-a-string": (lambda saved: _meta(saved, class_weights="heavy"), "a unet checkpoint whose meta class_weights: Input should be a valid tuple"),
    "weights-nan": (lambda saved: {**saved, "state_dict": _nan_first(saved["state_dict"], math.nan)}, "a unet checkpoint whose weights hold NaN or inf in 1 of"),
    "weights-inf": (lambda saved: {**saved, "state_dict": _nan_first(saved["state_dict"], math.inf)}, "a unet checkpoint whose weights hold NaN or inf in 1 of"),
}


def broken_checkpoint(files: Files, folder: Path, case: str) -> Path:
    saved = torch.load(files.checkpoint, weights_only=True)
    path = folder / f"{case}.pt"
    torch.save(CHECKPOINT_CASES[case][0](saved), path)
    return path


@pytest.mark.parametrize("case", CHECKPOINT_CASES, ids=list(CHECKPOINT_CASES))
def test_a_checkpoint_with_a_broken_meta_or_weights_is_one_line(files: Files, tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str) -> None:
    model = broken_checkpoint(files, tmp_path, case)
    code, err = predict_main(capsys, files, model, tmp_path / "out.tif")
    assert_one_line_error(code, err, model, CHECKPOINT_CASES[case][1])
    assert not (tmp_path / "out.tif").exists()


def test_nan_weights_name_the_first_bad_tensor(files: Files, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = broken_checkpoint(files, tmp_path, "weights-nan")
    first = next(iter(torch.load(model, weights_only=True)["state_dict"]))
    assert f"first {first} (a training that diverged)" in predict_main(capsys, files, model, tmp_path / "out.tif")[1]


def test_the_untouched_checkpoint_predicts(files: Files, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert predict_main(capsys, files, files.checkpoint, tmp_path / "out.tif") == (0, "")


def test_export_of_nan_weights_exits_2_and_writes_nothing(files: Files, tmp_path: Path) -> None:
    model = broken_checkpoint(files, tmp_path, "weights-nan")
    result = xctsam("export", "--model", model, "--out", tmp_path / "out.onnx", "--params", files.params, cwd=tmp_path)
    assert_cli_error(result, model, "weights hold NaN or inf")
    assert not (tmp_path / "out.onnx").exists()


def test_calibrate_on_nan_weights_exits_2_before_reading_its_validation_slices(files: Files, tmp_path: Path) -> None:
    model = broken_checkpoint(files, tmp_path, "weights-nan")
    result = xctsam("calibrate", "--model", model, "--root", files.folder / "data", "--out", tmp_path / "fit.json", "--params", files.params, cwd=tmp_path)
    assert_cli_error(result, model, "weights hold NaN or inf")
    assert not (tmp_path / "fit.json").exists()


# ---------------------------------------------------------------- the shared checks
def test_rebuild_segmenter_checks_weights_from_any_source(files: Files) -> None:
    """What a registry loader calls with the (state_dict, meta) it fetched: the same checks, its URI named."""
    saved = torch.load(files.checkpoint, weights_only=True)
    model, window, meta = rebuild_segmenter("models:/xctsam-unet/3", saved["state_dict"], saved["meta"])
    assert not model.training and window == IntensityWindow(0.0, 1.0) and meta["kind"] == "unet"
    with pytest.raises(InputError, match=r"^models:/xctsam-unet/3: a unet checkpoint whose weights hold NaN or inf"):
        rebuild_segmenter("models:/xctsam-unet/3", _nan_first(saved["state_dict"], math.nan), saved["meta"])
    with pytest.raises(InputError, match=r"^models:/xctsam-unet/3: a model whose meta is a list"):
        rebuild_segmenter("models:/xctsam-unet/3", saved["state_dict"], [])  # type: ignore[arg-type]


@pytest.mark.parametrize("window", [IntensityWindow(-2.0, 3.5), IntensityWindow(0.0, 1.0, (0.2, 0.7))], ids=["plain", "peaks"])
def test_a_window_reads_back_what_to_dict_wrote(window: IntensityWindow) -> None:
    assert IntensityWindow.from_dict(window.to_dict()) == window


@pytest.mark.parametrize(
    "stored",
    [{"low": 0, "high": True}, {"low": 0}, {"low": 0, "high": 1, "peaks": [0.2]}, {"low": 0, "high": 1, "peaks": [0.2, math.nan]}],
    ids=["a-boolean", "no-high", "one-peak", "nan-peak"],
)
def test_a_window_refuses_what_cannot_normalise(stored: dict[str, Any]) -> None:
    with pytest.raises(InvalidWindow):
        IntensityWindow.from_dict(stored)
