"""`xctsam export`: a trained segmenter as ONNX, to run without xctsam or PyTorch.

The graph maps a batch of normalised tiles (B, context, tile, tile) in [0, 1] to
(probabilities (B, 4, tile, tile), labels (B, tile, tile)); the batch is dynamic, the tile fixed
(SAM's encoder resizes to its own input size either way). The ONNX file's metadata says what a
user needs around it: `xctsam.window` (the grey window to normalise with, JSON), `xctsam.context`,
`xctsam.tile`, `xctsam.temperature` (the calibration built into the graph), `xctsam.labelling` (how overlapping tiles' blended probabilities become labels:
argmax, or painting for one binary model per class) and `xctsam.meta` (the checkpoint's).

Written with torch's dynamo exporter (torch.export, then onnxscript). Conv-LoRA is not merged
into SAM's qkv weights: its bottleneck runs through convolution experts, which no single
matrix can stand for; the graph keeps it as trained (every expert run densely, weighted by the
router's choice: the same sum as training's sparse dispatch).

`OnnxSegmenter` runs such a file with onnxruntime behind the `Segmenter` interface, so
`xctsam predict --model model.onnx` (tiling, blending, every input and output format) and the
test that checks an export against its original use it unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from xctsam.data.datasets import IntensityWindow
from xctsam.models.base import Segmenter
from xctsam.models.losses import LABELLINGS
from xctsam.util.atomic import atomic_path
from xctsam.util.errors import InputError

PREFIX = "xctsam."


class _Exported(nn.Module):
    """forward + probabilities + labels of one model, the graph the ONNX file holds."""

    def __init__(self, model: Segmenter, temperature: float) -> None:
        super().__init__()
        self.model = model
        self.temperature = temperature

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = self.model(images)
        probabilities = self.model.probabilities(outputs if self.temperature == 1.0 else outputs / self.temperature)
        return probabilities, self.model.to_labels(probabilities)


def export_onnx(model: Segmenter, window: IntensityWindow, meta: dict[str, Any], out: Path, tile: int, temperature: float = 1.0) -> Path:
    """Write `model` as ONNX to `out` (atomically), with the metadata described above; its logits
    are divided by `temperature` (predict.temperature) inside the graph."""
    import onnx

    model = model.cpu().eval()
    example = torch.rand(2, int(model.context), tile, tile, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        program = torch.onnx.export(
            _Exported(model, temperature), (example,), dynamo=True, input_names=["images"], output_names=["probabilities", "labels"],
            dynamic_shapes={"images": {0: torch.export.Dim("batch")}}, verbose=False,
        )
    proto = program.model_proto
    facts = {"window": json.dumps(window.to_dict()), "context": str(model.context), "tile": str(tile), "labelling": model.labelling, "temperature": str(temperature), "meta": json.dumps(meta, default=str)}
    for key, value in facts.items():
        proto.metadata_props.add(key=PREFIX + key, value=value)
    with atomic_path(Path(out)) as tmp:
        onnx.save(proto, str(tmp))
    return Path(out)


class OnnxSegmenter(Segmenter):
    """An exported model run by onnxruntime (CPU), for prediction only."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        import onnxruntime

        try:
            self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own types for unreadable files
            raise InputError(path, f"not a readable ONNX model ({str(exc).splitlines()[0][:200]})", "export it again with `xctsam export`") from None
        facts = {key.removeprefix(PREFIX): value for key, value in self.session.get_modelmeta().custom_metadata_map.items() if key.startswith(PREFIX)}
        if {"window", "context", "tile", "labelling"} - set(facts):
            raise InputError(path, "is an ONNX model without xctsam's metadata", "export it with `xctsam export`")
        self.context = int(facts["context"])
        self.fixed_tile = int(facts["tile"])
        self.labelling = facts["labelling"]
        self.window = IntensityWindow(**json.loads(facts["window"]))
        self.meta = json.loads(facts.get("meta", "{}"))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if tuple(images.shape[-2:]) != (self.fixed_tile, self.fixed_tile):
            raise ValueError(f"the exported model takes {self.fixed_tile} x {self.fixed_tile} tiles, got {tuple(images.shape[-2:])}: predict with tile {self.fixed_tile}")
        probabilities, _ = self.session.run(None, {"images": images.detach().cpu().numpy().astype(np.float32, copy=False)})
        return torch.from_numpy(probabilities)

    def probabilities(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs  # the graph ends in probabilities already

    def to_labels(self, probabilities: torch.Tensor) -> torch.Tensor:
        return LABELLINGS[self.labelling](probabilities)

    def loss(self, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("an exported model is for prediction; train the checkpoint it came from")


def load_onnx(path: Path) -> tuple[OnnxSegmenter, IntensityWindow, dict[str, Any]]:
    """(model, its intensity window, its meta) of an exported file, as load_segmenter gives."""
    if not Path(path).is_file():
        raise InputError(path, "no such ONNX model", "export one with `xctsam export`")
    model = OnnxSegmenter(Path(path))
    return model, model.window, {**model.meta, "kind": model.meta.get("kind", "onnx")}
