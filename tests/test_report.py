"""The study report: tables from tiny metric files, overlays from tiny untrained U-Nets, HTML self-contained.

The first tests use the old metrics layout (FID only, no intervals): the report must still
render, without the new columns. The later ones write every metrics file in the new layout by
hand (KID and floor, IoU intervals and paired differences, the GAN ablation, forgetting with
intervals and roles, per-defect scores) and check cells against hand computations.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from xctsam.config.params import Params, parse_params
from xctsam.data.datasets import IntensityWindow
from xctsam.data.volumes import write_volume
from xctsam.models.checkpoint import save_segmenter_checkpoint
from xctsam.models.factory import build_segmenter, model_meta
from xctsam.report.stage import NOT_RUN, write_report

SPLITS = ["Te-1", "Te-2", "Te-3"]
FID = {"Te-1": 30.0, "Te-2": 10.0, "Te-3": 20.0}  # ascending order: Te-2, Te-3, Te-1


@pytest.fixture
def params(tiny_params: dict) -> Params:
    tiny_params["eval"] = {"splits": [f"real/{split}" for split in SPLITS]}
    tiny_params["predict"] = {"tile": 16, "overlap": 0.25, "batch": 4}
    tiny_params["unet"] = {"context": 3, "filters": 4, "depth": 2}
    return parse_params(tiny_params)


def _write_json(path: Path, value: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


def _iou(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {split: {cls: float(rng.uniform()) for cls in ("background", "material", "pore", "inclusion")} for split in SPLITS}


def _make_project(root: Path, params: Params) -> dict[str, Path]:
    """Metrics, a robustness PNG, one labelled 9x24x24 volume per split and two untrained U-Nets."""
    iou = {"sam": _iou(1), "unet": _iou(2)}
    _write_json(root / "metrics" / "fid.json", {"fid": FID, "pairs": {}, "backbone": "fake", "samples": 2, "reference": "synthetic/Tr-GAN"})
    _write_json(root / "metrics" / "eval.json", {"iou": iou, "miou": {model: {s: 0.5 for s in SPLITS} for model in iou}})
    rng = np.random.default_rng(0)
    for split in SPLITS:
        labels = rng.integers(0, 4, size=(9, 24, 24)).astype(np.uint8)
        write_volume(root / "data" / "real" / split / f"{split}_000.h5", labels.astype(np.float32) / 3, labels)
    from matplotlib.figure import Figure

    robustness = root / "reports" / "robustness" / "Te-3_pore.png"
    robustness.parent.mkdir(parents=True)
    Figure(figsize=(1, 1)).savefig(robustness)
    models = {}
    for key in ("sam", "unet"):  # the report only loads checkpoints: an untrained U-Net stands in for SAM
        models[key] = root / "models" / key / "best.pt"
        model = build_segmenter("unet", params.unet, params.train.unet)
        save_segmenter_checkpoint(models[key], model, model_meta("unet", params.unet, params.train.unet, IntensityWindow(0.0, 1.0)), {"step": 0})
    return models


def _section(markdown: str, section: str) -> str:
    """The body of the first section whose heading starts with `section`, up to the next one."""
    return markdown.split(f"## {section}", 1)[1].split("\n", 1)[1].split("\n## ", 1)[0]


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _rows_of(markdown: str, section: str) -> list[list[str]]:
    """Body rows of the first pipe table after the heading `section`, cells stripped."""
    lines = [line for line in _section(markdown, section).splitlines() if line.startswith("|")][2:]  # skip header and rule
    return [_cells(line) for line in lines]


def _header_of(markdown: str, section: str) -> list[str]:
    """Column names of the first pipe table after the heading `section`."""
    return _cells(next(line for line in _section(markdown, section).splitlines() if line.startswith("|")))


@pytest.fixture
def report(tmp_path: Path, params: Params, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path, Path]:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    root = tmp_path / "project"
    models = _make_project(root, params)
    md, html = write_report(params, root, Path("reports"), models)
    return root, md, html


def test_fid_table_orders_splits_ascending_with_rank(report: tuple[Path, Path, Path]) -> None:
    _, md, _ = report
    text = md.read_text()
    assert _header_of(text, "Distance to the training set") == ["rank", "split", "FID"]  # old layout: no KID, no floor
    rows = _rows_of(text, "Distance to the training set")
    assert [row[1] for row in rows] == sorted(FID, key=FID.get)
    assert [int(row[0]) for row in rows] == [1, 2, 3]
    assert [float(row[2]) for row in rows] == sorted(FID.values())


def test_iou_table_compares_both_models_per_class(report: tuple[Path, Path, Path]) -> None:
    root, md, _ = report
    text = md.read_text()
    header = text.split("## IoU", 1)[1].splitlines()
    assert any("SAM-GAN" in line and "U-Net" in line for line in header[:6])
    rows = _rows_of(text, "IoU")
    iou = json.loads((root / "metrics" / "eval.json").read_text())["iou"]
    pore = next(row for row in rows if row[0] == "Te-2" and row[1] == "pore")
    assert float(pore[2]) == pytest.approx(iou["sam"]["Te-2"]["pore"], abs=1e-3)
    assert float(pore[3]) == pytest.approx(iou["unet"]["Te-2"]["pore"], abs=1e-3)
    assert float(pore[4]) == pytest.approx(iou["sam"]["Te-2"]["pore"] - iou["unet"]["Te-2"]["pore"], abs=2e-3)
    assert rows[0][0] == "Te-2"  # splits follow the FID order
    assert "[" not in _section(text, "IoU per class") and "n.s." not in text  # old layout: no intervals
    assert "fid.json has no KID" in _section(text, "IoU against shift")
    assert not (root / "reports" / "iou_vs_kid.png").exists() and not (root / "reports" / "defects_recall.png").exists()


def test_missing_forgetting_says_not_run_yet(report: tuple[Path, Path, Path]) -> None:
    _, md, html = report
    forgetting = md.read_text().split("## Forgetting", 1)[1].split("\n## ", 1)[0]
    assert NOT_RUN in forgetting
    assert NOT_RUN in html.read_text()


def test_each_split_has_a_part_report_of_the_truth_beside_each_model(report: tuple[Path, Path, Path], params: Params) -> None:
    from xctsam.data.volumes import Volume
    from xctsam.eval.part_report import part_defects

    root, md, _ = report
    assert _header_of(md.read_text(), "Defect report per part") == ["split", "labels", "porosity", "inclusion fraction", "pores", "internal pores", "inclusions", "largest pore"]
    rows = _rows_of(md.read_text(), "Defect report per part")
    shown = [row[0] for row in rows[::3]]  # splits in the report's order (by distance to training)
    assert sorted(shown) == sorted(SPLITS)
    assert [row[:2] for row in rows] == [[split, source] for split in shown for source in ("truth", "SAM-GAN", "U-Net")]
    with Volume(root / "data" / "real" / shown[0] / f"{shown[0]}_000.h5") as volume:
        labels = volume.labels()
    truth = part_defects(lambda z0, z1: labels[z0:z1], labels.shape, params.defects)
    assert rows[0][4] == str(truth.counts["pore"]["all"]) and rows[0][6] == str(truth.counts["inclusion"]["all"])
    assert float(rows[0][2].rstrip("%")) == pytest.approx(100 * truth.porosity, abs=1e-3)


def test_overlays_per_split_and_html_is_self_contained(report: tuple[Path, Path, Path]) -> None:
    root, md, html = report
    overlays = sorted((root / "reports" / "overlays").glob("*.png"))
    assert [p.name for p in overlays] == [f"{split}_z{z:03d}.png" for split in SPLITS for z in (3, 4)]
    page = html.read_text()
    # every overlay and the robustness plot embedded, nothing fetched from elsewhere
    assert page.count('src="data:image/png;base64,') == len(overlays) + 1
    assert not re.search(r'src="(?!data:)', page)
    assert "overlays/Te-1_z003.png" in md.read_text()


def test_forgetting_table_when_present(tmp_path: Path, params: Params, monkeypatch: pytest.MonkeyPatch) -> None:
    deltas = {"SAM-FineReal": {**{s: {"pore": 0.1 * i} for i, s in enumerate(SPLITS)}, "mean": {"pore": 0.1}}}
    _write_json(tmp_path / "metrics" / "forgetting.json", {"iou": {}, "deltas": deltas})
    md, _ = write_report(params, tmp_path, Path("out"), {}, log_mlflow=False)
    text = md.read_text()
    rows = _rows_of(text, "Forgetting")
    assert [(row[0], row[1]) for row in rows] == [("SAM-FineReal", s) for s in [*SPLITS, "mean"]]
    assert [float(row[2]) for row in rows] == pytest.approx([0.0, 0.1, 0.2, 0.1])
    assert _header_of(text, "Forgetting") == ["variant", "split", "pore"]  # old layout: no role column
    assert "Forgetting: in-domain" not in text  # "iou": {} gives no matrix
    assert text.count(NOT_RUN) == 8  # distance, IoU, ablation, defects, part reports, shift, robustness, overlays


def test_zero_shot_baselines_join_the_iou_table(tmp_path: Path, params: Params) -> None:
    evaluation = {"sam": _iou(1), "unet": _iou(2)}
    _write_json(tmp_path / "metrics" / "eval.json", {"iou": evaluation, "miou": {m: {s: 0.5 for s in SPLITS} for m in evaluation}})
    zero_shot = _iou(3)
    _write_json(tmp_path / "metrics" / "zero_shot" / "stand_in.json", {"iou": {"sam_zero_shot": zero_shot}, "miou": {"sam_zero_shot": {s: 0.25 for s in SPLITS}}})
    md, _ = write_report(params, tmp_path, Path("out"), {}, log_mlflow=False)
    text = md.read_text()
    header = next(line for line in text.split("## IoU", 1)[1].splitlines() if line.startswith("|"))
    columns = [cell.strip() for cell in header.strip("|").split("|")]
    assert "zero-shot (stand_in)" in columns and "SAM-GAN − U-Net" in columns
    column = columns.index("zero-shot (stand_in)")
    rows = _rows_of(text, "IoU")
    pore = next(row for row in rows if row[0] == "Te-3" and row[1] == "pore")
    assert float(pore[column]) == pytest.approx(zero_shot["Te-3"]["pore"], abs=1e-3)
    assert float(next(row for row in rows if row[0] == "Te-3" and row[1] == "mIoU")[column]) == pytest.approx(0.25)
    assert "prompted by one box per ground-truth component" in text


# ---------------------------------------------------------------- the new layout, by hand
# KID ranks Te-3, Te-2, Te-1 (FID alone would rank Te-1, Te-3, Te-2). Beyond the floor when
# mean - 0.010 > 2 sqrt(std^2 + 0.002^2): Te-3 0.0006 < 0.0045 no; Te-2 0.0084 < 0.0089 no
# (2 * std alone, 0.008, would say yes); Te-1 0.020 > 0.0108 yes; the pair 0.19 yes.
FID_NEW = {
    "backbone": "fake",
    "samples": 4,
    "crops_per_slice": 2,
    "reference": "synthetic/Tr-GAN",
    "features": {folder: 8 for folder in ["synthetic/Tr-GAN", *[f"real/{split}" for split in SPLITS]]},
    "fid": {"Te-1": 5.0, "Te-2": 40.0, "Te-3": 20.0},
    "kid": {"Te-1": {"mean": 0.030, "std": 0.005}, "Te-2": {"mean": 0.0184, "std": 0.004}, "Te-3": {"mean": 0.0106, "std": 0.001}},
    "pairs": {"Tr-sim_vs_Tr-real": 55.5},
    "kid_pairs": {"Tr-sim_vs_Tr-real": {"mean": 0.2, "std": 0.01}},
    "floor": {"fid": 3.25, "kid": {"mean": 0.010, "std": 0.002}, "volumes": [["a.h5"], ["b.h5"]]},
}
CLASSES = ("background", "material", "pore", "inclusion")


def _scores(offset: float) -> dict:
    """{split: {class: IoU}}, every value distinct; inclusion undefined (null) on Te-1."""
    return {
        split: {cls: (None if (split, cls) == ("Te-1", "inclusion") else round(0.9 - 0.1 * j - 0.02 * i + offset, 3)) for j, cls in enumerate(CLASSES)}
        for i, split in enumerate(SPLITS)
    }


def _eval_layout(a: str, b: str, scores_a: dict, scores_b: dict) -> dict:
    """An eval.json of two models with intervals (IoU ± 0.01), units and their paired difference."""
    iou = {a: scores_a, b: scores_b}
    ci = {m: {s: {c: (None if v is None else [round(v - 0.01, 3), round(v + 0.01, 3)]) for c, v in cs.items()} for s, cs in per.items()} for m, per in iou.items()}
    differences = {
        s: {c: ({"value": None, "low": None, "high": None, "significant": False} if scores_a[s][c] is None else {"value": 0.1, "low": 0.05, "high": 0.15, "significant": True}) for c in CLASSES}
        for s in SPLITS
    }
    return {
        "iou": iou,
        "iou_ci": ci,
        "miou": {m: {s: 0.5 for s in SPLITS} for m in iou},
        "bootstrap_unit": {m: {"Te-1": "volume", "Te-2": "slice", "Te-3": "slice"} for m in iou},
        "differences": {f"{a} - {b}": differences},
        "bootstrap": {"resamples": 200, "level": 0.95, "seed": 7},
    }


def _bin(low: float, high: float | None, n_true: int, n_detected: int) -> dict:
    return {"low": low, "high": high, "n_true": n_true, "n_detected": n_detected, "recall": n_detected / n_true if n_true else None, "n_pred": 0, "n_pred_matched": 0, "precision": None}


def _defect_report(f1: float, recall: float, precision: float, detected: tuple[int, int], porosity: tuple[float, float]) -> dict:
    """A DefectReport dict: two size bins of 4 true defects each, `detected` of them found."""
    score = {"n_true": 8, "n_detected": sum(detected), "recall": recall, "n_pred": 5, "n_pred_matched": 4, "precision": precision, "f1": f1}
    location = {**score, "bins": [_bin(0.0, 2.0, 4, detected[0]), _bin(2.0, None, 4, detected[1])]}
    empty = {**score, "bins": []}
    return {"unit": "voxel", "classes": {cls: {"all": location, "surface": empty, "internal": empty} for cls in ("pore", "inclusion")}, "porosity_true": porosity[0], "porosity_pred": porosity[1]}


def _write_new_layout(root: Path, *, ablation: bool = True) -> None:
    metrics = root / "metrics"
    _write_json(metrics / "fid.json", FID_NEW)
    evaluation = _eval_layout("sam", "unet", _scores(0.0), _scores(-0.05))
    evaluation["iou"]["sam"]["Te-2"]["pore"], evaluation["iou_ci"]["sam"]["Te-2"]["pore"] = 0.958, [0.941, 0.970]
    evaluation["differences"]["sam - unet"]["Te-2"]["pore"] = {"value": -0.012, "low": -0.030, "high": 0.004, "significant": False}
    _write_json(metrics / "eval.json", evaluation)
    if ablation:  # sam only: the unet ablation has not run
        _write_json(metrics / "ablation" / "sam.json", _eval_layout("sam", "sam-sim", _scores(0.0), _scores(-0.1)))
    before, after = _scores(0.0), _scores(0.02)
    deltas = {s: {c: (None if before[s][c] is None else round(after[s][c] - before[s][c], 3)) for c in CLASSES} for s in SPLITS}
    intervals = {s: {c: {"low": -0.01, "high": 0.05, "significant": False} for c in CLASSES} for s in SPLITS}
    intervals["mean"] = {c: {"low": 0.01, "high": 0.03, "significant": True} for c in CLASSES}
    _write_json(
        metrics / "forgetting.json",
        {
            "iou": {"SAM-GAN": before, "SAM-FineReal": after},
            "deltas": {"SAM-FineReal": {**deltas, "mean": {c: 0.02 for c in CLASSES}}},
            "intervals": {"SAM-FineReal": intervals},
            "roles": {"Te-1": "transfer", "Te-2": "adaptation", "Te-3": "transfer"},
            "mean_of": ["Te-1", "Te-3"],
        },
    )
    scores = {"sam": {s: _defect_report(0.8, 0.75, 0.875, (1, 2), (0.0123, 0.01)) for s in SPLITS}, "unet": {s: _defect_report(0.5, 0.5, 0.5, (2, 0), (0.0123, 0.02)) for s in SPLITS}}
    scores["sam"]["Te-2"] = _defect_report(0.6, 0.625, None, (4, 1), (0.02, 0.015))  # precision undefined
    _write_json(metrics / "defects.json", {"config": {"margin": 0, "surface_depth": 3}, "scores": scores})


@pytest.fixture
def new_report(tmp_path: Path, params: Params) -> tuple[Path, str]:
    _write_new_layout(tmp_path)
    md, _ = write_report(params, tmp_path, Path("out"), {}, log_mlflow=False)
    return tmp_path / "out", md.read_text()


def test_distance_table_ranks_by_kid_with_floor(new_report: tuple[Path, str]) -> None:
    _, text = new_report
    assert _header_of(text, "Distance to the training set") == ["rank", "split", "FID", "KID", "beyond floor"]
    assert _rows_of(text, "Distance to the training set") == [
        ["1", "Te-3", "20.000", "0.011 ± 0.001", "no"],
        ["2", "Te-2", "40.000", "0.018 ± 0.004", "no"],
        ["3", "Te-1", "5.000", "0.030 ± 0.005", "yes"],
        ["", "Tr-sim_vs_Tr-real", "55.500", "0.200 ± 0.010", "yes"],
        ["", "floor (reference halves by volume)", "3.250", "0.010 ± 0.002", "–"],
    ]
    note = _section(text, "Distance to the training set")
    assert "backbone fake, 4 slices per split × 2 crop(s) each (8 feature vectors per set)" in note
    assert "A distance within its floor says nothing about shift" in note


def test_iou_cells_carry_intervals_and_paired_differences(new_report: tuple[Path, str]) -> None:
    _, text = new_report
    assert _header_of(text, "IoU per class") == ["split", "class", "SAM-GAN", "U-Net", "SAM-GAN − U-Net"]
    rows = {(row[0], row[1]): row[2:] for row in _rows_of(text, "IoU per class")}
    assert [split for split, _ in rows][::5] == ["Te-3", "Te-2", "Te-1"]  # KID order, 4 classes + mIoU each
    assert rows[("Te-2", "pore")] == ["0.958 [0.941, 0.970]", "0.630 [0.620, 0.640]", "-0.012 [-0.030, 0.004] n.s."]
    assert rows[("Te-3", "material")] == ["0.760 [0.750, 0.770]", "0.710 [0.700, 0.720]", "0.100 [0.050, 0.150]"]
    assert rows[("Te-1", "inclusion")] == ["–", "–", "–"]
    assert rows[("Te-1", "mIoU")] == ["0.500", "0.500", "0.000"]  # no interval for the mean
    note = _section(text, "IoU per class")
    assert "95% bootstrap interval (200 resamples, seed 7, resampling by Te-1: volume, Te-2: slice, Te-3: slice)" in note
    assert "n.s. = its 95% interval contains 0" in note


def test_ablation_table_and_a_kind_not_run(new_report: tuple[Path, str]) -> None:
    _, text = new_report
    assert _header_of(text, "GAN ablation") == ["split", "class", "SAM Tr-GAN", "SAM Tr-sim", "SAM GAN − sim"]
    rows = {(row[0], row[1]): row[2:] for row in _rows_of(text, "GAN ablation")}
    assert rows[("Te-2", "pore")] == ["0.680 [0.670, 0.690]", "0.580 [0.570, 0.590]", "0.100 [0.050, 0.150]"]
    assert "U-Net: not run yet." in _section(text, "GAN ablation")


def test_ablation_wording_without_an_untranslated_split(tmp_path: Path, params: Params) -> None:
    _write_new_layout(tmp_path, ablation=False)
    real_mode = params.model_copy(update={"study": params.study.model_copy(update={"ablation": []})})
    md, _ = write_report(real_mode, tmp_path, Path("out"), {}, log_mlflow=False)
    section = _section(md.read_text(), "GAN ablation")
    assert "no untranslated training split in this mode: the real-data release ships only the GAN-translated set" in section
    assert NOT_RUN not in section and "|" not in section
    md, _ = write_report(params, tmp_path, Path("out"), {}, log_mlflow=False)  # planned, not run
    assert _section(md.read_text(), "GAN ablation").strip() == f"_{NOT_RUN}_"


def test_real_mode_ignores_an_ablation_file_left_by_another_mode(tmp_path: Path, params: Params) -> None:
    # a clone switched to the real-data mode still holds the embedded default's committed
    # metrics/ablation/*.json; no stage of this mode wrote them, so the report must not show them
    _write_new_layout(tmp_path, ablation=True)
    real_mode = params.model_copy(update={"study": params.study.model_copy(update={"ablation": []})})
    md, _ = write_report(real_mode, tmp_path, Path("out"), {}, log_mlflow=False)
    section = _section(md.read_text(), "GAN ablation")
    assert "no untranslated training split in this mode" in section and "|" not in section


def test_forgetting_with_intervals_roles_and_matrix(new_report: tuple[Path, str]) -> None:
    _, text = new_report
    assert _header_of(text, "Forgetting (") == ["variant", "split", "role", *CLASSES]
    rows = _rows_of(text, "Forgetting (")
    assert [row[1:3] for row in rows] == [["Te-3", "transfer"], ["Te-2", "adaptation"], ["Te-1", "transfer"], ["mean (Te-1, Te-3)", "–"]]
    assert rows[0][4] == "0.020 [-0.010, 0.050] n.s."  # material on Te-3
    assert rows[2][6] == "–"  # inclusion undefined on Te-1
    assert rows[3][3] == "0.020 [0.010, 0.030]"  # significant: no n.s.
    # the adaptation split first, then the others in KID order; before (_scores(0)): Te-2
    # material 0.78, pore 0.68, inclusion 0.58; Te-3 0.76, 0.66, 0.56; Te-1 0.8, 0.7, null
    assert _header_of(text, "Forgetting: in-domain") == ["model", "Te-2 (adaptation)", "Te-3", "Te-1"]
    matrix = {row[0]: row[1:] for row in _rows_of(text, "Forgetting: in-domain")}
    assert matrix["SAM-GAN (before)"] == [f"{(0.78 + 0.68 + 0.58) / 3:.3f}", f"{(0.76 + 0.66 + 0.56) / 3:.3f}", f"{(0.8 + 0.7) / 2:.3f}"]
    assert matrix["SAM-FineReal (after)"] == ["0.700", "0.680", "0.770"]


def test_defects_table_and_both_figures(new_report: tuple[Path, str]) -> None:
    out, text = new_report
    assert _header_of(text, "Per-defect detection") == [
        "model", "split", "pore F1", "pore recall", "pore precision", "inclusion F1", "inclusion recall", "inclusion precision", "porosity true", "porosity predicted",
    ]  # fmt: skip
    rows = {(row[0], row[1]): row[2:] for row in _rows_of(text, "Per-defect detection")}
    assert list(rows)[:3] == [("SAM-GAN", "Te-3"), ("SAM-GAN", "Te-2"), ("SAM-GAN", "Te-1")]
    assert rows[("SAM-GAN", "Te-3")] == ["0.800", "0.750", "0.875", "0.800", "0.750", "0.875", "1.230%", "1.000%"]
    assert rows[("SAM-GAN", "Te-2")][:3] == ["0.600", "0.625", "–"] and rows[("SAM-GAN", "Te-2")][6:] == ["2.000%", "1.500%"]
    assert rows[("U-Net", "Te-1")][-1] == "2.000%"
    for name in ("defects_recall.png", "iou_vs_kid.png"):
        png = out / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        assert f"]({name})" in text
    assert "Dashed line: the floor's KID." in _section(text, "IoU against shift")


def test_recall_pooled_over_splits_per_bin() -> None:
    from xctsam.report.figures import bin_labels, pooled_recall

    per_split = {"Te-1": _defect_report(0, 0, 0, (1, 2), (0, 0)), "Te-2": _defect_report(0, 0, 0, (4, 1), (0, 0))}
    lows, recall = pooled_recall(per_split, "pore")
    assert lows == [0.0, 2.0] and recall == [5 / 8, 3 / 8]  # summed counts, not the mean of recalls
    assert bin_labels(lows) == ["[0, 2)", "≥ 2"]


def test_html_embeds_the_new_figures(tmp_path: Path, params: Params) -> None:
    _write_new_layout(tmp_path)
    _, html = write_report(params, tmp_path, Path("out"), {}, log_mlflow=False)
    page = html.read_text()
    assert page.count('src="data:image/png;base64,') == 2
    assert "0.958 [0.941, 0.970]" in page and "n.s." in page
