"""One trial: train the model with the trial's values and score it on held-out validation slices.

The trial's params are the study's params with `tune.trial` (cheaper trials) and then the
trial's drawn values set. The objective is `tune.metric` of the validation slices held out
of the training splits (train.<model>.val_volumes): a Te split is never looked at, so the
search cannot overfit the test set. The metric is reported to the pruner after every epoch;
the trial's value is its best epoch's.

Each trial trains into <trials_dir>/trial-<n>; a retried trial (its worker was killed) uses its
original trial's folder and so resumes from that training's last checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xctsam.config.params import Params
from xctsam.tune.space import apply_values

if TYPE_CHECKING:
    from xctsam.tune.mlflow_log import TrialRun


def best_value(history: Sequence[dict[str, Any]], metric: str, direction: str) -> float:
    """The best defined value of `metric` over the epochs (NaN when no epoch defined it)."""
    values = [float(entry[metric]) for entry in history if metric in entry and not math.isnan(float(entry[metric]))]
    if not values:
        return math.nan
    return max(values) if direction == "maximize" else min(values)


def epochs_of(params: Params) -> int:
    """Validations one trial makes (the pruner's resource): one per epoch_steps and at the end."""
    config = getattr(params.train, params.tune.model)
    return math.ceil(config.steps / config.epoch_steps)


def trial_params(params: Params, values: dict[str, Any], source: Path | str = "tune") -> Params:
    return apply_values(apply_values(params, params.tune.trial, source), values, source)


@dataclass
class Objective:
    """Trains one trial; holds what every trial of one worker shares."""

    params: Params
    data_root: Path
    trials_dir: Path

    def __call__(self, trial: Any, values: dict[str, Any], run: TrialRun, retry_of: int | None = None) -> float:
        """Train with `values` (drawn by space.suggest) logging to `run`; raises optuna.TrialPruned.

        A retry (`retry_of`: the dead trial's number) resumes in that trial's checkpoint folder.
        """
        import optuna

        from xctsam.train.loop import train_segmenter
        from xctsam.train.stage import prepare_training

        tune = self.params.tune
        chosen = trial_params(self.params, values)
        epoch = {"n": 0}

        def on_epoch(scores: dict[str, float], step: int) -> None:
            epoch["n"] += 1
            value = scores[tune.metric]
            if not math.isnan(value):
                trial.report(value, epoch["n"])
            if trial.should_prune():
                raise optuna.TrialPruned(f"epoch {epoch['n']} (step {step}): {tune.metric} {value:.4f}")

        job = prepare_training(tune.model, chosen, self.data_root)
        run.log_metrics(job.model_counts(), 0)
        origin = trial.number if retry_of is None else retry_of
        with job.sampler:
            result = train_segmenter(
                job.model, job.sampler, job.validation, job.config, self.trials_dir / f"trial-{origin}",
                seed=chosen.seed, model_meta=job.meta, resume=True, log_metrics=run.log_metrics, on_epoch=on_epoch,
                params_key=f"train.{tune.model}",
            )
        return best_value(result.history, tune.metric, tune.direction)
