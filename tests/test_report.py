"""The study report: tables from tiny metric files, overlays from tiny untrained U-Nets, HTML self-contained."""

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
from xctsam.report import NOT_RUN, write_report

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


def _rows_of(markdown: str, section: str) -> list[list[str]]:
    """Body rows of the first pipe table after the heading `section`, cells stripped."""
    body = markdown.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in body.splitlines() if line.startswith("|")][2:]  # skip header and rule
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


@pytest.fixture
def report(tmp_path: Path, params: Params, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path, Path]:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    root = tmp_path / "project"
    models = _make_project(root, params)
    md, html = write_report(params, root, Path("reports"), models)
    return root, md, html


def test_fid_table_orders_splits_ascending_with_rank(report: tuple[Path, Path, Path]) -> None:
    _, md, _ = report
    rows = _rows_of(md.read_text(), "FID")
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


def test_missing_forgetting_says_not_run_yet(report: tuple[Path, Path, Path]) -> None:
    _, md, html = report
    forgetting = md.read_text().split("## Forgetting", 1)[1].split("\n## ", 1)[0]
    assert NOT_RUN in forgetting
    assert NOT_RUN in html.read_text()


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
    assert text.count(NOT_RUN) == 4  # FID, IoU, robustness, overlays


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
