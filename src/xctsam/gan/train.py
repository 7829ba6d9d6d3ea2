"""CycleGAN training: domain A (idealised render, labelled) <-> domain B (experimental scans).

Standard CycleGAN (Zhu et al. 2017; gan.model) trained on random tiles of 2-D slices; each
domain's grey values are normalised by an IntensityWindow measured on its own slices
(gan.domains) and stored with the generator.

Files in `out_dir`:
  checkpoint.pt      the whole training state (nets, optimisers, schedulers, pools, random
                     streams, step), every `checkpoint_every` steps and at the end; a killed
                     run started again continues from it and ends with the same weights.
  generator_a2b.pt   the final A->B generator with both windows (what `synthesize` reads).
  metrics.json       final losses, steps/s and the structure IoU of translated slices.
  samples/           PNG grids, rows A / A->B / B, every `sample_every` steps.
A first Ctrl-C (or SIGTERM) finishes the current step, saves the checkpoint and raises
`Interrupted`; a second one stops at once, and a hard kill (SIGKILL, power cut) loses at most
the steps since the last periodic checkpoint. The training is a job of the resumable engine
(util.resumable), which keeps checkpoint.pt at the end.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from xctsam.config.gan import GanConfig
from xctsam.config.params import Params
from xctsam.data.datasets import TileSampler
from xctsam.data.split_folders import folders_digest
from xctsam.gan.cyclegan import PatchDiscriminator, Translator, to_net
from xctsam.gan.domains import Domains, Monitor, load_domains, sampler_and_pool_seeds, save_grid
from xctsam.gan.model import CycleGan
from xctsam.util.device import pick_device
from xctsam.util.errors import ConfigError
from xctsam.util.hashing import fingerprint
from xctsam.util.jsonfile import write_json
from xctsam.util.resumable import Engine, Job, LossWindow, Outcome, StateFile

CHECKPOINT = "checkpoint.pt"
GENERATOR = "generator_a2b.pt"
METRICS = "metrics.json"
SAMPLES = "samples"
CHECKPOINT_FORMAT = "xctsam.cyclegan.checkpoint/1"

# Keys that change what is logged or where output goes, not what is trained.
NOT_TRAINING_KEYS = {"output", "checkpoint_every", "sample_every", "log_every"}


@dataclass(frozen=True)
class GanResult:
    generator_path: Path
    step: int
    structure_iou: float
    steps_per_second: float | None  # None when nothing was trained by this call
    resumed_from: int  # step the call started at (0: from scratch)
    metrics: dict[str, Any]
    run_id: str | None = None  # the MLflow run (None when the training was already finished)


# ---------------------------------------------------------------- fingerprint
def training_fingerprint(config: GanConfig, seed: int, data_root: Path) -> str:
    """Hash of what determines the trained weights: seed, training params, and both domains' files."""
    data = folders_digest(Path(data_root) / folder for folder in (config.domain_a, config.domain_b))
    return fingerprint(seed, config.model_dump(mode="json", exclude=NOT_TRAINING_KEYS), data)


def check_tile_fits_critic(config: GanConfig) -> None:
    if PatchDiscriminator.output_size(config.tile, config.discriminator.layers) < 1:
        smallest = 3 * 2**config.discriminator.layers
        raise ConfigError("params.yaml", "gan.tile", f"{config.tile} is too small for a {config.discriminator.layers}-layer PatchGAN (needs >= {smallest}); raise gan.tile or lower gan.discriminator.layers")


# ---------------------------------------------------------------- the job the engine runs
def _result_from_files(out_dir: Path, resumed_from: int) -> GanResult:
    metrics = json.loads((out_dir / METRICS).read_text())
    iou = metrics.get("structure_iou")
    return GanResult(out_dir / GENERATOR, int(metrics["step"]), math.nan if iou is None else float(iou), None, resumed_from, metrics)


def _finished(out_dir: Path, training_id: str) -> bool:
    """True if the final generator and metrics of exactly this training exist."""
    path = out_dir / GENERATOR
    if not (path.is_file() and (out_dir / METRICS).is_file()):
        return False
    try:
        return Translator.load(path).meta.get("fingerprint") == training_id
    except Exception:
        return False


def _batch(sampler: TileSampler, size: int, device: torch.device) -> torch.Tensor:
    return to_net(sampler.batch(size)[0]).to(device)


class GanJob(Job[GanResult]):
    """The CycleGAN training as util.resumable's engine runs it; logs to the active MLflow run."""

    name = "gan"
    hint = "lower gan.lr or check both domains' data"
    headline = "g_total"

    def __init__(self, gan: CycleGan, domains: Domains, monitor: Monitor, out_dir: Path, training_id: str) -> None:
        self.gan, self.domains, self.monitor = gan, domains, monitor
        self.config = gan.config
        self.steps = gan.config.steps
        self.out_dir, self.training_id = out_dir, training_id
        self.translator = Translator(gan.g_ab, domains.window_a, domains.window_b)  # the live generator, for samples
        self.window = LossWindow()
        self.logged: dict[str, float] = {}  # the last logged means: metrics.json's final losses
        self.lr_used = math.nan  # by the last step: what its gan.lr report shows

    def train_step(self, step: int) -> dict[str, float]:
        config, device = self.config, self.gan.device
        self.lr_used = self.gan.lr
        losses = self.gan.train_step(_batch(self.domains.sampler_a, config.batch, device), _batch(self.domains.sampler_b, config.batch, device))
        self.window.add(losses)
        return losses

    def log_window(self, done: int) -> None:
        import mlflow

        self.logged = self.window.take()
        mlflow.log_metrics({**{f"gan.loss.{k}": v for k, v in self.logged.items()}, "gan.lr": self.lr_used}, step=done)

    def after_step(self, done: int) -> None:
        if done % self.config.sample_every == 0 or done == self.config.steps:
            self.sample(done)

    def sample(self, done: int) -> None:
        """A sample grid, logged as an artifact, and the structure IoU then (the final one: `finish`)."""
        import mlflow

        grid_path = self.out_dir / SAMPLES / f"step_{done:06d}.png"
        save_grid(grid_path, self.monitor.grid(self.translator))
        mlflow.log_artifact(str(grid_path), artifact_path=SAMPLES)
        if done < self.config.steps:
            mlflow.log_metric("gan.structure_iou", self.monitor.structure_iou(self.translator), step=done)

    def state_dict(self) -> dict[str, Any]:
        domains = self.domains
        return {
            **self.gan.state_dict(),
            "samplers": {"a": domains.sampler_a.rng_state(), "b": domains.sampler_b.rng_state()},
            "windows": {"a": domains.window_a.to_dict(), "b": domains.window_b.to_dict()},
            "torch_rng": torch.get_rng_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """The windows came in earlier (`load_domains`: the samplers are built on them)."""
        self.gan.load_state_dict(state)
        self.domains.sampler_a.set_rng_state(state["samplers"]["a"])
        self.domains.sampler_b.set_rng_state(state["samplers"]["b"])
        torch.set_rng_state(state["torch_rng"])

    def finish(self, outcome: Outcome) -> GanResult:
        """The final generator (with both windows) and metrics.json, and their MLflow metrics."""
        import mlflow

        config, speed = self.config, outcome.steps_per_second
        meta = {"fingerprint": self.training_id, "domain_a": config.domain_a, "domain_b": config.domain_b}
        translator = Translator(self.gan.g_ab, self.domains.window_a, self.domains.window_b, config.steps, meta)
        iou = self.monitor.structure_iou(translator)
        metrics = {
            "step": config.steps,
            "resumed_from": outcome.start,
            "seconds": outcome.seconds,
            "steps_per_second": speed,
            "structure_iou": iou,
            "losses": self.logged,
            "device": str(self.gan.device),
            "threads": torch.get_num_threads(),
        }
        if speed is not None:
            mlflow.log_metric("gan.steps_per_second", speed)
        mlflow.log_metric("gan.structure_iou", iou, step=config.steps)
        translator.save(self.out_dir / GENERATOR)
        write_json(self.out_dir / METRICS, metrics)
        return GanResult(self.out_dir / GENERATOR, config.steps, iou, speed, outcome.start, metrics, mlflow.active_run().info.run_id)


def train_gan(params: Params, data_root: Path, out_dir: Path, *, resume: bool = True) -> GanResult:
    """Train the CycleGAN on gan.domain_a <-> gan.domain_b (folders under `data_root`) into `out_dir`.

    With `resume`, a finished training of the same params and data returns at once and a
    checkpoint of it continues where it stopped; without, training starts from scratch.
    """
    from xctsam.util.tracking import stage_run

    config = params.gan
    data_root, out_dir = Path(data_root), Path(out_dir)
    check_tile_fits_critic(config)
    training_id = training_fingerprint(config, params.seed, data_root)
    state_file = StateFile(out_dir / CHECKPOINT, CHECKPOINT_FORMAT, training_id)
    engine = Engine(state_file, config.checkpoint_every, config.log_every, resume=resume, keep_final_state=True, what="CycleGAN training")
    finished = engine.finished(lambda: _result_from_files(out_dir, config.steps) if _finished(out_dir, training_id) else None, out_dir)
    if finished is not None:
        return finished
    state = engine.load()
    domains = load_domains(config, params.seed, data_root, state["windows"] if state else None)
    torch.manual_seed(params.seed)
    gan = CycleGan(config, tuple(sampler_and_pool_seeds(params.seed)[2:]), pick_device())
    job = GanJob(gan, domains, Monitor.build(domains, params.seed), out_dir, training_id)
    start = engine.restore(job, state)
    with stage_run("gan_train", params={"seed": params.seed, "gan": config.model_dump(mode="json")}, tags={"resumed_from_step": str(start)}):
        _, result = engine.run(job, start)
    assert result is not None  # without stop_after a run ends completed, or raises
    return result
