"""The report's figures: detection recall by defect size, and IoU against each split's KID.

Drawn with matplotlib's `Figure` (no pyplot: no global backend state, Agg in any process) and
written atomically, so a failed draw never leaves half a PNG under the final name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from xctsam.report.cells import FOREGROUND, defined, number
from xctsam.report.inputs import model_name
from xctsam.report.tables import DEFECT_CLASSES
from xctsam.util.atomic import atomic_path

DPI = 90


def _save(figure: Any, out_png: Path) -> Path:
    with atomic_path(out_png) as tmp:
        figure.savefig(tmp, format="png", dpi=DPI)
    return out_png


# ---------------------------------------------------------------- recall by size
def pooled_recall(per_split: Mapping[str, Mapping[str, Any]], cls: str) -> tuple[list[float], list[float]]:
    """(bin lower edges, recall per bin) of one model and class, location "all", the splits
    pooled: detected and true components summed over splits per bin, then divided (NaN: none)."""
    lows: list[float] = []
    detected: list[int] = []
    true: list[int] = []
    for report in per_split.values():
        bins = report.get("classes", {}).get(cls, {}).get("all", {}).get("bins", [])
        for i, size_bin in enumerate(bins):
            if i == len(lows):
                lows.append(number(size_bin.get("low")))
                detected.append(0)
                true.append(0)
            detected[i] += int(size_bin.get("n_detected") or 0)
            true[i] += int(size_bin.get("n_true") or 0)
    return lows, [d / t if t else math.nan for d, t in zip(detected, true, strict=True)]


def bin_labels(lows: Sequence[float]) -> list[str]:
    """ "[0, 2)", ..., "≥ 16": each bin by its edges, the last open-ended."""
    edges = [f"{low:g}" for low in lows]
    return [f"[{low}, {high})" for low, high in zip(edges, edges[1:])] + ([f"≥ {edges[-1]}"] if edges else [])


def draw_defect_recall(defects: Mapping[str, Any], out_png: Path) -> Path | None:
    """One panel per defect class, one line per model: recall by equivalent-diameter bin, the
    splits pooled; None (nothing written) without any binned defect."""
    from matplotlib.figure import Figure

    scores = defects.get("scores", {})
    curves = {cls: {key: pooled_recall(per_split, cls) for key, per_split in scores.items()} for cls in DEFECT_CLASSES}
    if not any(lows for by_model in curves.values() for lows, _ in by_model.values()):
        return None
    unit = next((report.get("unit") for per_split in scores.values() for report in per_split.values() if report.get("unit")), "voxel")
    figure = Figure(figsize=(5 * len(DEFECT_CLASSES), 3.6), layout="constrained")
    axes = figure.subplots(1, len(DEFECT_CLASSES), squeeze=False)[0]
    for ax, cls in zip(axes, DEFECT_CLASSES, strict=True):
        longest: list[float] = []
        for key, (lows, recall) in curves[cls].items():
            if lows:
                ax.plot(range(len(lows)), recall, marker="o", label=model_name(key))
                longest = max(longest, lows, key=len)
        ax.set_xticks(range(len(longest)), bin_labels(longest))
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(f"{cls}: recall by size (splits pooled)")
        ax.set_xlabel(f"equivalent diameter ({unit}), bin")
        ax.set_ylabel("recall")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    return _save(figure, out_png)


# ---------------------------------------------------------------- IoU against shift
def shift_points(evaluation: Mapping[str, Any], kid: Mapping[str, Any], key: str, cls: str) -> list[tuple[str, float, float, float, float, float]]:
    """(split, KID mean, KID std, IoU, IoU - low, high - IoU) of one model and class for every
    split with both defined, in KID order; error bars 0 where undefined."""
    iou = evaluation.get("iou", {}).get(key, {})
    ci = (evaluation.get("iou_ci") or {}).get(key, {})
    points = []
    for split, entry in kid.items():
        x, y = number((entry or {}).get("mean")), number(iou.get(split, {}).get(cls))
        if not (defined(x) and defined(y)):
            continue
        low, high = (number(bound) for bound in (ci.get(split, {}).get(cls) or [math.nan, math.nan]))
        std = number((entry or {}).get("std"))
        points.append((split, x, std if defined(std) else 0.0, y, y - low if defined(low) else 0.0, high - y if defined(high) else 0.0))
    return sorted(points, key=lambda point: point[1])


def draw_iou_vs_kid(evaluation: Mapping[str, Any], fid: Mapping[str, Any], out_png: Path) -> Path | None:
    """One panel per foreground class: each model's IoU per split (bars: bootstrap interval)
    against that split's KID to the training set (bars: std over subsets), the floor's KID as a
    dashed line; None (nothing written) when fid.json has no KID or no split has both."""
    from matplotlib.figure import Figure

    kid = fid.get("kid") or {}
    points = {cls: {key: shift_points(evaluation, kid, key, cls) for key in evaluation.get("iou", {})} for cls in FOREGROUND}
    if not any(found for by_model in points.values() for found in by_model.values()):
        return None
    floor = ((fid.get("floor") or {}).get("kid") or {}).get("mean")
    figure = Figure(figsize=(4.6 * len(FOREGROUND), 3.8), layout="constrained")
    axes = figure.subplots(1, len(FOREGROUND), squeeze=False, sharex=True)[0]
    for ax, cls in zip(axes, FOREGROUND, strict=True):
        for i, (key, found) in enumerate(points[cls].items()):
            if not found:
                continue
            _, x, x_err, y, y_low, y_high = zip(*found, strict=True)
            # points, not a line: splits are separate scans, and a line through them in KID order
            # reads as a trend that zig-zags wherever two splits' KIDs are close
            ax.errorbar(x, y, xerr=x_err, yerr=[y_low, y_high], marker="o", capsize=3, linestyle="none", alpha=0.85, label=model_name(key))
            if i == 0:  # split names once per panel, beside the first model's points
                for split, px, _, py, _, _ in found:
                    ax.annotate(split, (px, py), textcoords="offset points", xytext=(4, 4), fontsize="x-small")
        if defined(floor):
            ax.axvline(number(floor), color="grey", linestyle="--", linewidth=1, label="floor KID")
        ax.set_title(f"{cls} IoU against shift")
        ax.set_xlabel("KID to the training set")
        ax.set_ylabel("IoU")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    return _save(figure, out_png)
