"""Train -> predict -> evaluate through the CLI on a tiny labelled split, for both models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from xctsam.cli import main
from xctsam.data.volumes import write_volume
from xctsam.models.factory import load_segmenter

from .conftest import write_params


def _coupon(rng: np.random.Generator, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A bright disc (material) with dark pores and brighter inclusions, plus noise."""
    z, y, x = np.indices(shape)
    labels = ((y - shape[1] / 2) ** 2 + (x - shape[2] / 2) ** 2 < (shape[1] / 2.6) ** 2).astype(np.uint8)
    for _ in range(6):
        cz, cy, cx = rng.integers(0, shape[0]), rng.integers(10, shape[1] - 10), rng.integers(10, shape[2] - 10)
        labels[((z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2 < 4) & (labels == 1)] = rng.choice([2, 3])
    image = np.choose(labels, [0.0, 0.5, 0.05, 1.0]) + rng.normal(0, 0.03, shape)
    return image.astype(np.float32), labels


@pytest.fixture
def project(tmp_path: Path, tiny_params: dict, monkeypatch: pytest.MonkeyPatch) -> Path:
    rng = np.random.default_rng(0)
    for split, count in (("synthetic/Tr-GAN", 3), ("real/Te-1", 1), ("real/Te-2", 1)):
        for i in range(count):
            write_volume(tmp_path / "data" / split / f"v{i}.h5", *_coupon(rng, (4, 40, 40)))
    small_train = {"steps": 6, "epoch_steps": 3, "tile": 32, "batch": 2, "val_slices": 2, "warmup_steps": 1, "checkpoint_every": 3}
    for kind in ("sam", "unet"):
        tiny_params["train"][kind].update(small_train)
    tiny_params["sam"]["small"] = {"embed_dim": 32, "depth": 2, "num_heads": 2, "global_attn_indexes": [1], "window_size": 4}
    tiny_params["sam"]["lora"].update({"rank": 2, "experts": 2})
    tiny_params["unet"] = {"context": 3, "filters": 4, "depth": 2}
    tiny_params["predict"] = {"tile": 32, "overlap": 0.25, "batch": 4}
    tiny_params["eval"] = {"splits": ["real/Te-1", "real/Te-2"]}
    write_params(tmp_path / "params.yaml", tiny_params)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("kind", ["unet", "sam"])
def test_train_predict_evaluate(project: Path, kind: str) -> None:
    assert main(["train", kind]) == 0
    summary = json.loads((project / "models" / kind / "training.json").read_text())
    assert summary["steps"] == 6 and summary["best_step"] in (3, 6)
    model, window, meta = load_segmenter(project / "models" / kind / "best.pt")
    assert meta["kind"] == kind and window.high > window.low
    assert set(meta["data"]) == {str(Path("data") / "synthetic" / "Tr-GAN")}

    out = project / "pred.tif"
    assert main(["predict", "data/real/Te-1/v0.h5", "--model", f"models/{kind}/best.pt", "--out", str(out)]) == 0
    predicted = tifffile.imread(out)
    assert predicted.shape == (4, 40, 40) and set(np.unique(predicted)) <= {0, 1, 2, 3}

    assert main(["eval", "models", "--model", f"{kind}=models/{kind}/best.pt"]) == 0
    report = json.loads((project / "metrics" / "eval.json").read_text())
    assert set(report["iou"][kind]) == {"Te-1", "Te-2"}
    assert set(report["iou"][kind]["Te-1"]) == {"background", "material", "pore", "inclusion"}


def test_second_train_returns_at_once(project: Path) -> None:
    assert main(["train", "unet"]) == 0
    best = project / "models" / "unet" / "best.pt"
    stamp = best.stat().st_mtime_ns
    assert main(["train", "unet"]) == 0
    assert best.stat().st_mtime_ns == stamp


def test_a_training_registers_its_model_and_records_its_data(project: Path) -> None:
    from mlflow import MlflowClient

    assert main(["train", "unet"]) == 0
    client = MlflowClient()
    versions = client.search_model_versions("name='xctsam-unet'")
    assert [int(version.version) for version in versions] == [1]
    run = client.get_run(versions[0].run_id)
    assert run.data.tags["stage"] == "train_unet" and run.data.tags["mlflow.source.name"]
    inputs = run.inputs.dataset_inputs
    assert [item.dataset.name for item in inputs] == ["synthetic/Tr-GAN"]
    assert len(inputs[0].dataset.digest) == 32 and inputs[0].tags[0].value == "training"
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on runs

    assert main(["train", "unet"]) == 0  # found finished: no second version
    assert len(client.search_model_versions("name='xctsam-unet'")) == 1
    for model, out in (("models/unet/best.pt", "file.tif"), ("models:/xctsam-unet/1", "registry.tif"), ("models:/xctsam-unet/latest", "latest.tif")):
        assert main(["predict", "data/real/Te-1/v0.h5", "--model", model, "--out", out]) == 0
    np.testing.assert_array_equal(tifffile.imread(project / "registry.tif"), tifffile.imread(project / "file.tif"))
    np.testing.assert_array_equal(tifffile.imread(project / "latest.tif"), tifffile.imread(project / "file.tif"))


def test_calibrate_fits_a_temperature_on_the_validation_slices(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "unet"]) == 0
    capsys.readouterr()
    assert main(["calibrate", "--model", "models/unet/best.pt", "--out", "metrics/calibration.json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((project / "metrics" / "calibration.json").read_text())
    assert 0.05 <= printed["temperature"] <= 20 and printed["pixels"] > 0
    assert printed["nll_after"] <= printed["nll_before"] + 1e-9  # the fit never worsens its own objective
    assert set(printed["ece_before"]) == set(printed["ece_after"]) == {"background", "material", "pore", "inclusion"}


def test_an_unknown_registered_model_is_one_line(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["predict", "data/real/Te-1/v0.h5", "--model", "models:/xctsam-nothing/3", "--out", "x.tif"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: models:/xctsam-nothing/3: no such registered model version") and "\n" not in err
    assert not (project / "x.tif").exists()


def test_missing_training_split_is_one_line(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "unet", "--root", "nowhere"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "nowhere" in err


@pytest.mark.parametrize("kind", ["unet", "sam"])
def test_a_training_starts_from_the_same_weights_whatever_torch_rng_did_before(project: Path, kind: str) -> None:
    """Two processes (two `dvc repro` runs) reach training with torch's RNG in different states;
    the initial weights must come from params.seed alone, or the same seed trains other models."""
    import torch

    from xctsam.config.params import load_params
    from xctsam.train.stage import prepare_training

    params = load_params(project / "params.yaml")
    weights = []
    for disturbance in (0, 7):
        torch.manual_seed(disturbance)
        torch.rand(3)
        job = prepare_training(kind, params, project / "data")
        weights.append({name: tensor.detach().clone() for name, tensor in job.model.state_dict().items()})
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    other = prepare_training(kind, params.model_copy(update={"seed": params.seed + 1}), project / "data").model.state_dict()
    assert any(not torch.equal(weights[0][name], other[name]) for name in weights[0] if weights[0][name].is_floating_point())
