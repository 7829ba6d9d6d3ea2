"""`xctsam eval zero-shot`: the pretrained SAM prompted from the ground truth, before any XCT training.

The study's zero-shot baseline: every slice of every labelled test volume, for each class, one
exact box per 8-connected component of the class's ground-truth mask (overlapping classes as
the per-class layout trains them: material = the part with its defects, pore, inclusion),
read on SAM's single-mask output. The class's masks are united and painted into a label map
material -> pore -> inclusion, which is scored with the evaluation's own confusion counting.

Grey values are mapped to [0, 1] by each test split's own robust window (0.5 / 99.5 percentile
of its slices): no trained model's window exists yet, and only the images are used for it.

Written like metrics/eval.json with the model name `sam_zero_shot` (metrics/zero_shot/<name>.json,
which the report adds to its IoU table),
and logged as MLflow run `zero_shot.sam_zero_shot` with `iou.<split>.<class>` and friends,
tagged with the foundation it ran on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from xctsam import CLASS_NAMES
from xctsam.config.params import Params
from xctsam.data.datasets import IntensityWindow, split_slices
from xctsam.data.volumes import Volume
from xctsam.eval.evaluate import (
    SplitCounts,
    eval_split_dirs,
    labelled_volumes,
    mlflow_metrics,
    pivot,
)
from xctsam.models.foundation import describe_foundation
from xctsam.models.sam_builder import Sam, build_sam
from xctsam.models.sam_peft import PER_CLASS_ORDER, PerClassPeftSam
from xctsam.pretrain.promptable import SINGLE, decode, embed_images
from xctsam.pretrain.prompts import component_boxes
from xctsam.util.device import pick_device
from xctsam.util.errors import ConfigError
from xctsam.util.jsonfile import write_json
from xctsam.util.progress import track

MODEL_NAME = "sam_zero_shot"
DEFAULT_OUT = Path("metrics/zero_shot/default.json")
SLICE_BATCH = 8  # slices through the encoder at once
PROMPT_CHUNK = 64  # boxes decoded at once (each holds 4 full-size masks)


def to_model_boxes(boxes: np.ndarray, shape: tuple[int, int], size: int) -> np.ndarray:
    """Boxes in slice pixels -> the same extents in the S x S model input (slices are resized)."""
    sy, sx = size / shape[0], size / shape[1]
    scaled = boxes.astype(np.float32).copy()
    scaled[:, [0, 2]] = np.stack([boxes[:, 0] * sx, (boxes[:, 2] + 1) * sx - 1], axis=1)
    scaled[:, [1, 3]] = np.stack([boxes[:, 1] * sy, (boxes[:, 3] + 1) * sy - 1], axis=1)
    return scaled


@torch.no_grad()
def segment_slice(sam: Sam, embedding: torch.Tensor, labels: np.ndarray) -> np.ndarray:
    """(H, W) label map painted from box prompts around each class's ground-truth components."""
    shape = labels.shape
    size = sam.image_encoder.img_size
    targets = PerClassPeftSam.binary_targets(torch.as_tensor(labels, dtype=torch.long)[None])[0].numpy() > 0.5
    painted = np.zeros(shape, dtype=np.int64)
    empty = np.zeros((0, 2), dtype=np.float32)
    for channel, name in enumerate(PER_CLASS_ORDER):
        boxes = to_model_boxes(component_boxes(targets[channel]), shape, size)
        union = torch.zeros(shape, dtype=torch.bool, device=embedding.device)
        for start in range(0, len(boxes), PROMPT_CHUNK):
            logits, _ = decode(sam, embedding[None], boxes[start : start + PROMPT_CHUNK], empty)
            masks = F.interpolate(logits[:, SINGLE : SINGLE + 1], size=shape, mode="bilinear", align_corners=False)[:, 0] > 0
            union |= masks.any(dim=0)
        painted[union.cpu().numpy()] = CLASS_NAMES.index(name)
    return painted


@torch.no_grad()
def count_split(sam: Sam, split_dir: Path, seed: int, device: torch.device, progress: bool) -> SplitCounts:
    """Confusion counts of the zero-shot model over every labelled volume of one split."""
    window = IntensityWindow.measure(split_slices([split_dir]), seed=seed)
    counts = SplitCounts()
    volumes = labelled_volumes(split_dir)
    if progress:
        volumes = list(track(volumes, f"zero-shot on {split_dir.name}", total=len(volumes)))
    for path in volumes:
        with Volume(path) as volume:
            for z0 in range(0, volume.n_slices, SLICE_BATCH):
                z1 = min(z0 + SLICE_BATCH, volume.n_slices)
                images = torch.as_tensor(window.normalise(volume.image(z0, z1)))[:, None].to(device)
                embeddings = embed_images(sam, images)
                for embedding, labels in zip(embeddings, volume.labels(z0, z1), strict=True):
                    predicted = segment_slice(sam, embedding, labels)
                    counts.per_slice.append(counts.counter.update(predicted, labels))
    return counts


def zero_shot(
    params: Params,
    data_root: Path,
    out: Path = DEFAULT_OUT,
    *,
    device: torch.device | str | None = None,
    log_mlflow: bool = True,
    progress: bool = True,
    checkpoint: Path | None = None,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Score the pretrained SAM of `checkpoint` (default sam.checkpoint) on every eval.splits split; write `out`."""
    if checkpoint is not None:
        params = params.model_copy(update={"sam": params.sam.model_copy(update={"checkpoint": Path(checkpoint)})})
    if params.sam.checkpoint is None:
        raise ConfigError("params", "sam.checkpoint", "zero-shot needs a pretrained SAM: name the stand-in (models/foundation/sam_small_pretrained.pth) or an official checkpoint")
    split_dirs = eval_split_dirs(params.eval.splits, data_root)  # checked before the model loads
    device = torch.device(device) if device is not None else pick_device()
    sam = build_sam(params.sam).to(device).eval()
    results = {split: count_split(sam, split_dir, params.seed, device, progress).summary() for split, split_dir in split_dirs.items()}
    report = pivot({MODEL_NAME: results})
    write_json(Path(out), report)
    if log_mlflow:
        import mlflow

        from xctsam.util.tracking import stage_run

        logged = {"eval": params.eval.model_dump(mode="json"), "sam": params.sam.model_dump(mode="json", exclude={"lora", "layout"})}
        with stage_run(f"zero_shot.{MODEL_NAME}", params=logged, tags={"model": MODEL_NAME, **describe_foundation(params.sam)}):
            mlflow.log_metrics(mlflow_metrics(results))
    return report
