"""The trained segmenter on disk (`best.pt`): weights plus `meta`, what is needed to rebuild the
model (kind, its params section, the intensity window), read by prediction and evaluation.

Written atomically (temporary name, then rename); loaded with `weights_only=True` (tensors and
plain values only, no code). A file that is not one is refused in one line saying what it holds.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from xctsam.util.atomic import atomic_path
from xctsam.util.errors import InputError, listed
from xctsam.util.torch_files import load_torch_file

SEGMENTER_FORMAT = "xctsam.segmenter/1"
STATE_FORMAT = "xctsam.train.state/1"  # a resumable training state (train.loop, pretrain.train), named in refusals
NOT_OURS = "not a checkpoint written by xctsam train"
SEGMENTER_REMEDY = "give a best.pt written by `xctsam train sam` or `xctsam train unet`"


def save_atomic(state: Mapping[str, Any], path: Path) -> None:
    with atomic_path(Path(path)) as tmp:
        torch.save(dict(state), tmp)


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
    """(state_dict, meta) of a saved segmenter; meta["training"] holds step, val_miou, fingerprint.

    Only the file's layout is checked here; what the meta and weights hold is checked where the
    model is rebuilt (factory.rebuild_segmenter), for every source of weights alike.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such model checkpoint", SEGMENTER_REMEDY)
    saved = load_torch_file(path, SEGMENTER_REMEDY)
    problem = _not_a_segmenter(saved)
    if problem is not None:
        raise InputError(path, problem, SEGMENTER_REMEDY)
    return saved["state_dict"], {**saved["meta"], "training": saved.get("training", {})}
