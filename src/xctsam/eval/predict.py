"""Whole-volume inference: `xctsam predict VOLUME`.

A volume is segmented slice by slice while it streams from its HDF5 file, so peak memory
depends on the slice size, the model's context and the batch, never on the number of slices:

- only the `model.context` normalised slices around the current one are kept (a rolling
  window; at the volume's ends neighbours are mirrored like numpy's 'reflect': z=-1 -> z=1);
- each slice is cut into square tiles overlapping by `overlap` of the tile (the last tile flush
  with the edge; slices smaller than a tile are reflect-padded), tiles of consecutive slices
  fill batches of `batch`;
- per-class probabilities of overlapping tiles are blended with a Gaussian importance map
  (sigma = tile / 8, as nnU-Net) that trusts tile centres more than their borders, then
  normalised by the summed weights and turned into labels by the model (`to_labels`).

An optional `transform` (the robustness stage's noise) is applied to every normalised slice
once, when it enters the window, so neighbouring predictions see the same noisy slice.

Sources: a project volume (`Volume`) or a user's scan in any format `Scan` reads (TIFF stack or
folder, HDF5 dataset, NPY, OME-Zarr); a path is opened as a `Scan`. Outputs: `eval.writers`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, nullcontext
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from scipy.signal.windows import gaussian

from xctsam import NUM_CLASSES
from xctsam.config.eval import PredictConfig
from xctsam.data.checks import check_fits_in_memory, nbytes
from xctsam.data.datasets import IntensityWindow
from xctsam.data.scans import GreySource, Scan
from xctsam.data.tiles import context_indices as tile_context
from xctsam.models.base import Segmenter
from xctsam.util.device import pick_device
from xctsam.util.progress import track

SliceTransform = Callable[[np.ndarray], np.ndarray]


class SlicePrediction(NamedTuple):
    z: int
    labels: np.ndarray  # (Y, X) uint8
    probabilities: np.ndarray  # (4, Y, X) float32, blended


# ---------------------------------------------------------------- geometry
def tile_starts(size: int, tile: int, overlap: float) -> list[int]:
    """Tile origins along one axis of `size` (>= tile): stride tile*(1-overlap), last flush."""
    if size <= tile:
        return [0]
    stride = max(1, int(tile * (1.0 - overlap)))
    starts = list(range(0, size - tile, stride))
    return [*starts, size - tile]


def gaussian_importance(tile: int, sigma_scale: float = 1 / 8) -> np.ndarray:
    """(tile, tile) float32 weights: ~1 at the centre, 4e-4 mid-edge, 1e-7 at corners (nnU-Net).

    The same for every tile size (sigma scales with it); never 0, so every pixel has weight.
    """
    profile = gaussian(tile, std=tile * sigma_scale, sym=True)
    return np.outer(profile, profile).astype(np.float32)


def _reflect_pad(image: np.ndarray, tile: int) -> np.ndarray:
    """Pad the last two axes up to `tile` by mirroring, so small slices still fill a tile."""
    pad_y, pad_x = max(0, tile - image.shape[-2]), max(0, tile - image.shape[-1])
    if not pad_y and not pad_x:
        return image
    widths = [(0, 0)] * (image.ndim - 2) + [(0, pad_y), (0, pad_x)]
    return np.pad(image, widths, mode="reflect" if min(image.shape[-2:]) > 1 else "edge")


def context_indices(n_slices: int, context: int) -> np.ndarray:
    """(n_slices, context) source slice of every input channel, mirrored at the ends.

    numpy's own 'reflect' padding of the index range defines the mirroring (z=-1 -> z=1, and
    repeatedly for contexts wider than the volume).
    """
    return np.stack([slice_context(z, n_slices, context) for z in range(n_slices)])


def slice_context(z: int, n_slices: int, context: int) -> np.ndarray:
    """The `context` source slices of slice z, mirrored at the ends; work and memory O(context).

    One mirroring rule for training tiles and inference (data.tiles.context_indices), applied
    to the slices within `context` of z only: that helper pads the whole index range and
    returns a view of it, so holding every slice's indices kept depth padded copies alive (a
    scan declaring 1e8 slices grew by 0.4 GB/s before its first tile). A mirror reaches at most
    `context // 2` past an end, so a window of `context` either side mirrors exactly as the
    whole volume does.
    """
    low, high = max(0, z - context), min(n_slices, z + context + 1)
    return low + tile_context(z - low, high - low, context)


# ---------------------------------------------------------------- streaming inputs
class _NormalisedSlices:
    """Normalised (and transformed) slices read on demand, only the last few kept."""

    def __init__(self, volume: GreySource, window: IntensityWindow, transform: SliceTransform | None, keep: int) -> None:
        self.volume = volume
        self.window = window.for_source(volume)  # matched to this volume's grey levels, if the model asks
        self.transform = transform
        self.keep = keep
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def __getitem__(self, z: int) -> np.ndarray:
        if z in self._cache:
            self._cache.move_to_end(z)
            return self._cache[z]
        unit = self.window.normalise(self.volume.image(z, z + 1)[0])
        if self.transform is not None:
            unit = self._transformed(unit, z)
        self._cache[z] = unit
        while len(self._cache) > self.keep:
            self._cache.popitem(last=False)
        return unit

    def _transformed(self, unit: np.ndarray, z: int) -> np.ndarray:
        out = np.asarray(self.transform(unit), dtype=np.float32)  # type: ignore[misc]
        if out.shape != unit.shape:
            raise ValueError(f"transform changed slice {z}'s shape {unit.shape} to {out.shape}")
        return np.clip(out, 0.0, 1.0)  # the model contract: inputs in [0, 1]


def _context_stacks(volume: GreySource, window: IntensityWindow, context: int, transform: SliceTransform | None, progress: bool, only: list[int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """(z, (context, Y, X) float32) per slice in order (or per slice of `only`); context + 1
    slices held at a time."""
    # Stacks of consecutive slices share all but one source slice; one spare entry means a
    # slice is never read twice, including the mirrored neighbours at the ends.
    slices = _NormalisedSlices(volume, window, transform, keep=context + 1)
    zs: Sequence[int] = range(volume.n_slices) if only is None else only
    if progress:
        zs = track(zs, f"predict {volume.path.name}", total=len(zs))
    for z in zs:
        yield z, np.stack([slices[int(source)] for source in slice_context(z, volume.n_slices, context)])


# ---------------------------------------------------------------- blending
class _SliceBlend:
    """Weighted sums of tile probabilities over one (padded) slice, and the tiles still due."""

    def __init__(self, z: int, padded_shape: tuple[int, int], shape: tuple[int, int], tiles: int, classes: int) -> None:
        self.z = z
        self.shape = shape
        self.scores = np.zeros((classes, *padded_shape), dtype=np.float32)
        self.weights = np.zeros(padded_shape, dtype=np.float32)
        self.remaining = tiles

    def add(self, y: int, x: int, probabilities: np.ndarray, importance: np.ndarray) -> None:
        tile = importance.shape[0]
        self.scores[:, y : y + tile, x : x + tile] += probabilities * importance
        self.weights[y : y + tile, x : x + tile] += importance
        self.remaining -= 1

    def probabilities(self) -> np.ndarray:
        height, width = self.shape
        return self.scores[:, :height, :width] / self.weights[:height, :width]


class _TileJob(NamedTuple):
    blend: _SliceBlend
    y: int
    x: int
    inputs: np.ndarray  # (context, tile, tile)


def _autocast(device: torch.device) -> AbstractContextManager[Any]:
    """Mixed precision on CUDA only (bf16 where supported); full precision elsewhere."""
    if device.type != "cuda":
        return nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


# Test-time augmentation views: the in-plane axes of a (batch, channel, y, x) tile batch that
# each view mirrors. A flip is its own inverse, so the same dims undo it on the output.
TTA_VIEWS: dict[str, tuple[tuple[int, ...], ...]] = {"none": ((),), "flips": ((), (3,), (2,), (2, 3))}


def batch_probabilities(model: Segmenter, inputs: torch.Tensor, config: PredictConfig) -> torch.Tensor:
    """Class probabilities of a tile batch as prediction computes them: at `config.temperature`,
    averaged over the `config.tta` views (each mirrored back)."""
    views, temperature = TTA_VIEWS[config.tta], config.temperature
    total = None
    for dims in views:
        seen = inputs.flip(dims) if dims else inputs
        outputs = model(seen)
        probabilities = model.probabilities(outputs if temperature == 1.0 else outputs.float() / temperature).float()
        probabilities = probabilities.flip(dims) if dims else probabilities
        total = probabilities if total is None else total + probabilities
    return total / len(views)


def _run_batch(model: Segmenter, jobs: list[_TileJob], importance: np.ndarray, device: torch.device, config: PredictConfig) -> None:
    inputs = torch.from_numpy(np.stack([job.inputs for job in jobs])).to(device)
    with torch.no_grad(), _autocast(device):
        probabilities = batch_probabilities(model, inputs, config)
    probabilities = probabilities.float().cpu().numpy()
    for job, tile_probabilities in zip(jobs, probabilities, strict=True):
        job.blend.add(job.y, job.x, tile_probabilities, importance)


def _labels(model: Segmenter, probabilities: np.ndarray, device: torch.device) -> np.ndarray:
    with torch.no_grad():
        labels = model.to_labels(torch.from_numpy(probabilities[None]).to(device))
    return labels[0].cpu().numpy().astype(np.uint8)


# ---------------------------------------------------------------- the public loop
def working_memory(shape: tuple[int, int, int], context: int, tile: int) -> int:
    """Bytes the streaming loop holds for one slice of a volume of `shape` (a generous count).

    float32 planes of one (padded) slice: the rolling window of context + 1 normalised slices
    and the slice being read, the context stack and its padded copy, then per pending slice
    the blended class scores and weights and the normalised probabilities, labels on top.
    """
    height, width = max(shape[1], tile), max(shape[2], tile)
    planes = (context + 2) + 2 * context + (NUM_CLASSES + 1) + 2 * NUM_CLASSES + 1
    return nbytes((planes, height, width), np.float32)


def check_prediction_memory(source: GreySource, context: int, tile: int) -> None:
    """Sizes come from the file's header: refuse a scan whose file does not hold the slices it
    declares (a tiny file claiming 1e8 slices) and slices that cannot fit, before allocating."""
    needed = working_memory(source.shape, context, tile)
    check_fits_in_memory(source.path, needed, f"predicting slices of {source.shape[1]} x {source.shape[2]} voxels")
    if isinstance(source, Scan):  # slices that fit, but that the file does not hold
        source.check_stored()


def predict_volume(
    model: Segmenter,
    volume: GreySource | Path | str,
    window: IntensityWindow,
    config: PredictConfig,
    device: torch.device | str | None = None,
    *,
    transform: SliceTransform | None = None,
    progress: bool = True,
    slices: Iterable[int] | None = None,
) -> Iterator[SlicePrediction]:
    """Segment every slice of `volume` (or only `slices`), yielding SlicePrediction(z, labels,
    probabilities) in z order.

    `window` maps grey values to the model's [0, 1] (the one it was trained with); `transform`
    is applied to each normalised slice (e.g. added noise) and its result clipped to [0, 1].
    `slices`: predict just these (e.g. a report's two overlays), each with its own context
    read from the file, the same labels as in a whole-volume pass.
    The model is used in eval mode and restored to its previous mode afterwards.
    """
    context = int(model.context)
    if context < 1 or context % 2 == 0:
        raise ValueError(f"model context must be an odd number of slices, got {context}")
    device = torch.device(device) if device is not None else pick_device()
    with ExitStack() as stack:
        source = stack.enter_context(Scan(volume)) if isinstance(volume, (str, Path)) else volume
        check_prediction_memory(source, context, config.tile)
        was_training = model.training
        model.to(device).eval()
        try:
            only = None if slices is None else sorted(set(slices))
            if only is not None and not all(0 <= z < source.n_slices for z in only):
                raise ValueError(f"slices {only} outside 0..{source.n_slices - 1} of {source.path}")
            if config.planes == ["z"]:
                stacks = _context_stacks(source, window, context, transform, progress, only)
                yield from _predict_stacks(model, stacks, config, device)
            else:
                yield from _fused_planes(model, source, window, config, device, transform, progress, only)
        finally:
            model.train(was_training)


# ---------------------------------------------------------------- tri-planar fusion
AXIS_OF_PLANE = {"z": 0, "y": 1, "x": 2}


class _ArraySlices:
    """A (k, m, n) array seen as a GreySource (slices along its first axis), e.g. a memory-mapped
    volume transposed so that the axis to slice along comes first."""

    def __init__(self, array: np.ndarray, path: Path) -> None:
        self.array, self.path = array, path

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)  # type: ignore[return-value]

    @property
    def n_slices(self) -> int:
        return self.array.shape[0]

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    def raw(self, z0: int, z1: int) -> np.ndarray:
        return np.array(self.array[z0:z1])

    def image(self, z0: int = 0, z1: int | None = None) -> np.ndarray:
        return np.array(self.array[z0:z1], dtype=np.float32)


def _fused_planes(
    model: Segmenter, source: GreySource, window: IntensityWindow, config: PredictConfig, device: torch.device,
    transform: SliceTransform | None, progress: bool, only: list[int] | None,
) -> Iterator[SlicePrediction]:
    """Run the model along each axis of `config.planes` and yield z slices of the averaged
    probabilities. The normalised (and transformed) volume and the probability sums live in
    memory-mapped temporary files: memory stays at a slice per pass, the disk holds the volume."""
    import tempfile

    depth, height, width = source.shape
    with tempfile.TemporaryDirectory(prefix="xctsam-planes-") as folder:
        unit = np.lib.format.open_memmap(Path(folder) / "unit.npy", mode="w+", dtype=np.float32, shape=source.shape)
        for z, stack in _context_stacks(source, window, 1, transform, False, None):
            unit[z] = stack[0]  # normalised and transformed once, as a single-plane pass would
        summed = np.lib.format.open_memmap(Path(folder) / "sum.npy", mode="w+", dtype=np.float32, shape=(NUM_CLASSES, depth, height, width))
        identity = IntensityWindow(0.0, 1.0)  # `unit` is normalised already
        for plane in config.planes:
            axis = AXIS_OF_PLANE[plane]
            view = _ArraySlices(np.moveaxis(unit, axis, 0), source.path)
            stacks = _context_stacks(view, identity, int(model.context), None, progress, None)
            for prediction in _predict_stacks(model, stacks, config, device):
                index = [slice(None)] * 4
                index[1 + axis] = prediction.z
                summed[tuple(index)] += prediction.probabilities
        for z in only if only is not None else range(depth):
            probabilities = np.asarray(summed[:, z]) / len(config.planes)
            yield SlicePrediction(z, _labels(model, probabilities, device), probabilities)


def _predict_stacks(model: Segmenter, stacks: Iterable[tuple[int, np.ndarray]], config: PredictConfig, device: torch.device) -> Iterator[SlicePrediction]:
    """Tile, batch across slices, blend; yield each slice as soon as its last tile is back."""
    importance = gaussian_importance(config.tile)
    pending: OrderedDict[int, _SliceBlend] = OrderedDict()
    jobs: list[_TileJob] = []
    for z, inputs in stacks:
        padded = _reflect_pad(inputs, config.tile)
        ys = tile_starts(padded.shape[-2], config.tile, config.overlap)
        xs = tile_starts(padded.shape[-1], config.tile, config.overlap)
        blend = _SliceBlend(z, padded.shape[-2:], inputs.shape[-2:], len(ys) * len(xs), classes=NUM_CLASSES)
        pending[z] = blend
        for y in ys:
            for x in xs:
                jobs.append(_TileJob(blend, y, x, padded[:, y : y + config.tile, x : x + config.tile]))
                if len(jobs) == config.batch:
                    _run_batch(model, jobs, importance, device, config)
                    jobs = []
                    yield from _finished(model, pending, device)
    if jobs:
        _run_batch(model, jobs, importance, device, config)
    yield from _finished(model, pending, device)


def _finished(model: Segmenter, pending: OrderedDict[int, _SliceBlend], device: torch.device) -> Iterator[SlicePrediction]:
    """Pop and label the leading slices whose tiles are all blended (tiles run in z order)."""
    while pending and next(iter(pending.values())).remaining == 0:
        _, blend = pending.popitem(last=False)
        probabilities = blend.probabilities()
        yield SlicePrediction(blend.z, _labels(model, probabilities, device), probabilities)
