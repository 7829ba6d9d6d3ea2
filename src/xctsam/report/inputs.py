"""What the report reads: the metric JSON of each stage, zero-shot baselines, the GAN ablation,
the models' names."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

MODEL_NAMES = {"sam": "SAM-GAN", "unet": "U-Net"}  # eval.json keys -> the study's names
ZERO_SHOT_DIR = Path("metrics/zero_shot")  # one eval.json-like file per zero_shot@<name> stage
ABLATION_DIR = Path("metrics/ablation")  # <kind>.json per evaluate_ablation@<kind>: <kind> and <kind>-sim
ABLATION_NAMES = {"sam": "SAM", "unet": "U-Net"}  # the ablation's kinds; "SAM-GAN Tr-sim" would contradict itself


def read_json(path: Path) -> Any | None:
    """The parsed file, or None when the stage that writes it has not run yet."""
    return json.loads(Path(path).read_text()) if Path(path).is_file() else None


def model_name(key: str) -> str:
    """The study's name of an eval.json model key ("sam" -> "SAM-GAN"); other keys as they are."""
    return MODEL_NAMES.get(key, key)


def read_zero_shots(folder: Path) -> dict[str, Any]:
    """{baseline name: its eval.json-like report} of every zero-shot file in `folder`."""
    return {path.stem: json.loads(path.read_text()) for path in sorted(Path(folder).glob("*.json"))}


def read_ablations(folder: Path, kinds: Iterable[str]) -> dict[str, Any]:
    """{kind: its eval.json-like report} of the ablation files of `kinds` (params study.ablation)
    found in `folder`, in that order. A file of a kind not planned is another study's (e.g. the
    embedded default's, in the real-data mode, which runs no ablation) and is not read."""
    folder = Path(folder)
    return {kind: json.loads((folder / f"{kind}.json").read_text()) for kind in kinds if (folder / f"{kind}.json").is_file()}


def with_zero_shots(evaluation: Mapping[str, Any] | None, zero_shots: Mapping[str, Any]) -> dict[str, Any] | None:
    """The evaluation with each zero-shot baseline as one more model, "zero-shot (<name>)"
    (its other keys, intervals and differences included, as they are: baselines have none)."""
    if not zero_shots:
        return dict(evaluation) if evaluation else None
    evaluation = evaluation or {}
    merged: dict[str, Any] = {**evaluation, "iou": dict(evaluation.get("iou", {})), "miou": dict(evaluation.get("miou", {}))}
    for name, report in zero_shots.items():
        for key in report["iou"]:  # one model per file: the pretrained SAM it prompted
            merged["iou"][f"zero-shot ({name})"] = report["iou"][key]
            merged["miou"][f"zero-shot ({name})"] = report.get("miou", {}).get(key, {})
    return merged
