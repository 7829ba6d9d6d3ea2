"""Trained segmenters in MLflow's model registry, and back, without running code from it.

`log_trained_model` logs the best checkpoint of a training (`best.pt`) from inside its stage
run as a pyfunc model whose data is two plain files (`models.pyfunc`: the weights as tensors,
the meta as JSON) and whose loader is this installed package (`loader_module`), never a pickle:
on a shared tracking server anyone who may register a version could otherwise run code on the
machine of everyone who loads it. It carries a signature (tiles in, class probabilities out),
the training's params and foundation as the logged model's params and tags, and the meta
(kind, config, intensity window) as its metadata; it is registered under the model's name
(`registered_name`: `xctsam-sam`, `xctsam-unet`, `xctsam-sam-sim`, ...), so every training of
a model is a new version of one registered model.

`load_model(spec)` loads what a user names: a `models:/` URI, an exported `.onnx`, a `best.pt`.
`load_model_uri` reads `models:/xctsam-sam/3`, `models:/xctsam-sam/latest` or
`models:/xctsam-sam@alias` by downloading the two files and rebuilding the model through the
project's factory; a version in any other form (a pickled `mlflow.pytorch` model, a cloudpickled
python_model) is refused in one line, unopened.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from xctsam import NUM_CLASSES, __version__
from xctsam.data.datasets import IntensityWindow
from xctsam.models.base import Segmenter
from xctsam.models.pyfunc import (
    DATA_FOLDER,
    LOADER_MODULE,
    read_model_files,
    write_model_files,
)
from xctsam.util.errors import InputError

MODEL_URI_PREFIX = "models:/"
ARTIFACT_NAME = "model"
NAME_PREFIX = "xctsam-"
LIST_VERSIONS = "the registered versions are listed in the MLflow UI's Models tab (`xctsam ui`)"


def registered_name(kind: str, variant: str | None = None) -> str:
    """The registry name of a model: `xctsam-<kind>` or `xctsam-<kind>-<variant>`
    (`xctsam-sam-sim`: SAM trained on the untranslated render; `xctsam-sam-finetune-full`)."""
    return f"{NAME_PREFIX}{kind}" + (f"-{variant}" if variant else "")


def splits_variant(splits: Sequence[str]) -> str:
    """The variant a model trained on other data than its params name is registered under:
    each split's folder name without its `Tr-` (synthetic/Tr-sim -> sim), in registry-safe characters."""
    names = (re.sub(r"(?i)^tr-", "", PurePosixPath(str(split)).name).lower() for split in splits)
    return "-".join(re.sub(r"[^a-z0-9_.]+", "-", name).strip("-") for name in names)


def is_model_uri(text: str) -> bool:
    return str(text).startswith(MODEL_URI_PREFIX)


def _requirements() -> list[str]:
    """Pinned from the running interpreter: MLflow's own inference imports the model in a
    subprocess (tens of seconds per training) and cannot see the editable xctsam install."""
    import torch

    return [f"torch=={torch.__version__.split('+')[0]}", f"xctsam=={__version__}", "segment-anything", "numpy"]


def _signature(context: int) -> Any:
    """Tiles of any size in, probabilities of the same size out (the models are fully convolutional)."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, context, -1, -1))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, NUM_CLASSES, -1, -1))]),
    )


def log_trained_model(checkpoint: Path, registered: str, *, params: Mapping[str, Any] | None = None, tags: Mapping[str, str] | None = None, tile: int = 128) -> Any:
    """Log `checkpoint` (a best.pt) to the active run and register it as `registered`; returns MLflow's ModelInfo."""
    import mlflow.pyfunc

    from xctsam.models.factory import load_segmenter

    model, window, meta = load_segmenter(checkpoint)
    meta = {**meta, "window": window.to_dict()}
    example = np.zeros((1, int(model.context), tile, tile), dtype=np.float32)
    with tempfile.TemporaryDirectory(prefix="xctsam-model-") as tmp:
        folder = write_model_files(Path(tmp) / DATA_FOLDER, model.state_dict(), meta)
        return mlflow.pyfunc.log_model(
            name=ARTIFACT_NAME,
            loader_module=LOADER_MODULE,
            data_path=str(folder),
            registered_model_name=registered,
            signature=_signature(int(model.context)),
            input_example=example,
            pip_requirements=_requirements(),
            metadata={"xctsam": {**meta, "input": "tiles (N, context, H, W) of grey values normalised to [0, 1] by the window"}},
            params={key: str(value)[:6000] for key, value in (params or {}).items()},
            tags=dict(tags or {}),
        )


def _refuse_foreign(uri: str, flavors: Mapping[str, Any]) -> None:
    """A version not logged as xctsam logs models: refused before anything of it is read."""
    pyfunc = flavors.get("python_function") or {}
    if pyfunc.get("loader_module") == LOADER_MODULE:
        return
    if "pytorch" in flavors or pyfunc.get("cloudpickle_version") or pyfunc.get("python_model"):
        problem = "is a pickled model (its loading would run code from the registry), which xctsam never loads"
    else:
        problem = f"is not a segmenter logged by xctsam (flavors: {', '.join(sorted(flavors)) or 'none'})"
    raise InputError(uri, problem, "register the model again with this xctsam (`xctsam train` logs every training safely)")


def load_model_uri(uri: str) -> tuple[Segmenter, IntensityWindow, dict[str, Any]]:
    """(model in eval mode, its intensity window, its meta) of a registered model version."""
    import mlflow.models
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository

    from xctsam.util.tracking import connect

    connect()
    try:
        info = mlflow.models.get_model_info(uri)  # the MLmodel file, read as YAML data
    except MlflowException as exc:
        raise InputError(uri, f"no such registered model version ({exc.message.splitlines()[0]})", LIST_VERSIONS) from None
    _refuse_foreign(uri, info.flavors)
    with tempfile.TemporaryDirectory(prefix="xctsam-model-") as tmp:
        try:  # only our two data files, never the flavor's loader or code paths
            folder = ModelsArtifactRepository(uri).download_artifacts(f"data/{DATA_FOLDER}", dst_path=tmp)
        except (MlflowException, OSError) as exc:
            raise InputError(uri, f"its data folder data/{DATA_FOLDER} cannot be read ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})", LIST_VERSIONS) from None
        return read_model_files(Path(folder), uri)


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
