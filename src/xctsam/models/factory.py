"""Build a segmentation model from params, and rebuild a trained one from its checkpoint."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import ValidationError

from xctsam.config.sam import SamConfig
from xctsam.config.train import TrainConfig
from xctsam.config.unet import UNetConfig
from xctsam.data.datasets import IntensityWindow, InvalidWindow
from xctsam.models.base import Segmenter
from xctsam.models.checkpoint import NOT_OURS, SEGMENTER_REMEDY, load_segmenter_checkpoint
from xctsam.util.errors import InputError, listed
from xctsam.util.finite import non_finite_tensors

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
    """'N missing [...], N unexpected [...], N of another shape [...], N not tensors [...]' (the parts that apply), or ''."""
    missing = [key for key in expected if key not in found]
    unexpected = [key for key in found if key not in expected]
    reshaped = [
        f"{key} {tuple(getattr(found[key], 'shape', ()))} not {tuple(tensor.shape)}"
        for key, tensor in expected.items()
        if key in found and getattr(found[key], "shape", None) != tensor.shape
    ]
    # a numpy array of the right shape would pass the shape test but not load_state_dict
    foreign = [f"{key} ({type(value).__name__})" for key, value in found.items() if key in expected and not isinstance(value, torch.Tensor)]
    parts = [
        (len(keys), label, keys)
        for keys, label in ((missing, "missing"), (unexpected, "unexpected"), (reshaped, "of another shape"), (foreign, "not tensors"))
        if keys
    ]
    return ", ".join(f"{count} {label} {listed(keys, 3)}" for count, label, keys in parts)


def _first_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    return f"{'.'.join(map(str, first['loc']))}: {first['msg']}"


def _checked_meta(source: Path | str, meta: Mapping[str, Any]) -> tuple[ModelKind, IntensityWindow]:
    """(kind, window) of a trained model's meta once every entry the rebuild reads is of the
    right type and value; InputError naming the entry otherwise. A broken meta would surface
    as a traceback deep in a model's constructor, or (a NaN window) as a scan labelled background."""
    if not isinstance(meta, Mapping):
        raise InputError(source, f"a model whose meta is a {type(meta).__name__}, not a mapping: {NOT_OURS}", SEGMENTER_REMEDY)
    kind = meta.get("kind")
    if kind not in MODEL_KINDS:
        raise InputError(source, f"a checkpoint of kind {kind!r}, which this xctsam cannot rebuild (known: {', '.join(MODEL_KINDS)})", SEGMENTER_REMEDY)
    missing = [key for key in REBUILD_KEYS if key not in meta]
    if missing:
        raise InputError(source, f"a {kind} checkpoint whose meta lacks {', '.join(missing)}: {NOT_OURS}", SEGMENTER_REMEDY)
    if not isinstance(meta["config"], Mapping):
        raise InputError(source, f"a {kind} checkpoint whose meta config is a {type(meta['config']).__name__}, not the mapping of its {kind} section", SEGMENTER_REMEDY)
    try:
        window = IntensityWindow.from_dict(meta["window"])
    except InvalidWindow as exc:
        raise InputError(source, f"a {kind} checkpoint whose intensity window (meta window) {exc}", SEGMENTER_REMEDY) from None
    try:  # the loss weights as params would take them: four positive numbers and one non-negative
        TrainConfig.model_validate({"class_weights": meta["class_weights"], "dice_weight": meta["dice_weight"]})
    except ValidationError as exc:
        raise InputError(source, f"a {kind} checkpoint whose meta {_first_error(exc)}", SEGMENTER_REMEDY) from None
    return kind, window


def _rebuild(source: Path | str, kind: ModelKind, meta: Mapping[str, Any]) -> Segmenter:
    """The untrained model a checked meta describes; InputError for a config its section refuses."""
    config = dict(meta["config"])
    if kind == "sam":
        config["checkpoint"] = None  # the saved state dict is complete: no base checkpoint needed
    try:
        return _build(kind, config, list(meta["class_weights"]), float(meta["dice_weight"]))
    except ValidationError as exc:
        raise InputError(source, f"a {kind} checkpoint whose meta is not a valid {kind} section ({_first_error(exc)})", SEGMENTER_REMEDY) from None


def _check_weights(source: Path | str, kind: ModelKind, model: Segmenter, state: Mapping[str, Any]) -> None:
    """InputError unless `state` fits `model` exactly and every weight is finite: NaN weights (a
    training that diverged) would make every output NaN, which argmax reads as background."""
    misfit = _weights_misfit(model.state_dict(), state)
    if misfit:
        raise InputError(source, f"a {kind} checkpoint whose weights do not fit the {kind} model its meta describes: {misfit}", SEGMENTER_REMEDY)
    broken = non_finite_tensors(state)
    if broken:
        raise InputError(source, f"a {kind} checkpoint whose weights hold NaN or inf in {len(broken)} of {len(state)} tensors, first {broken[0]} (a training that diverged)", SEGMENTER_REMEDY)


def rebuild_segmenter(source: Path | str, state: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> tuple[Segmenter, IntensityWindow, dict[str, Any]]:
    """(model in eval mode, its intensity window, its meta) from trained weights and the meta
    stored with them, wherever they were read (`source`, named in every refusal): a best.pt, a
    registered model. Refused in one line (InputError) unless the meta is complete and typed,
    the window finite and wide, and the weights fit the model it describes and are finite."""
    kind, window = _checked_meta(source, meta)
    model = _rebuild(source, kind, meta)
    _check_weights(source, kind, model, state)
    model.load_state_dict(dict(state))
    model.eval()
    return model, window, dict(meta)


def load_segmenter(path: Path) -> tuple[Segmenter, IntensityWindow, dict[str, Any]]:
    """(model in eval mode, its intensity window, its meta) from a `best.pt` of `xctsam train`."""
    state, meta = load_segmenter_checkpoint(path)
    return rebuild_segmenter(path, state, meta)
