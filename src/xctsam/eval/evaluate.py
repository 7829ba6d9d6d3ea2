"""`xctsam eval`: every model on every test split, per class, from whole-volume predictions.

Each labelled volume of a split is segmented by `predict_volume` (tiles, Gaussian blending,
the model's slice context) and compared with its labels slice by slice; one confusion matrix
per split is accumulated over all its volumes, and one per slice is kept for the study's
per-slice mean (metrics.summarise).

Every IoU carries a bootstrap interval (eval.bootstrap, seeded with params.seed; eval.bootstrap
explains the unit), and each eval.compare pair (a, b) gets IoU(a) - IoU(b) per split and class
with a paired interval: both models are scored on the same slices and resampled alike.

Written to metrics/eval.json for DVC, one table per score, NaN (class in neither prediction
nor truth) as null:
    {"iou": {model: {split: {class: v}}}, "iou_ci": {model: {split: {class: [low, high]}}},
     "dice": {...}, "iou_slice_mean": {...}, "miou": {model: {split: v}}, "fg_miou": {...},
     "mdice": {...}, "fg_mdice": {...}, "slices": {model: {split: n}}, "voxels": {...},
     "bootstrap_unit": {model: {split: "volume" | "slice"}},
     "differences": {"a - b": {split: {class: {value, low, high, significant}}}},
     "bootstrap": {resamples, level, seed}}
and logged as one MLflow run per model (`evaluate.<model>`) with metrics `iou.<split>.<class>`,
`iou_low.<split>.<class>`, `iou_high.<split>.<class>`, `dice.<split>.<class>`,
`iou_slice.<split>.<class>`, `miou.<split>`, `fg_miou.<split>`, `mdice.<split>`,
`fg_mdice.<split>` (undefined NaN scores are not logged), and the differences in the first
model's run as `diff.<b>.<split>.<class>` (with `_low` / `_high`). Split names are the folders'
last names ('real/Te-1' -> 'Te-1').

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

from xctsam import CLASS_NAMES
from xctsam.config.defects import DefectsConfig
from xctsam.config.eval import BootstrapConfig, PredictConfig
from xctsam.config.params import Params
from xctsam.data.datasets import IntensityWindow
from xctsam.data.split_folders import split_name, split_volumes
from xctsam.data.volumes import Volume
from xctsam.eval.bootstrap import (
    Interval,
    bootstrap_weights,
    difference_intervals,
    iou_intervals,
    resampled_unit,
)
from xctsam.eval.defects import PORE, DefectReport, combined, defect_scores
from xctsam.eval.label_cache import LabelCache
from xctsam.eval.metrics import ConfusionCounter, summarise
from xctsam.eval.predict import SliceTransform, predict_volume
from xctsam.models.base import Segmenter
from xctsam.util.errors import ConfigError, InputError
from xctsam.util.jsonfile import write_json
from xctsam.util.progress import track
from xctsam.util.tracking import log_stage

DEFAULT_OUT = Path("metrics/eval.json")
DEFAULT_DEFECTS_OUT = Path("metrics/defects.json")
DEFECT_SCORES = ("f1", "recall", "precision")
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
    volume_of_slice: list[int] = field(default_factory=list)  # 0, 1, ...: the volume each slice is of
    defects: list[DefectReport] = field(default_factory=list)  # one per volume, when scored

    def defect_report(self) -> DefectReport:
        """The split's per-defect scores: every volume's defects, and porosity (pore / part
        voxels) of the truth and of the prediction from the pooled counts."""
        matrix = self.counter.matrix
        truth_part, predicted_part = matrix[1:, :].sum(), matrix[:, 1:].sum()
        true = matrix[PORE, :].sum() / truth_part if truth_part else math.nan
        predicted = matrix[:, PORE].sum() / predicted_part if predicted_part else math.nan
        return combined(self.defects, float(true), float(predicted))

    def summary(self) -> dict[str, Any]:
        return summarise(self.counter.matrix, self.per_slice)

    def weights(self, config: BootstrapConfig, seed: int) -> tuple[str, np.ndarray]:
        """(the unit resampled, the bootstrap weights of these slices); the same for every
        model scored on the same volumes, which pairs their differences."""
        unit = resampled_unit(self.volume_of_slice, config.unit, config.min_volumes)
        return unit, bootstrap_weights(self.volume_of_slice, unit, config.resamples, seed)

    def summary_with_intervals(self, config: BootstrapConfig, seed: int) -> dict[str, Any]:
        """`summary` plus iou_ci {class: [low, high]} and the bootstrap_unit used."""
        unit, weights = self.weights(config, seed)
        intervals = iou_intervals(np.stack(self.per_slice), weights, config.level)
        return {**self.summary(), "iou_ci": {cls: [i.low, i.high] for cls, i in zip(CLASS_NAMES, intervals, strict=True)}, "bootstrap_unit": unit}


def paired_differences(a: Mapping[str, SplitCounts], b: Mapping[str, SplitCounts], config: BootstrapConfig, seed: int) -> dict[str, dict[str, dict[str, Any]]]:
    """{split: {class: {value, low, high, significant}}} of IoU(a) - IoU(b), resampled alike."""
    differences = {}
    for split, counts in a.items():
        if counts.volume_of_slice != b[split].volume_of_slice:
            raise ValueError(f"{split}: the two models were scored on different slices; cannot pair them")
        _, weights = counts.weights(config, seed)
        intervals = difference_intervals(np.stack(counts.per_slice), np.stack(b[split].per_slice), weights, config.level)
        differences[split] = {cls: _interval_entry(i) for cls, i in zip(CLASS_NAMES, intervals, strict=True)}
    return differences


def _interval_entry(interval: Interval) -> dict[str, Any]:
    return {**interval.to_dict(), "significant": interval.significant}


def count_volume(
    model: Segmenter,
    path: Path,
    window: IntensityWindow,
    config: PredictConfig,
    device: torch.device | str | None,
    counts: SplitCounts,
    transform: SliceTransform | None = None,
    defects: DefectsConfig | None = None,
    cache: LabelCache | None = None,
) -> None:
    """Predict one labelled volume and add its slices to `counts` (as the next volume); with
    `defects`, also its per-defect scores (which need the whole predicted volume in memory).
    With `cache`, an untransformed prediction is read from it when stored there, and stored."""
    volume_index = counts.volume_of_slice[-1] + 1 if counts.volume_of_slice else 0
    with Volume(path) as volume:
        predicted = np.zeros(volume.shape, dtype=np.uint8) if defects is not None else None
        if cache is not None and transform is None:
            slices = cache.predictions(model, volume, window, config, device)
        else:
            slices = ((z, labels) for z, labels, _ in predict_volume(model, volume, window, config, device, transform=transform, progress=False))
        for z, labels in slices:
            counts.per_slice.append(counts.counter.update(labels, volume.labels(z, z + 1)[0]))
            counts.volume_of_slice.append(volume_index)
            if predicted is not None:
                predicted[z] = labels
        if predicted is not None:
            counts.defects.append(defect_scores(predicted, volume.labels(), defects, volume.attrs.get("voxel_size_mm")))


def count_splits(
    model: Segmenter,
    window: IntensityWindow,
    split_dirs: Mapping[str, Path],
    config: PredictConfig,
    device: torch.device | str | None = None,
    *,
    transform: SliceTransform | None = None,
    name: str = "model",
    progress: bool = True,
    defects: DefectsConfig | None = None,
    cache: LabelCache | None = None,
) -> dict[str, SplitCounts]:
    """{split: SplitCounts} over every labelled volume of each split folder.

    `transform` is applied to every normalised input slice (robustness noise); `name` labels
    the progress bar; `defects` adds per-defect scores.
    """
    results = {}
    for split, split_dir in split_dirs.items():
        counts = SplitCounts()
        volumes = labelled_volumes(split_dir)
        if progress:
            volumes = list(track(volumes, f"eval {name} on {split}", total=len(volumes)))
        for path in volumes:
            count_volume(model, path, window, config, device, counts, transform, defects, cache)
        results[split] = counts
    return results


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
    cache: LabelCache | None = None,
) -> dict[str, dict[str, Any]]:
    """{split: metrics.summarise(...)} over every labelled volume of each split folder."""
    counts = count_splits(model, window, split_dirs, config, device, transform=transform, name=name, progress=progress, cache=cache)
    return {split: split_counts.summary() for split, split_counts in counts.items()}


# ---------------------------------------------------------------- reporting
def pivot(results: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """{model: {split: {score: v}}} -> {score: {model: {split: v}}}: one DVC table per score."""
    report: dict[str, dict[str, dict[str, Any]]] = {}
    for model, splits in results.items():
        for split, summary in splits.items():
            for score, value in summary.items():
                report.setdefault(score, {}).setdefault(model, {})[split] = value
    return report


def mlflow_metrics(splits: Mapping[str, Mapping[str, Any]], differences: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, float]:
    """Flat MLflow metrics of one model's {split: summary} and its {b: {split: {class: entry}}}
    differences to other models, NaN scores left out."""
    metrics: dict[str, float] = {}
    for split, summary in splits.items():
        for score, prefix in PER_CLASS_METRICS.items():
            metrics.update({f"{prefix}.{split}.{cls}": value for cls, value in summary[score].items()})
        for cls, (low, high) in summary.get("iou_ci", {}).items():
            metrics.update({f"iou_low.{split}.{cls}": low, f"iou_high.{split}.{cls}": high})
        metrics.update({f"{score}.{split}": summary[score] for score in MEAN_METRICS})
    for other, by_split in (differences or {}).items():
        for split, classes in by_split.items():
            for cls, entry in classes.items():
                key = f"diff.{other}.{split}.{cls}"
                metrics.update({key: entry["value"], f"{key}_low": entry["low"], f"{key}_high": entry["high"]})
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
    defects_out: Path | None = None,
    cache: LabelCache | None = None,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Score every (name -> (model, window)) on every eval.splits folder; write `out`, log MLflow.

    Returns the pivoted report as written (with NaN where JSON has null). With `defects_out`,
    every defect is scored too (params `defects`; eval.defects) into that file:
    {"config": the defects section, "scores": {model: {split: DefectReport}}}, and recall by
    size bin beside it (<stem>_recall.json, rows of `recall_by_size`). MLflow runs are
    named `<stage>.<model name>`, one per model, after the JSON files are safely written.
    """
    split_dirs = eval_split_dirs(params.eval.splits, data_root)
    bootstrap, seed = params.eval.bootstrap, params.seed
    scored_defects = params.defects if defects_out is not None else None
    counts = {
        name: count_splits(model, window, split_dirs, params.predict, device, transform=transform, name=name, progress=progress, defects=scored_defects, cache=cache)
        for name, (model, window) in models.items()
    }
    defects = {name: {split: c.defect_report().as_dict() for split, c in splits.items()} for name, splits in counts.items()} if defects_out else {}
    results = {name: {split: c.summary_with_intervals(bootstrap, seed) for split, c in splits.items()} for name, splits in counts.items()}
    compared = [(a, b) for a, b in params.eval.compare if a in counts and b in counts]
    differences = {f"{a} - {b}": paired_differences(counts[a], counts[b], bootstrap, seed) for a, b in compared}
    report = {**pivot(results), "differences": differences, "bootstrap": {"resamples": bootstrap.resamples, "level": bootstrap.level, "seed": seed}}
    write_json(Path(out), report)
    if defects_out is not None:
        write_json(Path(defects_out), {"config": params.defects.model_dump(mode="json"), "scores": defects})
        write_json(Path(defects_out).with_name(f"{Path(defects_out).stem}_recall.json"), recall_by_size(defects))
    if log_mlflow:
        for name, (_, window) in models.items():
            mine = {b: differences[f"{a} - {b}"] for a, b in compared if a == name}
            metrics = {**mlflow_metrics(results[name], mine), **defect_metrics(defects.get(name, {}))}
            log_stage(f"{stage}.{name}", params=_run_params(params, window), tags={"model": name}, metrics=metrics)
    return report


def recall_by_size(defects: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Rows {model, split, class, diameter, recall, n_true} per size bin (diameter: its lower
    edge): the DVC plot of detection against defect size."""
    return [
        {"model": model, "split": split, "class": cls, "diameter": b["low"], "recall": b["recall"], "n_true": b["n_true"]}
        for model, by_split in defects.items()
        for split, report in by_split.items()
        for cls, locations in report["classes"].items()
        for b in locations["all"]["bins"]
    ]


def defect_metrics(by_split: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """defects.<split>.<class>.<f1|recall|precision> (all defects), the same with .surface /
    .internal before the score, recall by size bin (.recall.bin<i>), and porosity.<split>.<true|pred>."""
    metrics: dict[str, float] = {}
    for split, report in by_split.items():
        for cls, locations in report["classes"].items():
            for location, score in locations.items():
                where = f"defects.{split}.{cls}" if location == "all" else f"defects.{split}.{cls}.{location}"
                metrics.update({f"{where}.{name}": score[name] for name in DEFECT_SCORES})
            metrics.update({f"defects.{split}.{cls}.recall.bin{i}": b["recall"] for i, b in enumerate(locations["all"]["bins"])})
        metrics.update({f"porosity.{split}.true": report["porosity_true"], f"porosity.{split}.pred": report["porosity_pred"]})
    return {key: float(value) for key, value in metrics.items() if not math.isnan(value)}
