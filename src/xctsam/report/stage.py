"""The `report` stage: the sections in the study's order, then study.md and study.html (and the
figures: defects_recall.png, iou_vs_kid.png beside them)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from xctsam.config.params import Params
from xctsam.data.split_folders import split_name
from xctsam.eval.label_cache import LabelCache
from xctsam.report.figures import draw_defect_recall, draw_iou_vs_kid
from xctsam.report.inputs import (
    ABLATION_DIR,
    MODEL_NAMES,
    ZERO_SHOT_DIR,
    read_ablations,
    read_json,
    read_zero_shots,
    with_zero_shots,
)
from xctsam.report.notes import (
    MATRIX_NOTE,
    NOT_RUN,
    PARTS_NOTE,
    ablation_note,
    defects_note,
    distance_note,
    forgetting_note,
    iou_note,
    shift_note,
)
from xctsam.report.overlays import write_overlays
from xctsam.report.parts import part_table
from xctsam.report.render import Section, render_html, render_markdown
from xctsam.report.tables import (
    ablation_table,
    defects_table,
    distance_table,
    forgetting_matrix,
    forgetting_table,
    iou_table,
    split_order,
)
from xctsam.util.atomic import write_text_atomic
from xctsam.util.tracking import log_stage

__all__ = ["NOT_RUN", "build_sections", "write_report"]

DEFECTS_PNG = "defects_recall.png"
SHIFT_PNG = "iou_vs_kid.png"


# ---------------------------------------------------------------- sections
def build_sections(params: Params, root: Path, out_dir: Path, models: Mapping[str, Path], data_root: Path, cache: LabelCache | None = None) -> list[Section]:
    """The report's sections in the study's order; a stage not run yet gives its note instead of a table."""
    metrics = root / "metrics"
    fid = read_json(metrics / "fid.json")
    scored = read_json(metrics / "eval.json")  # the trained models only, for the shift figure
    zero_shots = read_zero_shots(root / ZERO_SHOT_DIR)
    evaluation = with_zero_shots(scored, zero_shots)
    forgetting = read_json(metrics / "forgetting.json")
    order = split_order(fid, [split_name(folder) for folder in params.eval.splits])
    robustness_pngs = sorted((root / "reports" / "robustness").glob("*.png"))
    overlays = write_overlays(params.eval.splits, params.predict, data_root, models, out_dir, cache)
    return [
        Section("Distance to the training set (FID, KID)", note=distance_note(fid), table=distance_table(fid) if fid else None),
        Section("IoU per class: SAM-GAN vs U-Net", note=iou_note(evaluation, zero_shots), table=iou_table(evaluation, order) if evaluation else None),
        ablation_section(read_ablations(root / ABLATION_DIR, params.study.ablation), params.study.ablation, order),
        *forgetting_sections(forgetting, order),
        defects_section(read_json(metrics / "defects.json"), order, out_dir / DEFECTS_PNG),
        parts_section(params, data_root, models, order, cache),
        shift_section(scored, fid, out_dir / SHIFT_PNG),
        Section("Robustness to noise", note="" if robustness_pngs else NOT_RUN, images=robustness_pngs),
        Section("Overlays: input / truth / each model", note="" if overlays else f"{NOT_RUN} (no trained models)", images=overlays),
    ]


def ablation_section(ablations: Mapping[str, Any], planned: Sequence[str], order: Sequence[str]) -> Section:
    table = ablation_table(ablations, order) if ablations else None
    return Section("GAN ablation: trained on Tr-GAN vs Tr-sim", note=ablation_note(ablations, planned), table=table)


def forgetting_sections(forgetting: Mapping[str, Any] | None, order: Sequence[str]) -> list[Section]:
    """The deltas against SAM-GAN, and (once forgetting has run) the in- × out-of-domain matrix."""
    deltas = Section("Forgetting (IoU change against SAM-GAN)", note=forgetting_note(forgetting), table=forgetting_table(forgetting, order) if forgetting else None)
    if not forgetting or not forgetting.get("iou"):
        return [deltas]
    return [deltas, Section("Forgetting: in-domain × out-of-domain matrix", note=MATRIX_NOTE, table=forgetting_matrix(forgetting, order))]


def _drawn(png: Path | None, out_png: Path) -> list[Path]:
    """[png] when drawn; else [] and any earlier run's figure removed, so none outlives its data."""
    if png is None:
        out_png.unlink(missing_ok=True)
    return [png] if png is not None else []


def defects_section(defects: Mapping[str, Any] | None, order: Sequence[str], out_png: Path) -> Section:
    scored = defects if defects and defects.get("scores") else None
    images = _drawn(draw_defect_recall(scored, out_png) if scored else None, out_png)
    return Section("Per-defect detection", note=defects_note(scored), table=defects_table(scored, order) if scored else None, images=images)


def parts_section(params: Params, data_root: Path, models: Mapping[str, Path], order: Sequence[str], cache: LabelCache | None) -> Section:
    table = part_table(params.eval.splits, params.predict, params.defects, data_root, models, order, cache)
    return Section("Defect report per part: prediction vs truth", note=PARTS_NOTE if table is not None else f"{NOT_RUN} (no trained models)", table=table)


def shift_section(evaluation: Mapping[str, Any] | None, fid: Mapping[str, Any] | None, out_png: Path) -> Section:
    png = draw_iou_vs_kid(evaluation, fid, out_png) if evaluation and fid and fid.get("kid") else None
    images = _drawn(png, out_png)
    return Section("IoU against shift", note=shift_note(evaluation, fid, bool(images)), images=images)


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
    cache: LabelCache | None = None,
) -> tuple[Path, Path]:
    """Write out_dir/study.md, out_dir/study.html, out_dir/overlays/*.png and the figures
    (defects_recall.png, iou_vs_kid.png, when their metrics exist); return (md, html).

    `root` is the project folder holding metrics/, plots/, reports/robustness/ and models/; a
    relative `out_dir`, model path or `data_root` is taken relative to it. `models` maps
    eval.json keys ("sam", "unet") to checkpoints; by default models/<key>/best.pt. `data_root`
    holds the split folders the overlays are drawn from; by default params `study.root`.
    `cache`: where the evaluation stored its predicted labels (eval.label_cache); the overlays
    read theirs from it when there, instead of running the models again.
    """
    root = Path(root)
    data_root = root / (params.study.root if data_root is None else data_root)
    out_dir = root / out_dir
    models = {key: root / path for key, path in (default_models(root) if models is None else models).items()}
    sections = build_sections(params, root, out_dir, models, data_root, cache)
    md_path, html_path = out_dir / "study.md", out_dir / "study.html"
    write_text_atomic(md_path, render_markdown(sections, out_dir))
    write_text_atomic(html_path, render_html(sections))
    if log_mlflow:
        log_stage("report", artifacts=[md_path, html_path])
    return md_path, html_path
