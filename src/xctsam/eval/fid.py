"""`xctsam eval fid`: FID and KID of each test split (and named pairs) to the training set.

How far a test split lies from the training distribution, the way the study ordered its splits:
features of `fid.samples` slices per split (the same slices every run, drawn with params.seed),
each giving `fid.crops_per_slice` seeded crops, from the configured backbone (fid_backbones);
pytorch-fid's `calculate_frechet_distance` between their Gaussian statistics, and KID (eval.kid:
unbiased, so near 0 for two samples of one distribution, with a std over subsets) on the same
features. Beside them their floor: the same distances between two halves of the reference split
taken by volume, what phantom-to-phantom variation alone gives. Written to metrics/fid.json for
DVC and logged to MLflow as `fid.<split>`, `kid.<split>`, `kid_std.<split>` (and per pair, and
`*.floor`), with the backbone as the tag `fid.backbone`.

Every split is mapped to [0, 1] with ONE intensity window, measured on the reference (training)
split: a test split whose grey values differ from training (another alloy, another scanner)
should count as farther away, and a per-split window would hide exactly that difference.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from xctsam.config.eval import FidConfig
from xctsam.config.params import Params
from xctsam.data.datasets import (
    IntensityWindow,
    SliceReader,
    SliceRef,
    sample_slices,
    split_slices,
    volume_slices,
)
from xctsam.data.split_folders import split_name, split_volumes
from xctsam.eval.fid_backbones import FeatureBackbone, load_backbone
from xctsam.eval.kid import kernel_distance
from xctsam.util.compat import ensure_torchvision
from xctsam.util.errors import ConfigError, InputError
from xctsam.util.jsonfile import write_json
from xctsam.util.progress import track
from xctsam.util.tracking import log_stage

DEFAULT_OUT = Path("metrics/fid.json")


# ---------------------------------------------------------------- the distance
def _in_shared_subspace(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both feature sets in an orthonormal basis of the affine span of all their rows.

    The Frechet distance is unchanged by a common translation and rotation of the feature
    space, and both Gaussians live in the span of the samples, so when there are fewer samples
    than dimensions (200 slices vs 2048 Inception features) the distance is the same in that
    span, where the matrix square root costs a fraction of a second instead of ~12 s.
    """
    if len(a) + len(b) >= a.shape[1]:
        return a, b
    origin = a.mean(axis=0)
    _, _, basis = np.linalg.svd(np.concatenate([a, b]) - origin, full_matrices=False)
    return (a - origin) @ basis.T, (b - origin) @ basis.T


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID between two (N, D) feature sets (N >= 2 each), via pytorch-fid."""
    ensure_torchvision()  # pytorch_fid imports torchvision
    from pytorch_fid.fid_score import calculate_frechet_distance

    a, b = (np.asarray(f, dtype=np.float64) for f in (features_a, features_b))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need two (N>=2, D) feature sets of the same D, got {a.shape} and {b.shape}")
    a, b = _in_shared_subspace(a, b)
    # pytorch-fid prints its singular-covariance notice on stdout, which carries the CLI's JSON.
    with contextlib.redirect_stdout(sys.stderr):
        value = calculate_frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    return float(value)


# ---------------------------------------------------------------- features
def extract_features(backbone: FeatureBackbone, images_unit_grey: Sequence[np.ndarray] | np.ndarray, batch: int, description: str = "FID features") -> np.ndarray:
    """(N, backbone.dims) features of N grey slices in [0, 1], `batch` slices per forward pass.

    `images_unit_grey` may be an (N, H, W) array or any sequence of (H, W) slices (sizes may
    differ: each is resized); only one batch of slices is materialised at a time.
    """
    count = len(images_unit_grey)
    starts = range(0, count, batch)
    chunks = [
        backbone.features([images_unit_grey[i] for i in range(start, min(start + batch, count))])
        for start in track(starts, description, total=math.ceil(count / batch))
    ]
    return np.concatenate(chunks) if chunks else np.empty((0, backbone.dims))


class NormalisedCrops(Sequence[np.ndarray]):
    """`crops` crops of each slice, read on demand and mapped to [0, 1] by one window.

    Crop k of slice i spans `fraction` of the slice's height and width, at a position drawn once
    from `seed` (as a fraction of the free range, so slices of any size take the same draw).
    crops 1, fraction 1.0: each whole slice.
    """

    def __init__(self, refs: Sequence[SliceRef], window: IntensityWindow, reader: SliceReader, crops: int = 1, fraction: float = 1.0, seed: int = 0) -> None:
        self.refs = list(refs)
        self.window = window
        self.reader = reader
        self.crops = crops
        self.fraction = fraction
        self.positions = np.random.default_rng(seed).random((len(self.refs) * crops, 2))

    def __len__(self) -> int:
        return len(self.refs) * self.crops

    def __getitem__(self, index: int) -> np.ndarray:  # type: ignore[override]
        image = self.reader.image(self.refs[index // self.crops])
        size = np.maximum(1, np.round(self.fraction * np.array(image.shape))).astype(int)
        y0, x0 = np.floor(self.positions[index] * (np.array(image.shape) - size + 1)).astype(int)
        return self.window.normalise(image[y0 : y0 + size[0], x0 : x0 + size[1]])


# ---------------------------------------------------------------- splits
def _check_names(fid: FidConfig) -> None:
    keys = [split_name(folder) for folder in fid.splits]
    clashes = sorted({key for key in keys if keys.count(key) > 1})
    if clashes:
        raise ConfigError("params", "fid.splits", f"folders share the name(s) {clashes}; metrics are keyed by the last folder name")


def _split_dir(data_root: Path, folder: str, key: str) -> Path:
    path = Path(data_root) / folder
    if not path.is_dir():
        raise InputError(path, f"split folder not found ({key})", "make it first (dvc repro) or fix the folder name in params.yaml")
    return path


def _folders(fid: FidConfig, data_root: Path) -> dict[str, Path]:
    """Every split folder the stage reads, checked to exist before any slow work starts."""
    named = [(fid.reference, "fid.reference")]
    named += [(folder, "fid.splits") for folder in fid.splits]
    named += [(folder, f"fid.pairs.{name}") for name, pair in fid.pairs.items() for folder in pair]
    return {folder: _split_dir(data_root, folder, key) for folder, key in named}


class SplitFeatures:
    """Features of each set of slices, extracted once however many comparisons use it."""

    def __init__(self, backbone: FeatureBackbone, window: IntensityWindow, config: FidConfig, seed: int) -> None:
        self.backbone = backbone
        self.window = window
        self.config = config
        self.seed = seed
        self._cache: dict[str, np.ndarray] = {}

    def __call__(self, split_dir: Path) -> np.ndarray:
        """Of the split's seeded `fid.samples` slices."""
        return self.of(str(split_dir), split_dir, lambda: split_slices([split_dir]))

    def of(self, key: str, where: Path, refs: Callable[[], Sequence[SliceRef]]) -> np.ndarray:
        """Of a seeded `fid.samples` of `refs()` (slices of `where`), cached under `key`; the
        slices are listed only on a miss (listing opens every volume of the split)."""
        if key not in self._cache:
            chosen = sample_slices(refs(), self.config.samples, self.seed)
            if len(chosen) < 2:
                raise InputError(where, f"only {len(chosen)} slice(s); FID needs at least 2 per split", "add volumes to this split")
            with SliceReader() as reader:
                crops = NormalisedCrops(chosen, self.window, reader, self.config.crops_per_slice, self.config.crop_fraction, self.seed)
                self._cache[key] = extract_features(self.backbone, crops, self.config.batch, f"FID {Path(key).name}")
        return self._cache[key]

    def distances(self, a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
        """{fid, kid: {mean, std}} between two feature sets."""
        mean, std = kernel_distance(a, b, self.config.kid_subsets, self.config.kid_subset_size, self.seed)
        return {"fid": frechet_distance(a, b), "kid": {"mean": mean, "std": std}}


def reference_halves(reference: Path) -> tuple[list[Path], list[Path]] | None:
    """The reference split's volumes in two halves, even- and odd-numbered; None with fewer than 2."""
    volumes = split_volumes(reference)
    if len(volumes) < 2:
        return None
    return volumes[0::2], volumes[1::2]


def floor_distances(features: SplitFeatures, reference: Path) -> dict[str, Any] | None:
    """The distances between the reference's two halves, and which volumes each holds."""
    halves = reference_halves(reference)
    if halves is None:
        return None
    sets = [features.of(f"{reference}#half{i}", reference, lambda volumes=volumes: volume_slices(volumes)) for i, volumes in enumerate(halves)]
    return {**features.distances(*sets), "volumes": [[path.name for path in half] for half in halves]}


# ---------------------------------------------------------------- the stage
def _run_params(params: Params) -> dict[str, Any]:
    run_params: dict[str, Any] = {"seed": params.seed, "fid": params.fid.model_dump(mode="json")}
    if params.fid.backbone == "sam":  # the encoder's variant and checkpoint shape the features
        run_params["sam"] = params.sam.model_dump(mode="json")
    return run_params


def compute_fid(params: Params, data_root: Path, out: Path = DEFAULT_OUT) -> dict[str, Any]:
    """FID and KID of every fid.splits folder to fid.reference, of every fid.pairs pair, and
    their floor (fid.floor: the reference's two halves by volume).

    Writes `out` (JSON, atomically) and logs an MLflow run `fid`; returns what it wrote:
    {backbone, samples, crops_per_slice, reference, window, slices: {folder: count},
    features: {folder: count}, fid: {split: value}, kid: {split: {mean, std}},
    pairs: {name: fid}, kid_pairs: {name: {mean, std}}, floor: {fid, kid, volumes} or null}.
    Split keys are the folders' last names ('real/Te-1' -> 'Te-1').
    """
    fid = params.fid
    _check_names(fid)
    folders = _folders(fid, data_root)
    reference = folders[fid.reference]
    backbone = load_backbone(fid.backbone, params.sam, params.seed)
    window = (
        IntensityWindow(*fid.window) if fid.window is not None else IntensityWindow.measure(split_slices([reference]), seed=params.seed)
    )
    features = SplitFeatures(backbone, window, fid, params.seed)

    reference_features = features(reference)
    to_reference = {split_name(folder): features.distances(reference_features, features(folders[folder])) for folder in fid.splits}
    pairs = {name: features.distances(features(folders[a]), features(folders[b])) for name, (a, b) in fid.pairs.items()}
    floor = floor_distances(features, reference) if fid.floor else None
    result = {
        "backbone": backbone.name,
        "samples": fid.samples,
        "crops_per_slice": fid.crops_per_slice,
        "reference": fid.reference,
        "window": window.to_dict(),
        "slices": {folder: len(features(path)) // fid.crops_per_slice for folder, path in folders.items()},
        "features": {folder: len(features(path)) for folder, path in folders.items()},
        "fid": {name: d["fid"] for name, d in to_reference.items()},
        "kid": {name: d["kid"] for name, d in to_reference.items()},
        "pairs": {name: d["fid"] for name, d in pairs.items()},
        "kid_pairs": {name: d["kid"] for name, d in pairs.items()},
        "floor": floor,
    }
    write_json(Path(out), result)
    log_stage("fid", params=_run_params(params), tags={"fid.backbone": result["backbone"]}, metrics=mlflow_metrics(result))
    return result


def mlflow_metrics(result: dict[str, Any]) -> dict[str, float]:
    """fid.<name>, kid.<name> and kid_std.<name> of every split, pair and the floor."""
    metrics = {f"fid.{name}": value for group in ("fid", "pairs") for name, value in result[group].items()}
    for group in ("kid", "kid_pairs"):
        for name, kid in result[group].items():
            metrics[f"kid.{name}"], metrics[f"kid_std.{name}"] = kid["mean"], kid["std"]
    if result["floor"] is not None:
        floor = result["floor"]
        metrics.update({"fid.floor": floor["fid"], "kid.floor": floor["kid"]["mean"], "kid_std.floor": floor["kid"]["std"]})
    return metrics
