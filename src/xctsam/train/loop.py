"""One training loop for every Segmenter (Conv-LoRA SAM, 2.5D U-Net, ...).

Per step: a batch of tiles from the sampler, loss = model.loss + model.auxiliary_loss, AdamW
over the trainable parameters, gradient-norm clipping, LR linear warm-up then cosine (or poly
0.9) decay to 0 at `steps`. On CUDA the forward runs under autocast (train.optimisation);
elsewhere in float32, seeded and with deterministic algorithms.

Every `epoch_steps` steps (and at the last step) the model segments whole validation slices;
their pooled confusion counts give the validation mIoU (mean over defined classes). The best
epoch's weights are kept, and training stops early after `patience` epochs without gain.

The training is a job of the resumable engine (util.resumable: fingerprint, finished-run
shortcut, restore, checkpoints, Ctrl-C). Files in `out_dir` (all written atomically):
  last.pt         the whole training state every `checkpoint_every` steps and on Ctrl-C; a
                  killed run started again continues from it and ends with the same weights
                  and history as one never interrupted (bitwise on the CPU with the same
                  torch thread count: reductions split by thread). Removed at the end.
  best.pt         the best epoch's weights with the model meta (what evaluation loads).
  training.json   the summary, written last: its fingerprint marks the training as done, so
                  a rerun with the same params returns at once.
  .xctsam.lock    while training (util.folder_lock): a second run into the folder is refused.
A new training (other params, or --fresh) leaves a finished model where it is until its own
first best replaces it: training.json goes just before that (it would claim the new weights
for the old training), and comes back when the new training ends.
A first Ctrl-C finishes the current step, saves last.pt and stops; a second stops at once (the
last periodic checkpoint remains).

Several GPUs: under torchrun (train.runtime) each process trains on its own tiles, gradients
are averaged by DistributedDataParallel, and only rank 0 validates, logs and writes files.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from xctsam.config.train import TrainConfig
from xctsam.models.base import Segmenter
from xctsam.models.checkpoint import STATE_FORMAT, save_segmenter_checkpoint
from xctsam.train.checkpoint import capture_rng, restore_rng, seed_everything, training_fingerprint
from xctsam.train.runtime import Runtime, deterministic_on_cpu, start_runtime
from xctsam.train.runtime import (
    process_rank as process_rank,  # re-exported: callers seed samplers by rank
)
from xctsam.train.trainer import Trainer
from xctsam.train.validation import ValidationSource, to_device, validation_scores
from xctsam.util.finite import check_weights
from xctsam.util.folder_lock import folder_lock
from xctsam.util.jsonfile import write_json
from xctsam.util.resumable import Engine, Job, LossWindow, Outcome, StateFile

log = logging.getLogger(__name__)

LAST = "last.pt"
BEST = "best.pt"
SUMMARY = "training.json"
LOG_EVERY = 10  # steps between train.* metric reports (means over those steps)
WINDOWED = ("loss", "aux_loss", "grad_norm")  # of Trainer.step: what the train.* reports average

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
    window: dict[str, float] = field(default_factory=dict)  # LossWindow sums of WINDOWED since the last report

    def add(self, losses: Mapping[str, float]) -> None:
        self.epoch_loss = [self.epoch_loss[0] + losses["loss"], self.epoch_loss[1] + 1]
        LossWindow(self.window).add({name: losses[name] for name in WINDOWED})

    def take_window(self, lr: float) -> dict[str, float]:
        means = {f"train.{name}": mean for name, mean in LossWindow(self.window).take().items()}
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


# ---------------------------------------------------------------- the job the engine runs
@dataclass
class SegmentationJob(Job[None]):
    """The Segmenter's training as util.resumable's engine runs it; its state is last.pt's."""

    trainer: Trainer
    sampler: TileSource
    validation: ValidationSource
    config: TrainConfig
    runtime: Runtime
    out_dir: Path
    training_id: str
    model_meta: Mapping[str, Any]
    log_metrics: MetricsLogger
    on_epoch: EpochHook | None = None
    name: str = "train"  # the params section of `config` (train.sam, finetune), named by errors
    book: Book = field(default_factory=Book)
    lr_used: float = math.nan  # by the last step: what its train.* report shows

    @property
    def steps(self) -> int:
        return self.config.steps

    @property
    def hint(self) -> str:
        return f"lower {self.name}.lr or check the input data"

    def report(self, metrics: dict[str, float], step: int) -> None:
        if self.runtime.is_main:
            self.log_metrics(metrics, step)

    def train_step(self, step: int) -> dict[str, float]:
        images, labels = to_device(*self.sampler.batch(self.config.batch), self.trainer.device)
        losses = self.trainer.step(images, labels)
        self.book.step, self.lr_used = step + 1, losses["lr"]
        self.book.add(losses)
        return losses

    def log_window(self, done: int) -> None:
        self.report(self.book.take_window(self.lr_used), done)

    def after_step(self, done: int) -> None:
        if done % self.config.epoch_steps == 0 or done == self.config.steps:
            self.end_epoch()

    def stopped(self) -> bool:
        return self.book.stopped_early

    def end_epoch(self) -> None:
        """Rank 0 validates, keeps the best weights and decides on stopping; every rank learns it."""
        book = self.book
        if self.runtime.is_main:
            scores = validation_scores(self.trainer.model, self.validation, self.trainer.precision)
            if book.end_epoch(scores, self.trainer.lr, self.config.patience):
                self.save_best()
            self.report({**scores, "epoch": float(len(book.history))}, book.step)
            log.info("step %d: val.miou %.4f (best %.4f at step %s)", book.step, scores["val.miou"], _best_miou(book), book.best_step)
            if self.on_epoch is not None:  # e.g. a hyperparameter search reporting to its pruner
                self.on_epoch(dict(scores), book.step)
        self.book = self.runtime.broadcast(book)

    def save_best(self) -> None:
        # an update can overflow the weights while its loss was finite: such weights are no model
        book = self.book
        check_weights(self.name, book.step, self.trainer.model, self.hint)
        # until this training ends, a summary here is an earlier training's: it must not vouch
        # for these weights. Removed first, so a crash in between leaves the old model unclaimed.
        (self.out_dir / SUMMARY).unlink(missing_ok=True)
        facts = {"step": book.step, "val_miou": _best_miou(book), "fingerprint": self.training_id}
        save_segmenter_checkpoint(self.out_dir / BEST, self.trainer.model, self.model_meta, facts)

    def state_dict(self) -> dict[str, Any] | None:
        """Collective: every rank hands over its sampler and random streams, rank 0 gets the state."""
        samplers = self.runtime.gather(self.sampler.rng_state())
        streams = self.runtime.gather(capture_rng())
        if not self.runtime.is_main:
            return None
        return {"book": asdict(self.book), "samplers": samplers, "rng": streams, **self.trainer.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.trainer.load_state_dict(state)
        self.sampler.set_rng_state(state["samplers"][self.runtime.rank])
        restore_rng(state["rng"][self.runtime.rank])
        self.book = Book(**state["book"])

    def finish(self, outcome: Outcome) -> None:
        if outcome.steps_per_second is not None:
            self.report({"train.steps_per_second": outcome.steps_per_second}, self.book.step)
        if not self.runtime.is_main:
            return
        if self.book.best_step is None:  # no epoch had a defined mIoU: the final weights are the answer
            self.save_best()
        write_summary(self.out_dir, self.book, self.training_id, outcome.steps_per_second)

    def result(self, outcome: Outcome) -> TrainResult:
        book = self.book
        return TrainResult(book.step, _best_miou(book), book.best_step, book.stopped_early, outcome.steps_per_second, self.out_dir / BEST, book.history, outcome.completed, outcome.start)


def _start_fresh(out_dir: Path, runtime: Runtime, seed: int) -> None:
    """No state of this training: every random stream is seeded. A finished model stays until
    this training's first best replaces it (SegmentationJob.save_best); another training's
    resume state goes, as its record of a best would no longer match best.pt."""
    if runtime.is_main:
        (out_dir / LAST).unlink(missing_ok=True)
    seed_everything(seed + runtime.rank)


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
    Another run into `out_dir` meanwhile is refused (util.folder_lock.FolderBusy).
    """
    out_dir = Path(out_dir)
    own_runtime = runtime is None
    runtime = runtime or start_runtime(device)
    try:
        with folder_lock(out_dir, enabled=runtime.is_main):  # rank 0 writes the files, so rank 0 holds it
            training_id = training_fingerprint(config, model_meta, seed, runtime.world_size)
            engine = Engine(StateFile(out_dir / LAST, STATE_FORMAT, training_id), config.checkpoint_every, log_every, resume=resume, group=runtime)
            if (done := engine.finished(lambda: finished_result(out_dir, training_id), out_dir)) is not None:
                return done
            trainer = Trainer(model, config, runtime)
            job = SegmentationJob(trainer, sampler, val_batches, config, runtime, out_dir, training_id, dict(model_meta), log_metrics or (lambda metrics, step: None), on_epoch, params_key)
            state = engine.load()
            if state is None:
                _start_fresh(out_dir, runtime, seed)
            with deterministic_on_cpu(runtime.device):
                outcome, _ = engine.run(job, engine.restore(job, state), stop_after)
            return job.result(outcome)
    finally:
        if own_runtime:
            runtime.close()
