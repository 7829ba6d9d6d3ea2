"""The resumable engine (util.resumable) on a fake job: a counter summing draws of its own
torch generator, so its total depends on every draw and a resume must restore the stream."""

from __future__ import annotations

import json
import logging
import math
import signal
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from xctsam.util.errors import TrainingDiverged
from xctsam.util.interrupt import Interrupted
from xctsam.util.resumable import Engine, Job, LossWindow, Outcome, StateFile

FORMAT = "test.counter/1"
STEPS = 10


class Counter(Job[float]):
    """Adds a uniform draw per step; `on_step[i]()` runs at the start of step i (0-based)."""

    name = "counter"
    hint = "lower counter.lr"

    def __init__(self, out: Path, on_step: Mapping[int, Callable[[], object]] | None = None) -> None:
        self.out, self.steps = out, STEPS
        self.on_step = dict(on_step or {})
        self.generator = torch.Generator().manual_seed(0)
        self.total = torch.zeros((), dtype=torch.float64)
        self.window = LossWindow()
        self.logged: list[tuple[int, dict[str, float]]] = []
        self.stepped = 0  # steps this object did (not restored)

    def train_step(self, step: int) -> dict[str, float]:
        self.stepped += 1
        if step in self.on_step:
            self.on_step[step]()
        draw = torch.rand((), generator=self.generator, dtype=torch.float64)
        self.total += draw
        losses = {"loss": float(draw), "lr": 0.1}
        self.window.add(losses)
        return losses

    def log_window(self, done: int) -> None:
        self.logged.append((done, self.window.take()))

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "total": self.total.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.total = state["total"].clone()

    def finish(self, outcome: Outcome) -> float:
        (self.out / "total.json").write_text(json.dumps({"total": float(self.total), "steps": outcome.step}))
        return float(self.total)


def engine(out: Path, fingerprint: str = "a", **kwargs: Any) -> Engine:
    return Engine(StateFile(out / "state.pt", FORMAT, fingerprint), checkpoint_every=3, log_every=4, **kwargs)


def outputs_of(out: Path) -> float | None:
    path = out / "total.json"
    return json.loads(path.read_text())["total"] if path.is_file() else None


def run(out: Path, fingerprint: str = "a", stop_after: int | None = None, **job: Any) -> tuple[Outcome | None, float | None, Counter]:
    """What a stage does: finished? -> load -> restore -> run."""
    out.mkdir(exist_ok=True)
    counter, runner = Counter(out, **job), engine(out, fingerprint)
    if (done := runner.finished(lambda: outputs_of(out), out)) is not None:
        return None, done, counter
    outcome, total = runner.run(counter, runner.restore(counter, runner.load()), stop_after)
    return outcome, total, counter


def saved_step(out: Path) -> int:
    return int(torch.load(out / "state.pt", weights_only=True)["step"])


@pytest.fixture
def uninterrupted(tmp_path: Path) -> float:
    outcome, total, counter = run(tmp_path / "whole")
    assert outcome is not None and outcome.completed and outcome.start == 0 and outcome.step == STEPS
    assert [done for done, _ in counter.logged] == [4, 8, 10]  # every log_every steps and at the last
    assert not (tmp_path / "whole" / "state.pt").exists()  # the outputs mark it done
    return total


def test_finished_run_returns_at_once(tmp_path: Path, uninterrupted: float, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        outcome, total, counter = run(tmp_path / "whole")
    assert outcome is None and total == uninterrupted and counter.stepped == 0
    assert "training already finished; nothing to do" in caplog.text


def test_resume_after_a_pause_equals_an_uninterrupted_run(tmp_path: Path, uninterrupted: float) -> None:
    outcome, total, _ = run(tmp_path, stop_after=5)
    assert outcome is not None and not outcome.completed and total is None and saved_step(tmp_path) == 5
    outcome, total, counter = run(tmp_path)
    assert outcome is not None and outcome.start == 5 and counter.stepped == STEPS - 5
    assert total == uninterrupted  # bit for bit: the generator's stream came back too


def test_a_signal_finishes_the_step_saves_and_resumes_exactly(tmp_path: Path, uninterrupted: float) -> None:
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(Interrupted) as stopped:
        run(tmp_path, on_step={4: lambda: signal.raise_signal(signal.SIGINT)})
    assert stopped.value.exit_code == 130
    assert f"at step 5, {tmp_path / 'state.pt'} saved" in stopped.value.message
    assert saved_step(tmp_path) == 5 and signal.getsignal(signal.SIGINT) is handler
    assert run(tmp_path)[1] == uninterrupted


def test_a_second_signal_stops_at_once_keeping_the_periodic_state(tmp_path: Path, uninterrupted: float) -> None:
    def twice() -> None:
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGTERM)

    with pytest.raises(Interrupted) as stopped:
        run(tmp_path, on_step={4: twice})
    assert stopped.value.exit_code == 143 and saved_step(tmp_path) == 3  # step 5 never finished
    assert run(tmp_path)[1] == uninterrupted


def test_a_crash_resumes_from_the_last_periodic_state(tmp_path: Path, uninterrupted: float) -> None:
    def crash() -> None:
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        run(tmp_path, on_step={7: crash})
    assert saved_step(tmp_path) == 6
    outcome, total, _ = run(tmp_path)
    assert outcome is not None and outcome.start == 6 and total == uninterrupted


def test_another_fingerprint_starts_fresh(tmp_path: Path, uninterrupted: float, caplog: pytest.LogCaptureFixture) -> None:
    run(tmp_path, fingerprint="other", stop_after=5)
    with caplog.at_level(logging.WARNING):
        outcome, total, _ = run(tmp_path, fingerprint="a")
    assert outcome is not None and outcome.start == 0 and total == uninterrupted
    assert "saved by another training" in caplog.text and "training from scratch" in caplog.text


def test_a_non_finite_loss_stops_before_it_is_logged_or_saved(tmp_path: Path) -> None:
    counter = Counter(tmp_path)
    poisoned = counter.train_step

    def nan_at_step_four(step: int) -> dict[str, float]:
        return {**poisoned(step), "loss": math.nan} if step == 3 else poisoned(step)

    counter.train_step = nan_at_step_four  # type: ignore[method-assign]
    with pytest.raises(TrainingDiverged, match=r"counter: loss is nan at step 4 \(\); lower counter.lr"):
        engine(tmp_path).run(counter, 0)
    assert counter.logged == [] and saved_step(tmp_path) == 3


def test_kept_final_state_and_other_processes_signals(tmp_path: Path) -> None:
    kept = engine(tmp_path, keep_final_state=True)
    kept.run(Counter(tmp_path), 0)
    assert saved_step(tmp_path) == STEPS  # saved at the last step, and kept

    class SignalledElsewhere:
        is_main = True

        def any(self, flag: bool) -> bool:
            return True  # another process got the signal: this one stops with it, as SIGINT

    (tmp_path / "x").mkdir()
    with pytest.raises(Interrupted, match="at step 1,") as stopped:
        engine(tmp_path / "x", group=SignalledElsewhere()).run(Counter(tmp_path), 0)
    assert stopped.value.exit_code == 130
