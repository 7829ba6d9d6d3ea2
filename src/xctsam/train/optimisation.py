"""The update that ends every training step, and the precision it runs in.

On CUDA the forward runs under autocast (bf16 where supported, else fp16 with a GradScaler);
elsewhere in float32. The segmenters' Trainer (train.loop) and the pretraining's
(pretrain.train) share `Optimised`: backward pass, clipping of the true (unscaled) gradients,
optimiser and LR-schedule step, and the resumable state of all of it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


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


class Optimised:
    """A model with its optimiser, LR schedule (a factor of the base LR per step) and scaler."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_factor: Callable[[int], float],
        precision: Precision,
        clipped: Sequence[nn.Parameter],
        grad_clip: float,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        self.precision = precision
        self.clipped = list(clipped)
        self.grad_clip = grad_clip

    @property
    def lr(self) -> float:
        """The LR of the next step (of the first parameter group)."""
        return float(self.optimizer.param_groups[0]["lr"])

    def update(self, loss: torch.Tensor) -> float:
        """Backward pass of `loss`, clipping, optimiser and schedule step; the pre-clip gradient norm."""
        self.optimizer.zero_grad(set_to_none=True)
        scaler = self.precision.scaler
        scaler.scale(loss).backward()
        scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
        grad_norm = torch.nn.utils.clip_grad_norm_(self.clipped, self.grad_clip)
        scaler.step(self.optimizer)
        scaler.update()
        self.scheduler.step()
        return grad_norm.item()

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
