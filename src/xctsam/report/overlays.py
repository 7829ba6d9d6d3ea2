"""Overlay PNGs: input / truth / each model for two slices of the first labelled volume of a split."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from xctsam.config.eval import PredictConfig
from xctsam.data.split_folders import split_name, split_volumes
from xctsam.data.volumes import Volume
from xctsam.eval.label_cache import LabelCache
from xctsam.report.inputs import model_name
from xctsam.util.atomic import atomic_path

OVERLAY_FRACTIONS = (1 / 3, 1 / 2)  # slices shown per split, as fractions of the volume depth
# RGBA per label: background transparent so the input shows through, then material, pore, inclusion
LABEL_COLOURS = np.array([(0, 0, 0, 0), (0.6, 0.6, 0.6, 0.55), (0.9, 0.1, 0.1, 0.9), (1.0, 0.9, 0.0, 0.9)], dtype=np.float32)


def overlay_slices(n_slices: int) -> list[int]:
    return sorted({min(int(n_slices * fraction), n_slices - 1) for fraction in OVERLAY_FRACTIONS})


def first_labelled_volume(split_dir: Path) -> Path | None:
    for path in split_volumes(split_dir):
        with Volume(path) as volume:
            if volume.has_labels:
                return path
    return None


def predicted_slices(model: Any, window: Any, volume: Volume, slices: Sequence[int], predict: PredictConfig, cache: LabelCache | None = None) -> dict[int, np.ndarray]:
    """Labels of `slices`: from the evaluation's stored whole-volume labels when `cache` holds
    them, else of these slices only, each predicted with its own context (not the slices before it)."""
    from xctsam.eval.predict import predict_volume

    stored = None if cache is None else cache.lookup(model, volume, window, predict)
    if stored is not None:
        return {z: np.asarray(stored[z]) for z in slices}
    return {prediction.z: prediction.labels for prediction in predict_volume(model, volume, window, predict, progress=False, slices=slices)}


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


def write_overlays(splits: Sequence[str], predict: PredictConfig, data_root: Path, models: Mapping[str, Path], out_dir: Path, cache: LabelCache | None = None) -> list[Path]:
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
            predictions = {name: predicted_slices(model, window, volume, slices, predict, cache) for name, (model, window, _) in loaded.items()}
            for z in slices:
                panels = {"truth": volume.labels(z, z + 1)[0], **{name: found[z] for name, found in predictions.items()}}
                out_png = out_dir / "overlays" / f"{split_name(folder)}_z{z:03d}.png"
                draw_overlay(volume.image(z, z + 1)[0], panels, f"{split_name(folder)} · {volume_path.name} · z={z}", out_png)
                written.append(out_png)
    return written
