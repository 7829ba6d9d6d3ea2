"""The one training loop: schedule, clipping, validation, best/early stopping, exact resume.

A tiny conv Segmenter (with dropout, so resuming must restore the random streams, and an
auxiliary loss) learns a rule the data follow: the class is the grey value's third (0, 1, 2).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from xctsam.config.train import TrainConfig
from xctsam.data.datasets import IntensityWindow, SliceRef
from xctsam.data.volumes import write_volume
from xctsam.models.base import Segmenter
from xctsam.models.checkpoint import load_segmenter_checkpoint
from xctsam.train import loop
from xctsam.train.loop import LAST, SUMMARY, Runtime, train_segmenter
from xctsam.train.trainer import Trainer, lr_factor
from xctsam.train.validation import to_device, whole_slice_batches
from xctsam.util.device import pick_device
from xctsam.util.errors import InputError
from xctsam.util.interrupt import Interrupted

REPO = Path(__file__).resolve().parents[1]
TILE = 16
META = {"kind": "tiny", "window": {"low": 0.0, "high": 1.0}}


class TinySegmenter(Segmenter):
    context = 1

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.drop = nn.Dropout2d(0.2)
        self.conv2 = nn.Conv2d(8, 4, 1)
        self._aux = torch.zeros(())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        hidden = self.drop(F.relu(self.conv1(images)))
        self._aux = 1e-3 * hidden.pow(2).mean()
        return self.conv2(hidden)

    def loss(self, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, labels)

    def probabilities(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs.softmax(dim=1)

    def to_labels(self, probabilities: torch.Tensor) -> torch.Tensor:
        return probabilities.argmax(dim=1)

    def auxiliary_loss(self) -> torch.Tensor:
        return self._aux


def make_model(seed: int = 0) -> TinySegmenter:
    torch.manual_seed(seed)
    return TinySegmenter()


def rule(images: np.ndarray) -> np.ndarray:
    return np.minimum(images[:, 0] * 3, 2).astype(np.uint8)


class FakeTiles:
    """Random grey tiles labelled by `rule`; `on_call(n)` runs before the n-th batch (1-based)."""

    def __init__(self, seed: int, on_call: dict[int, object] | None = None) -> None:
        self.rng = np.random.default_rng(seed)
        self.calls = 0
        self.on_call = on_call or {}

    def batch(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        self.calls += 1
        if self.calls in self.on_call:
            self.on_call[self.calls]()
        images = self.rng.random((n, 1, TILE, TILE), dtype=np.float32)
        return images, rule(images)

    def rng_state(self) -> dict:
        return self.rng.bit_generator.state

    def set_rng_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state


def validation_set() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(99)
    slices = [rng.random((2, 1, 24, 20), dtype=np.float32) for _ in range(2)]
    return [(images, rule(images)) for images in slices]


def config(**changes: object) -> TrainConfig:
    base = {"tile": TILE, "batch": 4, "steps": 30, "epoch_steps": 10, "lr": 0.1, "warmup_steps": 3, "checkpoint_every": 7, "patience": 5, "grad_clip": 5.0}
    return TrainConfig(**{**base, **changes})


def train(out_dir: Path, cfg: TrainConfig | None = None, sampler: FakeTiles | None = None, model: TinySegmenter | None = None, **kwargs: object) -> loop.TrainResult:
    return train_segmenter(model or make_model(), sampler or FakeTiles(1), validation_set(), cfg or config(), out_dir, seed=3, model_meta=META, device="cpu", **kwargs)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_segmenter_checkpoint(path)[0]


def nan_as_none(history: list[dict]) -> list[dict]:
    """NaN != NaN: compare undefined scores as None."""
    return [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in entry.items()} for entry in history]


def assert_same_training(a: loop.TrainResult, b: loop.TrainResult) -> None:
    assert b.steps == a.steps
    assert nan_as_none(b.history) == nan_as_none(a.history)  # exact: the CPU run is deterministic
    assert (b.best_step, b.best_val_miou) == (a.best_step, a.best_val_miou)
    wa, wb = weights(a.checkpoint), weights(b.checkpoint)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread; bitwise comparisons also need one thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def uninterrupted(one_thread: None, tmp_path_factory: pytest.TempPathFactory) -> loop.TrainResult:
    return train(tmp_path_factory.mktemp("a"))


# ---------------------------------------------------------------- schedule and step
def test_lr_factor_warms_up_linearly_then_decays_to_zero() -> None:
    steps, warmup = 110, 10
    assert lr_factor(0, steps, warmup, "cosine") == pytest.approx(0.1)
    assert lr_factor(4, steps, warmup, "cosine") == pytest.approx(0.5)
    assert lr_factor(9, steps, warmup, "cosine") == pytest.approx(1.0)
    assert lr_factor(10, steps, warmup, "cosine") == pytest.approx(1.0)
    assert lr_factor(60, steps, warmup, "cosine") == pytest.approx(0.5)  # half way through the decay
    assert lr_factor(35, steps, warmup, "cosine") == pytest.approx((1 + math.cos(math.pi / 4)) / 2)
    assert lr_factor(steps, steps, warmup, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(60, steps, warmup, "poly") == pytest.approx(0.5**0.9)
    assert lr_factor(steps, steps, warmup, "poly") == pytest.approx(0.0, abs=1e-12)
    decay = [lr_factor(s, steps, warmup, "poly") for s in range(warmup, steps + 1)]
    assert all(later < earlier for earlier, later in zip(decay, decay[1:]))
    assert lr_factor(0, 5, 0, "cosine") == 1.0  # no warm-up: full LR at once


@pytest.mark.parametrize("schedule", ["cosine", "poly"])
def test_trainer_steps_follow_the_schedule(schedule: str) -> None:
    cfg = config(steps=12, warmup_steps=4, schedule=schedule, lr=0.1)
    trainer = Trainer(make_model(), cfg, Runtime(torch.device("cpu")))
    sampler = FakeTiles(0)
    used = [trainer.step(*to_device(*sampler.batch(2), trainer.device))["lr"] for _ in range(cfg.steps)]
    assert used[:4] == pytest.approx([0.025, 0.05, 0.075, 0.1])
    assert used[4] == pytest.approx(0.1)
    middle = 0.5 * (1 + math.cos(math.pi * 4 / 8)) if schedule == "cosine" else (1 - 4 / 8) ** 0.9
    assert used[8] == pytest.approx(0.1 * middle)
    assert 0 < used[-1] < used[-2]
    assert trainer.lr == pytest.approx(0.0, abs=1e-12)  # after the last step


def test_gradients_are_clipped_to_the_configured_norm() -> None:
    trainer = Trainer(make_model(), config(grad_clip=1e-3), Runtime(torch.device("cpu")))
    losses = trainer.step(*to_device(*FakeTiles(0).batch(4), trainer.device))
    clipped = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainer.trainable]))
    assert losses["grad_norm"] > 1e-2  # the raw gradient was far larger than the bound
    assert clipped.item() == pytest.approx(1e-3, rel=1e-3)


def test_only_trainable_parameters_are_optimised() -> None:
    model = make_model()
    model.conv1.requires_grad_(False)
    frozen = model.conv1.weight.detach().clone()
    trainer = Trainer(model, config(), Runtime(torch.device("cpu")))
    trainer.step(*to_device(*FakeTiles(0).batch(4), trainer.device))
    assert len(trainer.optimizer.param_groups[0]["params"]) == 2  # conv2 weight and bias
    assert torch.equal(model.conv1.weight, frozen)


# ---------------------------------------------------------------- the whole loop
def test_loop_learns_logs_and_keeps_the_best(tmp_path: Path) -> None:
    logged: list[tuple[dict, int]] = []
    result = train(tmp_path, config(steps=40), log_metrics=lambda metrics, step: logged.append((metrics, step)), log_every=5)
    train_reports = [(m, s) for m, s in logged if "train.loss" in m]
    val_reports = [(m, s) for m, s in logged if "val.miou" in m]
    assert [s for _, s in train_reports] == list(range(5, 41, 5))
    assert {"train.loss", "train.lr", "train.aux_loss", "train.grad_norm"} <= set(train_reports[0][0])
    assert [s for _, s in val_reports] == [10, 20, 30, 40]
    assert {"val.iou.background", "val.iou.material", "val.iou.pore", "val.iou.inclusion"} <= set(val_reports[0][0])
    assert math.isnan(val_reports[0][0]["val.iou.inclusion"])  # no class 3 anywhere: undefined, skipped
    assert train_reports[-1][0]["train.loss"] < 0.5 * train_reports[0][0]["train.loss"]
    mious = [entry["val.miou"] for entry in result.history]
    assert result.best_val_miou == max(mious) > 0.8
    assert result.best_step == result.history[mious.index(max(mious))]["step"]
    state, meta = load_segmenter_checkpoint(result.checkpoint)
    assert meta["kind"] == "tiny" and meta["training"]["step"] == result.best_step
    assert meta["training"]["val_miou"] == pytest.approx(result.best_val_miou)
    assert result.completed and not result.stopped_early and result.steps == 40
    assert not (tmp_path / LAST).exists()  # a finished run keeps no resume state
    assert json.loads((tmp_path / SUMMARY).read_text())["steps"] == 40


def test_early_stopping_and_best_checkpoint_at_the_best_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scripted = iter([0.3, 0.5, 0.4, 0.45, 0.2, 0.9])
    snapshots: list[dict[str, torch.Tensor]] = []

    def fake_scores(model: Segmenter, source: object, precision: object) -> dict[str, float]:
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return {"val.miou": next(scripted)}

    monkeypatch.setattr(loop, "validation_scores", fake_scores)
    result = train(tmp_path, config(steps=100, epoch_steps=5, patience=3))
    assert result.stopped_early and result.completed
    assert result.steps == 25  # epochs 3, 4, 5 did not beat epoch 2
    assert [entry["val.miou"] for entry in result.history] == [0.3, 0.5, 0.4, 0.45, 0.2]
    assert (result.best_step, result.best_val_miou) == (10, 0.5)
    saved = weights(result.checkpoint)
    assert all(torch.equal(saved[k], snapshots[1][k]) for k in saved)
    assert not all(torch.equal(saved[k], snapshots[-1][k]) for k in saved)


def test_undefined_validation_neither_improves_nor_stops(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loop, "validation_scores", lambda *args: {"val.miou": math.nan})
    result = train(tmp_path, config(steps=20, epoch_steps=2, patience=1))
    assert result.steps == 20 and not result.stopped_early
    assert result.best_step is None and math.isnan(result.best_val_miou)
    assert load_segmenter_checkpoint(result.checkpoint)[1]["training"]["step"] == 20  # the final weights


# ---------------------------------------------------------------- resume
def test_resume_after_a_pause_equals_an_uninterrupted_run(tmp_path: Path, uninterrupted: loop.TrainResult) -> None:
    paused = train(tmp_path, stop_after=13)
    assert not paused.completed and paused.steps == 13 and (tmp_path / LAST).is_file()
    # other initial weights and a fresh sampler: everything must come from last.pt
    resumed = train(tmp_path, model=make_model(seed=123), sampler=FakeTiles(1))
    assert resumed.resumed_from == 13 and resumed.completed
    assert_same_training(uninterrupted, resumed)


def test_ctrl_c_saves_and_the_rerun_equals_an_uninterrupted_run(tmp_path: Path, uninterrupted: loop.TrainResult) -> None:
    ctrl_c = FakeTiles(1, {9: lambda: signal.raise_signal(signal.SIGINT)})
    with pytest.raises(Interrupted) as stopped:
        train(tmp_path, sampler=ctrl_c)
    assert stopped.value.exit_code == 130 and "at step 9" in stopped.value.message
    assert torch.load(tmp_path / LAST, weights_only=True)["step"] == 9  # the step in flight was finished
    resumed = train(tmp_path, model=make_model(seed=5))
    assert resumed.resumed_from == 9
    assert_same_training(uninterrupted, resumed)


KILLED_RUN = """
import time
from pathlib import Path
import torch
torch.set_num_threads(1)
from tests.test_loop import FakeTiles, train
marker = Path({marker!r})
def hang():
    marker.write_text("ready")
    time.sleep(600)
train(Path({out!r}), sampler=FakeTiles(1, {{18: hang}}))
"""


def test_killed_run_resumes_from_its_last_checkpoint(tmp_path: Path, uninterrupted: loop.TrainResult) -> None:
    out, marker = tmp_path / "run", tmp_path / "at_step_18"
    env = {**os.environ, "XCTSAM_NO_PROGRESS": "1"}
    child = subprocess.Popen([sys.executable, "-c", KILLED_RUN.format(marker=str(marker), out=str(out))], cwd=REPO, env=env)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert child.poll() is None, "the training process ended before the kill"
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        child.kill()
        child.wait()
    assert torch.load(out / LAST, weights_only=True)["step"] == 14  # the last periodic checkpoint
    resumed = train(out, model=make_model(seed=7))
    assert resumed.resumed_from == 14
    assert_same_training(uninterrupted, resumed)


def test_other_params_start_fresh(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    train(tmp_path, stop_after=12)
    changed = config(lr=0.02)
    with caplog.at_level("WARNING"):
        result = train(tmp_path, cfg=changed)
    assert result.resumed_from == 0 and result.steps == 30
    assert "training from scratch" in caplog.text
    assert_same_training(train(tmp_path / "fresh", cfg=changed), result)


def test_only_checkpoint_frequency_keeps_the_fingerprint(tmp_path: Path) -> None:
    train(tmp_path, stop_after=12)
    assert train(tmp_path, cfg=config(checkpoint_every=3)).resumed_from == 12


def test_finished_training_returns_at_once(tmp_path: Path) -> None:
    first = train(tmp_path, cfg=config(steps=10, epoch_steps=5))

    def no_more(n: int) -> None:
        raise AssertionError("a finished training must not sample again")

    sampler = FakeTiles(1)
    sampler.batch = no_more  # type: ignore[method-assign]
    again = train(tmp_path, cfg=config(steps=10, epoch_steps=5), sampler=sampler)
    assert again.steps_per_second is None and first.steps_per_second > 0
    assert (again.steps, again.best_step, nan_as_none(again.history)) == (first.steps, first.best_step, nan_as_none(first.history))
    retrained = train(tmp_path, cfg=config(steps=10, epoch_steps=5), resume=False)
    assert retrained.steps_per_second is not None  # resume=False trains again


def test_whole_slice_batches_read_normalised_context_slices(tmp_path: Path) -> None:
    labels = np.random.default_rng(0).integers(0, 4, size=(5, 12, 10), dtype=np.uint8)
    image = labels.astype(np.float32) * 10 + np.arange(5, dtype=np.float32)[:, None, None]
    write_volume(tmp_path / "v.h5", image, labels)
    refs = [SliceRef(tmp_path / "v.h5", z) for z in range(5)]
    source = whole_slice_batches(refs, IntensityWindow(0.0, 40.0), context=3, count=2, seed=1)
    first, again = list(source()), list(source())
    assert len(first) == 2 and all(a[0].shape == (1, 3, 12, 10) and a[1].shape == (1, 12, 10) for a in first)
    for (images, truth), (images_again, _) in zip(first, again):  # the same slices at every call
        z = int(np.flatnonzero((labels == truth[0]).all(axis=(1, 2)))[0])
        neighbours = [abs(z - 1), z, 4 - abs(3 - z)]  # reflected at the volume's ends
        np.testing.assert_allclose(images[0], image[neighbours] / 40.0, rtol=1e-6)
        np.testing.assert_array_equal(images, images_again)



def test_validation_tiles_cover_each_slice_at_the_training_scale(tmp_path: Path) -> None:
    labels = np.random.default_rng(0).integers(0, 4, size=(5, 12, 10), dtype=np.uint8)
    image = labels.astype(np.float32) * 10
    write_volume(tmp_path / "v.h5", image, labels)
    refs = [SliceRef(tmp_path / "v.h5", z) for z in range(5)]
    whole = list(whole_slice_batches(refs, IntensityWindow(0.0, 40.0), context=1, count=2, seed=1)())
    tiled = list(whole_slice_batches(refs, IntensityWindow(0.0, 40.0), context=1, count=2, seed=1, tile=8)())
    for (slice_image, slice_labels), (tiles, tile_labels) in zip(whole, tiled):
        # 12 x 10 with 8 x 8 tiles: starts 0, 4 down and 0, 2 across, the last flush with the edge
        assert tiles.shape == (4, 1, 8, 8) and tile_labels.shape == (4, 8, 8)
        np.testing.assert_array_equal(tiles[3], slice_image[0, :, 4:12, 2:10])
        np.testing.assert_array_equal(tile_labels[0], slice_labels[0, :8, :8])
    small = list(whole_slice_batches(refs, IntensityWindow(0.0, 40.0), context=1, count=1, seed=1, tile=16)())
    assert small[0][0].shape == (1, 1, 12, 10)  # a slice smaller than the tile stays whole


# ---------------------------------------------------------------- checkpoint helpers
def test_segmenter_checkpoint_rebuilds_the_model(uninterrupted: loop.TrainResult) -> None:
    state, meta = load_segmenter_checkpoint(uninterrupted.checkpoint)
    assert meta["window"] == META["window"]
    model = make_model(seed=42).eval()
    model.load_state_dict(state)
    images, labels = validation_set()[0]
    predicted = model.to_labels(model.probabilities(model(torch.from_numpy(images))))
    assert (predicted.numpy() == labels).mean() > 0.8


def test_bad_checkpoint_is_an_input_error(tmp_path: Path) -> None:
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    for name in ("bad.pt", "foreign.pt", "missing.pt"):
        with pytest.raises(InputError, match=name):
            load_segmenter_checkpoint(tmp_path / name)


def test_pick_device_prefers_cuda_then_mps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert pick_device().type == "cpu"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert pick_device().type == "mps"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device().type == "cuda"


DDP_RUN = """
import sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from tests.test_loop import FakeTiles, config, train
from xctsam.train.loop import process_rank
result = train(Path({out!r}), cfg=config(steps=12, epoch_steps=6), sampler=FakeTiles(1 + process_rank()))
# a file per rank, not stdout: torchrun's handling of worker output is not ours to rely on
report = " ".join(map(str, ("rank", process_rank(), result.steps, result.best_step, repr(result.best_val_miou))))
Path({out!r}).with_name(f"rank{{process_rank()}}.txt").write_text(report)
"""


def test_torchrun_trains_with_two_processes(tmp_path: Path) -> None:
    """The DDP path on CPUs (gloo): ranks agree, rank 0 writes, the process count is in the fingerprint."""
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--no-python", sys.executable, "-c", DDP_RUN.format(out=str(out))]
    env = {**os.environ, "XCTSAM_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    finished = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    reports = sorted(path.read_text().split()[1:] for path in tmp_path.glob("rank*.txt"))
    assert [rank for rank, *_ in reports] == ["0", "1"], finished.stdout[-2000:] + finished.stderr[-2000:]
    assert reports[0][1:] == reports[1][1:]  # rank 0's validation decided for both
    assert reports[0][1] == "12"
    summary = json.loads((out / SUMMARY).read_text())
    assert summary["steps"] == 12 and summary["best_val_miou"] > 0.4
    assert [entry["step"] for entry in summary["history"]] == [6, 12]
    assert set(os.listdir(out)) == {"best.pt", SUMMARY}  # one writer, and no resume state left
    train(tmp_path / "single", cfg=config(steps=12, epoch_steps=6))
    assert summary["fingerprint"] != json.loads((tmp_path / "single" / SUMMARY).read_text())["fingerprint"]
