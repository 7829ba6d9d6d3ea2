"""`xctsam eval robustness`: IoU per class as noise is added to the models' inputs.

Every model is scored on the `robustness.splits` test splits (whole-volume prediction through
`evaluate_model`) with noise added to each normalised input slice, at every level of
params `robustness`:

- gaussian: additive, standard deviation in units of the model's [0, 1] window (0 = clean);
- poisson: photon-counting noise at a dose of `level` photons at full scale,
  poisson(image * level) / level (mean-preserving; fewer photons = more noise).

Noise is drawn from a numpy Generator seeded by params `seed`, and one fresh transform is
made for every (model, split set, kind, level), so every model sees exactly the same noisy
slices and a rerun repeats. The Gaussian draws at different levels are the same standard
normals scaled, so a curve's steps show the level's effect, not a new draw's luck.

Outputs (all written atomically, before anything is logged):
- `plots/robustness.json`: a flat JSON list of records {model, split, noise, level, class,
  iou} (NaN as null), a series for `dvc plots show`;
- `reports/robustness/<split>_<class>.png`: IoU against noise level, one line per model,
  one panel per noise kind;
- MLflow run `robustness` with metrics `robustness.<model>.<split>.<noise>.<level>.<class>`
  (undefined NaN scores left out) and the PNGs as artifacts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from xctsam import CLASS_NAMES
from xctsam.config.eval import PredictConfig, RobustnessConfig
from xctsam.config.params import Params
from xctsam.data.datasets import IntensityWindow
from xctsam.eval.evaluate import Models, eval_split_dirs, evaluate_model
from xctsam.eval.label_cache import LabelCache
from xctsam.models.base import Segmenter
from xctsam.util.atomic import atomic_path
from xctsam.util.jsonfile import write_json
from xctsam.util.tracking import log_stage

NoiseKind = Literal["gaussian", "poisson"]
NOISE_KINDS: tuple[NoiseKind, ...] = ("gaussian", "poisson")
DEFAULT_JSON = Path("plots/robustness.json")
DEFAULT_PNG_DIR = Path("reports/robustness")
STAGE = "robustness"
AXIS_LABELS = {"gaussian": "Gaussian noise std (fraction of window)", "poisson": "photons at full scale (dose)"}

Row = dict[str, Any]


# ---------------------------------------------------------------- noise
def noise_transform(kind: NoiseKind, level: float, seed: int) -> Callable[[np.ndarray], np.ndarray] | None:
    """A seeded per-slice noise function for `predict`'s transform hook; None for clean input.

    Each call draws fresh noise from the transform's own Generator, so a new transform with
    the same seed replays the same sequence of noisy slices.
    """
    if kind == "gaussian":
        if level < 0:
            raise ValueError(f"gaussian std must be >= 0, got {level}")
        return None if level == 0 else _gaussian(level, np.random.default_rng(seed))
    if kind == "poisson":
        if level <= 0:
            raise ValueError(f"poisson photon count must be > 0, got {level}")
        return _poisson(level, np.random.default_rng(seed))
    raise ValueError(f"unknown noise kind {kind!r} (known: {', '.join(NOISE_KINDS)})")


def _gaussian(std: float, rng: np.random.Generator) -> Callable[[np.ndarray], np.ndarray]:
    def add_gaussian(image: np.ndarray) -> np.ndarray:
        # standard normals scaled: the same seed gives the same pattern at every level
        return image + std * rng.standard_normal(image.shape)

    return add_gaussian


def _poisson(photons: float, rng: np.random.Generator) -> Callable[[np.ndarray], np.ndarray]:
    def count_photons(image: np.ndarray) -> np.ndarray:
        # negative grey values (outside the window) carry no photons
        return rng.poisson(np.clip(image, 0.0, None) * photons) / photons

    return count_photons


def noise_levels(config: RobustnessConfig) -> list[tuple[NoiseKind, float]]:
    """Every (kind, level) of the `robustness` section, in the order given."""
    return [("gaussian", float(level)) for level in config.gaussian] + [("poisson", float(level)) for level in config.poisson]


def level_key(level: float) -> str:
    """0.02 -> '0.02', 1000.0 -> '1000': a level as it appears in metric names and files."""
    return f"{level:g}"


# ---------------------------------------------------------------- scoring
def score_model(
    name: str,
    model: Segmenter,
    window: IntensityWindow,
    split_dirs: Mapping[str, Path],
    levels: Sequence[tuple[NoiseKind, float]],
    predict: PredictConfig,
    seed: int,
    device: torch.device | str | None,
    progress: bool,
    cache: LabelCache | None = None,
) -> list[Row]:
    """Rows {model, split, noise, level, class, iou} of one model at every (kind, level) of `levels`."""
    rows: list[Row] = []
    for kind, level in levels:
        transform = noise_transform(kind, level, seed)
        label = f"{name} {kind} {level_key(level)}"
        results = evaluate_model(model, window, split_dirs, predict, device, transform=transform, name=label, progress=progress, cache=cache)
        for split, summary in results.items():
            rows.extend(
                {"model": name, "split": split, "noise": kind, "level": level, "class": cls, "iou": float(iou)}
                for cls, iou in summary["iou"].items()
            )
    return rows


# ---------------------------------------------------------------- outputs
def write_rows(rows: Sequence[Row], out_json: Path) -> None:
    write_json(Path(out_json), list(rows))


def _select(rows: Sequence[Row], **match: Any) -> list[Row]:
    return [row for row in rows if all(row[key] == value for key, value in match.items())]


def _draw_panel(axes: Any, rows: Sequence[Row], kind: NoiseKind, models: Sequence[str]) -> None:
    """IoU against level, one line per model; Poisson on a log axis with noisier to the right."""
    for model in models:
        points = sorted((row["level"], row["iou"]) for row in _select(rows, noise=kind, model=model))
        if points:
            levels, ious = zip(*points, strict=True)
            axes.plot(levels, ious, marker="o", label=model)
    if kind == "poisson":
        axes.set_xscale("log")
        axes.invert_xaxis()
    axes.set_xlabel(AXIS_LABELS[kind])
    axes.set_ylabel("IoU")
    axes.set_ylim(-0.02, 1.02)
    axes.grid(True, alpha=0.3)
    axes.legend()


def plot_class(rows: Sequence[Row], split: str, cls: str, models: Sequence[str], out_png: Path) -> None:
    """One PNG: `cls` IoU on `split` against each noise kind's levels, one line per model."""
    # Figure without pyplot: no global backend state, renders with Agg in any process
    from matplotlib.figure import Figure

    selected = _select(rows, split=split, **{"class": cls})
    kinds = [kind for kind in NOISE_KINDS if _select(selected, noise=kind)]
    figure = Figure(figsize=(5 * max(len(kinds), 1), 4), layout="constrained")
    panels = figure.subplots(1, max(len(kinds), 1), squeeze=False)[0]
    for axes, kind in zip(panels, kinds, strict=False):
        _draw_panel(axes, selected, kind, models)
    figure.suptitle(f"{cls} IoU on {split}: {' vs '.join(models)}")
    with atomic_path(out_png) as tmp:
        figure.savefig(tmp, format="png", dpi=100)


def png_path(png_dir: Path, split: str, cls: str) -> Path:
    return Path(png_dir) / f"{split}_{cls}.png"


def write_plots(rows: Sequence[Row], models: Sequence[str], splits: Sequence[str], png_dir: Path) -> list[Path]:
    """A PNG per split and class; returns their paths."""
    paths = []
    for split in splits:
        for cls in CLASS_NAMES:
            path = png_path(png_dir, split, cls)
            plot_class(rows, split, cls, models, path)
            paths.append(path)
    return paths


def mlflow_metrics(rows: Sequence[Row]) -> dict[str, float]:
    """`robustness.<model>.<split>.<noise>.<level>.<class>` -> IoU, NaN left out."""
    return {
        f"{STAGE}.{row['model']}.{row['split']}.{row['noise']}.{level_key(row['level'])}.{row['class']}": row["iou"]
        for row in rows
        if not math.isnan(row["iou"])
    }


def _run_params(params: Params) -> dict[str, Any]:
    return {"seed": params.seed, "robustness": params.robustness.model_dump(mode="json"), "predict": params.predict.model_dump(mode="json")}


# ---------------------------------------------------------------- stage
def evaluate_robustness(
    models: Models,
    params: Params,
    data_root: Path,
    out_json: Path = DEFAULT_JSON,
    png_dir: Path = DEFAULT_PNG_DIR,
    *,
    device: torch.device | str | None = None,
    log_mlflow: bool = True,
    progress: bool = True,
    cache: LabelCache | None = None,
) -> list[Row]:
    """Score every (name -> (model, window)) on robustness.splits at every noise level.

    Writes `out_json` (flat records) and a PNG per split and class under `png_dir`, then logs
    the MLflow run `robustness`. Returns the rows (NaN where the JSON has null).
    """
    split_dirs = eval_split_dirs(params.robustness.splits, data_root)
    rows = [row for name, (model, window) in models.items() for row in score_model(name, model, window, split_dirs, noise_levels(params.robustness), params.predict, params.seed, device, progress, cache)]
    write_rows(rows, out_json)
    pngs = write_plots(rows, list(models), list(split_dirs), png_dir)
    if log_mlflow:
        log_stage(STAGE, params=_run_params(params), tags={"models": ",".join(models)}, metrics=mlflow_metrics(rows), artifacts=[Path(out_json), *pngs], artifact_path=STAGE)
    return rows
