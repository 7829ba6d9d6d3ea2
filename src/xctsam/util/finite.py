"""Trainings that diverge stop at once: NaN or infinite losses, and weights about to be saved.

A non-finite loss poisons every weight at the next optimiser step, after which a loop would
go on validating and could keep the NaN weights as its best epoch. Every training (segmenters,
CycleGAN, pretraining) checks its step's losses here, so the message reads the same in all.
Loaded weights are checked with the same test (non_finite_tensors).
(NaN in params is refused where params are read: xctsam.util.safe_yaml.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from xctsam.util.errors import TrainingDiverged


def _terms(values: Mapping[str, float]) -> str:
    return ", ".join(f"{name} {value:.4g}" for name, value in values.items())


def check_losses(job: str, step: int, losses: Mapping[str, float], hint: str) -> None:
    """Raise TrainingDiverged when a loss of step `step` (1-based) is NaN or infinite.

    `losses`: the step's total first, then its terms; the message names the first non-finite
    one and shows all the others, e.g.
    `train.sam: loss is nan at step 3 (task_loss nan, aux_loss 0.0012); lower train.sam.lr or check the input data`.
    """
    bad = next((name for name, value in losses.items() if not math.isfinite(value)), None)
    if bad is None:
        return
    others = {name: value for name, value in losses.items() if name != bad}
    raise TrainingDiverged(f"{job}: {bad} is {losses[bad]:.4g} at step {step} ({_terms(others)}); {hint}")


def non_finite_tensors(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding NaN or inf, in order (trainings about to save
    them, loaders of a trained model's weights)."""
    return [name for name, tensor in tensors.items() if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]


def check_weights(job: str, step: int, module: torch.nn.Module, hint: str) -> None:
    """Raise TrainingDiverged when a floating-point parameter or buffer holds NaN or inf.

    Called before weights are kept as a checkpoint: an optimiser step can overflow the weights
    while its loss was still finite, and those must not become best.pt.
    """
    broken = non_finite_tensors(module.state_dict())
    if broken:
        shown = ", ".join(broken[:3]) + (", ..." if len(broken) > 3 else "")
        raise TrainingDiverged(f"{job}: {len(broken)} weight tensors hold NaN or inf after step {step} ({shown}); {hint}")
