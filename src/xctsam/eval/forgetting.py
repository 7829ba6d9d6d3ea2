"""`xctsam eval forgetting`: what re-fine-tuning on real scans costs and gains, per class.

SAM-GAN and its fine-tuned variants (SAM-FineReal-Sub, SAM-FineReal) are scored on the
evaluation volumes: every labelled volume of `eval.splits` except the fine-tuning volumes
(`eval.holdout.evaluation_volumes`). Scoring is the same whole-volume prediction and
volume-accumulated IoU as `xctsam eval` (evaluate.count_volume / SplitCounts), restricted to
those volumes. A fine-tuned checkpoint records its fine-tuning volumes; any of them among the
evaluation volumes is refused, so changed params cannot make a model be scored on its own
training data.

Forgetting delta = IoU after (variant) minus IoU before (SAM-GAN), per variant, split and
class; NaN where either is undefined; "mean" per class is over the splits where it is defined,
except the fine-tuning splits: their held-out volumes measure adaptation, the other splits
forgetting (or transfer), as the study reported (it fine-tuned on Te-6 and averaged the change
over the other test splits). Each delta and mean has a paired bootstrap interval (eval.bootstrap:
both models scored on the same slices, resampled alike; a mean's resamples average its splits').

Outputs: `metrics/forgetting.json` (atomic, NaN as null)
    {"iou": {model: {split: {class: v}}}, "deltas": {variant: {split | "mean": {class: v}}},
     "intervals": {variant: {split | "mean": {class: {low, high, significant}}}},
     "roles": {split: "adaptation" | "transfer"}, "mean_of": [the splits "mean" averages]}
and the MLflow run `forgetting` with metrics `forgetting.<variant>.<split>.<class>` and
`forgetting.<variant>.mean.<class>` (with `_low` / `_high`; NaN left out), the evaluation
volumes as a param.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xctsam import CLASS_NAMES
from xctsam.config.eval import BootstrapConfig, PredictConfig
from xctsam.config.params import Params
from xctsam.data.datasets import IntensityWindow
from xctsam.data.split_folders import split_name
from xctsam.eval.bootstrap import percentile_interval, resampled_iou
from xctsam.eval.evaluate import SplitCounts, count_volume
from xctsam.eval.holdout import check_no_overlap, evaluation_volumes
from xctsam.eval.label_cache import LabelCache
from xctsam.eval.metrics import iou_dice
from xctsam.models.base import Segmenter
from xctsam.util.jsonfile import write_json
from xctsam.util.progress import track
from xctsam.util.tracking import log_stage

BASELINE = "SAM-GAN"
DEFAULT_OUT = Path("metrics/forgetting.json")
STAGE = "forgetting"

ClassScores = dict[str, float]
SplitScores = dict[str, ClassScores]


# ---------------------------------------------------------------- deltas
def _delta(after: float, before: float) -> float:
    return math.nan if math.isnan(after) or math.isnan(before) else after - before


def _mean_defined(values: Sequence[float]) -> float:
    defined = [value for value in values if not math.isnan(value)]
    return float(np.mean(defined)) if defined else math.nan


def forgetting_deltas(
    before: Mapping[str, Mapping[str, float]],
    after: Mapping[str, Mapping[str, Mapping[str, float]]],
    averaged: Sequence[str] | None = None,
) -> dict[str, SplitScores]:
    """{variant: {split: {class: after - before}, "mean": {class: mean over defined splits}}}.

    before: SAM-GAN's {split: {class: iou}}; after: {variant: {split: {class: iou}}} on the
    same splits. NaN (JSON null) in either makes that delta NaN, and it is left out of the mean.
    `averaged`: the splits the mean is over (default all).
    """
    deltas: dict[str, SplitScores] = {}
    for variant, splits in after.items():
        per_split = {
            split: {
                cls: _delta(float(value), float(before[split][cls]))
                for cls, value in classes.items()
            }
            for split, classes in splits.items()
        }
        classes = list(next(iter(per_split.values()), {}))
        mean = {
            cls: _mean_defined([scores[cls] for split, scores in per_split.items() if averaged is None or split in averaged])
            for cls in classes
        }
        deltas[variant] = {**per_split, "mean": mean}
    return deltas


# ---------------------------------------------------------------- scoring on chosen volumes
def count_volumes(
    model: Segmenter,
    window: IntensityWindow,
    volumes: Mapping[str, Sequence[Path]],
    config: PredictConfig,
    device: torch.device | str | None = None,
    *,
    name: str = "model",
    progress: bool = True,
    cache: LabelCache | None = None,
) -> dict[str, SplitCounts]:
    """{split name: its confusion counts} over the given volumes of each split folder."""
    counted: dict[str, SplitCounts] = {}
    for folder, paths in volumes.items():
        counts = SplitCounts()
        chosen = (
            track(paths, f"forgetting: {name} on {split_name(folder)}", total=len(paths))
            if progress
            else paths
        )
        for path in chosen:
            count_volume(model, path, window, config, device, counts, cache=cache)
        counted[split_name(folder)] = counts
    return counted


def _iou(counts: Mapping[str, SplitCounts]) -> SplitScores:
    return {split: {cls: float(value) for cls, value in c.summary()["iou"].items()} for split, c in counts.items()}


def delta_intervals(
    before: Mapping[str, SplitCounts], after: Mapping[str, SplitCounts], averaged: Sequence[str], config: BootstrapConfig, seed: int
) -> dict[str, dict[str, dict[str, Any]]]:
    """{split | "mean": {class: {low, high, significant}}} of after - before, paired per split;
    the mean's resamples average the `averaged` splits' resampled deltas (NaN-aware)."""
    samples = {}
    for split, counts in before.items():
        _, weights = counts.weights(config, seed)
        samples[split] = resampled_iou(np.stack(after[split].per_slice), weights) - resampled_iou(np.stack(counts.per_slice), weights)
    point = {split: iou_dice(after[split].counter.matrix)[0] - iou_dice(c.counter.matrix)[0] for split, c in before.items()}
    chosen = [split for split in before if split in averaged]
    if chosen:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a class undefined on every split: NaN
            samples["mean"] = np.nanmean(np.stack([samples[split] for split in chosen]), axis=0)
            point["mean"] = np.nanmean(np.stack([point[split] for split in chosen]), axis=0)
    intervals = {}
    for key, drawn in samples.items():
        per_class = [percentile_interval(float(point[key][c]), drawn[:, c], config.level) for c in range(len(CLASS_NAMES))]
        intervals[key] = {cls: {"low": i.low, "high": i.high, "significant": i.significant} for cls, i in zip(CLASS_NAMES, per_class, strict=True)}
    return intervals


def _check_model_volumes(meta: Mapping, volumes: Mapping[str, Sequence[Path]]) -> None:
    """A fine-tuned checkpoint must not be scored on a volume it was fine-tuned on."""
    tuned = meta.get("finetune", {}).get("volumes", [])
    check_no_overlap((Path(path) for path in tuned), volumes)


# ---------------------------------------------------------------- reporting
def mlflow_metrics(deltas: Mapping[str, SplitScores], intervals: Mapping[str, Mapping[str, Mapping[str, Mapping[str, Any]]]] | None = None) -> dict[str, float]:
    """forgetting.<variant>.<split | mean>.<class> and its _low / _high bounds, NaN left out."""
    metrics = {}
    for variant, splits in deltas.items():
        for split, classes in splits.items():
            for cls, value in classes.items():
                key = f"forgetting.{variant}.{split}.{cls}"
                metrics[key] = value
                bounds = (intervals or {}).get(variant, {}).get(split, {}).get(cls)
                if bounds is not None:
                    metrics.update({f"{key}_low": bounds["low"], f"{key}_high": bounds["high"]})
    return {key: float(value) for key, value in metrics.items() if not math.isnan(value)}


def _run_params(params: Params, volumes: Mapping[str, Sequence[Path]], models: Mapping[str, Path]) -> dict[str, Any]:
    return {
        "predict": params.predict.model_dump(mode="json"),
        "eval": params.eval.model_dump(mode="json"),
        "finetune": params.finetune.model_dump(mode="json"),
        "models": {name: str(path) for name, path in models.items()},
        "evaluation_volumes": {
            split_name(folder): [path.name for path in paths] for folder, paths in volumes.items()
        },
    }


def evaluate_forgetting(
    params: Params,
    data_root: Path,
    models: Mapping[str, Path],
    out: Path = DEFAULT_OUT,
    *,
    device: torch.device | str | None = None,
    log_mlflow: bool = True,
    progress: bool = True,
    cache: LabelCache | None = None,
) -> dict[str, dict]:
    """Score SAM-GAN and its fine-tuned variants (name -> best.pt) on the evaluation volumes;
    write `out` and log the MLflow run. Returns the report as written (NaN where JSON has null)."""
    from xctsam.models.factory import load_segmenter

    if BASELINE not in models:
        raise ValueError(f"models must include the baseline {BASELINE!r} (got {', '.join(models)})")
    volumes = evaluation_volumes(params.finetune.volumes, params.eval.splits, data_root)
    counts: dict[str, dict[str, SplitCounts]] = {}
    for name, path in models.items():
        model, window, meta = load_segmenter(Path(path))
        _check_model_volumes(meta, volumes)
        counts[name] = count_volumes(model, window, volumes, params.predict, device, name=name, progress=progress, cache=cache)
    iou = {name: _iou(by_split) for name, by_split in counts.items()}
    tuned = {split_name(folder) for folder in params.finetune.volumes}
    roles = {split: "adaptation" if split in tuned else "transfer" for split in iou[BASELINE]}
    # the mean is over the splits not fine-tuned on; when every split was (the per-split design:
    # a volume of each), over all of them, which then measures adaptation
    transfer = [split for split, role in roles.items() if role == "transfer"] or list(roles)
    variants = {name: scores for name, scores in iou.items() if name != BASELINE}
    intervals = {
        name: delta_intervals(counts[BASELINE], counts[name], transfer, params.eval.bootstrap, params.seed) for name in variants
    }
    report = {"iou": iou, "deltas": forgetting_deltas(iou[BASELINE], variants, transfer), "intervals": intervals, "roles": roles, "mean_of": transfer}
    write_json(Path(out), report)
    if log_mlflow:
        log_stage(STAGE, params=_run_params(params, volumes, models), metrics=mlflow_metrics(report["deltas"], intervals))
    return report
