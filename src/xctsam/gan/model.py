"""The CycleGAN of Zhu et al. 2017 as one trainable object: nets, optimisers, schedules, pools.

Least-squares adversarial loss, cycle and identity L1 losses, a history pool of generated
images per critic, Adam with the learning rate held until `decay_start` and then decayed
linearly to zero at `steps`. The nets themselves are in gan.cyclegan.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from xctsam.config.gan import GanConfig
from xctsam.gan.cyclegan import ImagePool, PatchDiscriminator, ResnetGenerator
from xctsam.util.optim import adamw


def linear_decay(step: int, steps: int, decay_start: int) -> float:
    """LR factor: 1 until `decay_start`, then linear to 0 at `steps`."""
    if step < decay_start or steps <= decay_start:
        return 1.0
    return max(0.0, 1.0 - (step - decay_start) / (steps - decay_start))


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
        # only A -> B gets noise inputs: the render is noise-free, the scans are not
        self.g_ab = make_generator(noise_channels=config.generator.noise_channels).to(device)
        self.g_ba = make_generator().to(device)
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
