"""Make the study's splits from params: label phantoms, then a render or scan per split.

Each volume is seeded from (params seed, split name, volume index), so a split's content does
not change when another split is added or resized. Work is resumable per volume: a volume
whose file exists with the same fingerprint (hash of everything that made it) is kept, so an
interrupted run started again continues where it stopped.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from xctsam import __version__
from xctsam.config.data import DataConfig, SplitRecipe
from xctsam.data.split_folders import write_manifest
from xctsam.data.volumes import Volume, VolumeWriter, write_volume
from xctsam.util.hashing import fingerprint
from xctsam.util.progress import track

PHANTOM_STORE = "phantoms"
SLAB = 16  # slices scanned per batch: large enough to amortise the projector, small in memory


def volume_rng(seed: int, split: str, index: int, stream: str) -> np.random.Generator:
    """Independent, reproducible random stream per (seed, split, volume, purpose)."""
    key = [seed, zlib.crc32(split.encode()), index, zlib.crc32(stream.encode())]
    return np.random.default_rng(np.random.SeedSequence(key))


def _is_current(path: Path, expected: str) -> bool:
    """True if `path` is a complete volume made from the same inputs (resume support)."""
    if not path.is_file():
        return False
    try:
        with Volume(path) as volume:
            return volume.attrs.get("fingerprint") == expected
    except Exception:  # an unreadable leftover is simply made again
        return False


def _selected(data: DataConfig, splits: Iterable[str] | None) -> dict[str, SplitRecipe]:
    from xctsam.util.errors import ConfigError

    chosen = dict(data.splits)
    if splits is None:
        return chosen
    unknown = [s for s in splits if s not in chosen]
    if unknown:
        raise ConfigError("params", f"data.splits.{unknown[0]}", f"no such split (defined: {', '.join(chosen)})")
    return {name: chosen[name] for name in splits}


def _prune(folder: Path, keep: set[Path]) -> None:
    """Remove volumes left from an earlier run with more volumes than params now ask for."""
    for stale in folder.glob("*.h5"):
        if stale not in keep:
            stale.unlink()


# ---------------------------------------------------------------- phantoms
def make_phantoms(data: DataConfig, seed: int, out: Path, *, splits: Iterable[str] | None = None) -> Iterator[Path]:
    """Write data/phantoms/<split>/<split>_NNN.h5 (labels, and the labels as image) of the `data`
    section's splits (all, or those named by `splits`)."""
    from xctsam.sim.phantom import defect_fractions, make_phantom

    jobs = [(name, split, i) for name, split in _selected(data, splits).items() for i in range(split.volumes)]
    written: dict[str, set[Path]] = {}
    for name, split, index in track(jobs, "phantoms", total=len(jobs)):
        recipe = data.recipes[split.recipe]
        path = Path(out) / name / f"{name}_{index:03d}.h5"
        written.setdefault(name, set()).add(path)
        stamp = fingerprint(__version__, seed, name, index, data.phantom.model_dump(), recipe.model_dump())
        if not _is_current(path, stamp):
            labels = make_phantom(data.phantom, recipe, volume_rng(seed, name, index, PHANTOM_STORE))
            attrs = {
                "kind": "phantom", "split": name, "index": index, "recipe": split.recipe, "seed": seed,
                "fingerprint": stamp, "measured_fractions": defect_fractions(labels),
                "voxel_size_mm": data.voxel_size_mm, "xctsam_version": __version__,
            }
            write_volume(path, labels.astype(np.float32), labels, attrs)
        yield path
    for name, paths in written.items():
        _prune(Path(out) / name, paths)
        write_manifest(Path(out) / name, name)


# ---------------------------------------------------------------- render / scan
def split_folder(root: Path, name: str, split: SplitRecipe) -> Path:
    return Path(root) / split.kind / name


Imager = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def _imager(data: DataConfig, split: SplitRecipe, size: int) -> Imager:
    """The idealised render for synthetic splits, the physics scanner for real ones."""
    from xctsam.sim.physics import XctScanner, render_ideal

    if split.kind == "synthetic":
        return lambda labels, _rng: render_ideal(labels, data.render, split.alloy, split.inclusion_material)
    assert split.scanner is not None  # config guarantees it for real splits
    scanner = XctScanner(data.scanners[split.scanner], split.alloy, split.inclusion_material, data.voxel_size_mm, size)
    return scanner.scan


def simulate_splits(
    data: DataConfig, seed: int, phantoms: Path, root: Path, *, splits: Iterable[str] | None = None
) -> Iterator[Path]:
    """Render (synthetic) or scan (real) every phantom of each split into data/<kind>/<split>/."""
    for name, split in _selected(data, splits).items():
        source_dir = Path(phantoms) / name
        sources = [source_dir / f"{name}_{i:03d}.h5" for i in range(split.volumes)]
        target_dir = split_folder(root, name, split)
        scanner_settings = data.scanners[split.scanner].model_dump() if split.scanner else None
        setting = {"render": data.render.model_dump()} if split.kind == "synthetic" else {"scanner": scanner_settings}
        targets: set[Path] = set()
        imager = None  # built on first need: the projector build is skipped when all volumes are current
        for index, source in enumerate(track(sources, f"{split.kind} {name}", total=len(sources))):
            target = target_dir / source.name
            targets.add(target)
            with Volume(source) as phantom:
                stamp = fingerprint(__version__, seed, phantom.attrs.get("fingerprint"), split.model_dump(), setting, data.voxel_size_mm)
                if _is_current(target, stamp):
                    yield target
                    continue
                imager = imager or _imager(data, split, phantom.shape[-1])
                rng = volume_rng(seed, name, index, "scan")
                attrs = {
                    "kind": split.kind, "split": name, "material": split.alloy, "inclusion_material": split.inclusion_material,
                    "voxel_size_mm": data.voxel_size_mm, "intensity": "linear attenuation, 1/mm", "fingerprint": stamp,
                    "phantom": str(source), "phantom_fingerprint": phantom.attrs.get("fingerprint"),
                    "scanner_name": split.scanner, **setting, "xctsam_version": __version__,
                }
                with VolumeWriter(target, phantom.shape, labelled=split.labelled, attrs=attrs) as out:
                    for z0, _, labels in phantom.iter_slabs(SLAB):
                        assert labels is not None  # phantoms are labelled by construction
                        image = imager(labels, rng)
                        out.write(z0, image, labels if split.labelled else None)
            yield target
        _prune(target_dir, targets)
        write_manifest(target_dir, name, {"kind": split.kind, "labelled": split.labelled, "scanner": split.scanner})
