"""The resumable training engine: every long training here is a `Job` this engine runs.

The segmenters' loop (train.loop), the CycleGAN (gan.train) and the stand-in SAM pretraining
(pretrain.train) know their models, data and files and do one step at a time; the engine knows
nothing of models and does the rest, the same way for all three:

    engine = Engine(StateFile(path, FORMAT, fingerprint), checkpoint_every, log_every, resume=resume)
    if (done := engine.finished(find_outputs, where)) is not None:
        return done                          # outputs of this fingerprint: nothing to do
    state = engine.load()                    # this training's saved state, or None
    job = ...                                # built from `state` where it needs to be
    outcome, outputs = engine.run(job, engine.restore(job, state))

The state file is {"format", "fingerprint", "step", **job.state_dict()}, written atomically
(temporary name, then rename) every `checkpoint_every` steps, when `stop_after` ends a call,
and on a first SIGINT/SIGTERM: that one finishes the step in flight, saves and raises
`Interrupted` ("at step N, <path> saved"); a second one stops at once, and a hard kill falls
back to the last periodic state. A state of another format or fingerprint (other params, model
or data) is ignored with a warning. A resumed job ends with the same weights as one never
interrupted as long as its state_dict holds every random stream its steps draw from.

Each step's losses are checked for NaN/inf (util.finite) before anything is logged or saved.
After the last step the job writes its outputs, then the state file goes (unless the engine
keeps it): the outputs, written last, are what marks the training as done.

Several processes (torchrun): `group` says which one is the main one and whether any of them
was signalled; the job's state_dict is then collective (every process calls it, the main one
gets the state, the others None), and only the main one writes or removes the state file.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
from rich.progress import TextColumn

from xctsam.util import progress
from xctsam.util.atomic import atomic_path
from xctsam.util.errors import InputError
from xctsam.util.finite import check_losses
from xctsam.util.interrupt import InterruptLatch
from xctsam.util.torch_files import load_torch_file

log = logging.getLogger(__name__)

R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)

# What a step may report besides its losses, not checked for NaN/inf: an fp16 step that the
# gradient scaler skips has an infinite gradient norm without the training diverging.
DIAGNOSTICS = frozenset({"lr", "grad_norm"})


@dataclass(frozen=True)
class Outcome:
    """What one `Engine.run` call did."""

    start: int  # the step it began at (0: from scratch)
    step: int  # steps done when it returned
    completed: bool  # False when `stop_after` ended it before the end
    seconds: float  # wall time of its steps

    @property
    def steps_per_second(self) -> float | None:
        """Of this call; None when it trained no step."""
        trained = self.step - self.start
        return trained / self.seconds if trained else None


class Job(Protocol[R_co]):
    """One training as the engine runs it. Members with a body are optional: subclass to inherit them."""

    name: str  # the params section (train.sam, pretrain, gan): names it in divergence errors and on the bar
    hint: str  # the remedy a divergence error suggests, e.g. "lower pretrain.lr"
    steps: int  # steps of the whole training
    headline: str = "loss"  # the value of train_step's result the progress bar shows

    def train_step(self, step: int) -> Mapping[str, float]:
        """Step `step` (0-based), metered for log_window: its losses (the total first, then its
        terms: they are checked for NaN/inf) and any DIAGNOSTICS."""
        ...

    def log_window(self, done: int) -> None:
        """Log the means of the steps metered since the last call; the engine calls it after
        step `done` (1-based) every `log_every` steps and at the last step."""
        ...

    def after_step(self, done: int) -> None:
        """What follows step `done` once its losses passed, before it is checkpointed: validation, samples."""

    def stopped(self) -> bool:
        """True once the job ends before `steps` (early stopping); the same on every process."""
        return False

    def state_dict(self) -> dict[str, Any] | None:
        """Everything a resume needs besides the step (collective; None where not to be written)."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from `state` (as state_dict made it, with "step")."""
        ...

    def finish(self, outcome: Outcome) -> R_co:
        """After the last step: write the outputs (atomically) and return what the caller gets."""
        ...


class Group(Protocol):
    """The processes training together (train.runtime.Runtime); OneProcess when alone."""

    @property
    def is_main(self) -> bool: ...

    def any(self, flag: bool) -> bool: ...


@dataclass(frozen=True)
class OneProcess:
    is_main: bool = True

    def any(self, flag: bool) -> bool:
        return flag


@dataclass(frozen=True)
class StateFile:
    """Where a training's resumable state lives, and whose it is (format and fingerprint)."""

    path: Path
    format: str
    fingerprint: str

    def load(self) -> dict[str, Any] | None:
        """The saved state if it is this training's, else None (and why, logged)."""
        if not self.path.is_file():
            return None
        try:
            state = load_torch_file(self.path, "ignored; training from scratch")
        except InputError as exc:  # atomic writes leave no torn file, but a foreign one can sit here
            log.warning("%s", exc)
            return None
        if not isinstance(state, dict) or state.get("format") != self.format or state.get("fingerprint") != self.fingerprint:
            log.warning("%s: saved by another training (other params, model or data); training from scratch", self.path)
            return None
        return state

    def save(self, step: int, payload: Mapping[str, Any]) -> None:
        with atomic_path(self.path) as tmp:
            torch.save({"format": self.format, "fingerprint": self.fingerprint, "step": step, **payload}, tmp)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


class LossWindow:
    """Sums of step values since the last report, for their means.

    `sums` is a plain dict ({name: sum, ..., "count": steps}), so a job may keep it in its state.
    """

    def __init__(self, sums: dict[str, float] | None = None) -> None:
        self.sums = {} if sums is None else sums  # the caller's dict itself: it is updated in place

    def add(self, values: Mapping[str, float]) -> None:
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
        self.sums["count"] = self.sums.get("count", 0.0) + 1

    def take(self) -> dict[str, float]:
        """The means since the last take; the window starts again."""
        count = max(self.sums.pop("count", 1.0), 1.0)
        means = {name: total / count for name, total in self.sums.items()}
        self.sums.clear()
        return means


@contextmanager
def step_progress(label: str, total: int, start: int, enabled: bool) -> Iterator[Callable[[int, float], None]]:
    """update(done, loss) callback of a rich bar; silent when disabled or XCTSAM_NO_PROGRESS=1."""
    if not (enabled and progress.enabled()):
        yield lambda done, loss: None
        return
    with progress.progress_bar(TextColumn("loss {task.fields[loss]}")) as bar:
        task = bar.add_task(label, total=total, completed=start, loss="-")
        yield lambda done, loss: bar.update(task, completed=done, loss=f"{loss:.4f}")


@dataclass
class Engine:
    """Runs a Job resumably to its end (see the module docstring for the whole contract)."""

    state_file: StateFile
    checkpoint_every: int
    log_every: int
    resume: bool = True  # False: neither finished outputs nor a saved state count; train from scratch
    group: Group = field(default_factory=OneProcess)
    keep_final_state: bool = False  # also save the state at the last step, and keep it
    what: str = "training"  # names the job in "<where>: <what> already finished"

    def finished(self, find_outputs: Callable[[], R | None], where: Path) -> R | None:
        """When resuming, the result `find_outputs` makes of a finished training's outputs
        (None when they are missing or of another fingerprint); None otherwise."""
        if not self.resume or (done := find_outputs()) is None:
            return None
        log.info("%s: %s already finished; nothing to do", where, self.what)
        return done

    def load(self) -> dict[str, Any] | None:
        """The saved state of this training when resuming, else None."""
        return self.state_file.load() if self.resume else None

    def restore(self, job: Job[Any], state: Mapping[str, Any] | None) -> int:
        """The step to start at: the saved one, with `job` restored to it, or 0 for no state."""
        if state is None:
            return 0
        log.info("resuming from step %d of %d (%s)", state["step"], job.steps, self.state_file.path)
        job.load_state_dict(state)
        return int(state["step"])

    def run(self, job: Job[R], start: int, stop_after: int | None = None) -> tuple[Outcome, R | None]:
        """Steps from `start` to the end (or early stopping), then the job's outputs.

        stop_after: end the call once that many steps are done, saving the state as a signal
        would but returning (outputs None) instead of raising: a test hook.
        """
        began = time.perf_counter()
        step, completed = self._steps(job, start, stop_after)
        outcome = Outcome(start, step, completed, time.perf_counter() - began)
        if not completed:
            return outcome, None
        outputs = job.finish(outcome)
        if self.group.is_main and not self.keep_final_state:
            self.state_file.remove()  # the outputs now mark the training as done
        return outcome, outputs

    def _steps(self, job: Job[Any], step: int, stop_after: int | None) -> tuple[int, bool]:
        """(steps done, whether the training reached its end) of the interruptible loop."""
        with InterruptLatch().installed() as latch, step_progress(job.name, job.steps, step, self.group.is_main) as show:
            while step < job.steps and not job.stopped():
                if stop_after is not None and step >= stop_after:
                    return step, False
                losses = self._checked_step(job, step)
                step += 1
                show(step, losses[job.headline])
                job.after_step(step)
                interrupted = self.group.any(latch.requested)  # every process stops at the same step
                if self._save_due(job, step, interrupted, stop_after):
                    self._save(job, step)
                if interrupted:
                    raise latch.interruption(f"at step {step}, {self.state_file.path} saved")
        return step, True

    def _checked_step(self, job: Job[Any], step: int) -> Mapping[str, float]:
        """Step `step`; a non-finite loss stops the training before anything of it is logged."""
        losses = job.train_step(step)
        done = step + 1
        check_losses(job.name, done, {name: value for name, value in losses.items() if name not in DIAGNOSTICS}, job.hint)
        if done % self.log_every == 0 or done == job.steps:
            job.log_window(done)
        return losses

    def _save_due(self, job: Job[Any], done: int, interrupted: bool, stop_after: int | None) -> bool:
        """Periodically, on a signal and when pausing; at the end only when the state is kept
        (otherwise the outputs written next replace it)."""
        if done >= job.steps or job.stopped():
            return self.keep_final_state
        pausing = stop_after is not None and done >= stop_after
        return done % self.checkpoint_every == 0 or interrupted or pausing

    def _save(self, job: Job[Any], done: int) -> None:
        payload = job.state_dict()  # collective: every process hands over its part
        if payload is not None:
            self.state_file.save(done, payload)
