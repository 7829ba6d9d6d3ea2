"""What the CycleGAN trains on and is watched by: both domains' slices, windows and tile samplers,
and fixed slices for sample grids and for the structure check of translated labelled slices.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from skimage.util import montage

from xctsam.config.gan import GanConfig
from xctsam.data.datasets import (
    IntensityWindow,
    SliceReader,
    SliceRef,
    TileSampler,
    sample_slices,
    split_slices,
)
from xctsam.gan.cyclegan import Translator
from xctsam.gan.synthesize import mean_iou, slab_structure_iou
from xctsam.util.atomic import atomic_path

# The idealised render is noise-free: every grey value is real (inclusions are its rarest and
# brightest), so its window spans min..max. Scans are noisy: a robust percentile window.
WINDOW_PERCENTILES_A = (0.0, 100.0)
WINDOW_PERCENTILES_B = (0.5, 99.5)
SAMPLE_COLUMNS = 4  # slices per row of a sample grid
SAMPLE_SIZE = 256  # at most this many pixels square of each sample slice (central crop)
STRUCTURE_SLICES = 16  # domain-A slices whose translation is checked against their labels


@dataclass
class Domains:
    """Each domain's slices, intensity window and tile sampler."""

    refs_a: list[SliceRef]
    refs_b: list[SliceRef]
    window_a: IntensityWindow
    window_b: IntensityWindow
    sampler_a: TileSampler
    sampler_b: TileSampler


def sampler_and_pool_seeds(seed: int) -> list[int]:
    """Independent seeds for the two tile samplers and the two image pools."""
    return [int(s) for s in np.random.SeedSequence(seed).generate_state(4)]


def load_domains(config: GanConfig, seed: int, data_root: Path, windows: dict[str, dict] | None) -> Domains:
    """Both domains' slices under `data_root`, their windows (measured, or as a checkpoint stored them) and samplers."""
    refs_a = split_slices([Path(data_root) / config.domain_a])
    refs_b = split_slices([Path(data_root) / config.domain_b])
    if windows is None:
        window_a = IntensityWindow.measure(refs_a, WINDOW_PERCENTILES_A, seed=seed)
        window_b = IntensityWindow.measure(refs_b, WINDOW_PERCENTILES_B, seed=seed)
    else:
        window_a, window_b = IntensityWindow(**windows["a"]), IntensityWindow(**windows["b"])
    seed_a, seed_b = sampler_and_pool_seeds(seed)[:2]
    return Domains(refs_a, refs_b, window_a, window_b, TileSampler(refs_a, window_a, config.tile, seed_a), TileSampler(refs_b, window_b, config.tile, seed_b))


def _central_crop(image: np.ndarray, size: int) -> np.ndarray:
    y0, x0 = (image.shape[0] - size) // 2, (image.shape[1] - size) // 2
    return image[y0 : y0 + size, x0 : x0 + size]


@dataclass
class Monitor:
    """Fixed slices for sample grids (A, A->B, B) and for the structure check, chosen once by seed."""

    sample_a: np.ndarray  # (n, S, S) grey values
    sample_b: np.ndarray  # (n, S, S) in domain B's [0, 1] units
    check_images: list[np.ndarray]
    check_labels: list[np.ndarray]

    @classmethod
    def build(cls, domains: Domains, seed: int) -> Monitor:
        with SliceReader() as reader:
            a = [reader.image(ref) for ref in sample_slices(domains.refs_a, SAMPLE_COLUMNS, seed)]
            b = [reader.image(ref) for ref in sample_slices(domains.refs_b, SAMPLE_COLUMNS, seed)]
            checked = sample_slices(domains.refs_a, STRUCTURE_SLICES, seed + 1)
            images, labels = [reader.image(ref) for ref in checked], [reader.labels(ref) for ref in checked]
        size = min(SAMPLE_SIZE, *(min(image.shape) for image in a + b))
        crop_a = np.stack([_central_crop(image, size) for image in a])
        crop_b = domains.window_b.normalise(np.stack([_central_crop(image, size) for image in b]))
        return cls(crop_a, crop_b, images, labels)

    def grid(self, translator: Translator) -> np.ndarray:
        """uint8 image: one column per slice, rows A, A->B, B, each shown in its window."""
        rows = [translator.window_a.normalise(self.sample_a), translator.unit(self.sample_a), self.sample_b]
        canvas = montage(np.concatenate(rows), grid_shape=(len(rows), len(self.sample_a)), padding_width=2, fill=1.0)
        return (np.clip(canvas, 0, 1) * 255).round().astype(np.uint8)

    def structure_iou(self, translator: Translator) -> float:
        ious = [iou for image, labels in zip(self.check_images, self.check_labels) for iou in slab_structure_iou(translator(image[None]), labels[None])]
        return mean_iou(ious)


def save_grid(path: Path, grid: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")
