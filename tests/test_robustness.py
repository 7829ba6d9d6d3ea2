"""`xctsam eval robustness`: seeded noise transforms, IoU against noise level, JSON, PNGs, MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.test_predict import QuantiseModel
from xctsam import CLASS_NAMES
from xctsam.config.params import parse_params
from xctsam.data.datasets import IntensityWindow
from xctsam.data.volumes import write_volume
from xctsam.eval.evaluate import eval_split_dirs, evaluate_model
from xctsam.eval.robustness import evaluate_robustness, noise_transform

GAUSSIAN = [0.0, 0.05, 0.15, 0.4]
POISSON = [1000.0, 30.0, 3.0]
SPLITS = {"Te-3": 0.1, "Te-4": 0.0}  # split -> fraction of labels flipped
MODELS = {"SAM-GAN": (QuantiseModel(), IntensityWindow(0.0, 1.0)), "U-Net": (QuantiseModel(context=3), IntensityWindow(-0.1, 1.1))}


def _two_level_volume(rng: np.random.Generator, flipped: float) -> tuple[np.ndarray, np.ndarray]:
    """Grey 0.375 (material for QuantiseModel) left, 0.625 (pore) right; a fraction of labels flipped."""
    image = np.full((3, 16, 20), 0.375, dtype=np.float32)
    image[:, :, 10:] = 0.625
    labels = np.where(image > 0.5, 2, 1).astype(np.uint8)
    flip = rng.random(image.shape) < flipped
    labels = np.where(flip, rng.integers(0, 4, image.shape), labels).astype(np.uint8)
    return image, labels


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    """Te-3: every class in the truth; Te-4: only material and pore (background, inclusion NaN when clean)."""
    root = tmp_path / "data"
    rng = np.random.default_rng(3)
    for split, flipped in SPLITS.items():
        write_volume(root / "real" / split / "vol_000.h5", *_two_level_volume(rng, flipped))
    return root


@pytest.fixture
def params(tiny_params: dict):
    tiny_params["robustness"] = {"splits": [f"real/{split}" for split in SPLITS], "gaussian": GAUSSIAN, "poisson": POISSON}
    tiny_params["predict"] = {"tile": 16, "overlap": 0.25, "batch": 4}
    return parse_params(tiny_params)


# ---------------------------------------------------------------- noise transforms
def test_zero_gaussian_is_clean_and_unknown_kinds_or_levels_are_refused() -> None:
    assert noise_transform("gaussian", 0.0, seed=0) is None
    with pytest.raises(ValueError, match="unknown noise kind"):
        noise_transform("speckle", 0.1, seed=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        noise_transform("poisson", 0.0, seed=0)


@pytest.mark.parametrize(("kind", "level"), [("gaussian", 0.1), ("poisson", 50.0)])
def test_same_seed_repeats_the_noise_sequence_and_another_seed_does_not(kind: str, level: float) -> None:
    image = np.random.default_rng(1).random((12, 14))
    first, again, other = (noise_transform(kind, level, seed) for seed in (5, 5, 6))  # type: ignore[arg-type]
    sequence = [first(image), first(image)]
    assert not np.array_equal(sequence[0], sequence[1])  # fresh noise per slice
    np.testing.assert_array_equal(sequence[0], again(image))
    np.testing.assert_array_equal(sequence[1], again(image))
    assert not np.array_equal(sequence[0], other(image))


def test_poisson_noise_is_mean_preserving_with_variance_image_over_photons() -> None:
    photons, grey = 40.0, 0.3
    image = np.full((400, 500), grey)
    noisy = noise_transform("poisson", photons, seed=2)(image)
    standard_error = np.sqrt(grey / photons / image.size)
    assert abs(noisy.mean() - grey) < 5 * standard_error
    assert noisy.var() == pytest.approx(grey / photons, rel=0.03)
    np.testing.assert_allclose(noisy * photons, np.round(noisy * photons), atol=1e-9)  # whole photon counts


def test_gaussian_noise_has_the_requested_std_and_no_bias() -> None:
    image = np.full((300, 300), 0.5)
    noisy = noise_transform("gaussian", 0.07, seed=4)(image)
    assert noisy.std() == pytest.approx(0.07, rel=0.02)
    assert abs(noisy.mean() - 0.5) < 5 * 0.07 / 300


# ---------------------------------------------------------------- the stage
def _iou(rows: list[dict], **match) -> float:
    found = [row["iou"] for row in rows if all(row[key] == value for key, value in match.items())]
    assert len(found) == 1, match
    return found[0]


def test_rows_clean_level_matches_evaluate_and_iou_falls_with_gaussian_noise(tmp_path: Path, data_root: Path, params) -> None:
    out_json = tmp_path / "plots" / "robustness.json"
    rows = evaluate_robustness(MODELS, params, data_root, out_json, tmp_path / "png", device="cpu", log_mlflow=False, progress=False)

    written = json.loads(out_json.read_text())
    assert len(written) == len(MODELS) * len(SPLITS) * (len(GAUSSIAN) + len(POISSON)) * len(CLASS_NAMES)
    assert all(set(row) == {"model", "split", "noise", "level", "class", "iou"} for row in written)
    assert {row["noise"] for row in written} == {"gaussian", "poisson"} and {row["split"] for row in written} == set(SPLITS)
    assert [row["iou"] is None for row in written] == [np.isnan(row["iou"]) for row in rows]  # NaN -> null

    split_dirs = eval_split_dirs([f"real/{split}" for split in SPLITS], data_root)
    for name, (model, window) in MODELS.items():
        clean = evaluate_model(model, window, split_dirs, params.predict, "cpu", progress=False)
        for split in SPLITS:
            by_class = {"model": name, "split": split}
            np.testing.assert_allclose(
                [_iou(rows, **by_class, noise="gaussian", level=0.0, **{"class": cls}) for cls in CLASS_NAMES],
                [clean[split]["iou"][cls] for cls in CLASS_NAMES],
                rtol=1e-12,
            )
            for cls in ("material", "pore"):
                curve = [_iou(rows, **by_class, noise="gaussian", level=level, **{"class": cls}) for level in GAUSSIAN]
                # the same normals scaled up: each voxel's error only grows, so IoU never rises
                assert all(later <= earlier + 1e-12 for earlier, later in zip(curve, curve[1:], strict=False)), (name, split, cls, curve)
                assert curve[-1] < curve[0] - 0.1  # std 0.4 against a 0.125 margin: many voxels change class
                # fewer photons, more noise: the lowest dose scores below the highest
                dose = [_iou(rows, **by_class, noise="poisson", level=level, **{"class": cls}) for level in POISSON]
                assert dose[-1] < dose[0]


def test_a_png_per_class_and_mlflow_run_with_the_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data_root: Path, params) -> None:
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    png_dir = tmp_path / "reports" / "robustness"
    rows = evaluate_robustness(MODELS, params, data_root, tmp_path / "robustness.json", png_dir, device="cpu", progress=False)

    pngs = sorted(png_dir.iterdir())
    assert [path.name for path in pngs] == sorted(f"{split}_{cls}.png" for split in SPLITS for cls in CLASS_NAMES)  # no temporary leftovers
    for path in pngs:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width > 300 and image.height > 200
            assert len(np.unique(np.asarray(image.convert("L")))) > 10  # something is drawn

    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.stage = 'robustness'", output_format="list")
    assert len(runs) == 1
    metrics = runs[0].data.metrics
    defined = [row for row in rows if not np.isnan(row["iou"])]
    assert len(metrics) == len(defined) and len(defined) < len(rows)  # NaN scores are left out
    assert "robustness.SAM-GAN.Te-4.gaussian.0.inclusion" not in metrics  # clean Te-4: no inclusion anywhere
    assert metrics["robustness.SAM-GAN.Te-3.gaussian.0.15.pore"] == pytest.approx(_iou(rows, model="SAM-GAN", split="Te-3", noise="gaussian", level=0.15, **{"class": "pore"}))
    assert metrics["robustness.U-Net.Te-3.poisson.30.material"] == pytest.approx(_iou(rows, model="U-Net", split="Te-3", noise="poisson", level=30.0, **{"class": "material"}))
    artifacts = {Path(item.path).name for item in mlflow.MlflowClient().list_artifacts(runs[0].info.run_id, "robustness")}
    assert {path.name for path in pngs} | {"robustness.json"} <= artifacts
