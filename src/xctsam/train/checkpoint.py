"""Training files on disk: the resumable state, the model checkpoint, the run's identity.

Two kinds of file, both written atomically (temporary name, then rename):
  - the *training state* (`last.pt`): everything needed to continue a run bit for bit: model
    and optimiser state, LR schedule, gradient scaler, step, early-stopping bookkeeping, the
    history so far and every random stream (tile sampler, torch, numpy, Python);
  - the *segmenter checkpoint* (`best.pt`): model weights plus `meta`, what is needed to rebuild
    the model (kind, its params section, the intensity window), read by prediction/evaluation.

Both carry a `fingerprint` of what determines the trained weights (training params, model
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

from xctsam.atomic import atomic_path
from xctsam.config import TrainConfig
from xctsam.errors import InputError, listed
from xctsam.hashing import fingerprint
from xctsam.torch_files import load_torch_file

log = logging.getLogger(__name__)

STATE_FORMAT = "xctsam.train.state/1"
SEGMENTER_FORMAT = "xctsam.segmenter/1"
NOT_OURS = "not a checkpoint written by xctsam train"
SEGMENTER_REMEDY = "give a best.pt written by `xctsam train sam` or `xctsam train unet`"
# Keys that change how often state is saved, not what is trained.
NOT_TRAINING_KEYS = {"checkpoint_every"}


def training_fingerprint(config: TrainConfig, model_meta: Mapping[str, Any], seed: int, world_size: int = 1) -> str:
    """Identity of a training: same fingerprint, same weights (on the same device type)."""
    return fingerprint(seed, world_size, config.model_dump(mode="json", exclude=NOT_TRAINING_KEYS), dict(model_meta))


def save_atomic(state: Mapping[str, Any], path: Path) -> None:
    with atomic_path(Path(path)) as tmp:
        torch.save(dict(state), tmp)


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


# ---------------------------------------------------------------- segmenter checkpoint
def save_segmenter_checkpoint(path: Path, model: torch.nn.Module, meta: Mapping[str, Any], training: Mapping[str, Any]) -> None:
    """Weights (full state dict, on the CPU) with the meta to rebuild the model and training facts.

    The full state dict includes frozen weights (a SAM image encoder): larger (vit_b ~375 MB)
    but self-contained, so evaluation needs neither the base checkpoint nor the seed that built it.
    """
    weights = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    save_atomic({"format": SEGMENTER_FORMAT, "meta": dict(meta), "training": dict(training), "state_dict": weights}, path)


def _not_a_segmenter(saved: Any) -> str | None:
    """Why a loaded file is not a segmenter checkpoint this version reads; None when it is one."""
    if not isinstance(saved, dict):
        return f"holds a {type(saved).__name__}: {NOT_OURS}"
    if saved and all(isinstance(value, torch.Tensor) for value in saved.values()):
        # most likely a foundation's weights, e.g. an official sam_vit_b_01ec64.pth
        return f"holds a plain state dict of {len(saved)} tensors and no 'kind' entry: {NOT_OURS} (a SAM foundation .pth goes in params sam.checkpoint)"
    if saved.get("format") == STATE_FORMAT:
        return "holds a resumable training state (last.pt), not a trained model: give the best.pt beside it"
    meta = saved.get("meta")
    if not isinstance(meta, dict) or "kind" not in meta:
        return f"holds no 'kind' entry (its keys: {listed([str(key) for key in saved])}): {NOT_OURS}"
    if saved.get("format") != SEGMENTER_FORMAT:
        return f"a {meta['kind']} checkpoint in format {saved.get('format')!r}; this xctsam reads {SEGMENTER_FORMAT!r}"
    if not isinstance(saved.get("state_dict"), dict):
        return f"a {meta['kind']} checkpoint without its 'state_dict' entry: {NOT_OURS}"
    return None


def load_segmenter_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, meta) of a saved segmenter; meta["training"] holds step, val_miou, fingerprint."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such model checkpoint", SEGMENTER_REMEDY)
    saved = load_torch_file(path, SEGMENTER_REMEDY)
    problem = _not_a_segmenter(saved)
    if problem is not None:
        raise InputError(path, problem, SEGMENTER_REMEDY)
    return saved["state_dict"], {**saved["meta"], "training": saved.get("training", {})}
