"""Split folders: a split's volume files, their digest, its manifest.json, a table of them."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xctsam import CLASS_NAMES, NUM_CLASSES
from xctsam.data.volumes import Volume, label_counts, label_histogram
from xctsam.util.errors import InputError
from xctsam.util.hashing import file_sha256
from xctsam.util.jsonfile import json_text, write_json

if TYPE_CHECKING:
    from rich.table import Table

MANIFEST = "manifest.json"


def split_name(folder: str | Path) -> str:
    """'real/Te-1' -> 'Te-1': the key of a split in metrics files and MLflow metric names."""
    return Path(folder).name


def split_volumes(split_dir: Path) -> list[Path]:
    return sorted(Path(split_dir).glob("*.h5"))


def folders_digest(folders: Iterable[Path]) -> dict[str, list[tuple[str, str]]]:
    """{folder: [(volume file, sha256), ...]}: identifies the data a model was trained on."""
    return {str(folder): [(path.name, file_sha256(path)) for path in split_volumes(Path(folder))] for folder in folders}


def manifest_entry(path: Path, name: str | None = None) -> dict[str, Any]:
    """What a manifest says about one volume file (listed as `name`, default its own file name)."""
    with Volume(path) as volume:
        entry: dict[str, Any] = {"file": name or Path(path).name, "shape": list(volume.shape), "labelled": volume.has_labels}
    if entry["labelled"]:
        counts = label_counts(path)
        entry["class_fractions"] = {label: float(c) / float(counts.sum()) for label, c in zip(CLASS_NAMES, counts, strict=False)}
    return entry


def _manifest(split: str, entries: Iterable[Mapping[str, Any]], extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """The split's name, its volumes in file-name order, then keys other stages put there."""
    return {"split": split, "volumes": sorted(entries, key=lambda entry: entry["file"]), **dict(extra or {})}


def manifest_text(split: str, entries: Iterable[Mapping[str, Any]], extra: Mapping[str, Any] | None = None) -> str:
    """manifest.json's content, for callers that stage it with other files."""
    return json_text(_manifest(split, entries, extra))


def write_manifest(split_dir: Path, split: str, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Describe every volume of a split (shape, labelled, class fractions) in manifest.json."""
    split_dir = Path(split_dir)
    manifest = _manifest(split, [manifest_entry(path) for path in split_volumes(split_dir)], extra)
    write_json(split_dir / MANIFEST, manifest)
    return manifest


def read_manifest(split_dir: Path) -> dict[str, Any]:
    path = Path(split_dir) / MANIFEST
    if not path.is_file():
        raise InputError(path, "split manifest not found", "run the stage that makes the split (dvc repro)")
    return json.loads(path.read_text())


def describe_volumes(paths: Iterable[Path]) -> Table:
    """A table of shape, labels and class fractions for volume files or split folders."""
    from rich.table import Table

    table = Table("volume", "shape", "labelled", *CLASS_NAMES, "unknown labels")
    for given in paths:
        files = split_volumes(given) if Path(given).is_dir() else [Path(given)]
        if not files:
            raise InputError(given, "no .h5 volumes here", "give volume files or a split folder")
        for path in files:
            with Volume(path) as volume:
                shape, labelled = volume.shape, volume.has_labels
            fractions, unknown = ["-"] * len(CLASS_NAMES), "-"
            if labelled:
                fractions, unknown = _label_columns(label_histogram(path))
            table.add_row(str(path), "x".join(map(str, shape)), "yes" if labelled else "no", *fractions, unknown)
    return table


def _label_columns(histogram: Mapping[int, int]) -> tuple[list[str], str]:
    """Fraction of each class among all labelled voxels, and the unknown values with their counts:
    shown rather than dropped, so a broken label file is visible before training on it."""
    total = max(sum(histogram.values()), 1)
    fractions = [f"{histogram.get(label, 0) / total:.5f}" for label in range(NUM_CLASSES)]
    unknown = {value: count for value, count in histogram.items() if not 0 <= value < NUM_CLASSES}
    text = ", ".join(f"{value}: {count} voxels" for value, count in sorted(unknown.items()))
    return fractions, text or "-"
