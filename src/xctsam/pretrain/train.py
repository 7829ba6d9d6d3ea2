"""`xctsam train pretrain`: promptable training of the small SAM into an official-format checkpoint.

Everything trains (image encoder, prompt encoder, mask decoder), as SAM's own training did. Per
step: `batch` corpus images (pretrain.shapes, each from its own seed), the encoder on all of
them, then per image up to `prompts` objects prompted by a jittered box or a single point,
decoded with all four mask outputs and scored by pretrain.losses. AdamW, linear warm-up then
cosine decay (the training loop's schedule), gradient clipping; autocast on CUDA only.

Files:
  <out>.pth           model.state_dict() of build_sam(small) itself: exactly the keys and shapes
                      of the architecture, no wrapper, like the official sam_vit_*.pth files, so
                      `sam.checkpoint` loads it through the same loader.
  <out>.json          sidecar, written last: params fingerprint, the .pth's sha256, MLflow run
                      id, held-out promptable mIoU. A rerun with the same params returns at once.
  state file          the whole training state every `checkpoint_every` steps and on Ctrl-C /
                      SIGTERM (default <out>.state.pt); a run started again continues from it
                      and ends with the same weights. Removed at the end.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from xctsam.config import Params, PretrainConfig, SamConfig
from xctsam.models.checkpoint import STATE_FORMAT, save_atomic
from xctsam.models.sam_builder import Sam, build_sam
from xctsam.pretrain.losses import promptable_loss
from xctsam.pretrain.promptable import decode, embed_images, read_masks
from xctsam.pretrain.prompts import mask_box, mask_point, sample_prompts
from xctsam.pretrain.shapes import ShapeImage, make_image
from xctsam.train.checkpoint import (
    capture_rng,
    load_training_state,
    restore_rng,
    seed_everything,
)
from xctsam.train.loop import (
    Precision,
    choose_precision,
    deterministic_on_cpu,
    lr_factor,
    start_runtime,
    step_progress,
)
from xctsam.util.errors import ConfigError
from xctsam.util.finite import check_losses
from xctsam.util.hashing import file_sha256, fingerprint
from xctsam.util.interrupt import InterruptLatch
from xctsam.util.jsonfile import write_json
from xctsam.util.optim import adamw

log = logging.getLogger(__name__)

SIDECAR_FORMAT = "xctsam.sam_stand_in/1"
TRAIN_STREAM, HELDOUT_STREAM, PROMPT_STREAM, HELDOUT_PROMPT_STREAM = 0, 1, 2, 3  # disjoint seed streams
LOG_EVERY = 10
LOSS_TERMS = ("loss", "mask", "iou")  # of step_loss: the total first, then its terms
HELDOUT_BATCH = 8
LOSS_SCALE = 2  # losses on masks at image_size / 2: a quarter of the cost, small objects still seen
NOT_TRAINING_KEYS = {"checkpoint_every", "stand_ins"}  # change how often state is saved, or which files


@dataclass(frozen=True)
class PretrainResult:
    checkpoint: Path
    sidecar: Path
    steps: int
    completed: bool
    summary: dict[str, Any]


def sidecar_path(checkpoint: Path) -> Path:
    return Path(checkpoint).with_suffix(".json")


def stand_in_config(sam: SamConfig) -> SamConfig:
    """The architecture to pretrain: the configured small SAM, from random initialisation."""
    if sam.variant != "small":
        raise ConfigError("params", "sam.variant", f"'{sam.variant}' has official checkpoints; the stand-in is for the small variant only (set pretrain.stand_ins: [] at paper scale)")
    return sam.model_copy(update={"checkpoint": None})


def pretrain_fingerprint(config: PretrainConfig, sam: SamConfig) -> str:
    """What determines the stand-in's weights: the pretrain section and the architecture keys."""
    return fingerprint(config.model_dump(mode="json", exclude=NOT_TRAINING_KEYS), sam.small.model_dump(mode="json"), sam.image_size)


# ---------------------------------------------------------------- data of one step
def corpus_image(config: PretrainConfig, size: int, stream: int, *index: int) -> ShapeImage:
    return make_image([config.seed, stream, *index], size, config.objects, config.min_area)


def as_images(items: list[ShapeImage], device: torch.device) -> torch.Tensor:
    return torch.as_tensor(np.stack([item.image for item in items]))[:, None].to(device)


def step_loss(sam: Sam, config: PretrainConfig, step: int, device: torch.device) -> dict[str, torch.Tensor]:
    """The mean promptable loss over the step's images (each image's prompts weigh equally)."""
    size = sam.image_encoder.img_size
    items = [corpus_image(config, size, TRAIN_STREAM, step, i) for i in range(config.batch)]
    embeddings = embed_images(sam, as_images(items, device))
    losses: list[dict[str, torch.Tensor]] = []
    for index, (item, embedding) in enumerate(zip(items, embeddings, strict=True)):
        if not len(item.instances):
            continue
        rng = np.random.default_rng([config.seed, PROMPT_STREAM, step, index])
        prompts = sample_prompts(item.instances, config.prompts, config.box_share, config.box_jitter, rng)
        logits, iou = decode(sam, embedding[None], prompts.boxes, prompts.points, size // LOSS_SCALE)
        masks = torch.as_tensor(item.instances[prompts.targets], dtype=torch.float32, device=device)
        targets = F.avg_pool2d(masks[:, None], LOSS_SCALE)[:, 0]  # soft: a pixel's covered share
        losses.append(promptable_loss(logits, iou, targets, len(prompts.boxes), config.focal_weight, config.dice_weight, config.iou_weight))
    if not losses:  # every image empty: a zero loss that still reaches the parameters
        zero = embeddings.sum() * 0
        return {"loss": zero, "mask": zero, "iou": zero}
    return {key: torch.stack([loss[key] for loss in losses]).mean() for key in losses[0]}


# ---------------------------------------------------------------- held-out score
@torch.no_grad()
def heldout_scores(sam: Sam, config: PretrainConfig, device: torch.device) -> dict[str, float]:
    """Promptable mIoU over every object of `heldout_images` unseen images: an exact box per
    object (read on the single mask), and one random point per object (the multimask output
    the IoU head ranks first); each a mean over objects."""
    sam.eval()
    size = sam.image_encoder.img_size
    box_ious: list[float] = []
    point_ious: list[float] = []
    for start in range(0, config.heldout_images, HELDOUT_BATCH):
        indices = range(start, min(start + HELDOUT_BATCH, config.heldout_images))
        items = [corpus_image(config, size, HELDOUT_STREAM, i) for i in indices]
        embeddings = embed_images(sam, as_images(items, device))
        for index, item, embedding in zip(indices, items, embeddings, strict=True):
            count = len(item.instances)
            if not count:
                continue
            rng = np.random.default_rng([config.seed, HELDOUT_PROMPT_STREAM, index])
            boxes = np.stack([mask_box(mask) for mask in item.instances])
            points = np.stack([mask_point(mask, rng) for mask in item.instances])
            logits, iou = decode(sam, embedding[None], boxes, points)
            masks = read_masks(logits, iou, count).cpu().numpy()
            truth = np.concatenate([item.instances, item.instances])
            ious = (masks & truth).sum(axis=(1, 2)) / np.maximum((masks | truth).sum(axis=(1, 2)), 1)
            box_ious.extend(ious[:count].tolist())
            point_ious.extend(ious[count:].tolist())
    return {
        "heldout.miou_box": float(np.mean(box_ious)) if box_ious else math.nan,
        "heldout.miou_point": float(np.mean(point_ious)) if point_ious else math.nan,
        "heldout.objects": float(len(box_ious)),
    }


# ---------------------------------------------------------------- state
@dataclass
class Trainer:
    sam: Sam
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    precision: Precision

    @classmethod
    def create(cls, sam: Sam, config: PretrainConfig, device: torch.device) -> Trainer:
        sam.to(device).requires_grad_(True)
        promptable = [*sam.prompt_encoder.parameters(), *sam.mask_decoder.parameters()]
        groups = [{"params": list(sam.image_encoder.parameters()), "lr": config.lr * config.encoder_lr_scale}, {"params": promptable}]
        optimizer = adamw(groups, config.lr, config.weight_decay)

        def factor(step: int) -> float:
            return lr_factor(step, config.steps, config.warmup_steps, "cosine")

        return cls(sam, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor), choose_precision(device))

    def step(self, config: PretrainConfig, step: int) -> dict[str, float]:
        self.sam.train()
        with self.precision.autocast():
            losses = step_loss(self.sam, config, step, self.precision.device)
        self.optimizer.zero_grad(set_to_none=True)
        self.precision.scaler.scale(losses["loss"]).backward()
        self.precision.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.sam.parameters(), config.grad_clip)
        self.precision.scaler.step(self.optimizer)
        self.precision.scaler.update()
        self.scheduler.step()
        return {**{key: float(value.detach()) for key, value in losses.items()}, "grad_norm": float(grad_norm)}

    def state(self, training_id: str, step: int, seconds: float) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT, "fingerprint": training_id, "step": step, "seconds": seconds, "rng": capture_rng(),
            "model": self.sam.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.precision.scaler.state_dict(),
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.sam.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:
            self.precision.scaler.load_state_dict(state["scaler"])
        restore_rng(state["rng"])


# ---------------------------------------------------------------- outputs
def finished(checkpoint: Path, training_id: str) -> dict[str, Any] | None:
    """The sidecar of a finished pretraining with this fingerprint whose .pth is intact, else None."""
    sidecar = sidecar_path(checkpoint)
    if not (sidecar.is_file() and checkpoint.is_file()):
        return None
    try:
        summary = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return None
    if summary.get("fingerprint") != training_id or summary.get("sha256") != file_sha256(checkpoint):
        return None
    return summary


def write_outputs(sam: Sam, checkpoint: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """The plain state dict (official format), then the sidecar naming its sha256."""
    save_atomic({name: tensor.detach().cpu().contiguous() for name, tensor in sam.state_dict().items()}, checkpoint)
    summary = {"format": SIDECAR_FORMAT, **summary, "sha256": file_sha256(checkpoint)}
    write_json(sidecar_path(checkpoint), summary)
    return summary


@contextmanager
def _mlflow_run(params: Params, enabled: bool) -> Iterator[tuple[str | None, Callable[[dict[str, float], int], None]]]:
    """(run id, log_metrics) of the pretrain_sam stage run; no MLflow at all when disabled."""
    if not enabled:
        yield None, lambda metrics, step: None
        return
    import mlflow

    from xctsam.util import tracking

    logged = {"pretrain": params.pretrain.model_dump(mode="json"), "sam": {"small": params.sam.small.model_dump(mode="json"), "image_size": params.sam.image_size}}
    with tracking.stage_run("pretrain_sam", logged, tags={"model": "sam_stand_in"}) as run:
        yield run.info.run_id, lambda metrics, step: mlflow.log_metrics(metrics, step=step)


# ---------------------------------------------------------------- the stage
def pretrain_sam(
    params: Params,
    checkpoint: Path,
    *,
    state_path: Path | None = None,
    resume: bool = True,
    stop_after: int | None = None,
    device: torch.device | str | None = None,
    log_mlflow: bool = True,
) -> PretrainResult:
    """Pretrain the small SAM on the shapes corpus into `checkpoint` (+ sidecar); resumable.

    stop_after: end the call (saving the state file) once that many steps are done, as an
    interruption would (a test hook).
    """
    config, sam_config = params.pretrain, stand_in_config(params.sam)
    checkpoint = Path(checkpoint)
    state_path = Path(state_path) if state_path is not None else checkpoint.with_suffix(".state.pt")
    training_id = pretrain_fingerprint(config, sam_config)
    if resume and (done := finished(checkpoint, training_id)) is not None:
        log.info("%s: pretraining already finished; nothing to do", checkpoint)
        return PretrainResult(checkpoint, sidecar_path(checkpoint), done["steps"], True, done)
    runtime = start_runtime(device)
    with deterministic_on_cpu(runtime.device), _mlflow_run(params, log_mlflow) as (run_id, log_metrics):
        seed_everything(config.seed)
        trainer = Trainer.create(build_sam(sam_config), config, runtime.device)
        state = load_training_state(state_path, training_id) if resume else None
        step, seconds = 0, 0.0
        if state is not None:
            trainer.restore(state)
            step, seconds = state["step"], state["seconds"]
            log.info("resuming pretraining from step %d of %d (%s)", step, config.steps, state_path)
        window: list[dict[str, float]] = []
        began = time.perf_counter() - seconds
        with InterruptLatch().installed() as latch, step_progress(config.steps, step, True) as show:
            while step < config.steps:
                if stop_after is not None and step >= stop_after:
                    save_atomic(trainer.state(training_id, step, time.perf_counter() - began), state_path)
                    return PretrainResult(checkpoint, sidecar_path(checkpoint), step, False, {})
                losses = trainer.step(config, step)
                step += 1
                check_losses("pretrain", step, {key: losses[key] for key in LOSS_TERMS}, "lower pretrain.lr or pretrain.encoder_lr_scale")
                window.append(losses)
                show(step, losses["loss"])
                if step % LOG_EVERY == 0 or step == config.steps:
                    log_metrics({f"train.{key}": float(np.mean([w[key] for w in window])) for key in window[0]}, step)
                    window = []
                if (step % config.checkpoint_every == 0 or latch.requested) and step < config.steps:
                    save_atomic(trainer.state(training_id, step, time.perf_counter() - began), state_path)
                if latch.requested:
                    raise latch.interruption(f"at step {step}, {state_path} saved")
        train_seconds = time.perf_counter() - began
        scores = heldout_scores(trainer.sam, config, runtime.device)
        log_metrics({**scores, "train.seconds": train_seconds}, step)
        summary = write_outputs(trainer.sam, checkpoint, {
            "fingerprint": training_id, "steps": step, "train_seconds": round(train_seconds, 1),
            "mlflow_run_id": run_id, "architecture": {"small": sam_config.small.model_dump(mode="json"), "image_size": sam_config.image_size},
            "heldout": scores,
        })
        state_path.unlink(missing_ok=True)  # the sidecar now marks the pretraining as done
    return PretrainResult(checkpoint, sidecar_path(checkpoint), step, True, summary)
