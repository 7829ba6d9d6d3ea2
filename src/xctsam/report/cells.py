"""Table cells as text: numbers to 3 decimals, intervals, "n.s.", "mean ± std", undefined as –.

Metric JSON writes NaN (undefined: a class in neither prediction nor truth, a ratio with nothing
to count) as null; every helper here takes None, NaN or a missing value alike and gives DASH.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from xctsam import CLASS_NAMES
from xctsam.eval import metrics

DASH = "–"  # an undefined or missing score
NOT_SIGNIFICANT = "n.s."
FOREGROUND = tuple(CLASS_NAMES[index] for index in metrics.FOREGROUND)  # material, pore, inclusion


def number(value: Any) -> float:
    """`value` as a float; NaN for None (JSON null) or anything not a number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return math.nan
    return float(value)


def defined(value: Any) -> bool:
    return math.isfinite(number(value))


def fmt(value: Any) -> str:
    """3 decimals, or DASH when undefined."""
    return f"{number(value):.3f}" if defined(value) else DASH


def percent(value: Any) -> str:
    """A fraction as a percentage to 3 decimals ("1.234%"), or DASH."""
    return f"{100 * number(value):.3f}%" if defined(value) else DASH


def mean_std(entry: Mapping[str, Any] | None) -> str:
    """{mean, std} as "0.012 ± 0.003"; the mean alone when the std is undefined."""
    if not entry or not defined(entry.get("mean")):
        return DASH
    std = entry.get("std")
    return f"{fmt(entry['mean'])} ± {fmt(std)}" if defined(std) else fmt(entry["mean"])


def with_interval(value: Any, interval: Sequence[Any] | None) -> str:
    """ "0.958 [0.941, 0.970]"; the plain number without a (defined) interval."""
    if not defined(value):
        return DASH
    if not interval or len(interval) != 2 or not all(defined(bound) for bound in interval):
        return fmt(value)
    return f"{fmt(value)} [{fmt(interval[0])}, {fmt(interval[1])}]"


def difference(value: Any, low: Any = None, high: Any = None, significant: bool | None = None) -> str:
    """ "-0.012 [-0.030, 0.004] n.s.": a difference, its interval, and n.s. when the interval
    contains 0. `significant` None: decided from the bounds. No defined interval: the number."""
    if not defined(value):
        return DASH
    if not (defined(low) and defined(high)):
        return fmt(value)
    if significant is None:
        significant = number(low) > 0 or number(high) < 0
    return f"{with_interval(value, [low, high])}{'' if significant else ' ' + NOT_SIGNIFICANT}"


def difference_entry(entry: Mapping[str, Any] | None) -> str:
    """A {value, low, high, significant} entry of eval.json "differences" as `difference`."""
    if not entry:
        return DASH
    return difference(entry.get("value"), entry.get("low"), entry.get("high"), entry.get("significant"))


def mean_defined(values: Iterable[Any]) -> float:
    """The mean of the defined values (None counts as undefined); NaN when there are none."""
    return float(metrics.mean_defined([number(value) for value in values]))


def foreground_mean(classes: Mapping[str, Any]) -> float:
    """Mean IoU over material, pore and inclusion, undefined ones skipped."""
    return mean_defined(classes.get(cls) for cls in FOREGROUND)


def beyond_floor(kid: Mapping[str, Any] | None, floor: Mapping[str, Any] | None) -> str:
    """ "yes" when KID mean - floor mean > 2 sqrt(std^2 + floor std^2), "no" otherwise, DASH
    when either is undefined: a distance within its floor says nothing about shift."""
    if not kid or not floor or not all(defined(entry.get(key)) for entry in (kid, floor) for key in ("mean", "std")):
        return DASH
    margin = 2 * math.sqrt(number(kid["std"]) ** 2 + number(floor["std"]) ** 2)
    return "yes" if number(kid["mean"]) - number(floor["mean"]) > margin else "no"
