"""Build a segmentation model from params, and rebuild a trained one from its checkpoint."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from xctsam.config.sam import SamConfig
from xctsam.config.train import TrainConfig
from xctsam.config.unet import UNetConfig
from xctsam.data.datasets import IntensityWindow
from xctsam.models.base import Segmenter
from xctsam.models.checkpoint import SEGMENTER_REMEDY, load_segmenter_checkpoint
from xctsam.util.errors import InputError, listed

ModelKind = Literal["sam", "unet"]
MODEL_KINDS: tuple[ModelKind, ...] = ("sam", "unet")
REBUILD_KEYS = ("config", "class_weights", "dice_weight", "window")  # of a checkpoint's meta, beside its kind


def _build(kind: str, section: dict[str, Any], class_weights: list[float], dice_weight: float) -> Segmenter:
    if kind == "sam":
        from xctsam.models.sam_peft import build_peft_sam

        return build_peft_sam(SamConfig.model_validate(section), class_weights, dice_weight)
    if kind == "unet":
        from xctsam.models.unet25d import UNet25D

        return UNet25D(UNetConfig.model_validate(section), class_weights, dice_weight)
    raise ValueError(f"unknown model kind {kind!r} (known: {', '.join(MODEL_KINDS)})")


ModelConfig = SamConfig | UNetConfig


def build_segmenter(kind: ModelKind, model: ModelConfig, train: TrainConfig) -> Segmenter:
    """A fresh model of `kind` from its section (`sam` or `unet`) and the loss weights of
    train.<kind>; SAM loads its base checkpoint, if any."""
    return _build(kind, model.model_dump(mode="json"), list(train.class_weights), train.dice_weight)


def model_meta(kind: ModelKind, model: ModelConfig, train: TrainConfig, window: IntensityWindow) -> dict[str, Any]:
    """What rebuilds the trained model later: stored in its checkpoint."""
    return {
        "kind": kind,
        "config": model.model_dump(mode="json"),
        "class_weights": list(train.class_weights),
        "dice_weight": train.dice_weight,
        "window": window.to_dict(),
    }


def _weights_misfit(expected: Mapping[str, Any], found: Mapping[str, Any]) -> str:
    """'N missing [...], N unexpected [...], N of another shape [...]' (the parts that apply), or ''."""
    missing = [key for key in expected if key not in found]
    unexpected = [key for key in found if key not in expected]
    reshaped = [
        f"{key} {tuple(getattr(found[key], 'shape', ()))} not {tuple(tensor.shape)}"
        for key, tensor in expected.items()
        if key in found and getattr(found[key], "shape", None) != tensor.shape
    ]
    parts = [(len(keys), label, keys) for keys, label in ((missing, "missing"), (unexpected, "unexpected"), (reshaped, "of another shape")) if keys]
    return ", ".join(f"{count} {label} {listed(keys, 3)}" for count, label, keys in parts)


def _rebuild(path: Path, meta: Mapping[str, Any], remedy: str) -> Segmenter:
    """The untrained model a checkpoint's meta describes; InputError for an unknown kind or a broken meta."""
    kind = meta["kind"]
    if kind not in MODEL_KINDS:
        raise InputError(path, f"a checkpoint of kind {kind!r}, which this xctsam cannot rebuild (known: {', '.join(MODEL_KINDS)})", remedy)
    missing = [key for key in REBUILD_KEYS if key not in meta]
    if missing:
        raise InputError(path, f"a {kind} checkpoint whose meta lacks {', '.join(missing)}: not one written by xctsam train", remedy)
    config = dict(meta["config"])
    if kind == "sam":
        config["checkpoint"] = None  # the saved state dict is complete: no base checkpoint needed
    try:
        return _build(kind, config, meta["class_weights"], meta["dice_weight"])
    except ValidationError as exc:
        first = exc.errors()[0]
        raise InputError(path, f"a {kind} checkpoint whose meta is not a valid {kind} section ({'.'.join(map(str, first['loc']))}: {first['msg']})", remedy) from None


def load_segmenter(path: Path) -> tuple[Segmenter, IntensityWindow, dict[str, Any]]:
    """(model in eval mode, its intensity window, its meta) from a `best.pt` of `xctsam train`."""
    state, meta = load_segmenter_checkpoint(path)
    model = _rebuild(path, meta, SEGMENTER_REMEDY)
    misfit = _weights_misfit(model.state_dict(), state)
    if misfit:
        kind = meta["kind"]
        raise InputError(path, f"a {kind} checkpoint whose weights do not fit the {kind} model its meta describes: {misfit}", SEGMENTER_REMEDY)
    model.load_state_dict(state)
    model.eval()
    return model, IntensityWindow(**meta["window"]), meta

