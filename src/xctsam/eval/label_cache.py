"""Predicted labels of whole volumes, kept between stages so a model segments a volume once.

evaluate, evaluate_ablation, forgetting, robustness (its clean level) and the report's
overlays all segment the same test volumes with the same trained models; each of them used to
run the model again (the SAM-GAN model went over every test volume four times per `dvc repro`).
Here the labels of an untransformed whole-volume prediction are stored under a key of
everything that determines them:

- the model: class, context and a digest of its state dict (weights and buffers);
- the volume file's sha256;
- the intensity window, the predict params, the device type and the torch version
  (CUDA's mixed precision and another torch can change a few labels).

One file per key, `<cache>/labels/<key>.npy` (uint8, Z x Y x X): written slice by slice to a
temporary name while the prediction streams and renamed once the last slice is in, read back
memory-mapped, so memory stays flat in depth either way. A file that cannot be read as the
expected array is ignored and predicted again.

The cache folder is `.xctsam-cache/` in the project (the folder holding params.yaml or
dvc.yaml; for DVC's temporary experiment copies, the project they were copied from, as for
the MLflow store); XCTSAM_CACHE_DIR moves it, and XCTSAM_CACHE_DIR=off turns caching off. Nothing
removes old entries: delete the folder to reclaim the space.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from xctsam.config.eval import PredictConfig
from xctsam.data.datasets import IntensityWindow
from xctsam.data.volumes import Volume
from xctsam.eval.predict import predict_volume
from xctsam.models.base import Segmenter
from xctsam.util.atomic import atomic_path
from xctsam.util.device import pick_device
from xctsam.util.hashing import file_sha256, fingerprint
from xctsam.util.tracking import outside_dvc_temp, project_root

CACHE_ENV = "XCTSAM_CACHE_DIR"
CACHE_OFF = "off"
DEFAULT_FOLDER = ".xctsam-cache"
KEY_FORMAT = "xctsam.labels/1"


def model_digest(model: Segmenter) -> str:
    """sha256 over the names, dtypes, shapes and bytes of the model's state dict, in order."""
    digest = hashlib.sha256(f"{type(model).__qualname__}/{model.context}".encode())
    for name, tensor in model.state_dict().items():
        plain = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{plain.dtype}:{tuple(plain.shape)}".encode())
        digest.update(plain.reshape(-1).view(torch.uint8).numpy())  # raw bytes, any dtype (bf16 too)
    return digest.hexdigest()


def default_folder() -> Path | None:
    """Where the cache lives (XCTSAM_CACHE_DIR, else the project's .xctsam-cache); None when off."""
    chosen = os.environ.get(CACHE_ENV)
    if chosen is not None and chosen.strip().lower() in (CACHE_OFF, ""):
        return None
    return Path(chosen) if chosen else outside_dvc_temp(project_root()) / DEFAULT_FOLDER


class LabelCache:
    """Whole-volume labels by model, volume, window and predict params (see the module docstring).

    One instance serves one stage: it remembers the digests of the models it has seen, so a
    model's weights are hashed once, not once per volume.
    """

    def __init__(self, folder: Path | None) -> None:
        self.folder = None if folder is None else Path(folder) / "labels"
        self._digests: dict[Segmenter, str] = {}  # modules hash by identity

    @classmethod
    def default(cls) -> LabelCache:
        return cls(default_folder())

    def _model_digest(self, model: Segmenter) -> str:
        if model not in self._digests:
            self._digests[model] = model_digest(model)
        return self._digests[model]

    def path(self, model: Segmenter, volume: Volume, window: IntensityWindow, config: PredictConfig, device: torch.device) -> Path | None:
        if self.folder is None:
            return None
        key = fingerprint(
            KEY_FORMAT, self._model_digest(model), file_sha256(volume.path), window.to_dict(),
            config.model_dump(mode="json"), device.type, torch.__version__,
        )
        return self.folder / f"{key}.npy"

    def lookup(self, model: Segmenter, volume: Volume, window: IntensityWindow, config: PredictConfig, device: torch.device | str | None = None) -> np.ndarray | None:
        """The stored (Z, Y, X) labels of this prediction, memory-mapped; None if not stored."""
        path = self.path(model, volume, window, config, _device(device))
        return None if path is None else _read(path, volume.shape)

    def predictions(self, model: Segmenter, volume: Volume, window: IntensityWindow, config: PredictConfig, device: torch.device | str | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """(z, labels) of every slice in order: read back if stored, else predicted and stored."""
        device = _device(device)
        path = self.path(model, volume, window, config, device)
        stored = None if path is None else _read(path, volume.shape)
        if stored is not None:
            for z in range(volume.n_slices):
                yield z, np.asarray(stored[z])
            return
        predicted = ((z, labels) for z, labels, _ in predict_volume(model, volume, window, config, device, progress=False))
        if path is None:
            yield from predicted
            return
        # a consumer that stops early (an error, Ctrl-C) closes this generator: atomic_path
        # then removes the temporary file and the cache holds nothing half-written
        with atomic_path(path) as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=volume.shape)
            for z, labels in predicted:
                out[z] = labels
                yield z, labels
            out.flush()
            del out


def _device(device: torch.device | str | None) -> torch.device:
    return torch.device(device) if device is not None else pick_device()


def _read(path: Path, shape: tuple[int, int, int]) -> np.ndarray | None:
    if not path.is_file():
        return None
    try:
        stored = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return None
    if stored.dtype != np.uint8 or stored.shape != tuple(shape):
        return None
    return stored
