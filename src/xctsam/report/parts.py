"""The report's defect report per part: each model's predicted part beside the ground truth.

For the first labelled volume of every evaluation split, the quality-control summary
`xctsam predict --report` writes for a user's part (eval.part_report: porosity, inclusion
fraction, pore and inclusion counts, internal ones, the largest pore) is computed on the truth
and on each model's prediction, so a reader sees whether a model's part report could be trusted.
Predictions come from the label cache where an evaluation stored them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from xctsam.config.defects import DefectsConfig
from xctsam.config.eval import PredictConfig
from xctsam.data.datasets import IntensityWindow
from xctsam.data.split_folders import split_name
from xctsam.data.volumes import Volume
from xctsam.eval.label_cache import LabelCache
from xctsam.eval.part_report import PartReport, part_defects
from xctsam.models.base import Segmenter
from xctsam.report.cells import fmt, percent
from xctsam.report.inputs import model_name
from xctsam.report.overlays import first_labelled_volume
from xctsam.report.tables import frame, ordered

TRUTH = "truth"
COLUMNS = ("porosity", "inclusion fraction", "pores", "internal pores", "inclusions", "largest pore")


def _predicted(model: Segmenter, window: IntensityWindow, volume: Volume, predict: PredictConfig, cache: LabelCache | None) -> np.ndarray:
    from xctsam.eval.predict import predict_volume

    stored = None if cache is None else cache.lookup(model, volume, window, predict)
    if stored is not None:
        return stored
    labels = np.zeros(volume.shape, dtype=np.uint8)  # the study's test volumes: tens of slices
    for prediction in predict_volume(model, volume, window, predict, progress=False):
        labels[prediction.z] = prediction.labels
    return labels


def _cells(report: PartReport) -> dict[str, str]:
    largest = max((defect.diameter for defect in report.defects if defect.cls == "pore"), default=None)
    return {
        "porosity": percent(report.porosity),
        "inclusion fraction": percent(report.inclusion_fraction),
        "pores": str(report.counts["pore"]["all"]),
        "internal pores": str(report.counts["pore"]["internal"]),
        "inclusions": str(report.counts["inclusion"]["all"]),
        "largest pore": fmt(largest),
    }


def part_table(splits: Sequence[str], predict: PredictConfig, defects: DefectsConfig, data_root: Path, models: Mapping[str, Path], order: Sequence[str], cache: LabelCache | None = None) -> pd.DataFrame | None:
    """Rows (split, truth | model), the COLUMNS of each part's report; None without models."""
    from xctsam.models.factory import load_segmenter

    present = {model_name(key): load_segmenter(path)[:2] for key, path in models.items() if Path(path).is_file()}
    if not present:
        return None
    columns: dict[str, dict[tuple[str, str], str]] = {name: {} for name in COLUMNS}
    rows: list[tuple[str, str]] = []
    by_split = {split_name(folder): folder for folder in splits}
    for split in ordered(by_split, order):
        volume_path = first_labelled_volume(data_root / by_split[split]) if (data_root / by_split[split]).is_dir() else None
        if volume_path is None:
            continue
        with Volume(volume_path) as volume:
            voxel_size = volume.attrs.get("voxel_size_mm")
            config = defects if voxel_size else defects.model_copy(update={"diameter_unit": "voxel"})
            labelled = {TRUTH: volume.labels(), **{name: _predicted(model, window, volume, predict, cache) for name, (model, window) in present.items()}}
            for source, labels in labelled.items():
                report = part_defects(lambda z0, z1, labels=labels: np.asarray(labels[z0:z1]), volume.shape, config, voxel_size=float(voxel_size or 1.0))
                row = (split, source)
                rows.append(row)
                for name, cell in _cells(report).items():
                    columns[name][row] = cell
    return frame(columns, rows, ["split", "labels"])
