"""Build a segmentation model from params, and rebuild a trained one from its checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from xctsam.config import Params, SamConfig, UNetConfig
from xctsam.data.datasets import IntensityWindow
from xctsam.errors import InputError
from xctsam.models.base import Segmenter

ModelKind = Literal["sam", "unet"]
MODEL_KINDS: tuple[ModelKind, ...] = ("sam", "unet")


def _build(kind: str, section: dict[str, Any], class_weights: list[float], dice_weight: float) -> Segmenter:
    if kind == "sam":
        from xctsam.models.sam_peft import build_peft_sam

        return build_peft_sam(SamConfig.model_validate(section), class_weights, dice_weight)
    if kind == "unet":
        from xctsam.models.unet25d import UNet25D

        return UNet25D(UNetConfig.model_validate(section), class_weights, dice_weight)
    raise ValueError(f"unknown model kind {kind!r} (known: {', '.join(MODEL_KINDS)})")


def model_section(kind: ModelKind, params: Params) -> dict[str, Any]:
    return (params.sam if kind == "sam" else params.unet).model_dump(mode="json")


def build_segmenter(kind: ModelKind, params: Params) -> Segmenter:
    """A fresh model of `kind` as params describe it (SAM loads its base checkpoint, if any)."""
    train = getattr(params.train, kind)
    return _build(kind, model_section(kind, params), list(train.class_weights), train.dice_weight)


def model_meta(kind: ModelKind, params: Params, window: IntensityWindow) -> dict[str, Any]:
    """What rebuilds the trained model later: stored in its checkpoint."""
    train = getattr(params.train, kind)
    return {
        "kind": kind,
        "config": model_section(kind, params),
        "class_weights": list(train.class_weights),
        "dice_weight": train.dice_weight,
        "window": window.to_dict(),
    }


def load_segmenter(path: Path) -> tuple[Segmenter, IntensityWindow, dict[str, Any]]:
    """(model in eval mode, its intensity window, its meta) from a `best.pt` of `xctsam train`."""
    from xctsam.train.checkpoint import load_segmenter_checkpoint

    state, meta = load_segmenter_checkpoint(path)
    config = dict(meta["config"])
    if meta["kind"] == "sam":
        config["checkpoint"] = None  # the saved state dict is complete: no base checkpoint needed
    model = _build(meta["kind"], config, meta["class_weights"], meta["dice_weight"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InputError(path, f"weights do not fit the {meta['kind']} model its meta describes: missing {missing[:5]}, unexpected {unexpected[:5]}", "retrain with this xctsam version")
    model.eval()
    return model, IntensityWindow(**meta["window"]), meta
