"""`xctsam eval`: every model on every test split, per class, from whole-volume predictions.

Each labelled volume of a split is segmented by `predict_volume` (tiles, Gaussian blending,
the model's slice context) and compared with its labels slice by slice; one confusion matrix
per split is accumulated over all its volumes, and one per slice is kept for the study's
per-slice mean (metrics.summarise).

Written to metrics/eval.json for DVC, one table per score, NaN (class in neither prediction
nor truth) as null:
    {"iou": {model: {split: {class: v}}}, "dice": {...}, "iou_slice_mean": {...},
     "miou": {model: {split: v}}, "fg_miou": {...}, "mdice": {...}, "fg_mdice": {...},
     "slices": {model: {split: n}}, "voxels": {...}}
and logged as one MLflow run per model (`evaluate.<model>`) with metrics `iou.<split>.<class>`,
`dice.<split>.<class>`, `iou_slice.<split>.<class>`, `miou.<split>`, `fg_miou.<split>`,
`mdice.<split>`, `fg_mdice.<split>` (undefined NaN scores are not logged). Split names are
the folders' last names ('real/Te-1' -> 'Te-1').

The same code scores noisy inputs (robustness) through `transform`, and re-fine-tuned models
(forgetting) through the model names and the `stage` that names their MLflow runs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xctsam.config.eval import PredictConfig
from xctsam.config.params import Params
from xctsam.data.datasets import IntensityWindow
from xctsam.data.split_folders import split_name, split_volumes
from xctsam.data.volumes import Volume
from xctsam.eval.metrics import ConfusionCounter, summarise
from xctsam.eval.predict import SliceTransform, predict_volume
from xctsam.models.base import Segmenter
from xctsam.util.errors import ConfigError, InputError
from xctsam.util.jsonfile import write_json
from xctsam.util.progress import track
from xctsam.util.tracking import log_stage

DEFAULT_OUT = Path("metrics/eval.json")
PER_CLASS_METRICS = {"iou": "iou", "dice": "dice", "iou_slice_mean": "iou_slice"}  # summary key -> MLflow prefix
MEAN_METRICS = ("miou", "fg_miou", "mdice", "fg_mdice")

Models = Mapping[str, tuple[Segmenter, IntensityWindow]]


# ---------------------------------------------------------------- splits
def labelled_volumes(split_dir: Path) -> list[Path]:
    """The split's volumes that carry labels; an error if the folder has none."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise InputError(split_dir, "split folder not found", "make it first (dvc repro) or fix eval.splits in params.yaml")
    labelled = []
    for path in split_volumes(split_dir):
        with Volume(path) as volume:
            if volume.has_labels:
                labelled.append(path)
    if not labelled:
        raise InputError(split_dir, "no labelled volumes (*.h5 with labels) to score", "evaluate labelled test splits only")
    return labelled


def eval_split_dirs(folders: Sequence[str], data_root: Path) -> dict[str, Path]:
    """{split name: folder} for eval.splits, names unique and folders scoreable (checked up front)."""
    names = [split_name(folder) for folder in folders]
    clashes = sorted({name for name in names if names.count(name) > 1})
    if clashes:
        raise ConfigError("params", "eval.splits", f"folders share the name(s) {clashes}; metrics are keyed by the last folder name")
    split_dirs = {name: Path(data_root) / folder for name, folder in zip(names, folders, strict=True)}
    for split_dir in split_dirs.values():
        labelled_volumes(split_dir)
    return split_dirs


# ---------------------------------------------------------------- counting
@dataclass
class SplitCounts:
    """Confusion counts of one model on one split: accumulated, and one matrix per slice."""

    counter: ConfusionCounter = field(default_factory=ConfusionCounter)
    per_slice: list[np.ndarray] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return summarise(self.counter.matrix, self.per_slice)


def count_volume(
    model: Segmenter,
    path: Path,
    window: IntensityWindow,
    config: PredictConfig,
    device: torch.device | str | None,
    counts: SplitCounts,
    transform: SliceTransform | None = None,
) -> None:
    """Predict one labelled volume and add its slices to `counts`."""
    with Volume(path) as volume:
        for z, labels, _ in predict_volume(model, volume, window, config, device, transform=transform, progress=False):
            counts.per_slice.append(counts.counter.update(labels, volume.labels(z, z + 1)[0]))


def evaluate_model(
    model: Segmenter,
    window: IntensityWindow,
    split_dirs: Mapping[str, Path],
    config: PredictConfig,
    device: torch.device | str | None = None,
    *,
    transform: SliceTransform | None = None,
    name: str = "model",
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """{split: metrics.summarise(...)} over every labelled volume of each split folder.

    `transform` is applied to every normalised input slice (robustness noise); `name` labels
    the progress bar.
    """
    results = {}
    for split, split_dir in split_dirs.items():
        counts = SplitCounts()
        volumes = labelled_volumes(split_dir)
        if progress:
            volumes = list(track(volumes, f"eval {name} on {split}", total=len(volumes)))
        for path in volumes:
            count_volume(model, path, window, config, device, counts, transform)
        results[split] = counts.summary()
    return results


# ---------------------------------------------------------------- reporting
def pivot(results: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """{model: {split: {score: v}}} -> {score: {model: {split: v}}}: one DVC table per score."""
    report: dict[str, dict[str, dict[str, Any]]] = {}
    for model, splits in results.items():
        for split, summary in splits.items():
            for score, value in summary.items():
                report.setdefault(score, {}).setdefault(model, {})[split] = value
    return report


def mlflow_metrics(splits: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """Flat MLflow metrics of one model's {split: summary}, NaN scores left out."""
    metrics: dict[str, float] = {}
    for split, summary in splits.items():
        for score, prefix in PER_CLASS_METRICS.items():
            metrics.update({f"{prefix}.{split}.{cls}": value for cls, value in summary[score].items()})
        metrics.update({f"{score}.{split}": summary[score] for score in MEAN_METRICS})
    return {key: float(value) for key, value in metrics.items() if not math.isnan(value)}


def _run_params(params: Params, window: IntensityWindow) -> dict[str, Any]:
    return {"predict": params.predict.model_dump(mode="json"), "eval": params.eval.model_dump(mode="json"), "window": window.to_dict()}


def evaluate_models(
    models: Models,
    params: Params,
    data_root: Path,
    out: Path = DEFAULT_OUT,
    *,
    device: torch.device | str | None = None,
    transform: SliceTransform | None = None,
    stage: str = "evaluate",
    log_mlflow: bool = True,
    progress: bool = True,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Score every (name -> (model, window)) on every eval.splits folder; write `out`, log MLflow.

    Returns the pivoted report as written (with NaN where JSON has null). MLflow runs are named
    `<stage>.<model name>`, one per model, after the JSON is safely written.
    """
    split_dirs = eval_split_dirs(params.eval.splits, data_root)
    results = {
        name: evaluate_model(model, window, split_dirs, params.predict, device, transform=transform, name=name, progress=progress)
        for name, (model, window) in models.items()
    }
    report = pivot(results)
    write_json(Path(out), report)
    if log_mlflow:
        for name, (_, window) in models.items():
            log_stage(f"{stage}.{name}", params=_run_params(params, window), tags={"model": name}, metrics=mlflow_metrics(results[name]))
    return report
