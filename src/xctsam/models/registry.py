"""Trained segmenters in MLflow's model registry, and back.

`log_trained_model` logs the best checkpoint of a training (`best.pt`) from inside its stage
run with `mlflow.pytorch.log_model` (MLflow 3's `name=`): the rebuilt model (pickled with the
installed xctsam, which loading needs too), an input example of one tile and the signature
MLflow infers from it, the training's params and foundation as the logged model's params and
tags, and the checkpoint's meta (kind, config, intensity window) as its metadata. It is
registered as `xctsam-<name>` (`xctsam-sam`, `xctsam-unet`, `xctsam-sam-sim`, ...), so every
training of a model is a new version of one registered model.

`load_model(spec)` loads what a user names: a `models:/` URI, an exported `.onnx`, a `best.pt`.
`load_model_uri` reads `models:/xctsam-sam/3`, `models:/xctsam-sam/latest` or
`models:/xctsam-sam@alias` back as (segmenter, window, meta), what `load_segmenter` gives for a
file, so `xctsam predict --model` takes either.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from xctsam import __version__
from xctsam.data.datasets import IntensityWindow
from xctsam.models.base import Segmenter
from xctsam.util.errors import InputError

MODEL_URI_PREFIX = "models:/"
ARTIFACT_NAME = "model"


def registered_name(model: str) -> str:
    return f"xctsam-{model}"


def is_model_uri(text: str) -> bool:
    return str(text).startswith(MODEL_URI_PREFIX)


def _requirements() -> list[str]:
    """Pinned from the running interpreter: MLflow's own inference imports the model in a
    subprocess (tens of seconds per training) and cannot see the editable xctsam install."""
    import torch

    return [f"torch=={torch.__version__.split('+')[0]}", f"xctsam=={__version__}", "segment-anything", "numpy"]


def log_trained_model(checkpoint: Path, model_name: str, *, params: Mapping[str, Any] | None = None, tags: Mapping[str, str] | None = None, tile: int = 128) -> Any:
    """Log `checkpoint` (a best.pt) to the active run and register it; returns MLflow's ModelInfo."""
    import mlflow.pytorch

    from xctsam.models.factory import load_segmenter

    model, window, meta = load_segmenter(checkpoint)
    example = np.zeros((1, int(model.context), tile, tile), dtype=np.float32)
    return mlflow.pytorch.log_model(
        model,
        name=ARTIFACT_NAME,
        registered_model_name=registered_name(model_name),
        input_example=example,
        pip_requirements=_requirements(),
        metadata={"xctsam": {**meta, "window": window.to_dict()}},
        params={key: str(value)[:6000] for key, value in (params or {}).items()},
        tags=dict(tags or {}),
        # pickled whole: loading gives the Segmenter back (probabilities, to_labels, context),
        # not the bare forward graph MLflow's default torch.export format keeps
        serialization_format="pickle",
    )


def load_model_uri(uri: str) -> tuple[Segmenter, IntensityWindow, dict[str, Any]]:
    """(model in eval mode, its intensity window, its meta) of a registered model version."""
    import mlflow.models
    import mlflow.pytorch
    from mlflow.exceptions import MlflowException

    from xctsam.util.tracking import configure

    configure()
    try:
        info = mlflow.models.get_model_info(uri)
        model = mlflow.pytorch.load_model(uri, map_location="cpu")
    except MlflowException as exc:
        raise InputError(uri, f"no such registered model version ({exc.message.splitlines()[0]})", "list them with `mlflow models` or in the UI's Models tab") from None
    meta = dict((info.metadata or {}).get("xctsam") or {})
    if "window" not in meta or not isinstance(model, Segmenter):
        raise InputError(uri, "is not a segmenter logged by xctsam", "give a models:/xctsam-<model>/<version> URI")
    model.eval()
    return model, IntensityWindow(**meta["window"]), meta


def load_model(spec: str | Path) -> tuple[Segmenter, IntensityWindow, dict[str, Any]]:
    """A model as users name one: a registered `models:/xctsam-sam/<version>`, an exported
    `.onnx` file, or a `best.pt` checkpoint; (model in eval mode, its window, its meta)."""
    from xctsam.models.factory import load_segmenter

    if is_model_uri(str(spec)):
        return load_model_uri(str(spec))
    if Path(spec).suffix.lower() == ".onnx":
        from xctsam.models.export import load_onnx

        return load_onnx(Path(spec))
    return load_segmenter(Path(spec))
