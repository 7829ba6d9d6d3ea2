"""The study report: `reports/study.md` and a self-contained `reports/study.html`.

Sections, in the study's order: FID of each test split to the training set (ordering the splits
by how far out of distribution they are), IoU per class per split of SAM-GAN against the U-Net
(and any zero-shot baselines of metrics/zero_shot/),
the forgetting deltas of the re-fine-tuned variants, the robustness plots, and overlays
(input / truth / each model) for two slices of the first volume of every test split.

Both files are rendered from one list of `Section`s so the two can never disagree. A stage
that has not run yet (its JSON is missing) gives a section saying "not run yet" instead of an
error: the report can be written at any point of the pipeline.
"""

from __future__ import annotations

import base64
import html
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from xctsam.config.eval import PredictConfig
from xctsam.config.params import Params
from xctsam.data.split_folders import split_name, split_volumes
from xctsam.data.volumes import Volume
from xctsam.util.atomic import atomic_path, write_text_atomic
from xctsam.util.tracking import log_stage

NOT_RUN = "not run yet"
MODEL_NAMES = {"sam": "SAM-GAN", "unet": "U-Net"}  # eval.json keys -> the study's names
ZERO_SHOT_DIR = Path("metrics/zero_shot")  # one eval.json-like file per zero_shot@<name> stage
OVERLAY_FRACTIONS = (1 / 3, 1 / 2)  # slices shown per split, as fractions of the volume depth
# RGBA per label: background transparent so the input shows through, then material, pore, inclusion
LABEL_COLOURS = np.array([(0, 0, 0, 0), (0.6, 0.6, 0.6, 0.55), (0.9, 0.1, 0.1, 0.9), (1.0, 0.9, 0.0, 0.9)], dtype=np.float32)
CSS = """
body { font-family: system-ui, sans-serif; max-width: 70em; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f0f0f0; }
img { max-width: 100%; margin: 0.5em 0; }
.note { color: #666; font-style: italic; }
"""


@dataclass
class Section:
    """One report section: a title, an optional note, an optional table and images."""

    title: str
    note: str = ""
    table: pd.DataFrame | None = None
    images: list[Path] = field(default_factory=list)


# ---------------------------------------------------------------- inputs
def read_json(path: Path) -> Any | None:
    """The parsed file, or None when the stage that writes it has not run yet."""
    return json.loads(Path(path).read_text()) if Path(path).is_file() else None


def model_name(key: str) -> str:
    return MODEL_NAMES.get(key, key)


def read_zero_shots(folder: Path) -> dict[str, Any]:
    """{baseline name: its eval.json-like report} of every zero-shot file in `folder`."""
    return {path.stem: json.loads(path.read_text()) for path in sorted(Path(folder).glob("*.json"))}


def with_zero_shots(evaluation: Mapping[str, Any] | None, zero_shots: Mapping[str, Any]) -> dict[str, Any] | None:
    """The evaluation with each zero-shot baseline as one more model, "zero-shot (<name>)"."""
    if not zero_shots:
        return dict(evaluation) if evaluation else None
    merged: dict[str, Any] = {"iou": dict((evaluation or {}).get("iou", {})), "miou": dict((evaluation or {}).get("miou", {}))}
    for name, report in zero_shots.items():
        for key in report["iou"]:  # one model per file: the pretrained SAM it prompted
            merged["iou"][f"zero-shot ({name})"] = report["iou"][key]
            merged["miou"][f"zero-shot ({name})"] = report.get("miou", {}).get(key, {})
    return merged


# ---------------------------------------------------------------- tables
def fid_table(fid: Mapping[str, Any]) -> pd.DataFrame:
    """Splits by FID ascending (least out of distribution first), with a 1-based rank."""
    scores = pd.Series(fid["fid"], name="FID", dtype=float).sort_values(kind="stable")
    table = scores.rename_axis("split").reset_index()
    table.insert(0, "rank", range(1, len(table) + 1))
    return table.set_index("rank")


def split_order(fid: Mapping[str, Any] | None, splits: Iterable[str]) -> list[str]:
    """`splits` in FID order when FID is known (unknown ones last, in their given order)."""
    splits = list(splits)
    if not fid:
        return splits
    ranked = [split for split in fid_table(fid)["split"] if split in splits]
    return ranked + [split for split in splits if split not in ranked]


def iou_table(evaluation: Mapping[str, Any], order: Sequence[str]) -> pd.DataFrame:
    """Rows (split, class + mIoU), one column per model, and SAM-GAN minus U-Net when both exist."""
    columns = {}
    for key, per_split in evaluation["iou"].items():
        miou = evaluation.get("miou", {}).get(key, {})
        columns[model_name(key)] = {
            (split, cls): value
            for split in order
            if split in per_split
            for cls, value in [*per_split[split].items(), ("mIoU", miou.get(split))]
        }
    table = pd.DataFrame(columns, dtype=float)
    table.index = pd.MultiIndex.from_tuples(table.index, names=["split", "class"])
    if {"SAM-GAN", "U-Net"} <= set(table.columns):
        table["SAM-GAN − U-Net"] = table["SAM-GAN"] - table["U-Net"]
    return table


def forgetting_table(forgetting: Mapping[str, Any], order: Sequence[str]) -> pd.DataFrame:
    """IoU change of each re-fine-tuned variant against SAM-GAN: rows (variant, split), columns classes."""
    rows = {}
    for variant, per_split in forgetting["deltas"].items():
        for split in [*[s for s in order if s in per_split], *[s for s in per_split if s not in order]]:
            rows[(variant, split)] = per_split[split]
    table = pd.DataFrame.from_dict(rows, orient="index", dtype=float)
    table.index = pd.MultiIndex.from_tuples(table.index, names=["variant", "split"])
    return table


def markdown_table(table: pd.DataFrame) -> str:
    """A pipe table with index levels as plain columns; a missing score (class absent) shows as –."""
    flat = table.reset_index() if isinstance(table.index, pd.MultiIndex) else table
    # tabulate only replaces None, not NaN, with missingval
    return flat.astype(object).where(flat.notna(), None).to_markdown(index=flat is table, floatfmt=".3f", missingval="–")


# ---------------------------------------------------------------- overlays
def overlay_slices(n_slices: int) -> list[int]:
    return sorted({min(int(n_slices * fraction), n_slices - 1) for fraction in OVERLAY_FRACTIONS})


def first_labelled_volume(split_dir: Path) -> Path | None:
    for path in split_volumes(split_dir):
        with Volume(path) as volume:
            if volume.has_labels:
                return path
    return None


def predicted_slices(model: Any, window: Any, volume: Volume, slices: Sequence[int], predict: PredictConfig) -> dict[int, np.ndarray]:
    """Labels of `slices` only: prediction streams in z order, so stop past the last one wanted."""
    from xctsam.eval.predict import predict_volume

    wanted, found = set(slices), {}
    for prediction in predict_volume(model, volume, window, predict, progress=False):
        if prediction.z in wanted:
            found[prediction.z] = prediction.labels
        if prediction.z >= max(wanted):
            break
    return found


def draw_overlay(image: np.ndarray, panels: Mapping[str, np.ndarray], title: str, out_png: Path) -> None:
    """One PNG row: the input, then each label map coloured over the input."""
    # Figure without pyplot: no global backend state, renders with Agg in any process
    from matplotlib.figure import Figure

    figure = Figure(figsize=(3 * (len(panels) + 1), 3.3), layout="constrained")
    axes = figure.subplots(1, len(panels) + 1, squeeze=False)[0]
    low, high = np.percentile(image, (1, 99))
    for ax, (name, labels) in zip(axes, [("input", None), *panels.items()], strict=True):
        ax.imshow(image, cmap="gray", vmin=low, vmax=high)
        if labels is not None:
            ax.imshow(LABEL_COLOURS[labels], interpolation="nearest")
        ax.set_title(name)
        ax.set_axis_off()
    figure.suptitle(title)
    with atomic_path(out_png) as tmp:
        figure.savefig(tmp, format="png", dpi=80)


def write_overlays(splits: Sequence[str], predict: PredictConfig, data_root: Path, models: Mapping[str, Path], out_dir: Path) -> list[Path]:
    """Overlay PNGs for two slices of the first labelled volume of each of `splits`; [] without models."""
    from xctsam.models.factory import load_segmenter

    present = {key: path for key, path in models.items() if Path(path).is_file()}
    if not present:
        return []
    loaded = {model_name(key): load_segmenter(path) for key, path in present.items()}
    written = []
    for folder in splits:
        volume_path = first_labelled_volume(data_root / folder) if (data_root / folder).is_dir() else None
        if volume_path is None:
            continue
        with Volume(volume_path) as volume:
            slices = overlay_slices(volume.n_slices)
            predictions = {name: predicted_slices(model, window, volume, slices, predict) for name, (model, window, _) in loaded.items()}
            for z in slices:
                panels = {"truth": volume.labels(z, z + 1)[0], **{name: found[z] for name, found in predictions.items()}}
                out_png = out_dir / "overlays" / f"{split_name(folder)}_z{z:03d}.png"
                draw_overlay(volume.image(z, z + 1)[0], panels, f"{split_name(folder)} · {volume_path.name} · z={z}", out_png)
                written.append(out_png)
    return written


# ---------------------------------------------------------------- sections
def build_sections(params: Params, root: Path, out_dir: Path, models: Mapping[str, Path], data_root: Path) -> list[Section]:
    fid = read_json(root / "metrics" / "fid.json")
    zero_shots = read_zero_shots(root / ZERO_SHOT_DIR)
    evaluation = with_zero_shots(read_json(root / "metrics" / "eval.json"), zero_shots)
    forgetting = read_json(root / "metrics" / "forgetting.json")
    order = split_order(fid, [split_name(folder) for folder in params.eval.splits])
    robustness_pngs = sorted((root / "reports" / "robustness").glob("*.png"))
    overlays = write_overlays(params.eval.splits, params.predict, data_root, models, out_dir)
    return [
        Section("FID to the training set", note=_fid_note(fid), table=fid_table(fid) if fid else None),
        Section("IoU per class: SAM-GAN vs U-Net", note=_iou_note(evaluation, zero_shots), table=iou_table(evaluation, order) if evaluation else None),
        Section("Forgetting (IoU change against SAM-GAN)", note="" if forgetting else NOT_RUN, table=forgetting_table(forgetting, order) if forgetting else None),
        Section("Robustness to noise", note="" if robustness_pngs else NOT_RUN, images=robustness_pngs),
        Section("Overlays: input / truth / each model", note="" if overlays else f"{NOT_RUN} (no trained models)", images=overlays),
    ]


def _iou_note(evaluation: Mapping[str, Any] | None, zero_shots: Mapping[str, Any]) -> str:
    if not evaluation:
        return NOT_RUN
    if not zero_shots:
        return ""
    return "Zero-shot: a pretrained SAM before any XCT training, prompted by one box per ground-truth component of each class (prompts from the truth, so not an automatic segmentation)."


def _fid_note(fid: Mapping[str, Any] | None) -> str:
    if not fid:
        return NOT_RUN
    return f"Reference {fid.get('reference', '?')}, backbone {fid.get('backbone', '?')}, {fid.get('samples', '?')} slices per split; lower = closer to the training data."


# ---------------------------------------------------------------- rendering
def render_markdown(sections: Sequence[Section], out_dir: Path) -> str:
    parts = ["# Study report\n"]
    for section in sections:
        parts.append(f"## {section.title}\n")
        if section.note:
            parts.append(f"_{section.note}_\n")
        if section.table is not None:
            parts.append(markdown_table(section.table) + "\n")
        # relative links: the report folder can be moved or served as a whole
        parts.extend(f"![{image.stem}]({Path(os.path.relpath(image, out_dir)).as_posix()})\n" for image in section.images)
    return "\n".join(parts)


def data_uri(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(png).read_bytes()).decode("ascii")


def render_html(sections: Sequence[Section]) -> str:
    body = []
    for section in sections:
        body.append(f"<h2>{html.escape(section.title)}</h2>")
        if section.note:
            body.append(f'<p class="note">{html.escape(section.note)}</p>')
        if section.table is not None:
            body.append(section.table.to_html(float_format=lambda value: f"{value:.3f}", na_rep="–"))
        body.extend(f'<img alt="{html.escape(image.stem)}" src="{data_uri(image)}">' for image in section.images)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>xctsam study report</title>'
        f"<style>{CSS}</style></head><body><h1>Study report</h1>\n" + "\n".join(body) + "\n</body></html>\n"
    )


# ---------------------------------------------------------------- the stage
def default_models(root: Path) -> dict[str, Path]:
    return {key: root / "models" / key / "best.pt" for key in MODEL_NAMES}


def write_report(
    params: Params,
    root: Path = Path("."),
    out_dir: Path = Path("reports"),
    models: dict[str, Path] | None = None,
    *,
    data_root: Path | None = None,
    log_mlflow: bool = True,
) -> tuple[Path, Path]:
    """Write out_dir/study.md, out_dir/study.html and out_dir/overlays/*.png; return (md, html).

    `root` is the project folder holding metrics/, plots/, reports/robustness/ and models/; a
    relative `out_dir`, model path or `data_root` is taken relative to it. `models` maps
    eval.json keys ("sam", "unet") to checkpoints; by default models/<key>/best.pt. `data_root`
    holds the split folders the overlays are drawn from; by default params `study.root`.
    """
    root = Path(root)
    data_root = root / (params.study.root if data_root is None else data_root)
    out_dir = root / out_dir
    models = {key: root / path for key, path in (default_models(root) if models is None else models).items()}
    sections = build_sections(params, root, out_dir, models, data_root)
    md_path, html_path = out_dir / "study.md", out_dir / "study.html"
    write_text_atomic(md_path, render_markdown(sections, out_dir))
    write_text_atomic(html_path, render_html(sections))
    if log_mlflow:
        log_stage("report", artifacts=[md_path, html_path])
    return md_path, html_path
