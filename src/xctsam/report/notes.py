"""The note under each section: what its numbers are, how they were made, or "not run yet"."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from xctsam.report.inputs import ABLATION_NAMES

NOT_RUN = "not run yet"
NO_UNTRANSLATED_SPLIT = (
    "There is no untranslated training split in this mode: the real-data release ships only the "
    "GAN-translated set (study.ablation is empty), so the GAN ablation cannot be run."
)


def _percent(level: Any) -> str:
    return f"{100 * float(level):g}%" if isinstance(level, int | float) else "95%"


def distance_note(fid: Mapping[str, Any] | None) -> str:
    """Reference, backbone, samples and crops; how splits are ranked; what the floor means."""
    if not fid:
        return NOT_RUN
    counts = set((fid.get("features") or {}).values())
    features = f" ({counts.pop()} feature vectors per set)" if len(counts) == 1 else ""
    parts = [
        f"Reference {fid.get('reference', '?')}, backbone {fid.get('backbone', '?')}, {fid.get('samples', '?')} slices per split"
        f" × {fid.get('crops_per_slice', 1)} crop(s) each{features}; lower = closer to the training data."
    ]
    if fid.get("kid"):
        parts.append("Splits ranked by KID (unbiased squared MMD: near 0 for two samples of one distribution), mean ± std over subsets.")
    else:
        parts.append("Splits ranked by FID: this fid.json has no KID and no floor (rerun the fid stage for them).")
    floor = fid.get("floor")
    if floor:
        halves = " vs ".join(str(len(half)) for half in floor.get("volumes", []))
        parts.append(
            f"Floor: the same distances between the reference's two halves by volume ({halves} volumes), what "
            "phantom-to-phantom variation alone gives. Beyond floor: KID − floor KID > 2·√(std² + floor std²)."
        )
    elif fid.get("kid"):
        parts.append("No floor was computed (fid.floor off, or a reference of one volume).")
    parts.append("A distance within its floor says nothing about shift: it is what two samples of the training data differ by.")
    return " ".join(parts)


def bootstrap_units(evaluation: Mapping[str, Any]) -> str:
    """The resampled unit: one word when every split used the same, else per split."""
    per_split: dict[str, set[str]] = {}
    for units in (evaluation.get("bootstrap_unit") or {}).values():
        for split, unit in units.items():
            per_split.setdefault(split, set()).add(str(unit))
    every = {unit for units in per_split.values() for unit in units}
    if len(every) == 1:
        return f"{every.pop()} (every split)"
    return ", ".join(f"{split}: {'/'.join(sorted(units))}" for split, units in per_split.items()) or "?"


def interval_note(evaluation: Mapping[str, Any], compared: str) -> str:
    """What the brackets and "n.s." mean, from eval.json "bootstrap"; "" in the old layout."""
    bootstrap = evaluation.get("bootstrap")
    if not bootstrap or not evaluation.get("iou_ci"):
        return ""
    level = _percent(bootstrap.get("level"))
    return (
        f"Brackets: {level} bootstrap interval ({bootstrap.get('resamples', '?')} resamples, seed {bootstrap.get('seed', '?')}, "
        f"resampling by {bootstrap_units(evaluation)}). {compared}: paired difference (both models scored on the same slices, "
        f"resampled alike); n.s. = its {level} interval contains 0."
    )


def iou_note(evaluation: Mapping[str, Any] | None, zero_shots: Mapping[str, Any]) -> str:
    if not evaluation:
        return NOT_RUN
    parts = [interval_note(evaluation, "SAM-GAN − U-Net")]
    if zero_shots:
        parts.append(
            "Zero-shot: a pretrained SAM before any XCT training, prompted by one box per ground-truth component of each class "
            "(prompts from the truth, so not an automatic segmentation); no interval."
        )
    return " ".join(part for part in parts if part)


def ablation_note(ablations: Mapping[str, Any], planned: Sequence[str]) -> str:
    """The wording for the real-data mode (nothing planned), "not run yet", or what the table is."""
    if not ablations:
        return NOT_RUN if planned else NO_UNTRANSLATED_SPLIT
    first = next(iter(ablations.values()))
    parts = [
        "Each model trained again, same steps and seed, on the untranslated render Tr-sim, scored beside the one trained on "
        "the GAN-translated Tr-GAN: GAN − sim > 0 means the translation helps.",
        interval_note(first, "GAN − sim"),
    ]
    missing = [ABLATION_NAMES.get(kind, kind) for kind in planned if kind not in ablations]
    if missing:
        parts.append(f"{', '.join(missing)}: {NOT_RUN}.")
    return " ".join(part for part in parts if part)


def forgetting_note(forgetting: Mapping[str, Any] | None) -> str:
    if not forgetting:
        return NOT_RUN
    parts = ["IoU after re-fine-tuning minus SAM-GAN's before, on the evaluation volumes (fine-tuning volumes left out)."]
    if forgetting.get("roles"):
        parts.append("Role: adaptation = a fine-tuning split's held-out volumes; transfer = the other splits (forgetting when negative).")
    if forgetting.get("intervals"):
        parts.append("Brackets: paired bootstrap interval (both models on the same slices); n.s. = it contains 0.")
    if forgetting.get("mean_of"):
        parts.append("The mean row averages the splits it names.")
    return " ".join(parts)


MATRIX_NOTE = (
    "Mean IoU over material, pore and inclusion (undefined classes skipped) per model and split: for the fine-tuned "
    "variants the adaptation column is in domain, the others out of domain."
)
PARTS_NOTE = (
    "What `xctsam predict --report` tells quality control about a part, for the first labelled volume of each split: "
    "from the ground truth and from each model's labels. Porosity and inclusion fraction are shares of the part "
    "(labels >= 1); pores and inclusions count 3-D components (26-connected), internal ones lie inside the part eroded "
    "by defects.surface_depth; the largest pore is its equivalent diameter (voxels, or mm with a voxel size)."
)


def defects_note(defects: Mapping[str, Any] | None) -> str:
    if not defects or not defects.get("scores"):
        return NOT_RUN
    margin = (defects.get("config") or {}).get("margin")
    grown = f" (grown by {margin} voxels)" if margin is not None else ""
    return (
        "Pores and inclusions as 26-connected 3-D components, every location; a true defect is found when the prediction has its "
        f"class in its bounding box{grown}, a predicted one matched likewise; recall = "
        "found / true, precision = matched / predicted; porosity = pore / part voxels. Figure: recall per equivalent-diameter "
        "bin, each model's splits pooled (components summed over splits)."
    )


def shift_note(evaluation: Mapping[str, Any] | None, fid: Mapping[str, Any] | None, drawn: bool) -> str:
    if not evaluation or not fid:
        return NOT_RUN
    if not fid.get("kid"):
        return f"{NOT_RUN}: fid.json has no KID (rerun the fid stage)."
    if not drawn:
        return "No split has both an IoU and a KID."
    floor = "Dashed line: the floor's KID. " if (fid.get("floor") or {}).get("kid") else ""
    return (
        "Each point a test split: x its KID to the training set (bars: std over subsets), y the IoU (bars: bootstrap interval). "
        f"{floor}The study's out-of-distribution figure made quantitative: a model robust to shift stays flat as KID grows."
    )
