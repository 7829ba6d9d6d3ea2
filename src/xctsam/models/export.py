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

`OnnxSegmenter` runs such a file with onnxruntime behind the `Segmenter` interface (every
metadata value parsed and checked against the graph's shapes when it is opened), so
`xctsam predict --model model.onnx` (tiling, blending, every input and output format) and the
test that checks an export against its original use it unchanged.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from xctsam import CLASS_NAMES, NUM_CLASSES
from xctsam.data.datasets import IntensityWindow
from xctsam.models.base import Segmenter
from xctsam.models.losses import LABELLINGS
from xctsam.util.atomic import atomic_path
from xctsam.util.errors import InputError

PREFIX = "xctsam."
REMEDY = "export it again with `xctsam export`"
REQUIRED = ("window", "context", "tile", "labelling")  # older exports may lack temperature and meta


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
            _Exported(model, temperature).eval(), (example,), dynamo=True, input_names=["images"], output_names=["probabilities", "labels"],
            dynamic_shapes={"images": {0: torch.export.Dim("batch")}}, verbose=False,
        )
    proto = program.model_proto
    facts = {"window": json.dumps(window.to_dict()), "context": str(model.context), "tile": str(tile), "labelling": model.labelling, "temperature": str(temperature), "meta": json.dumps(meta, default=str)}
    for key, value in facts.items():
        proto.metadata_props.add(key=PREFIX + key, value=value)
    with atomic_path(Path(out)) as tmp:
        onnx.save(proto, str(tmp))
    return Path(out)


def _shown(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:40] + "...")


def _positive_int(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise ValueError(f"is {_shown(text)}, not a positive whole number")
    return int(text)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"is {_shown(text)}, not a positive finite number")
    return value


def _labelling(text: str) -> str:
    if text not in LABELLINGS:
        raise ValueError(f"is {_shown(text)}, not one of {', '.join(LABELLINGS)}")
    return text


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"is not JSON ({exc.msg} at character {exc.pos})") from None


def _json_object(text: str) -> dict[str, Any]:
    value = _json(text)
    if not isinstance(value, dict):
        raise ValueError(f"is a JSON {type(value).__name__}, not an object")
    return value


def _window(text: str) -> IntensityWindow:
    return IntensityWindow.from_dict(_json(text))  # InvalidWindow is a ValueError saying what is wrong


# each metadata value's reader: a ValueError whose message reads after "metadata xctsam.<key> "
READERS: dict[str, Callable[[str], Any]] = {
    "window": _window, "context": _positive_int, "tile": _positive_int, "labelling": _labelling,
    "temperature": _positive_float, "meta": _json_object,
}


def _open_session(path: Path) -> Any:
    import onnxruntime

    try:
        return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own types for unreadable files
        raise InputError(path, f"not a readable ONNX model ({str(exc).splitlines()[0][:200]})", REMEDY) from None


def _read_metadata(path: Path, stored: dict[str, str]) -> dict[str, Any]:
    """xctsam's metadata values of an ONNX file, each parsed and validated; InputError naming the key."""
    facts = {key.removeprefix(PREFIX): value for key, value in stored.items() if key.startswith(PREFIX)}
    if set(REQUIRED) - set(facts):
        raise InputError(path, "is an ONNX model without xctsam's metadata", "export it with `xctsam export`")
    read = {}
    for key, reader in READERS.items():
        if key in facts:
            try:
                read[key] = reader(facts[key])
            except ValueError as exc:
                raise InputError(path, f"metadata {PREFIX}{key} {exc}", REMEDY) from None
    return read


def _sizes_problem(name: str, shape: list[Any], expected: dict[int, tuple[int, str]]) -> str | None:
    """Why a graph's input or output `shape` differs from the sizes its metadata implies
    ({axis: (size, what the size is)}); None when they agree. A symbolic or unknown size passes
    only for the tile's axes (a graph may take any tile), never for channels or classes."""
    if len(shape) != 4:
        return f"the graph's {name} has {len(shape)} dimensions {shape}, not 4 (batch, channels, tile, tile)"
    for axis, (size, what) in expected.items():
        found = shape[axis]
        if found != size and (axis == 1 or isinstance(found, int)):
            return f"the graph's {name} has {found!r} {what} (shape {shape})"
    return None


def _check_graph(path: Path, session: Any, context: int, tile: int) -> None:
    """InputError unless the graph takes (batch, context, tile, tile) float images and gives
    (batch, NUM_CLASSES, tile, tile) probabilities first: metadata that disagrees with its graph
    would fail mid-prediction, or (a graph of one class) label every voxel background."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if [graph_input.name for graph_input in inputs] != ["images"] or inputs[0].type != "tensor(float)":
        raise InputError(path, f"the graph takes {[(i.name, i.type) for i in inputs]}, not one float input named images", REMEDY)
    if not outputs:
        raise InputError(path, "the graph has no outputs", REMEDY)
    tiles = {2: (tile, f"rows where metadata {PREFIX}tile says {tile}"), 3: (tile, f"columns where metadata {PREFIX}tile says {tile}")}
    channels = {1: (context, f"channels where metadata {PREFIX}context says {context}")}
    classes = {1: (NUM_CLASSES, f"classes, not xctsam's {NUM_CLASSES} ({', '.join(CLASS_NAMES)})")}
    problem = _sizes_problem("input images", inputs[0].shape, channels | tiles) or _sizes_problem(f"output {outputs[0].name}", outputs[0].shape, classes | tiles)
    if problem is not None:
        raise InputError(path, problem, REMEDY)


class OnnxSegmenter(Segmenter):
    """An exported model run by onnxruntime (CPU), for prediction only; its metadata and the
    graph's shapes are checked when it is opened, so a file that cannot predict is refused
    before any scan is read."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.session = _open_session(path)
        facts = _read_metadata(path, self.session.get_modelmeta().custom_metadata_map)
        _check_graph(path, self.session, facts["context"], facts["tile"])
        self.context = facts["context"]
        self.fixed_tile = facts["tile"]
        self.labelling = facts["labelling"]
        self.window = facts["window"]
        self.meta = facts.get("meta", {})

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
