"""The report's tables, cells as text (report.cells): distance ranking, IoU per class with
intervals, the GAN ablation, forgetting deltas and matrix, per-defect detection; as markdown.

Each table reads one metrics file as its producer wrote it; keys a file in the old layout lacks
(KID, floor, intervals, differences, roles) leave their columns or brackets out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd

from xctsam.report.cells import (
    DASH,
    beyond_floor,
    defined,
    difference,
    difference_entry,
    fmt,
    foreground_mean,
    mean_std,
    number,
    percent,
    with_interval,
)
from xctsam.report.inputs import ABLATION_NAMES, model_name

Row = tuple[str, ...]
FLOOR_ROW = "floor (reference halves by volume)"
BASELINE = "SAM-GAN"  # forgetting.json's model before re-fine-tuning
DEFECT_CLASSES = ("pore", "inclusion")
DEFECT_SCORES = (("F1", "f1"), ("recall", "recall"), ("precision", "precision"))


def frame(columns: Mapping[str, Mapping[Row, str]], rows: Sequence[Row], names: Sequence[str]) -> pd.DataFrame:
    """Columns of {row: cell} on the MultiIndex `rows` (in that order), DASH where a cell is missing."""
    index = pd.MultiIndex.from_tuples(rows, names=list(names)) if rows else pd.MultiIndex.from_arrays([[] for _ in names], names=list(names))
    return pd.DataFrame({name: [cells.get(row, DASH) for row in rows] for name, cells in columns.items()}, index=index, dtype=object)


def ordered(keys: Iterable[str], order: Sequence[str]) -> list[str]:
    """`keys` in `order` first, the others after in their own order."""
    keys = list(keys)
    return [key for key in order if key in keys] + [key for key in keys if key not in order]


# ---------------------------------------------------------------- distance to the training set
def distance_ranking(fid: Mapping[str, Any]) -> list[str]:
    """Test splits from nearest to farthest: by KID mean when fid.json has KID, else by FID;
    undefined distances last."""
    kid = fid.get("kid") or {}
    if kid:
        scores = {split: number((entry or {}).get("mean")) for split, entry in kid.items()}
    else:
        scores = {split: number(value) for split, value in fid.get("fid", {}).items()}
    return sorted(scores, key=lambda split: (not defined(scores[split]), scores[split] if defined(scores[split]) else 0.0))


def split_order(fid: Mapping[str, Any] | None, splits: Iterable[str]) -> list[str]:
    """`splits` in distance order when it is known (unknown ones last, in their given order)."""
    splits = list(splits)
    if not fid:
        return splits
    ranked = [split for split in distance_ranking(fid) if split in splits]
    return ranked + [split for split in splits if split not in ranked]


def distance_table(fid: Mapping[str, Any]) -> pd.DataFrame:
    """Ranked test splits, then the named pairs, then the floor; FID, KID "mean ± std" and
    whether the KID lies clearly beyond the floor's (columns present only with their data)."""
    kid, kid_pairs, floor = fid.get("kid") or {}, fid.get("kid_pairs") or {}, fid.get("floor")
    floor_kid = (floor or {}).get("kid")
    header = ["rank", "split", "FID", *(["KID"] if kid else []), *(["beyond floor"] if kid and floor_kid else [])]
    rows: list[dict[str, str]] = []

    def row(rank: str, name: str, fid_value: Any, kid_entry: Mapping[str, Any] | None, beyond: str) -> None:
        cells = {"rank": rank, "split": name, "FID": fmt(fid_value)}
        if kid:
            cells["KID"] = mean_std(kid_entry)
            if floor_kid:
                cells["beyond floor"] = beyond
        rows.append(cells)

    for rank, split in enumerate(distance_ranking(fid), start=1):
        row(str(rank), split, fid.get("fid", {}).get(split), kid.get(split), beyond_floor(kid.get(split), floor_kid))
    for name in dict.fromkeys([*fid.get("pairs", {}), *kid_pairs]):
        row("", name, fid.get("pairs", {}).get(name), kid_pairs.get(name), beyond_floor(kid_pairs.get(name), floor_kid))
    if floor:
        row("", FLOOR_ROW, floor.get("fid"), floor_kid, DASH)
    return pd.DataFrame(rows, columns=header, dtype=object).set_index("rank")


# ---------------------------------------------------------------- IoU with intervals
def iou_rows(evaluation: Mapping[str, Any], keys: Sequence[str], order: Sequence[str]) -> list[Row]:
    """(split, class) of every split of `order` any of `keys` scored, classes then "mIoU"."""
    rows: list[Row] = []
    for split in order:
        classes: list[str] = []
        for key in keys:
            classes += [cls for cls in evaluation["iou"].get(key, {}).get(split, {}) if cls not in classes]
        rows += [(split, cls) for cls in [*classes, "mIoU"]] if classes else []
    return rows


def model_cells(evaluation: Mapping[str, Any], key: str, rows: Sequence[Row]) -> dict[Row, str]:
    """One model's IoU per row, "value [low, high]" where eval.json has its interval."""
    iou, ci = evaluation["iou"].get(key, {}), (evaluation.get("iou_ci") or {}).get(key, {})
    miou = (evaluation.get("miou") or {}).get(key, {})
    cells = {}
    for split, cls in rows:
        if cls == "mIoU":
            cells[(split, cls)] = fmt(miou.get(split))
        elif cls in iou.get(split, {}):
            cells[(split, cls)] = with_interval(iou[split][cls], ci.get(split, {}).get(cls))
    return cells


def difference_cells(evaluation: Mapping[str, Any], a: str, b: str, rows: Sequence[Row]) -> dict[Row, str]:
    """IoU(a) - IoU(b) per row: eval.json's paired difference and interval ("n.s." when it holds
    0) where it has one; else (old layout, mIoU) the plain difference of the two scores."""
    paired = (evaluation.get("differences") or {}).get(f"{a} - {b}")
    iou, miou = evaluation["iou"], evaluation.get("miou") or {}
    cells = {}
    for split, cls in rows:
        if paired is not None and cls != "mIoU":
            cells[(split, cls)] = difference_entry(paired.get(split, {}).get(cls))
            continue
        if cls == "mIoU":
            first, second = (miou.get(key, {}).get(split) for key in (a, b))
        else:
            first, second = (iou.get(key, {}).get(split, {}).get(cls) for key in (a, b))
        cells[(split, cls)] = fmt(number(first) - number(second))
    return cells


def iou_table(evaluation: Mapping[str, Any], order: Sequence[str]) -> pd.DataFrame:
    """Rows (split, class + mIoU), one column per model, and SAM-GAN − U-Net when both exist."""
    keys = list(evaluation["iou"])
    rows = iou_rows(evaluation, keys, ordered({split for key in keys for split in evaluation["iou"][key]}, order))
    columns = {model_name(key): model_cells(evaluation, key, rows) for key in keys}
    if {"sam", "unet"} <= set(keys):
        columns[f"{model_name('sam')} − {model_name('unet')}"] = difference_cells(evaluation, "sam", "unet", rows)
    return frame(columns, rows, ["split", "class"])


def ablation_table(ablations: Mapping[str, Mapping[str, Any]], order: Sequence[str]) -> pd.DataFrame:
    """Per kind (sam, unet): the model trained on Tr-GAN, on Tr-sim, and GAN − sim with its
    paired interval; rows (split, class + mIoU) over every kind's splits."""
    rows: list[Row] = []
    columns: dict[str, dict[Row, str]] = {}
    for kind, report in ablations.items():
        keys = [kind, f"{kind}-sim"]
        splits = ordered({split for key in keys for split in report["iou"].get(key, {})}, order)
        kind_rows = iou_rows(report, keys, splits)
        rows += [row for row in kind_rows if row not in rows]
        name = ABLATION_NAMES.get(kind, kind)
        columns[f"{name} Tr-GAN"] = model_cells(report, kind, kind_rows)
        columns[f"{name} Tr-sim"] = model_cells(report, f"{kind}-sim", kind_rows)
        columns[f"{name} GAN − sim"] = difference_cells(report, kind, f"{kind}-sim", kind_rows)
    by_split = {split: i for i, split in enumerate(ordered({split for split, _ in rows}, order))}
    rows.sort(key=lambda row: by_split[row[0]])  # stable: each split's classes keep their order
    return frame(columns, rows, ["split", "class"])


# ---------------------------------------------------------------- forgetting
def forgetting_table(forgetting: Mapping[str, Any], order: Sequence[str]) -> pd.DataFrame:
    """IoU change of each re-fine-tuned variant against SAM-GAN: rows (variant, split), a role
    column (adaptation / transfer) and one column per class, "delta [low, high]" and "n.s."
    where forgetting.json has intervals; the mean row names the splits it averages."""
    intervals, roles, mean_of = forgetting.get("intervals") or {}, forgetting.get("roles") or {}, forgetting.get("mean_of")
    mean_label = f"mean ({', '.join(mean_of)})" if mean_of else "mean"
    rows: list[Row] = []
    columns: dict[str, dict[Row, str]] = {"role": {}} if roles else {}
    for variant, per_split in forgetting["deltas"].items():
        for split in [*ordered([s for s in per_split if s != "mean"], order), *(["mean"] if "mean" in per_split else [])]:
            row = (variant, mean_label if split == "mean" else split)
            rows.append(row)
            if roles:
                columns["role"][row] = roles.get(split, DASH)
            for cls, delta in per_split[split].items():
                bounds = intervals.get(variant, {}).get(split, {}).get(cls) or {}
                columns.setdefault(cls, {})[row] = difference(delta, bounds.get("low"), bounds.get("high"), bounds.get("significant"))
    return frame(columns, rows, ["variant", "split"])


def matrix_splits(forgetting: Mapping[str, Any], order: Sequence[str]) -> list[str]:
    """The scored splits, adaptation ones (the fine-tuning splits' held-out volumes) first."""
    splits = ordered({split for scores in forgetting.get("iou", {}).values() for split in scores}, order)
    roles = forgetting.get("roles") or {}
    return [s for s in splits if roles.get(s) == "adaptation"] + [s for s in splits if roles.get(s) != "adaptation"]


def forgetting_matrix(forgetting: Mapping[str, Any], order: Sequence[str]) -> pd.DataFrame:
    """In-domain × out-of-domain: rows SAM-GAN before and each variant after, columns the splits
    (adaptation first, marked), cells the mean IoU over foreground classes (undefined skipped)."""
    iou, roles = forgetting.get("iou", {}), forgetting.get("roles") or {}
    models = ordered(iou, [BASELINE])
    rows = [f"{model} ({'before' if model == BASELINE else 'after'})" for model in models]
    columns = {
        f"{split} (adaptation)" if roles.get(split) == "adaptation" else split: [fmt(foreground_mean(iou[model].get(split, {}))) for model in models]
        for split in matrix_splits(forgetting, order)
    }
    return pd.DataFrame(columns, index=pd.Index(rows, name="model"), dtype=object)


# ---------------------------------------------------------------- per-defect detection
def defects_table(defects: Mapping[str, Any], order: Sequence[str]) -> pd.DataFrame:
    """Rows (model, split), columns F1 / recall / precision of pores and inclusions (location
    "all") and porosity true / predicted (as %), from defects.json "scores"."""
    rows: list[Row] = []
    columns: dict[str, dict[Row, str]] = {f"{cls} {label}": {} for cls in DEFECT_CLASSES for label, _ in DEFECT_SCORES}
    columns |= {"porosity true": {}, "porosity predicted": {}}
    for key, per_split in defects.get("scores", {}).items():
        for split in ordered(per_split, order):
            row, report = (model_name(key), split), per_split[split]
            rows.append(row)
            for cls in DEFECT_CLASSES:
                scores = report.get("classes", {}).get(cls, {}).get("all", {})
                for label, field in DEFECT_SCORES:
                    columns[f"{cls} {label}"][row] = fmt(scores.get(field))
            columns["porosity true"][row] = percent(report.get("porosity_true"))
            columns["porosity predicted"][row] = percent(report.get("porosity_pred"))
    return frame(columns, rows, ["model", "split"])


def markdown_table(table: pd.DataFrame) -> str:
    """A pipe table with index levels as plain columns; a missing score (class absent) shows as –."""
    flat = table.reset_index() if isinstance(table.index, pd.MultiIndex) else table
    # tabulate only replaces None, not NaN, with missingval; numbers given as text stay as given
    return flat.astype(object).where(flat.notna(), None).to_markdown(index=flat is table, floatfmt=".3f", missingval="–", disable_numparse=True)
