"""`xctsam eval forgetting`: what re-fine-tuning on real scans costs and gains, per class.

SAM-GAN and its fine-tuned variants (SAM-FineReal-Sub, SAM-FineReal) are scored on the
evaluation volumes: every labelled volume of `eval.splits` except the fine-tuning volumes
(`eval.holdout.evaluation_volumes`). Scoring is the same whole-volume prediction and
volume-accumulated IoU as `xctsam eval` (evaluate.count_volume / SplitCounts), restricted to
those volumes. A fine-tuned checkpoint records its fine-tuning volumes; any of them among the
evaluation volumes is refused, so changed params cannot make a model be scored on its own
training data.

Forgetting delta = IoU after (variant) minus IoU before (SAM-GAN), per variant, split and
class; NaN where either is undefined; "mean" per class is over the splits where it is defined.

Outputs: `metrics/forgetting.json` (atomic, NaN as null)
    {"iou": {model: {split: {class: v}}}, "deltas": {variant: {split | "mean": {class: v}}}}
and the MLflow run `forgetting` with metrics `forgetting.<variant>.<split>.<class>` and
`forgetting.<variant>.mean.<class>` (NaN left out), the evaluation volumes as a param.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xctsam.config.eval import PredictConfig
from xctsam.config.params import Params
from xctsam.data.datasets import IntensityWindow
from xctsam.data.split_folders import split_name
from xctsam.eval.evaluate import SplitCounts, count_volume
from xctsam.eval.holdout import check_no_overlap, evaluation_volumes
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
) -> dict[str, SplitScores]:
    """{variant: {split: {class: after - before}, "mean": {class: mean over defined splits}}}.

    before: SAM-GAN's {split: {class: iou}}; after: {variant: {split: {class: iou}}} on the
    same splits. NaN (JSON null) in either makes that delta NaN, and it is left out of the mean.
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
            cls: _mean_defined([scores[cls] for scores in per_split.values()]) for cls in classes
        }
        deltas[variant] = {**per_split, "mean": mean}
    return deltas


# ---------------------------------------------------------------- scoring on chosen volumes
def score_volumes(
    model: Segmenter,
    window: IntensityWindow,
    volumes: Mapping[str, Sequence[Path]],
    config: PredictConfig,
    device: torch.device | str | None = None,
    *,
    name: str = "model",
    progress: bool = True,
) -> SplitScores:
    """{split name: {class: IoU}} accumulated over the given volumes of each split folder."""
    scores: SplitScores = {}
    for folder, paths in volumes.items():
        counts = SplitCounts()
        chosen = (
            track(paths, f"forgetting: {name} on {split_name(folder)}", total=len(paths))
            if progress
            else paths
        )
        for path in chosen:
            count_volume(model, path, window, config, device, counts)
        scores[split_name(folder)] = {
            cls: float(value) for cls, value in counts.summary()["iou"].items()
        }
    return scores


def _check_model_volumes(meta: Mapping, volumes: Mapping[str, Sequence[Path]]) -> None:
    """A fine-tuned checkpoint must not be scored on a volume it was fine-tuned on."""
    tuned = meta.get("finetune", {}).get("volumes", [])
    check_no_overlap((Path(path) for path in tuned), volumes)


# ---------------------------------------------------------------- reporting
def mlflow_metrics(deltas: Mapping[str, SplitScores]) -> dict[str, float]:
    """forgetting.<variant>.<split | mean>.<class>, NaN left out."""
    return {
        f"forgetting.{variant}.{split}.{cls}": float(value)
        for variant, splits in deltas.items()
        for split, classes in splits.items()
        for cls, value in classes.items()
        if not math.isnan(value)
    }


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
) -> dict[str, dict]:
    """Score SAM-GAN and its fine-tuned variants (name -> best.pt) on the evaluation volumes;
    write `out` and log the MLflow run. Returns the report as written (NaN where JSON has null)."""
    from xctsam.models.factory import load_segmenter

    if BASELINE not in models:
        raise ValueError(f"models must include the baseline {BASELINE!r} (got {', '.join(models)})")
    volumes = evaluation_volumes(params.finetune.volumes, params.eval.splits, data_root)
    iou: dict[str, SplitScores] = {}
    for name, path in models.items():
        model, window, meta = load_segmenter(Path(path))
        _check_model_volumes(meta, volumes)
        iou[name] = score_volumes(
            model, window, volumes, params.predict, device, name=name, progress=progress
        )
    variants = {name: scores for name, scores in iou.items() if name != BASELINE}
    report = {"iou": iou, "deltas": forgetting_deltas(iou[BASELINE], variants)}
    write_json(Path(out), report)
    if log_mlflow:
        log_stage(STAGE, params=_run_params(params, volumes, models), metrics=mlflow_metrics(report["deltas"]))
    return report
