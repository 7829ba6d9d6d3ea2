"""The resumable training state's contents, and the run's identity.

The *training state* (`last.pt`, written and checked by util.resumable) holds everything needed
to continue a run bit for bit: model and optimiser state, LR schedule, gradient scaler, step,
early-stopping bookkeeping, the history so far and every random stream (tile sampler, torch,
numpy, Python): this module captures and restores the global ones. The trained model itself
(`best.pt`) is xctsam.models.checkpoint's.

It carries a `fingerprint` of what determines the trained weights (training params, model
meta, seed, process count), so a file left by other params is recognised and ignored.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from xctsam.config.train import TrainConfig
from xctsam.util.hashing import fingerprint

# Keys that change how often state is saved, not what is trained.
NOT_TRAINING_KEYS = {"checkpoint_every"}


def training_fingerprint(config: TrainConfig, model_meta: Mapping[str, Any], seed: int, world_size: int = 1) -> str:
    """Identity of a training: same fingerprint, same weights (on the same device type)."""
    return fingerprint(seed, world_size, config.model_dump(mode="json", exclude=NOT_TRAINING_KEYS), dict(model_meta))


# ---------------------------------------------------------------- random streams
def capture_rng() -> dict[str, Any]:
    """Every global random stream the training step may draw from (dropout, gate noise, ...)."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = numpy_state["state"]["key"].tolist()  # plain ints load with weights_only
    streams: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        streams["cuda"] = torch.cuda.get_rng_state_all()
    return streams


def restore_rng(streams: Mapping[str, Any]) -> None:
    torch.set_rng_state(streams["torch"])
    numpy_state = dict(streams["numpy"])
    numpy_state["state"] = {**numpy_state["state"], "key": np.asarray(numpy_state["state"]["key"], dtype=np.uint32)}
    np.random.set_state(numpy_state)
    version, internal, gauss = streams["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in streams and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(streams["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
