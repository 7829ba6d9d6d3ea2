"""`xctsam eval fid`: Frechet distance of each test split (and named pairs) to the training set.

How far a test split lies from the training distribution, the way the study ordered its splits:
features of `fid.samples` slices per split (the same slices every run, drawn with params.seed)
from the configured backbone (fid_backbones), and pytorch-fid's `calculate_frechet_distance`
between their Gaussian statistics. Written to metrics/fid.json for DVC and logged to MLflow as
`fid.<split>` / `fid.<pair name>` with the backbone as the tag `fid.backbone`.

Every split is mapped to [0, 1] with ONE intensity window, measured on the reference (training)
split: a test split whose grey values differ from training (another alloy, another scanner)
should count as farther away, and a per-split window would hide exactly that difference.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from xctsam.config.eval import FidConfig
from xctsam.config.params import Params
from xctsam.data.datasets import IntensityWindow, SliceReader, SliceRef, sample_slices, split_slices
from xctsam.data.split_folders import split_name
from xctsam.eval.fid_backbones import FeatureBackbone, load_backbone
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


class NormalisedSlices(Sequence[np.ndarray]):
    """Slices read on demand from their volumes and mapped to [0, 1] by one window."""

    def __init__(self, refs: Sequence[SliceRef], window: IntensityWindow, reader: SliceReader) -> None:
        self.refs = list(refs)
        self.window = window
        self.reader = reader

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, index: int) -> np.ndarray:  # type: ignore[override]
        return self.window.normalise(self.reader.image(self.refs[index]))


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
    """Features of each split's seeded sample, extracted once however many comparisons use it."""

    def __init__(self, backbone: FeatureBackbone, window: IntensityWindow, samples: int, batch: int, seed: int) -> None:
        self.backbone = backbone
        self.window = window
        self.samples = samples
        self.batch = batch
        self.seed = seed
        self._cache: dict[Path, np.ndarray] = {}

    def __call__(self, split_dir: Path) -> np.ndarray:
        if split_dir not in self._cache:
            refs = sample_slices(split_slices([split_dir]), self.samples, self.seed)
            if len(refs) < 2:
                raise InputError(split_dir, f"only {len(refs)} slice(s); FID needs at least 2 per split", "add volumes to this split")
            with SliceReader() as reader:
                slices = NormalisedSlices(refs, self.window, reader)
                self._cache[split_dir] = extract_features(self.backbone, slices, self.batch, f"FID {split_dir.name}")
        return self._cache[split_dir]


# ---------------------------------------------------------------- the stage
def _run_params(params: Params) -> dict[str, Any]:
    run_params: dict[str, Any] = {"seed": params.seed, "fid": params.fid.model_dump(mode="json")}
    if params.fid.backbone == "sam":  # the encoder's variant and checkpoint shape the features
        run_params["sam"] = params.sam.model_dump(mode="json")
    return run_params


def compute_fid(params: Params, data_root: Path, out: Path = DEFAULT_OUT) -> dict[str, Any]:
    """FID of every fid.splits folder to fid.reference, and of every fid.pairs pair.

    Writes `out` (JSON, atomically) and logs an MLflow run `fid`; returns what it wrote:
    {backbone, samples, reference, window, slices: {folder: count}, fid: {split: value},
    pairs: {name: value}}. Split keys are the folders' last names ('real/Te-1' -> 'Te-1').
    """
    fid = params.fid
    _check_names(fid)
    folders = _folders(fid, data_root)
    reference = folders[fid.reference]
    backbone = load_backbone(fid.backbone, params.sam, params.seed)
    window = (
        IntensityWindow(*fid.window) if fid.window is not None else IntensityWindow.measure(split_slices([reference]), seed=params.seed)
    )
    features = SplitFeatures(backbone, window, fid.samples, fid.batch, params.seed)

    reference_features = features(reference)
    distances = {split_name(folder): frechet_distance(reference_features, features(folders[folder])) for folder in fid.splits}
    pairs = {name: frechet_distance(features(folders[a]), features(folders[b])) for name, (a, b) in fid.pairs.items()}
    result = {
        "backbone": backbone.name,
        "samples": fid.samples,
        "reference": fid.reference,
        "window": window.to_dict(),
        "slices": {folder: len(features(path)) for folder, path in folders.items()},
        "fid": distances,
        "pairs": pairs,
    }
    write_json(Path(out), result)
    metrics = {f"fid.{name}": value for group in ("fid", "pairs") for name, value in result[group].items()}
    log_stage("fid", params=_run_params(params), tags={"fid.backbone": result["backbone"]}, metrics=metrics)
    return result
