"""Params `tune`: the hyperparameter search space and its settings.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from xctsam import CLASS_NAMES
from xctsam.config.base import Float, Int, PositiveFloat, StrictModel

# ---------------------------------------------------------------- hyperparameter search
TUNE_METRICS = ("val.miou", *(f"val.iou.{name}" for name in CLASS_NAMES))  # scores of the held-out validation slices
SearchValue = bool | int | float | str


class SearchDimension(StrictModel):
    """How one params key is drawn: `categorical` from `choices`, or `float`/`int` in [low, high]
    (`log`: log-uniform; `step`: a grid). Which key is xctsam.tune.space's business."""

    type: Literal["categorical", "float", "int"]
    choices: list[SearchValue] | None = None
    low: Float | None = None
    high: Float | None = None
    log: bool = False
    step: PositiveFloat | None = None

    @model_validator(mode="after")
    def _complete(self) -> SearchDimension:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("choices: a categorical dimension needs a non-empty list")
            if self.low is not None or self.high is not None or self.log or self.step is not None:
                raise ValueError("a categorical dimension takes only choices")
            return self
        if self.choices is not None:
            raise ValueError(f"choices: a {self.type} dimension takes low/high, not choices")
        if self.low is None or self.high is None or not self.high > self.low:
            raise ValueError("low/high: give both, high greater than low")
        if self.log and (self.low <= 0 or self.step is not None):
            raise ValueError("log: needs low > 0 and no step")
        return self


class TuneConfig(StrictModel):
    """`xctsam tune`: an Optuna search over any params keys, scored on held-out validation slices."""

    model: Literal["sam", "unet"] = "sam"
    space: dict[str, SearchDimension] = {}  # dotted params key -> how to draw it
    trial: dict[str, Any] = {}  # dotted params key -> value set in every trial (cheaper trials)
    metric: str = "val.miou"
    direction: Literal["maximize", "minimize"] = "maximize"
    sampler: Literal["tpe", "random"] = "tpe"
    pruner: Literal["median", "hyperband", "none"] = "median"
    n_trials: Annotated[Int, Field(ge=1)] = 20  # the study's total, shared by all its workers
    heartbeat_seconds: Annotated[Int, Field(ge=1)] = 10  # a worker silent for 2x this is dead; its trial is retried
    max_retry: Annotated[Int, Field(ge=0)] = 2
    # torch threads per local worker of `tune run --workers N`; None: the worker's share of the
    # cores (each worker is pinned to its share). XCTSAM_THREADS overrides both.
    threads_per_worker: Annotated[Int, Field(ge=1)] | None = None

    @model_validator(mode="after")
    def _known_metric(self) -> TuneConfig:
        if self.metric not in TUNE_METRICS:
            raise ValueError(f"metric: '{self.metric}' is not one of {', '.join(TUNE_METRICS)}")
        return self
