"""Temperature scaling (Guo et al. 2017) of a trained segmenter, fitted on its validation slices.

The model's logits are divided by one temperature T before its own probabilities (softmax for
the multi-class head, per-class sigmoids for the study's binary models): T > 1 softens
over-confident scores, labels from an argmax are unchanged. T minimises the mean negative log
probability of the true class over a seeded sample of the pixels of the validation slices the
training held out (`train.<model>.val_volumes`, cut into training tiles), so no test slice is
used. `xctsam calibrate` prints T with the calibration error (eval.uncertainty) before and
after; `predict.temperature` applies it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.optimize import minimize_scalar

from xctsam import CLASS_NAMES
from xctsam.config.params import Params
from xctsam.data.tiles import validation_slices
from xctsam.eval.uncertainty import CalibrationCounts
from xctsam.models.base import Segmenter
from xctsam.train.validation import whole_slice_batches

MAX_PIXELS = 500_000  # sampled validation pixels: enough for one scalar, small for a CPU
LOG_T_RANGE = (-3.0, 3.0)  # T in [0.05, 20]


def sample_logits(model: Segmenter, batches: Any, seed: int, max_pixels: int = MAX_PIXELS) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C) logits and (N,) labels of up to `max_pixels` pixels drawn from the batches."""
    rng = np.random.default_rng(seed)
    logits, labels = [], []
    model.eval()
    with torch.no_grad():
        for images, truth in batches():
            outputs = model(torch.as_tensor(images, dtype=torch.float32))
            logits.append(outputs.permute(0, 2, 3, 1).reshape(-1, outputs.shape[1]))
            labels.append(torch.as_tensor(np.asarray(truth), dtype=torch.long).reshape(-1))
    all_logits, all_labels = torch.cat(logits), torch.cat(labels)
    if len(all_labels) > max_pixels:
        keep = torch.from_numpy(rng.choice(len(all_labels), max_pixels, replace=False))
        all_logits, all_labels = all_logits[keep], all_labels[keep]
    return all_logits, all_labels


def _probabilities(model: Segmenter, logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """(N, 4) probabilities of (N, C) logits at `temperature`, through the model's own head."""
    return model.probabilities((logits / temperature)[:, :, None, None])[:, :, 0, 0]


def negative_log_likelihood(model: Segmenter, logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> float:
    probabilities = _probabilities(model, logits, temperature)
    true = probabilities.gather(1, labels[:, None])[:, 0].clamp_min(1e-12)
    return float(-true.log().mean())


def fit_temperature(model: Segmenter, logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature minimising the mean negative log-likelihood (bounded search over log T)."""
    found = minimize_scalar(lambda log_t: negative_log_likelihood(model, logits, labels, math.exp(log_t)), bounds=LOG_T_RANGE, method="bounded")
    return float(math.exp(found.x))


def _errors(model: Segmenter, logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> dict[str, float]:
    counts = CalibrationCounts(len(CLASS_NAMES))
    counts.add(_probabilities(model, logits, temperature).T.numpy(), labels.numpy())
    return {cls: counts.error(index) for index, cls in enumerate(CLASS_NAMES)}


def calibrate(model: Segmenter, window: Any, kind: str, params: Params, data_root: Path) -> dict[str, Any]:
    """{temperature, nll_before, nll_after, ece_before, ece_after, pixels} on `kind`'s validation slices."""
    config = getattr(params.train, kind)
    _, held_out = validation_slices([Path(data_root) / split for split in config.splits], config.val_volumes)
    batches = whole_slice_batches(held_out, window, int(model.context), config.val_slices, params.seed, config.tile)
    logits, labels = sample_logits(model, batches, params.seed)
    temperature = fit_temperature(model, logits, labels)
    return {
        "temperature": temperature,
        "pixels": len(labels),
        "nll_before": negative_log_likelihood(model, logits, labels, 1.0),
        "nll_after": negative_log_likelihood(model, logits, labels, temperature),
        "ece_before": _errors(model, logits, labels, 1.0),
        "ece_after": _errors(model, logits, labels, temperature),
    }
