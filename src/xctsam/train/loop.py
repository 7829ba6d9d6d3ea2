"""One training loop for every Segmenter (Conv-LoRA SAM, 2.5D U-Net, ...).

Per step: a batch of tiles from the sampler, loss = model.loss + model.auxiliary_loss, AdamW
over the trainable parameters, gradient-norm clipping, LR linear warm-up then cosine (or poly
0.9) decay to 0 at `steps`. On CUDA the forward runs under autocast (bf16 where supported, else
fp16 with a GradScaler); elsewhere in float32, seeded and with deterministic algorithms.

Every `epoch_steps` steps (and at the last step) the model segments whole validation slices;
their pooled confusion counts give the validation mIoU (mean over defined classes). The best
epoch's weights are kept, and training stops early after `patience` epochs without gain.

Files in `out_dir` (all written atomically):
  last.pt         the whole training state every `checkpoint_every` steps and on Ctrl-C; a
                  killed run started again continues from it and ends with the same weights
                  and history as one never interrupted (bitwise on the CPU with the same
                  torch thread count: reductions split by thread). Removed at the end.
  best.pt         the best epoch's weights with the model meta (what evaluation loads).
  training.json   the summary, written last: its fingerprint marks the training as done, so
                  a rerun with the same params returns at once.
A first Ctrl-C finishes the current step, saves last.pt and stops; a second stops at once (the
last periodic checkpoint remains).

Several GPUs: launch under torchrun, e.g.
    torchrun --standalone --nproc_per_node=4 --no-python xctsam train sam
Each process trains on its own tiles (the caller seeds its sampler with `seed + process_rank()`),
gradients are averaged by DistributedDataParallel (effective batch: batch x processes), and
only rank 0 validates, logs and writes files. Without torchrun nothing of torch.distributed is
touched.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from rich.progress import TextColumn
from torch import nn

from xctsam import CLASS_NAMES, NUM_CLASSES
from xctsam.config import TrainConfig
from xctsam.data.datasets import IntensityWindow, SliceRef, sample_slices
from xctsam.data.tiles import ContextReader, read_context
from xctsam.eval.metrics import ConfusionCounter, iou_dice, mean_defined
from xctsam.models.base import Segmenter
from xctsam.models.checkpoint import STATE_FORMAT, save_atomic, save_segmenter_checkpoint
from xctsam.train.checkpoint import (
    capture_rng,
    load_training_state,
    restore_rng,
    seed_everything,
    training_fingerprint,
)
from xctsam.util import progress
from xctsam.util.device import pick_device
from xctsam.util.finite import check_losses, check_weights
from xctsam.util.interrupt import InterruptLatch
from xctsam.util.jsonfile import write_json
from xctsam.util.optim import adamw

log = logging.getLogger(__name__)

LAST = "last.pt"
BEST = "best.pt"
SUMMARY = "training.json"
LOG_EVERY = 10  # steps between train.* metric reports (means over those steps)
LOSS_TERMS = ("loss", "task_loss", "aux_loss")  # of Trainer.step: the total first, then its terms
POLY_POWER = 0.9

ArrayLike = np.ndarray | torch.Tensor
ValidationSource = Sequence[tuple[ArrayLike, ArrayLike]] | Callable[[], Iterable[tuple[ArrayLike, ArrayLike]]]
MetricsLogger = Callable[[dict[str, float], int], None]
EpochHook = Callable[[dict[str, float], int], None]  # (validation scores, step); may raise to stop training


class TileSource(Protocol):
    def batch(self, n: int) -> tuple[np.ndarray, np.ndarray]: ...
    def rng_state(self) -> Any: ...
    def set_rng_state(self, state: Any) -> None: ...


@dataclass(frozen=True)
class TrainResult:
    steps: int  # optimiser steps done (fewer than config.steps after early stopping)
    best_val_miou: float  # NaN when no validation gave a defined mIoU
    best_step: int | None
    stopped_early: bool
    steps_per_second: float | None  # of this call; None when it trained no step
    checkpoint: Path  # best.pt
    history: list[dict[str, Any]]  # one entry per validated epoch
    completed: bool = True  # False when `stop_after` ended the call before the end
    resumed_from: int = 0  # step this call started at


# ---------------------------------------------------------------- schedule
def lr_factor(step: int, steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the base LR for optimiser step `step` (0-based).

    Linear warm-up reaching 1 at step warmup_steps - 1, then cosine (or (1 - t)^0.9) from 1 at
    step warmup_steps to 0 at step `steps` (one past the last step, so no step is wasted at 0).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, steps - warmup_steps))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "poly":
        return (1.0 - progress) ** POLY_POWER
    raise ValueError(f"unknown LR schedule {schedule!r} (cosine or poly)")


# ---------------------------------------------------------------- one process or several
@dataclass
class Runtime:
    """The single-process run: every collective is the identity."""

    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def gather(self, value: Any) -> list[Any]:
        return [value]

    def broadcast(self, value: Any) -> Any:
        return value

    def any(self, flag: bool) -> bool:
        return flag

    def close(self) -> None:
        pass


class DistributedRuntime(Runtime):
    """torchrun's processes: NCCL with one GPU each when there are enough GPUs, else gloo on CPUs."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self._dist = dist
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        local_size = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
        use_gpus = torch.cuda.is_available() and torch.cuda.device_count() >= local_size
        if use_gpus:
            torch.cuda.set_device(local_rank)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_gpus else "gloo")
        device = torch.device("cuda", local_rank) if use_gpus else torch.device("cpu")
        super().__init__(device, dist.get_rank(), dist.get_world_size())

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # top-k mixtures of experts leave unchosen experts without gradients in a step
        return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=True)

    def gather(self, value: Any) -> list[Any]:
        values: list[Any] = [None] * self.world_size
        self._dist.all_gather_object(values, value)
        return values

    def broadcast(self, value: Any) -> Any:
        box = [value]
        self._dist.broadcast_object_list(box, src=0)
        return box[0]

    def any(self, flag: bool) -> bool:
        tensor = torch.tensor([int(flag)], device=self.device)
        self._dist.all_reduce(tensor, op=self._dist.ReduceOp.MAX)
        return bool(tensor.item())

    def close(self) -> None:
        if self._dist.is_initialized():
            self._dist.destroy_process_group()


def process_rank() -> int:
    """This process's rank under torchrun (0 otherwise); seed per-process samplers with seed + rank."""
    return int(os.environ.get("RANK", "0"))


def start_runtime(device: torch.device | str | None = None) -> Runtime:
    """Distributed under torchrun with more than one process, else the plain single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return DistributedRuntime()
    return Runtime(torch.device(device) if device is not None else pick_device())


# ---------------------------------------------------------------- precision
@dataclass
class Precision:
    """Autocast dtype (None: float32) and the gradient scaler fp16 needs."""

    device: torch.device
    dtype: torch.dtype | None
    scaler: torch.amp.GradScaler

    def autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=self.dtype) if self.dtype is not None else nullcontext()


def choose_precision(device: torch.device) -> Precision:
    if device.type != "cuda":
        return Precision(device, None, torch.amp.GradScaler(device.type, enabled=False))
    if torch.cuda.is_bf16_supported():  # bf16 has float32's range: no loss scaling needed
        return Precision(device, torch.bfloat16, torch.amp.GradScaler("cuda", enabled=False))
    return Precision(device, torch.float16, torch.amp.GradScaler("cuda", enabled=True))


# ---------------------------------------------------------------- the optimiser step
class Trainer:
    """Model, optimiser, schedule and scaler, and one training step."""

    def __init__(self, model: Segmenter, config: TrainConfig, runtime: Runtime) -> None:
        self.model = model.to(runtime.device)
        self.net = runtime.wrap(self.model)  # what the forward runs through (DDP or the model)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        if not self.trainable:
            raise ValueError("the model has no trainable parameters")
        self.config = config
        self.device = runtime.device
        self.optimizer = adamw(self.trainable, config.lr, config.weight_decay)
        factor = functools.partial(lr_factor, steps=config.steps, warmup_steps=config.warmup_steps, schedule=config.schedule)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        self.precision = choose_precision(runtime.device)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """One optimiser step; returns the loss, its task and auxiliary terms, LR used and pre-clip gradient norm."""
        self.model.train()
        lr = self.lr
        with self.precision.autocast():
            outputs = self.net(images)
            auxiliary = self.model.auxiliary_loss()
            task = self.model.loss(outputs, labels)
            loss = task + auxiliary
        self.optimizer.zero_grad(set_to_none=True)
        scaler = self.precision.scaler
        scaler.scale(loss).backward()
        scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.config.grad_clip)
        scaler.step(self.optimizer)
        scaler.update()
        self.scheduler.step()
        return {"loss": loss.item(), "task_loss": float(task.detach().float()), "aux_loss": float(auxiliary.detach().float()), "lr": lr, "grad_norm": grad_norm.item()}

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.precision.scaler.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:  # empty when saved by a run without loss scaling
            self.precision.scaler.load_state_dict(state["scaler"])


def as_tensor(array: ArrayLike, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(array, np.ndarray):
        array = np.ascontiguousarray(array)  # crops of a slice are strided views
    return torch.as_tensor(array).to(device, dtype)


def to_device(images: ArrayLike, labels: ArrayLike, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return as_tensor(images, device, torch.float32), as_tensor(labels, device, torch.long)


# ---------------------------------------------------------------- validation
def validation_scores(model: Segmenter, source: ValidationSource, precision: Precision) -> dict[str, float]:
    """val.miou and val.iou.<class> of whole slices, from confusion counts pooled over all of them.

    `source`: (images, labels) pairs, or a callable returning them afresh (a one-shot iterator
    would be spent after the first epoch).

    Slices go to the model at full size: every Segmenter returns outputs at its input size
    (the U-Net pads internally, SAM resizes to its image size).
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


def whole_slice_batches(refs: Sequence[SliceRef], window: IntensityWindow, context: int, count: int, seed: int) -> Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]:
    """A validation source: `count` seeded slices of `refs`, read afresh one by one at each call
    (whole slices with their 2.5D context, normalised by `window`), so none sits in memory."""
    chosen = sample_slices(refs, count, seed)

    def batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        with ContextReader() as reader:
            for ref in chosen:
                yield window.normalise(read_context(reader, ref, context))[None], reader.labels(ref)[None]

    return batches


# ---------------------------------------------------------------- bookkeeping that a resume restores
@dataclass
class Book:
    step: int = 0
    best_miou: float = -math.inf
    best_step: int | None = None
    bad_epochs: int = 0
    stopped_early: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)
    epoch_loss: list[float] = field(default_factory=lambda: [0.0, 0.0])  # sum, count since the epoch began
    window: dict[str, float] = field(default_factory=dict)  # train.* sums since the last report, and "count"

    def add(self, losses: Mapping[str, float]) -> None:
        self.epoch_loss = [self.epoch_loss[0] + losses["loss"], self.epoch_loss[1] + 1]
        for name in ("loss", "aux_loss", "grad_norm"):
            self.window[name] = self.window.get(name, 0.0) + losses[name]
        self.window["count"] = self.window.get("count", 0.0) + 1

    def take_window(self, lr: float) -> dict[str, float]:
        count = max(self.window.pop("count", 1.0), 1.0)
        means = {f"train.{name}": total / count for name, total in self.window.items()}
        self.window = {}
        return {**means, "train.lr": lr}

    def end_epoch(self, scores: Mapping[str, float], lr: float, patience: int) -> bool:
        """Record the epoch; True if its mIoU is a new best. NaN (nothing scorable) neither improves nor counts."""
        total, count = self.epoch_loss
        self.history.append({"epoch": len(self.history) + 1, "step": self.step, "train.loss": total / max(count, 1), "train.lr": lr, **scores})
        self.epoch_loss = [0.0, 0.0]
        miou = scores["val.miou"]
        if math.isnan(miou):
            return False
        if miou > self.best_miou:
            self.best_miou, self.best_step, self.bad_epochs = miou, self.step, 0
            return True
        self.bad_epochs += 1
        self.stopped_early = self.bad_epochs >= patience
        return False


# ---------------------------------------------------------------- summary file
def _history_from_json(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Undefined scores were written as null: back to NaN."""
    return [{key: math.nan if value is None else value for key, value in entry.items()} for entry in history]


def _best_miou(book: Book) -> float:
    return book.best_miou if book.best_step is not None else math.nan


def write_summary(out_dir: Path, book: Book, training_id: str, steps_per_second: float | None) -> None:
    summary = {
        "fingerprint": training_id,
        "steps": book.step,
        "best_val_miou": _best_miou(book),
        "best_step": book.best_step,
        "stopped_early": book.stopped_early,
        "steps_per_second": steps_per_second,
        "history": book.history,
    }
    write_json(out_dir / SUMMARY, summary)


def finished_result(out_dir: Path, training_id: str) -> TrainResult | None:
    """The result of a finished training with this fingerprint, if its files are all there."""
    path = out_dir / SUMMARY
    if not (path.is_file() and (out_dir / BEST).is_file()):
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if summary.get("fingerprint") != training_id:
        return None
    history = _history_from_json(summary["history"])
    best = summary["best_val_miou"]
    return TrainResult(summary["steps"], math.nan if best is None else best, summary["best_step"], summary["stopped_early"], None, out_dir / BEST, history, True, summary["steps"])


# ---------------------------------------------------------------- training state on disk
def save_state(path: Path, trainer: Trainer, book: Book, sampler: TileSource, runtime: Runtime, training_id: str) -> None:
    """Collective: every rank hands over its sampler and random streams, rank 0 writes."""
    samplers = runtime.gather(sampler.rng_state())
    streams = runtime.gather(capture_rng())
    if not runtime.is_main:
        return
    state = {"format": STATE_FORMAT, "fingerprint": training_id, "step": book.step, "book": asdict(book), "samplers": samplers, "rng": streams, **trainer.state_dict()}
    save_atomic(state, path)


def restore_state(state: Mapping[str, Any], trainer: Trainer, sampler: TileSource, runtime: Runtime) -> Book:
    trainer.load_state_dict(state)
    sampler.set_rng_state(state["samplers"][runtime.rank])
    restore_rng(state["rng"][runtime.rank])
    return Book(**state["book"])


# ---------------------------------------------------------------- progress bar with the loss
@contextmanager
def step_progress(total: int, start: int, enabled: bool) -> Iterator[Callable[[int, float], None]]:
    """update(done, loss) callback of a rich bar; silent when disabled or XCTSAM_NO_PROGRESS=1."""
    if not (enabled and progress.enabled()):
        yield lambda done, loss: None
        return
    with progress.progress_bar(TextColumn("loss {task.fields[loss]}")) as bar:
        task = bar.add_task("train", total=total, completed=start, loss="-")
        yield lambda done, loss: bar.update(task, completed=done, loss=f"{loss:.4f}")


@contextmanager
def deterministic_on_cpu(device: torch.device) -> Iterator[None]:
    """Deterministic kernels on the CPU (where they cost nothing), the previous setting restored after."""
    if device.type != "cpu":
        yield
        return
    previous, previous_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)


# ---------------------------------------------------------------- the loop
@dataclass
class Run:
    """What the loop works with, in one place."""

    trainer: Trainer
    sampler: TileSource
    validation: ValidationSource
    config: TrainConfig
    runtime: Runtime
    out_dir: Path
    training_id: str
    model_meta: Mapping[str, Any]
    log_metrics: MetricsLogger
    log_every: int
    on_epoch: EpochHook | None = None
    params_key: str = "train"  # the params section of `config` (train.sam, finetune), named by errors

    @property
    def hint(self) -> str:
        return f"lower {self.params_key}.lr or check the input data"

    def report(self, metrics: dict[str, float], step: int) -> None:
        if self.runtime.is_main:
            self.log_metrics(metrics, step)

    def end_epoch(self, book: Book) -> Book:
        """Rank 0 validates, keeps the best weights and decides on stopping; every rank learns it."""
        if self.runtime.is_main:
            scores = validation_scores(self.trainer.model, self.validation, self.trainer.precision)
            if book.end_epoch(scores, self.trainer.lr, self.config.patience):
                self.save_best(book)
            self.report({**scores, "epoch": float(len(book.history))}, book.step)
            log.info("step %d: val.miou %.4f (best %.4f at step %s)", book.step, scores["val.miou"], _best_miou(book), book.best_step)
            if self.on_epoch is not None:  # e.g. a hyperparameter search reporting to its pruner
                self.on_epoch(dict(scores), book.step)
        return self.runtime.broadcast(book)

    def save_best(self, book: Book) -> None:
        # an update can overflow the weights while its loss was finite: such weights are no model
        check_weights(self.params_key, book.step, self.trainer.model, self.hint)
        save_segmenter_checkpoint(self.out_dir / BEST, self.trainer.model, self.model_meta, self.best_facts(book))

    def best_facts(self, book: Book) -> dict[str, Any]:
        return {"step": book.step, "val_miou": _best_miou(book), "fingerprint": self.training_id}

    def step(self, book: Book) -> float:
        images, labels = to_device(*self.sampler.batch(self.config.batch), self.trainer.device)
        losses = self.trainer.step(images, labels)
        book.step += 1
        check_losses(self.params_key, book.step, {name: losses[name] for name in LOSS_TERMS}, self.hint)
        book.add(losses)
        if book.step % self.log_every == 0 or book.step == self.config.steps:
            self.report(book.take_window(losses["lr"]), book.step)
        return losses["loss"]

    def train(self, book: Book, stop_after: int | None) -> tuple[Book, bool]:
        """Steps until the end, early stopping or `stop_after`; returns (book, completed)."""
        config = self.config
        with InterruptLatch().installed() as latch, step_progress(config.steps, book.step, self.runtime.is_main) as show:
            while book.step < config.steps and not book.stopped_early:
                if stop_after is not None and book.step >= stop_after:
                    return book, False
                show(book.step + 1, self.step(book))
                if book.step % config.epoch_steps == 0 or book.step == config.steps:
                    book = self.end_epoch(book)
                interrupted = self.runtime.any(latch.requested)
                pausing = stop_after is not None and book.step >= stop_after
                finishing = book.step == config.steps or book.stopped_early
                if (book.step % config.checkpoint_every == 0 or interrupted or pausing) and not finishing:
                    save_state(self.out_dir / LAST, self.trainer, book, self.sampler, self.runtime, self.training_id)
                if interrupted:
                    raise latch.interruption(f"at step {book.step}, {self.out_dir / LAST} saved")
        return book, True

    def finish(self, book: Book, steps_per_second: float | None) -> None:
        if not self.runtime.is_main:
            return
        if book.best_step is None:  # no epoch had a defined mIoU: the final weights are the answer
            self.save_best(book)
        write_summary(self.out_dir, book, self.training_id, steps_per_second)
        (self.out_dir / LAST).unlink(missing_ok=True)  # the summary now marks the training as done


def _start(run: Run, resume: bool, seed: int) -> Book:
    """Resume from last.pt of this training, or start fresh (clearing another training's files)."""
    state = load_training_state(run.out_dir / LAST, run.training_id) if resume else None
    if state is not None:
        log.info("resuming from step %d of %d (%s)", state["step"], run.config.steps, run.out_dir / LAST)
        return restore_state(state, run.trainer, run.sampler, run.runtime)
    if run.runtime.is_main:
        for name in (LAST, BEST, SUMMARY):
            (run.out_dir / name).unlink(missing_ok=True)
    seed_everything(seed + run.runtime.rank)
    return Book()


def train_segmenter(
    model: Segmenter,
    sampler: TileSource,
    val_batches: ValidationSource,
    config: TrainConfig,
    out_dir: Path,
    *,
    seed: int,
    model_meta: Mapping[str, Any],
    device: torch.device | str | None = None,
    resume: bool = True,
    log_metrics: MetricsLogger | None = None,
    stop_after: int | None = None,
    log_every: int = LOG_EVERY,
    runtime: Runtime | None = None,
    on_epoch: EpochHook | None = None,
    params_key: str = "train",
) -> TrainResult:
    """Train `model` on `sampler`'s tiles, validating on whole slices, into `out_dir`.

    sampler: `.batch(n) -> (images (n, context, t, t) float32 in [0, 1], labels (n, t, t))` with
    `.rng_state()` / `.set_rng_state()`. val_batches: (images (n, context, H, W), labels (n, H, W))
    pairs, or a callable returning them afresh. model_meta: what rebuilds the model (kind, its
    params section, intensity window), stored in best.pt and part of the fingerprint with
    `config` and `seed` (add a data hash to it to retrain when the data change).
    log_metrics(metrics, step): e.g. mlflow.log_metrics; train.* every `log_every` steps,
    val.* per epoch. stop_after: end the call (saving last.pt) once that many steps are done,
    as a kill would, but cleanly (a test hook). on_epoch(scores, step): called on rank 0 after
    each validation; an exception it raises (e.g. optuna.TrialPruned) ends training there and
    propagates, leaving the last periodic checkpoint. The model is moved to the device in place.
    A NaN or infinite loss stops training at once (TrainingDiverged naming the step, its loss
    terms and `params_key`, the params section of `config`); best.pt never holds such weights.
    """
    out_dir = Path(out_dir)
    own_runtime = runtime is None
    runtime = runtime or start_runtime(device)
    try:
        training_id = training_fingerprint(config, model_meta, seed, runtime.world_size)
        if resume and (done := finished_result(out_dir, training_id)) is not None:
            log.info("%s: training already finished (%d steps); nothing to do", out_dir, done.steps)
            return done
        run = Run(Trainer(model, config, runtime), sampler, val_batches, config, runtime, out_dir, training_id, dict(model_meta), log_metrics or (lambda metrics, step: None), log_every, on_epoch, params_key)
        with deterministic_on_cpu(runtime.device):
            book = _start(run, resume, seed)
            began, start = time.perf_counter(), book.step
            book, completed = run.train(book, stop_after)
            trained = book.step - start
            steps_per_second = trained / (time.perf_counter() - began) if trained else None
        if completed:
            if steps_per_second is not None:
                run.report({"train.steps_per_second": steps_per_second}, book.step)
            run.finish(book, steps_per_second)
        return TrainResult(book.step, _best_miou(book), book.best_step, book.stopped_early, steps_per_second, out_dir / BEST, book.history, completed, start)
    finally:
        if own_runtime:
            runtime.close()
