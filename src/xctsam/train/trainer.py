"""The segmenters' optimiser step: AdamW over the trainable parameters, gradient-norm clipping,
LR linear warm-up then cosine (or poly 0.9) decay to 0 at `steps`, autocast on CUDA.
"""

from __future__ import annotations

import functools
import math

import torch

from xctsam.config.train import TrainConfig
from xctsam.models.base import Segmenter
from xctsam.train.optimisation import Optimised, choose_precision
from xctsam.train.runtime import Runtime
from xctsam.util.optim import adamw

POLY_POWER = 0.9


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


class Trainer(Optimised):
    """Model, optimiser, schedule and scaler, and one training step."""

    def __init__(self, model: Segmenter, config: TrainConfig, runtime: Runtime) -> None:
        model = model.to(runtime.device)
        self.net = runtime.wrap(model)  # what the forward runs through (DDP or the model)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        if not self.trainable:
            raise ValueError("the model has no trainable parameters")
        self.config = config
        self.device = runtime.device
        factor = functools.partial(lr_factor, steps=config.steps, warmup_steps=config.warmup_steps, schedule=config.schedule)
        optimizer = adamw(self.trainable, config.lr, config.weight_decay)
        super().__init__(model, optimizer, factor, choose_precision(runtime.device), self.trainable, config.grad_clip)

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """One optimiser step; returns the loss, its task and auxiliary terms, LR used and pre-clip gradient norm."""
        self.model.train()
        lr = self.lr
        with self.precision.autocast():
            outputs = self.net(images)
            auxiliary = self.model.auxiliary_loss()
            task = self.model.loss(outputs, labels)
            loss = task + auxiliary
        grad_norm = self.update(loss)
        return {"loss": loss.item(), "task_loss": float(task.detach().float()), "aux_loss": float(auxiliary.detach().float()), "lr": lr, "grad_norm": grad_norm}
