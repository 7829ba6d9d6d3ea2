"""The resumable training state on disk, and the run's identity.

The *training state* (`last.pt`), written atomically (temporary name, then rename), holds
everything needed to continue a run bit for bit: model and optimiser state, LR schedule,
gradient scaler, step, early-stopping bookkeeping, the history so far and every random stream
(tile sampler, torch, numpy, Python). The trained model itself (`best.pt`) is
xctsam.models.checkpoint's.

It carries a `fingerprint` of what determines the trained weights (training params, model
meta, seed, process count), so a file left by other params is recognised and ignored.
Files are loaded with `weights_only=True`: only tensors and plain Python values, no code.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xctsam.config import TrainConfig
from xctsam.models.checkpoint import STATE_FORMAT
from xctsam.util.errors import InputError
from xctsam.util.hashing import fingerprint
from xctsam.util.torch_files import load_torch_file

log = logging.getLogger(__name__)

# Keys that change how often state is saved, not what is trained.
NOT_TRAINING_KEYS = {"checkpoint_every"}


def training_fingerprint(config: TrainConfig, model_meta: Mapping[str, Any], seed: int, world_size: int = 1) -> str:
    """Identity of a training: same fingerprint, same weights (on the same device type)."""
    return fingerprint(seed, world_size, config.model_dump(mode="json", exclude=NOT_TRAINING_KEYS), dict(model_meta))


def load_file(path: Path) -> dict[str, Any] | None:
    """The saved dict, or None (with a warning) when it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return load_torch_file(path, "ignored; training from scratch")
    except InputError as exc:  # atomic writes leave no torn file, but a foreign one can sit here
        log.warning("%s", exc)
        return None


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


# ---------------------------------------------------------------- training state
def load_training_state(path: Path, training_id: str) -> dict[str, Any] | None:
    """The saved training state if it belongs to this training, else None (and why, logged)."""
    state = load_file(path)
    if state is None:
        return None
    if state.get("format") != STATE_FORMAT or state.get("fingerprint") != training_id:
        log.warning("%s: saved by other training params or model; training from scratch", path)
        return None
    return state
