"""`xctsam eval`: every model on every test split, checked against scikit-learn on the same voxels."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import f1_score, jaccard_score

from tests.test_predict import QuantiseModel, quantise
from xctsam import CLASS_NAMES
from xctsam.config.eval import PredictConfig
from xctsam.config.params import parse_params
from xctsam.data.datasets import IntensityWindow
from xctsam.data.volumes import write_volume
from xctsam.eval.evaluate import evaluate_model, evaluate_models, mlflow_metrics
from xctsam.util.errors import ConfigError, InputError

CLASSES = list(range(4))
WINDOWS = {"flat": IntensityWindow(0.0, 1.0), "wide": IntensityWindow(-0.2, 1.3)}


def _volume(rng: np.random.Generator, n_slices: int, top: float, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Grey values in [0, top) and labels that mostly follow them (some voxels relabelled)."""
    image = (top * rng.random((n_slices, 20, 24))).astype(np.float32)
    labels = np.minimum(quantise(image), classes - 1)
    flip = rng.random(image.shape) < 0.15
    labels = np.where(flip, rng.integers(0, classes, image.shape), labels).astype(np.uint8)
    return image, labels


@pytest.fixture
def data_root(tmp_path: Path) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """Te-1: two labelled volumes (all classes) and an unlabelled one; Te-2: no inclusion anywhere."""
    rng = np.random.default_rng(7)
    root = tmp_path / "data"
    splits = {
        "Te-1": [_volume(rng, 4, 1.0, 4), _volume(rng, 3, 1.0, 4)],
        "Te-2": [_volume(rng, 5, 0.7, 3)],  # grey < 0.7: no model predicts inclusion (>= 0.75) here
    }
    for split, volumes in splits.items():
        for index, (image, labels) in enumerate(volumes):
            write_volume(root / "real" / split / f"vol_{index:03d}.h5", image, labels)
    write_volume(root / "real" / "Te-1" / "vol_unlabelled.h5", rng.random((2, 20, 24)).astype(np.float32))
    return splits


@pytest.fixture
def params(tiny_params: dict):
    tiny_params["eval"] = {"splits": ["real/Te-1", "real/Te-2"]}
    tiny_params["predict"] = {"tile": 16, "overlap": 0.25, "batch": 3}
    return parse_params(tiny_params)


def _expected(volumes: list[tuple[np.ndarray, np.ndarray]], window: IntensityWindow) -> dict[str, np.ndarray]:
    """Independent scores with scikit-learn over the split's voxels, NaN where a class is in neither."""
    truth = np.concatenate([labels.ravel() for _, labels in volumes])
    prediction = np.concatenate([quantise(window.normalise(image)).ravel() for image, _ in volumes])

    def scores(t: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        absent = [c not in t and c not in p for c in CLASSES]
        iou = jaccard_score(t, p, labels=CLASSES, average=None, zero_division=0)
        dice = f1_score(t, p, labels=CLASSES, average=None, zero_division=0)
        return np.where(absent, np.nan, iou), np.where(absent, np.nan, dice)

    iou, dice = scores(truth, prediction)
    slices = [(labels[z].ravel(), quantise(window.normalise(image[z])).ravel()) for image, labels in volumes for z in range(len(image))]
    by_slice = np.array([scores(t, p)[0] for t, p in slices])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a class undefined on every slice: NaN
        slice_mean = np.nanmean(by_slice, axis=0)
    return {"iou": iou, "dice": dice, "iou_slice_mean": slice_mean, "slices": len(slices)}


def _as_array(by_class: dict[str, float | None]) -> np.ndarray:
    return np.array([np.nan if by_class[name] is None else by_class[name] for name in CLASS_NAMES], dtype=float)


def test_eval_json_matches_an_independent_computation(tmp_path: Path, data_root, params) -> None:
    models = {"flat": (QuantiseModel(), WINDOWS["flat"]), "wide": (QuantiseModel(context=3), WINDOWS["wide"])}
    out = tmp_path / "metrics" / "eval.json"
    returned = evaluate_models(models, params, tmp_path / "data", out, device="cpu", log_mlflow=False, progress=False)

    written = json.loads(out.read_text())
    assert np.isnan(returned["iou"]["flat"]["Te-2"]["inclusion"])  # NaN in Python, null in JSON
    assert {"iou", "dice", "iou_slice_mean", "miou", "fg_miou", "mdice", "fg_mdice", "slices"} <= set(written)
    for model, window in WINDOWS.items():
        for split, volumes in data_root.items():
            expected = _expected(volumes, window)
            assert set(written["iou"][model][split]) == set(CLASS_NAMES)
            for score in ("iou", "dice", "iou_slice_mean"):
                np.testing.assert_allclose(_as_array(written[score][model][split]), expected[score], rtol=1e-12, err_msg=f"{score} {model} {split}")
            assert written["miou"][model][split] == pytest.approx(np.nanmean(expected["iou"]))
            assert written["fg_miou"][model][split] == pytest.approx(np.nanmean(expected["iou"][1:]))
            assert written["slices"][model][split] == expected["slices"]  # the unlabelled volume is skipped
    # no inclusion in Te-2's truth nor in any prediction there: undefined, JSON null
    assert written["iou"]["flat"]["Te-2"]["inclusion"] is None and written["dice"]["wide"]["Te-2"]["inclusion"] is None
    assert written["iou"]["flat"]["Te-1"]["inclusion"] is not None
    # the two windows give different predictions, hence different scores
    assert written["iou"]["flat"]["Te-1"] != written["iou"]["wide"]["Te-1"]


def test_mlflow_run_per_model_has_the_keys_and_no_nan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data_root, params) -> None:
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    report = evaluate_models({"flat": (QuantiseModel(), WINDOWS["flat"])}, params, tmp_path / "data", tmp_path / "eval.json", device="cpu", progress=False)

    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.stage = 'evaluate.flat'", output_format="list")
    assert len(runs) == 1
    metrics, run_params = runs[0].data.metrics, runs[0].data.params
    assert metrics["iou.Te-1.pore"] == pytest.approx(report["iou"]["flat"]["Te-1"]["pore"])
    assert metrics["dice.Te-2.material"] == pytest.approx(report["dice"]["flat"]["Te-2"]["material"])
    assert metrics["miou.Te-1"] == pytest.approx(report["miou"]["flat"]["Te-1"])
    assert metrics["fg_miou.Te-2"] == pytest.approx(report["fg_miou"]["flat"]["Te-2"])
    assert "iou.Te-2.inclusion" not in metrics and "dice.Te-2.inclusion" not in metrics
    expected_keys = {f"{prefix}.{split}.{name}" for prefix in ("iou", "dice", "iou_slice") for split in ("Te-1", "Te-2") for name in CLASS_NAMES}
    expected_keys |= {f"{mean}.{split}" for mean in ("miou", "fg_miou", "mdice", "fg_mdice") for split in ("Te-1", "Te-2")}
    expected_keys |= {f"{bound}.{split}.{name}" for bound in ("iou_low", "iou_high") for split in ("Te-1", "Te-2") for name in CLASS_NAMES}
    expected_keys -= {f"{prefix}.Te-2.inclusion" for prefix in ("iou", "dice", "iou_slice", "iou_low", "iou_high")}
    assert set(metrics) == expected_keys
    assert metrics["iou_low.Te-1.pore"] <= metrics["iou.Te-1.pore"] <= metrics["iou_high.Te-1.pore"]
    assert run_params["predict.tile"] == "16" and runs[0].data.tags["model"] == "flat"


def test_transform_hook_scores_modified_inputs(tmp_path: Path, data_root) -> None:
    split_dirs = {"Te-1": tmp_path / "data" / "real" / "Te-1"}
    config = PredictConfig(tile=16, overlap=0.25, batch=4)
    window = WINDOWS["flat"]
    inverted = [(1.0 - image, labels) for image, labels in data_root["Te-1"]]
    scores = evaluate_model(QuantiseModel(), window, split_dirs, config, "cpu", transform=lambda unit: 1.0 - unit, name="noisy", progress=False)
    np.testing.assert_allclose(_as_array(scores["Te-1"]["iou"]), _expected(inverted, window)["iou"], rtol=1e-12)
    clean = evaluate_model(QuantiseModel(), window, split_dirs, config, "cpu", progress=False)
    assert clean["Te-1"]["miou"] > scores["Te-1"]["miou"]


def test_mlflow_metrics_leave_nan_out() -> None:
    summary = {
        "iou": {"background": 0.5, "pore": float("nan")},
        "dice": {"background": 0.6, "pore": float("nan")},
        "iou_slice_mean": {"background": 0.4, "pore": float("nan")},
        "miou": 0.5,
        "fg_miou": float("nan"),
        "mdice": 0.6,
        "fg_mdice": float("nan"),
    }
    assert mlflow_metrics({"Te-9": summary}) == {
        "iou.Te-9.background": 0.5,
        "dice.Te-9.background": 0.6,
        "iou_slice.Te-9.background": 0.4,
        "miou.Te-9": 0.5,
        "mdice.Te-9": 0.6,
    }


def test_bad_splits_are_named_before_any_prediction(tmp_path: Path, data_root, tiny_params: dict) -> None:
    models = {"flat": (QuantiseModel(), WINDOWS["flat"])}
    root = tmp_path / "data"
    tiny_params["eval"] = {"splits": ["real/Te-1", "real/Te-9"]}
    with pytest.raises(InputError, match="Te-9: split folder not found"):
        evaluate_models(models, parse_params(tiny_params), root, tmp_path / "a.json", log_mlflow=False, progress=False)
    tiny_params["eval"] = {"splits": ["real/Te-1", "synthetic/Te-1"]}
    with pytest.raises(ConfigError, match="share the name"):
        evaluate_models(models, parse_params(tiny_params), root, tmp_path / "b.json", log_mlflow=False, progress=False)
    write_volume(root / "real" / "Tr-real" / "vol_000.h5", np.zeros((2, 8, 8), np.float32))
    tiny_params["eval"] = {"splits": ["real/Tr-real"]}
    with pytest.raises(InputError, match="no labelled volumes"):
        evaluate_models(models, parse_params(tiny_params), root, tmp_path / "c.json", log_mlflow=False, progress=False)
    assert not any((tmp_path / name).exists() for name in ("a.json", "b.json", "c.json"))


def test_every_iou_has_an_interval_and_compared_models_a_paired_difference(tmp_path: Path, data_root, tiny_params: dict) -> None:
    tiny_params["eval"] = {"splits": ["real/Te-1", "real/Te-2"], "compare": [["flat", "wide"], ["flat", "flat"], ["flat", "absent"]], "bootstrap": {"resamples": 300}}
    tiny_params["predict"] = {"tile": 16, "overlap": 0.25, "batch": 3}
    models = {"flat": (QuantiseModel(), WINDOWS["flat"]), "wide": (QuantiseModel(context=3), WINDOWS["wide"])}
    report = evaluate_models(models, parse_params(tiny_params), tmp_path / "data", tmp_path / "eval.json", device="cpu", log_mlflow=False, progress=False)
    written = json.loads((tmp_path / "eval.json").read_text())
    for model in models:
        for split in ("Te-1", "Te-2"):
            assert written["bootstrap_unit"][model][split] == "slice"  # 2 volumes at most, fewer than min_volumes
            for cls in ("material", "pore"):
                low, high = written["iou_ci"][model][split][cls]
                assert low <= written["iou"][model][split][cls] <= high and low < high
    assert written["iou_ci"]["flat"]["Te-2"]["inclusion"] == [None, None]  # undefined class, no interval
    assert set(written["differences"]) == {"flat - wide", "flat - flat"}  # a model not evaluated is skipped
    difference = written["differences"]["flat - wide"]["Te-1"]["pore"]
    assert difference["value"] == pytest.approx(written["iou"]["flat"]["Te-1"]["pore"] - written["iou"]["wide"]["Te-1"]["pore"])
    assert difference["low"] <= difference["value"] <= difference["high"]
    itself = written["differences"]["flat - flat"]["Te-1"]["pore"]
    assert itself == {"value": 0.0, "low": 0.0, "high": 0.0, "significant": False}
    assert written["bootstrap"] == {"resamples": 300, "level": 0.95, "seed": tiny_params["seed"]}
    again = evaluate_models(models, parse_params(tiny_params), tmp_path / "data", tmp_path / "again.json", device="cpu", log_mlflow=False, progress=False)
    assert again["iou_ci"] == report["iou_ci"]  # seeded

    tiny_params["eval"]["bootstrap"]["min_volumes"] = 2  # Te-1 has two labelled volumes: resample them
    by_volume = evaluate_models(models, parse_params(tiny_params), tmp_path / "data", tmp_path / "vol.json", device="cpu", log_mlflow=False, progress=False)
    assert by_volume["bootstrap_unit"]["flat"] == {"Te-1": "volume", "Te-2": "slice"}


def test_defects_of_a_split_are_every_volume_s_defects(tmp_path: Path, data_root, params) -> None:
    from xctsam.eval.defects import defect_scores

    models = {"flat": (QuantiseModel(), WINDOWS["flat"])}
    evaluate_models(models, params, tmp_path / "data", tmp_path / "eval.json", device="cpu", log_mlflow=False, progress=False, defects_out=tmp_path / "defects.json")
    written = json.loads((tmp_path / "defects.json").read_text())
    assert written["config"] == params.defects.model_dump(mode="json")
    for split, volumes in data_root.items():
        per_volume = [defect_scores(quantise(WINDOWS["flat"].normalise(image)), labels, params.defects) for image, labels in volumes]
        pore = written["scores"]["flat"][split]["classes"]["pore"]["all"]
        assert pore["n_true"] == sum(r.classes["pore"]["all"].n_true for r in per_volume) > 0
        assert pore["n_detected"] == sum(r.classes["pore"]["all"].n_detected for r in per_volume)
        assert pore["recall"] == pytest.approx(pore["n_detected"] / pore["n_true"])
        truth = np.concatenate([labels.ravel() for _, labels in volumes])
        assert written["scores"]["flat"][split]["porosity_true"] == pytest.approx((truth == 2).sum() / (truth >= 1).sum())
    assert written["scores"]["flat"]["Te-2"]["classes"]["inclusion"]["all"]["recall"] is None  # no inclusion in Te-2
    rows = json.loads((tmp_path / "defects_recall.json").read_text())
    pore_rows = [row for row in rows if row["split"] == "Te-1" and row["class"] == "pore"]
    assert [row["diameter"] for row in pore_rows] == params.defects.diameter_bins
    assert sum(row["n_true"] for row in pore_rows) == written["scores"]["flat"]["Te-1"]["classes"]["pore"]["all"]["n_true"]


def test_defect_metrics_name_split_class_location_and_bin() -> None:
    from xctsam.eval.evaluate import defect_metrics

    bins = [{"recall": 0.5}, {"recall": math.nan}]
    score = {"f1": 0.4, "recall": 0.5, "precision": math.nan, "bins": bins}
    report = {"classes": {"pore": {"all": score, "surface": score, "internal": score}}, "porosity_true": 0.01, "porosity_pred": 0.02}
    metrics = defect_metrics({"Te-1": report})
    assert metrics["defects.Te-1.pore.f1"] == 0.4 and metrics["defects.Te-1.pore.surface.recall"] == 0.5
    assert metrics["defects.Te-1.pore.recall.bin0"] == 0.5 and "defects.Te-1.pore.recall.bin1" not in metrics
    assert "defects.Te-1.pore.precision" not in metrics and metrics["porosity.Te-1.pred"] == 0.02
