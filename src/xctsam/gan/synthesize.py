"""Translate the labelled idealised render (domain A) into GAN-synthetic experimental-looking
volumes (Tr-GAN), slice by slice, with the labels copied unchanged.

The translation must not move the part: `structure_iou` compares an Otsu split of each
translated slice with its solid label (material and inclusion; pores are dark in XCT), and the
mean goes into the output split's manifest, every volume's attrs and MLflow.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from skimage.filters import threshold_otsu

from xctsam.config.params import Params
from xctsam.data.split_folders import split_volumes, write_manifest
from xctsam.data.volumes import Volume, VolumeWriter
from xctsam.gan.cyclegan import Translator
from xctsam.util.atomic import atomic_dir
from xctsam.util.device import pick_device
from xctsam.util.errors import InputError
from xctsam.util.hashing import file_sha256, fingerprint
from xctsam.util.progress import track
from xctsam.util.tracking import log_stage

SOLID_LABELS = (1, 3)  # material and inclusion attenuate more than air and pores: bright in XCT
SLAB = 8  # slices translated per generator call


def structure_iou(translated: np.ndarray, labels: np.ndarray) -> float:
    """IoU of the Otsu-bright part of one slice with its solid label; NaN if both are empty."""
    solid = np.isin(labels, SOLID_LABELS)
    bright = translated > threshold_otsu(translated)
    union = np.count_nonzero(solid | bright)
    if union == 0:
        return math.nan
    return np.count_nonzero(solid & bright) / union


def slab_structure_iou(translated: np.ndarray, labels: np.ndarray) -> list[float]:
    """structure_iou of every slice of a (Z, Y, X) slab."""
    return [structure_iou(image, label) for image, label in zip(translated, labels)]


def mean_iou(values: list[float]) -> float:
    """Mean over the slices where the IoU is defined (NaN if none is)."""
    defined = [v for v in values if not math.isnan(v)]
    return float(np.mean(defined)) if defined else math.nan


def _labelled_sources(source_dir: Path) -> list[Path]:
    sources = split_volumes(source_dir)
    if not sources:
        raise InputError(source_dir, "no volumes (*.h5) to translate", "run the stage that makes gan.domain_a (dvc repro)")
    for path in sources:
        with Volume(path) as volume:
            if not volume.has_labels:
                raise InputError(path, "domain-A volume has no labels", "gan.domain_a must be a labelled split (the idealised render)")
    return sources


def _volume_attrs(source: Volume, split: str, provenance: dict[str, Any]) -> dict[str, Any]:
    """The source's metadata, re-labelled as a translated volume and stamped with its origin."""
    origin = {**provenance, "source_volume": str(source.path), "source_fingerprint": source.attrs.get("fingerprint")}
    return {
        **source.attrs,
        "split": split,
        "kind": "synthetic",
        "intensity": f"grey values of {provenance['domain_b']} (CycleGAN translation)",
        "fingerprint": fingerprint(origin["source_fingerprint"], provenance["generator_sha256"]),
        "gan": origin,
    }


def slab_noise_seed(seed: int, volume_index: int, z0: int) -> int:
    """The noise inputs' seed of one slab: every slab of every volume draws its own noise."""
    return int(np.random.SeedSequence([seed, volume_index, z0]).generate_state(1)[0])


def translate_volume(translator: Translator, source: Path, target: Path, split: str, provenance: dict[str, Any], slab: int = SLAB, seed: tuple[int, int] = (0, 0)) -> list[float]:
    """Write the translated copy of one labelled volume; returns the structure IoU of each slice.

    `seed` (params seed, volume index) seeds the generator's noise inputs, if it has any.
    """
    ious: list[float] = []
    with Volume(source) as volume, VolumeWriter(target, volume.shape, labelled=True, attrs=_volume_attrs(volume, split, provenance)) as out:
        for z0, image, labels in volume.iter_slabs(slab):
            translated = translator(image, batch=slab, noise_seed=slab_noise_seed(*seed, z0))
            out.write(z0, translated, labels, source=source)
            ious.extend(slab_structure_iou(translated, labels))
        out.set_attrs(structure_iou=mean_iou(ious))
    return ious


def synthesize(params: Params, data_root: Path, generator_path: Path) -> list[Path]:
    """Translate every volume of gan.domain_a into gan.output (same file names); returns their paths.

    The output split is written to a temporary folder and renamed into place, so a failure
    leaves the previous split (or nothing) instead of a partial one.
    """
    config = params.gan
    data_root, generator_path = Path(data_root), Path(generator_path)
    sources = _labelled_sources(data_root / config.domain_a)
    target_dir = data_root / config.output
    translator = Translator.load(generator_path, pick_device())
    provenance = {
        "generator": str(generator_path),
        "generator_sha256": file_sha256(generator_path),
        "generator_step": translator.step,
        "domain_a": config.domain_a,
        "domain_b": translator.meta.get("domain_b", config.domain_b),
        "window_a": translator.window_a.to_dict(),
        "window_b": translator.window_b.to_dict(),
    }
    slice_ious: dict[str, list[float]] = {}
    with atomic_dir(target_dir) as tmp:
        for index, source in enumerate(track(sources, "gan synthesize", total=len(sources))):
            slice_ious[source.name] = translate_volume(translator, source, tmp / source.name, target_dir.name, provenance, seed=(params.seed, index))
        split_iou = mean_iou([iou for ious in slice_ious.values() for iou in ious])
        per_volume = {name: mean_iou(ious) for name, ious in slice_ious.items()}
        extra = {"structure_iou": split_iou, "structure_iou_per_volume": per_volume, "gan": provenance}
        write_manifest(tmp, target_dir.name, extra)
    logged = {"gan": {"domain_a": params.gan.domain_a, "output": params.gan.output}, "generator_sha256": provenance["generator_sha256"]}
    log_stage("gan_synthesize", params=logged, metrics={"gan.structure_iou": split_iou})
    return [target_dir / source.name for source in sources]
