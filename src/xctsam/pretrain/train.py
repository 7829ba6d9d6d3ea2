"""`xctsam train pretrain`: promptable training of the small SAM into an official-format checkpoint.

Everything trains (image encoder, prompt encoder, mask decoder), as SAM's own training did. Per
step: `batch` corpus images (pretrain.shapes, each from its own seed), the encoder on all of
them, then per image up to `prompts` objects prompted by a jittered box or a single point,
decoded with all four mask outputs and scored by pretrain.losses. AdamW, linear warm-up then
cosine decay (the training loop's schedule), gradient clipping; autocast on CUDA only.

The pretraining is a job of the resumable engine (util.resumable). Files:
  <out>.pth           model.state_dict() of build_sam(small) itself: exactly the keys and shapes
                      of the architecture, no wrapper, like the official sam_vit_*.pth files, so
                      `sam.checkpoint` loads it through the same loader.
  <out>.json          sidecar, written last: params fingerprint, the .pth's sha256, MLflow run
                      id, held-out promptable mIoU. A rerun with the same params returns at once.
  state file          the whole training state every `checkpoint_every` steps and on Ctrl-C /
                      SIGTERM (default <out>.state.pt); a run started again continues from it
                      and ends with the same weights. Removed at the end.
  .<out>.lock         while training (util.folder_lock): a second run onto <out> is refused.
A run with other params leaves a finished .pth and sidecar in place until it writes its own.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from xctsam.config.params import Params
from xctsam.config.pretrain import PretrainConfig
from xctsam.config.sam import SamConfig
from xctsam.models.checkpoint import STATE_FORMAT, save_atomic
from xctsam.models.sam_builder import Sam, build_sam
from xctsam.pretrain.losses import promptable_loss
from xctsam.pretrain.promptable import decode, embed_images, read_masks
from xctsam.pretrain.prompts import mask_box, mask_point, sample_prompts
from xctsam.pretrain.shapes import ShapeImage, make_image
from xctsam.train.checkpoint import capture_rng, restore_rng, seed_everything
from xctsam.train.optimisation import Optimised, choose_precision
from xctsam.train.runtime import deterministic_on_cpu, process_rank, start_runtime
from xctsam.train.trainer import lr_factor
from xctsam.util.errors import ConfigError
from xctsam.util.folder_lock import folder_lock
from xctsam.util.hashing import file_sha256, fingerprint
from xctsam.util.jsonfile import write_json
from xctsam.util.optim import adamw
from xctsam.util.resumable import Engine, Job, LossWindow, Outcome, StateFile

log = logging.getLogger(__name__)

SIDECAR_FORMAT = "xctsam.sam_stand_in/1"
TRAIN_STREAM, HELDOUT_STREAM, PROMPT_STREAM, HELDOUT_PROMPT_STREAM = 0, 1, 2, 3  # disjoint seed streams
LOG_EVERY = 10
HELDOUT_BATCH = 8
LOSS_SCALE = 2  # losses on masks at image_size / 2: a quarter of the cost, small objects still seen
NOT_TRAINING_KEYS = {"checkpoint_every", "stand_ins"}  # change how often state is saved, or which files

MetricsLogger = Callable[[dict[str, float], int], None]


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


# ---------------------------------------------------------------- the optimiser step
class Trainer(Optimised):
    """The SAM with its optimiser (the encoder at `encoder_lr_scale` of the LR), schedule and scaler."""

    model: Sam

    @classmethod
    def create(cls, sam: Sam, config: PretrainConfig, device: torch.device) -> Trainer:
        sam.to(device).requires_grad_(True)
        promptable = [*sam.prompt_encoder.parameters(), *sam.mask_decoder.parameters()]
        groups = [{"params": list(sam.image_encoder.parameters()), "lr": config.lr * config.encoder_lr_scale}, {"params": promptable}]
        optimizer = adamw(groups, config.lr, config.weight_decay)

        def factor(step: int) -> float:
            return lr_factor(step, config.steps, config.warmup_steps, "cosine")

        return cls(sam, optimizer, factor, choose_precision(device), list(sam.parameters()), config.grad_clip)

    def step(self, config: PretrainConfig, step: int) -> dict[str, float]:
        """Step `step` (0-based): its loss terms and the pre-clip gradient norm."""
        self.model.train()
        with self.precision.autocast():
            losses = step_loss(self.model, config, step, self.precision.device)
        grad_norm = self.update(losses["loss"])
        return {**{key: float(value.detach()) for key, value in losses.items()}, "grad_norm": grad_norm}


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
def _mlflow_run(config: PretrainConfig, sam: SamConfig, enabled: bool) -> Iterator[tuple[str | None, MetricsLogger]]:
    """(run id, log_metrics) of the pretrain_sam stage run; no MLflow at all when disabled."""
    if not enabled:
        yield None, lambda metrics, step: None
        return
    import mlflow

    from xctsam.util import tracking

    logged = {"pretrain": config.model_dump(mode="json"), "sam": {"small": sam.small.model_dump(mode="json"), "image_size": sam.image_size}}
    with tracking.stage_run("pretrain_sam", logged, tags={"model": "sam_stand_in"}) as run:
        yield run.info.run_id, lambda metrics, step: mlflow.log_metrics(metrics, step=step)


# ---------------------------------------------------------------- the job the engine runs
@dataclass
class PretrainJob(Job[dict[str, Any]]):
    """The pretraining as util.resumable's engine runs it; its outputs are the .pth and sidecar."""

    trainer: Trainer
    config: PretrainConfig
    sam_config: SamConfig
    checkpoint: Path
    training_id: str
    run_id: str | None
    log_metrics: MetricsLogger
    name: str = "pretrain"
    hint: str = "lower pretrain.lr or pretrain.encoder_lr_scale"
    window: LossWindow = field(default_factory=LossWindow)
    began: float = field(default_factory=time.perf_counter)  # a resumed run's clock carries its earlier seconds on

    @property
    def steps(self) -> int:
        return self.config.steps

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.began

    def train_step(self, step: int) -> dict[str, float]:
        losses = self.trainer.step(self.config, step)
        self.window.add(losses)
        return losses

    def log_window(self, done: int) -> None:
        self.log_metrics({f"train.{key}": mean for key, mean in self.window.take().items()}, done)

    def state_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "rng": capture_rng(), **self.trainer.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.trainer.load_state_dict(state)
        restore_rng(state["rng"])
        self.began = time.perf_counter() - state["seconds"]

    def finish(self, outcome: Outcome) -> dict[str, Any]:
        """Held-out scores, then the .pth and its sidecar: the summary written."""
        train_seconds = self.seconds
        scores = heldout_scores(self.trainer.model, self.config, self.trainer.precision.device)
        self.log_metrics({**scores, "train.seconds": train_seconds}, outcome.step)
        architecture = {"small": self.sam_config.small.model_dump(mode="json"), "image_size": self.sam_config.image_size}
        return write_outputs(self.trainer.model, self.checkpoint, {
            "fingerprint": self.training_id, "steps": outcome.step, "train_seconds": round(train_seconds, 1),
            "mlflow_run_id": self.run_id, "architecture": architecture, "heldout": scores,
        })


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
    engine = Engine(StateFile(state_path, STATE_FORMAT, training_id), config.checkpoint_every, LOG_EVERY, resume=resume, what="pretraining")

    def result(steps: int, completed: bool, summary: dict[str, Any]) -> PretrainResult:
        return PretrainResult(checkpoint, sidecar_path(checkpoint), steps, completed, summary)

    # one lock per checkpoint, not per folder: stand-ins of other names may train side by side
    with folder_lock(checkpoint.parent, f".{checkpoint.name}.lock", enabled=process_rank() == 0):
        if (done := engine.finished(lambda: finished(checkpoint, training_id), checkpoint)) is not None:
            return result(done["steps"], True, done)
        runtime = start_runtime(device)
        with deterministic_on_cpu(runtime.device), _mlflow_run(params.pretrain, params.sam, log_mlflow) as (run_id, log_metrics):
            seed_everything(config.seed)
            trainer = Trainer.create(build_sam(sam_config), config, runtime.device)
            job = PretrainJob(trainer, config, sam_config, checkpoint, training_id, run_id, log_metrics)
            outcome, summary = engine.run(job, engine.restore(job, engine.load()), stop_after)
        return result(outcome.step, outcome.completed, summary or {})
