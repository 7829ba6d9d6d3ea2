"""CycleGAN training: domain A (idealised render, labelled) <-> domain B (experimental scans).

Standard CycleGAN (Zhu et al. 2017): two ResNet generators, two PatchGAN critics, least-squares
adversarial loss, cycle and identity L1 losses, a history pool of generated images per critic,
Adam with the learning rate held until `decay_start` and then decayed linearly to zero at
`steps`. Training samples random tiles of 2-D slices; each domain's grey values are normalised
by an IntensityWindow measured on its own slices and stored with the generator.

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

import functools
import itertools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from skimage.util import montage
from torch import nn

from xctsam.config.gan import GanConfig
from xctsam.config.params import Params
from xctsam.data.datasets import (
    IntensityWindow,
    SliceReader,
    SliceRef,
    TileSampler,
    sample_slices,
    split_slices,
)
from xctsam.data.volumes import folders_digest
from xctsam.gan.cyclegan import (
    ImagePool,
    PatchDiscriminator,
    ResnetGenerator,
    Translator,
    to_net,
)
from xctsam.gan.synthesize import mean_iou, slab_structure_iou
from xctsam.util.atomic import atomic_path
from xctsam.util.device import pick_device
from xctsam.util.errors import ConfigError
from xctsam.util.hashing import fingerprint
from xctsam.util.jsonfile import write_json
from xctsam.util.optim import adamw
from xctsam.util.resumable import Engine, Job, LossWindow, Outcome, StateFile

CHECKPOINT = "checkpoint.pt"
GENERATOR = "generator_a2b.pt"
METRICS = "metrics.json"
SAMPLES = "samples"
CHECKPOINT_FORMAT = "xctsam.cyclegan.checkpoint/1"

# The idealised render is noise-free: every grey value is real (inclusions are its rarest and
# brightest), so its window spans min..max. Scans are noisy: a robust percentile window.
WINDOW_PERCENTILES_A = (0.0, 100.0)
WINDOW_PERCENTILES_B = (0.5, 99.5)
SAMPLE_COLUMNS = 4  # slices per row of a sample grid
SAMPLE_SIZE = 256  # at most this many pixels square of each sample slice (central crop)
STRUCTURE_SLICES = 16  # domain-A slices whose translation is checked against their labels
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


# ---------------------------------------------------------------- schedule and fingerprint
def linear_decay(step: int, steps: int, decay_start: int) -> float:
    """LR factor: 1 until `decay_start`, then linear to 0 at `steps`."""
    if step < decay_start or steps <= decay_start:
        return 1.0
    return max(0.0, 1.0 - (step - decay_start) / (steps - decay_start))


def training_fingerprint(params: Params, data_root: Path) -> str:
    """Hash of what determines the trained weights: seed, training params, and both domains' files."""
    config = params.gan.model_dump(mode="json", exclude=NOT_TRAINING_KEYS)
    data = folders_digest(Path(data_root) / folder for folder in (params.gan.domain_a, params.gan.domain_b))
    return fingerprint(params.seed, config, data)


def check_tile_fits_critic(config: GanConfig) -> None:
    if PatchDiscriminator.output_size(config.tile, config.discriminator.layers) < 1:
        smallest = 3 * 2**config.discriminator.layers
        raise ConfigError("params.yaml", "gan.tile", f"{config.tile} is too small for a {config.discriminator.layers}-layer PatchGAN (needs >= {smallest}); raise gan.tile or lower gan.discriminator.layers")


# ---------------------------------------------------------------- the model and one step
def _lsgan(prediction: torch.Tensor, real: bool) -> torch.Tensor:
    target = torch.ones_like(prediction) if real else torch.zeros_like(prediction)
    return F.mse_loss(prediction, target)


def _adam(nets: tuple[nn.Module, ...], config: GanConfig) -> torch.optim.AdamW:
    parameters = itertools.chain.from_iterable(net.parameters() for net in nets)
    return adamw(parameters, config.lr, betas=(config.beta1, 0.999))


class CycleGan:
    """Both generators and critics, their optimisers, LR schedules and image pools."""

    def __init__(self, config: GanConfig, pool_seeds: tuple[int, int], device: torch.device) -> None:
        self.config = config
        make_generator = functools.partial(ResnetGenerator, 1, 1, config.generator.filters, config.generator.blocks)
        make_critic = functools.partial(PatchDiscriminator, 1, config.discriminator.filters, config.discriminator.layers)
        self.g_ab, self.g_ba = make_generator().to(device), make_generator().to(device)
        self.d_a, self.d_b = make_critic().to(device), make_critic().to(device)
        self.opt_g = _adam((self.g_ab, self.g_ba), config)
        self.opt_d = _adam((self.d_a, self.d_b), config)
        factor = functools.partial(linear_decay, steps=config.steps, decay_start=config.decay_start)
        self.sched_g = torch.optim.lr_scheduler.LambdaLR(self.opt_g, factor)
        self.sched_d = torch.optim.lr_scheduler.LambdaLR(self.opt_d, factor)
        self.pool_a, self.pool_b = ImagePool(config.pool_size, pool_seeds[0]), ImagePool(config.pool_size, pool_seeds[1])
        self.device = device

    def _critics_trainable(self, trainable: bool) -> None:
        for parameter in itertools.chain(self.d_a.parameters(), self.d_b.parameters()):
            parameter.requires_grad_(trainable)

    def _generator_losses(self, real_a: torch.Tensor, real_b: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        config = self.config
        fake_b, fake_a = self.g_ab(real_a), self.g_ba(real_b)
        losses = {
            "adv_ab": _lsgan(self.d_b(fake_b), real=True),
            "adv_ba": _lsgan(self.d_a(fake_a), real=True),
            "cycle_a": F.l1_loss(self.g_ba(fake_b), real_a) * config.lambda_cycle,
            "cycle_b": F.l1_loss(self.g_ab(fake_a), real_b) * config.lambda_cycle,
        }
        if config.lambda_identity > 0:  # a generator fed its own target domain should leave it alone
            weight = config.lambda_cycle * config.lambda_identity
            losses["identity_a"] = F.l1_loss(self.g_ba(real_a), real_a) * weight
            losses["identity_b"] = F.l1_loss(self.g_ab(real_b), real_b) * weight
        return losses, fake_a, fake_b

    def _critic_loss(self, critic: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        return 0.5 * (_lsgan(critic(real), real=True) + _lsgan(critic(fake.detach()), real=False))

    def train_step(self, real_a: torch.Tensor, real_b: torch.Tensor) -> dict[str, float]:
        """One generator update, then one critic update (on pooled fakes); returns the losses."""
        self._critics_trainable(False)
        losses, fake_a, fake_b = self._generator_losses(real_a, real_b)
        loss_g = torch.stack(list(losses.values())).sum()
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        self.opt_g.step()

        self._critics_trainable(True)
        loss_d_a = self._critic_loss(self.d_a, real_a, self.pool_a.query(fake_a))
        loss_d_b = self._critic_loss(self.d_b, real_b, self.pool_b.query(fake_b))
        self.opt_d.zero_grad(set_to_none=True)
        (loss_d_a + loss_d_b).backward()
        self.opt_d.step()

        self.sched_g.step()
        self.sched_d.step()
        return {**{k: v.item() for k, v in losses.items()}, "g_total": loss_g.item(), "d_a": loss_d_a.item(), "d_b": loss_d_b.item()}

    @property
    def lr(self) -> float:
        return self.opt_g.param_groups[0]["lr"]

    def state_dict(self) -> dict[str, Any]:
        return {
            "nets": {name: getattr(self, name).state_dict() for name in ("g_ab", "g_ba", "d_a", "d_b")},
            "optimisers": {"g": self.opt_g.state_dict(), "d": self.opt_d.state_dict()},
            "schedulers": {"g": self.sched_g.state_dict(), "d": self.sched_d.state_dict()},
            "pools": {"a": self.pool_a.state_dict(), "b": self.pool_b.state_dict()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, weights in state["nets"].items():
            getattr(self, name).load_state_dict(weights)
        self.opt_g.load_state_dict(state["optimisers"]["g"])
        self.opt_d.load_state_dict(state["optimisers"]["d"])
        self.sched_g.load_state_dict(state["schedulers"]["g"])
        self.sched_d.load_state_dict(state["schedulers"]["d"])
        self.pool_a.load_state_dict(state["pools"]["a"], self.device)
        self.pool_b.load_state_dict(state["pools"]["b"], self.device)


# ---------------------------------------------------------------- the data of both domains
@dataclass
class Domains:
    """Each domain's slices, intensity window and tile sampler."""

    refs_a: list[SliceRef]
    refs_b: list[SliceRef]
    window_a: IntensityWindow
    window_b: IntensityWindow
    sampler_a: TileSampler
    sampler_b: TileSampler


def _seeds(seed: int) -> list[int]:
    """Independent seeds for the two tile samplers and the two image pools."""
    return [int(s) for s in np.random.SeedSequence(seed).generate_state(4)]


def _domains(params: Params, data_root: Path, windows: dict[str, dict] | None) -> Domains:
    config = params.gan
    refs_a = split_slices([Path(data_root) / config.domain_a])
    refs_b = split_slices([Path(data_root) / config.domain_b])
    if windows is None:
        window_a = IntensityWindow.measure(refs_a, WINDOW_PERCENTILES_A, seed=params.seed)
        window_b = IntensityWindow.measure(refs_b, WINDOW_PERCENTILES_B, seed=params.seed)
    else:
        window_a, window_b = IntensityWindow(**windows["a"]), IntensityWindow(**windows["b"])
    seed_a, seed_b = _seeds(params.seed)[:2]
    return Domains(refs_a, refs_b, window_a, window_b, TileSampler(refs_a, window_a, config.tile, seed_a), TileSampler(refs_b, window_b, config.tile, seed_b))


# ---------------------------------------------------------------- samples and structure check
def _central_crop(image: np.ndarray, size: int) -> np.ndarray:
    y0, x0 = (image.shape[0] - size) // 2, (image.shape[1] - size) // 2
    return image[y0 : y0 + size, x0 : x0 + size]


@dataclass
class Monitor:
    """Fixed slices for sample grids (A, A->B, B) and for the structure check, chosen once by seed."""

    sample_a: np.ndarray  # (n, S, S) grey values
    sample_b: np.ndarray  # (n, S, S) in domain B's [0, 1] units
    check_images: list[np.ndarray]
    check_labels: list[np.ndarray]

    @classmethod
    def build(cls, domains: Domains, seed: int) -> Monitor:
        with SliceReader() as reader:
            a = [reader.image(ref) for ref in sample_slices(domains.refs_a, SAMPLE_COLUMNS, seed)]
            b = [reader.image(ref) for ref in sample_slices(domains.refs_b, SAMPLE_COLUMNS, seed)]
            checked = sample_slices(domains.refs_a, STRUCTURE_SLICES, seed + 1)
            images, labels = [reader.image(ref) for ref in checked], [reader.labels(ref) for ref in checked]
        size = min(SAMPLE_SIZE, *(min(image.shape) for image in a + b))
        crop_a = np.stack([_central_crop(image, size) for image in a])
        crop_b = domains.window_b.normalise(np.stack([_central_crop(image, size) for image in b]))
        return cls(crop_a, crop_b, images, labels)

    def grid(self, translator: Translator) -> np.ndarray:
        """uint8 image: one column per slice, rows A, A->B, B, each shown in its window."""
        rows = [translator.window_a.normalise(self.sample_a), translator.unit(self.sample_a), self.sample_b]
        canvas = montage(np.concatenate(rows), grid_shape=(len(rows), len(self.sample_a)), padding_width=2, fill=1.0)
        return (np.clip(canvas, 0, 1) * 255).round().astype(np.uint8)

    def structure_iou(self, translator: Translator) -> float:
        ious = [iou for image, labels in zip(self.check_images, self.check_labels) for iou in slab_structure_iou(translator(image[None]), labels[None])]
        return mean_iou(ious)


def save_grid(path: Path, grid: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")


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
        """The windows came in earlier (`_domains`: the samplers are built on them)."""
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
    training_id = training_fingerprint(params, data_root)
    state_file = StateFile(out_dir / CHECKPOINT, CHECKPOINT_FORMAT, training_id)
    engine = Engine(state_file, config.checkpoint_every, config.log_every, resume=resume, keep_final_state=True, what="CycleGAN training")
    finished = engine.finished(lambda: _result_from_files(out_dir, config.steps) if _finished(out_dir, training_id) else None, out_dir)
    if finished is not None:
        return finished
    state = engine.load()
    domains = _domains(params, data_root, state["windows"] if state else None)
    torch.manual_seed(params.seed)
    gan = CycleGan(config, tuple(_seeds(params.seed)[2:]), pick_device())
    job = GanJob(gan, domains, Monitor.build(domains, params.seed), out_dir, training_id)
    start = engine.restore(job, state)
    with stage_run("gan_train", params={"seed": params.seed, "gan": config.model_dump(mode="json")}, tags={"resumed_from_step": str(start)}):
        _, result = engine.run(job, start)
    assert result is not None  # without stop_after a run ends completed, or raises
    return result
