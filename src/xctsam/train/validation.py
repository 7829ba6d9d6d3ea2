"""Validation of a segmenter on whole slices: pooled confusion counts, mIoU and IoU per class."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from xctsam import CLASS_NAMES, NUM_CLASSES
from xctsam.data.datasets import IntensityWindow, SliceRef, sample_slices
from xctsam.data.tiles import ContextReader, read_context
from xctsam.eval.metrics import ConfusionCounter, iou_dice, mean_defined
from xctsam.eval.predict import tile_starts
from xctsam.models.base import Segmenter
from xctsam.train.optimisation import Precision

ArrayLike = np.ndarray | torch.Tensor
ValidationSource = Sequence[tuple[ArrayLike, ArrayLike]] | Callable[[], Iterable[tuple[ArrayLike, ArrayLike]]]


def as_tensor(array: ArrayLike, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(array, np.ndarray):
        array = np.ascontiguousarray(array)  # crops of a slice are strided views
    return torch.as_tensor(array).to(device, dtype)


def to_device(images: ArrayLike, labels: ArrayLike, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return as_tensor(images, device, torch.float32), as_tensor(labels, device, torch.long)


def validation_scores(model: Segmenter, source: ValidationSource, precision: Precision) -> dict[str, float]:
    """val.miou and val.iou.<class> of whole slices, from confusion counts pooled over all of them.

    `source`: (images, labels) pairs, or a callable returning them afresh (a one-shot iterator
    would be spent after the first epoch).

    Inputs go to the model as they come (whole slices, or their tiles: whole_slice_batches):
    every Segmenter returns outputs at its input size (the U-Net pads, SAM resizes).
    """
    counter = ConfusionCounter(NUM_CLASSES)
    batches = source() if callable(source) else source
    model.eval()
    with torch.no_grad(), precision.autocast():
        for images, labels in batches:
            outputs = model(as_tensor(images, precision.device, torch.float32))
            predicted = model.to_labels(model.probabilities(outputs))
            counter.update(predicted, labels)
    iou, _ = iou_dice(counter.matrix)
    return {"val.miou": mean_defined(iou), **{f"val.iou.{name}": float(value) for name, value in zip(CLASS_NAMES, iou)}}


def whole_slice_batches(
    refs: Sequence[SliceRef], window: IntensityWindow, context: int, count: int, seed: int, tile: int | None = None,
) -> Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]:
    """A validation source: `count` seeded slices of `refs`, read afresh one by one at each call
    (whole slices with their 2.5D context, normalised by `window`), so none sits in memory.

    `tile`: each slice goes to the model as a batch of tile x tile crops covering it (the last
    one flush with the edge, so a strip may count twice), the scale a model trains and predicts
    at. Without it the whole slice is one input, and SAM resizes it to its image size: a 512^2
    slice is scored at half the scale of 128^2 training tiles, where few-pixel pores vanish.
    """
    chosen = sample_slices(refs, count, seed)

    def batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        with ContextReader() as reader:
            for ref in chosen:
                image = window.for_volume(ref.volume).normalise(read_context(reader, ref, context))
                labels = reader.labels(ref)
                if tile is None:
                    yield image[None], labels[None]
                else:
                    yield _cut(image, tile), _cut(labels, tile)

    return batches


def _cut(array: np.ndarray, tile: int) -> np.ndarray:
    """(..., H, W) -> (N, ..., tile, tile) crops covering it (smaller where the slice is)."""
    height, width = array.shape[-2:]
    return np.stack([array[..., y : y + tile, x : x + tile] for y in tile_starts(height, tile, 0.0) for x in tile_starts(width, tile, 0.0)])
