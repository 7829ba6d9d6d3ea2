"""A trained segmenter as MLflow model files that load without running code from them.

A logged model's data folder (`xctsam/` under the MLflow model's `data/`) holds two files:
- `weights.pt`: the state dict, tensors only (`torch.save` of a dict of tensors), read back with
  `weights_only=True`, which rebuilds tensors and refuses any other pickled object;
- `meta.json`: what rebuilds the architecture (kind, its params section, loss weights, the
  intensity window) and the training facts, as JSON.
Reading them rebuilds the model through the project's own factory (`rebuild_segmenter`), so a
version someone registered on a shared server is data to this process, never code.

MLflow's own clients (`mlflow.pyfunc.load_model`, `mlflow models serve`) reach the same files
through this module as the pyfunc flavor's `loader_module`: `_load_pyfunc` reads them the same
way, and `predict` maps tiles (N, context, H, W) of grey values already normalised to [0, 1]
by the model's window (in the model's metadata) to class probabilities (N, 4, H, W).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xctsam.data.datasets import IntensityWindow
from xctsam.models.base import Segmenter
from xctsam.util.errors import InputError
from xctsam.util.torch_files import load_torch_file

LOADER_MODULE = __name__
DATA_FOLDER = "xctsam"  # the data folder's name inside the MLflow model's data/
WEIGHTS = "weights.pt"
META = "meta.json"
REMEDY = "log it again from its best.pt with this xctsam (`xctsam train` registers every training)"


def write_model_files(folder: Path, state: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Path:
    """`folder` with weights.pt (tensors only) and meta.json; returns it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({name: tensor.detach().cpu().contiguous() for name, tensor in state.items()}, folder / WEIGHTS)
    (folder / META).write_text(json.dumps(dict(meta), indent=1, sort_keys=True, default=str))
    return folder


def _read_meta(path: Path, source: str) -> dict[str, Any]:
    if not path.is_file():
        raise InputError(source, f"holds no {META}: not a segmenter logged by xctsam", REMEDY)
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(source, f"its {META} is not JSON ({exc})", REMEDY) from None
    if not isinstance(meta, dict):
        raise InputError(source, f"its {META} holds a {type(meta).__name__}, not a mapping", REMEDY)
    return meta


def _read_weights(path: Path, source: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise InputError(source, f"holds no {WEIGHTS}: not a segmenter logged by xctsam", REMEDY)
    try:
        state = load_torch_file(path, REMEDY)  # weights_only: a pickled object is refused, not run
    except InputError as exc:  # named by what the user gave, not the download's temporary path
        raise InputError(source, f"its {WEIGHTS} is {exc.problem}", REMEDY) from None
    if not isinstance(state, dict) or not all(isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items()):
        raise InputError(source, f"its {WEIGHTS} is not a state dict of named tensors", REMEDY)
    return state


def read_model_files(folder: Path, source: str) -> tuple[Segmenter, IntensityWindow, dict[str, Any]]:
    """(model in eval mode, its window, its meta) from a folder write_model_files wrote;
    `source` (the URI the user gave) names the model in every refusal."""
    from xctsam.models.factory import rebuild_segmenter

    meta = _read_meta(Path(folder) / META, source)
    state = _read_weights(Path(folder) / WEIGHTS, source)
    return rebuild_segmenter(source, state, meta)


class SegmenterPyfunc:
    """What `mlflow.pyfunc.load_model` wraps: tiles in, class probabilities out."""

    def __init__(self, model: Segmenter, window: IntensityWindow) -> None:
        self.model = model
        self.window = window

    def predict(self, model_input: Any, params: Mapping[str, Any] | None = None) -> np.ndarray:
        tiles = np.asarray(model_input, dtype=np.float32)  # float64 (pandas, JSON) too
        if tiles.ndim == 3:  # one tile without its batch axis
            tiles = tiles[None]
        if tiles.ndim != 4 or tiles.shape[1] != int(self.model.context):
            raise ValueError(f"input of shape {tiles.shape}: expected (N, {self.model.context}, H, W) grey values normalised to [0, 1]")
        with torch.no_grad():
            probabilities = self.model.probabilities(self.model(torch.from_numpy(tiles)))
        return probabilities.float().numpy()


def _load_pyfunc(data_path: str) -> SegmenterPyfunc:
    """MLflow's pyfunc entry point (the flavor's loader_module): the safe read above."""
    model, window, _ = read_model_files(Path(data_path), str(data_path))
    return SegmenterPyfunc(model, window)
