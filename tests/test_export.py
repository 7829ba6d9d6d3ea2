"""`xctsam export`: an ONNX file that labels a volume as its checkpoint does, for both models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import yaml

from tests.conftest import write_params
from tests.test_bad_input_data import xctsam
from xctsam.config.params import load_params
from xctsam.data.datasets import IntensityWindow
from xctsam.data.volumes import write_volume
from xctsam.models.checkpoint import save_segmenter_checkpoint
from xctsam.models.export import OnnxSegmenter
from xctsam.models.factory import build_segmenter, model_meta
from xctsam.models.registry import load_model

REPO = Path(__file__).resolve().parents[1]
TILE = 32


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Untrained tiny checkpoints whose outputs still vary with the input: a 2.5D U-Net and a
    per-class (painting) small SAM with Conv-LoRA and its refinement head."""
    folder = tmp_path_factory.mktemp("export")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["sam"].update({"checkpoint": None, "layout": "per_class", "refine": {"channels": 4, "layers": 1}})
    raw["sam"]["small"] = {"embed_dim": 32, "depth": 2, "num_heads": 2, "global_attn_indexes": [1], "window_size": 4}
    raw["sam"]["lora"].update({"rank": 2, "experts": 2})
    raw["unet"] = {"context": 3, "filters": 4, "depth": 2}
    raw["predict"] = {"tile": TILE, "overlap": 0.25, "batch": 4}
    params = load_params(write_params(folder / "params.yaml", raw))
    paths = {}
    torch.manual_seed(0)
    for kind in ("unet", "sam"):
        model = build_segmenter(kind, getattr(params, kind), getattr(params.train, kind))
        for parameter in model.parameters():  # zero-initialised heads (LoRA B, refine out) would hide the adapters
            if parameter.requires_grad:
                torch.nn.init.normal_(parameter, std=0.2)
        paths[kind] = folder / f"{kind}.pt"
        save_segmenter_checkpoint(paths[kind], model, model_meta(kind, getattr(params, kind), getattr(params.train, kind), IntensityWindow(0.0, 2.0)), {"step": 0})
    paths["params"] = folder / "params.yaml"
    return paths


@pytest.fixture(scope="module")
def exported(checkpoints: dict[str, Path]) -> dict[str, Path]:
    """Each checkpoint exported once, through the command."""
    folder = checkpoints["params"].parent
    files = {}
    for kind in ("unet", "sam"):
        files[kind] = folder / f"{kind}.onnx"
        done = xctsam("export", "--model", checkpoints[kind], "--out", files[kind], "--params", checkpoints["params"], cwd=folder)
        assert done.returncode == 0, done.stderr
    return files


@pytest.mark.parametrize("kind", ["unet", "sam"])
def test_the_exported_graph_gives_the_checkpoints_probabilities_and_metadata(checkpoints: dict[str, Path], exported: dict[str, Path], kind: str) -> None:
    model, window, _ = load_model(checkpoints[kind])
    graph = OnnxSegmenter(exported[kind])
    assert (graph.context, graph.fixed_tile, graph.labelling) == (model.context, TILE, "paint" if kind == "sam" else "argmax")
    assert graph.window == window and graph.meta["kind"] == kind
    images = torch.rand(3, model.context, TILE, TILE, generator=torch.Generator().manual_seed(1))  # not the export's batch of 2
    with torch.no_grad():
        expected = model.probabilities(model(images))
    got = graph.probabilities(graph(images))
    assert expected.std() > 1e-3  # the outputs vary: a constant model would pass trivially
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["unet", "sam"])
def test_predicting_with_the_export_labels_a_volume_as_the_checkpoint_does(tmp_path: Path, checkpoints: dict[str, Path], exported: dict[str, Path], kind: str) -> None:
    volume = tmp_path / "scan.h5"
    write_volume(volume, np.random.default_rng(2).random((4, 40, 52)).astype(np.float32) * 2)
    for model, out in ((checkpoints[kind], "original.tif"), (exported[kind], "exported.tif")):
        done = xctsam("predict", volume, "--model", model, "--out", tmp_path / out, "--params", checkpoints["params"], cwd=tmp_path)
        assert done.returncode == 0, done.stderr
    original, from_export = tifffile.imread(tmp_path / "original.tif"), tifffile.imread(tmp_path / "exported.tif")
    assert len(np.unique(original)) > 1
    assert np.mean(original == from_export) > 0.999  # float rounding may flip a voxel on a tie


def test_an_export_never_overwrites_a_file(tmp_path: Path, checkpoints: dict[str, Path], exported: dict[str, Path]) -> None:
    before = exported["unet"].read_bytes()
    again = xctsam("export", "--model", checkpoints["unet"], "--out", exported["unet"], "--params", checkpoints["params"], cwd=tmp_path)
    assert again.returncode == 2 and "exists" in again.stderr
    assert exported["unet"].read_bytes() == before


def test_a_file_that_is_not_an_export_is_one_line(tmp_path: Path, checkpoints: dict[str, Path]) -> None:
    bogus = tmp_path / "bogus.onnx"
    bogus.write_bytes(b"not onnx")
    volume = tmp_path / "scan.h5"
    write_volume(volume, np.zeros((2, 16, 16), np.float32))
    result = xctsam("predict", volume, "--model", bogus, "--out", tmp_path / "x.tif", "--params", checkpoints["params"], cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.startswith(f"error: {bogus}: not a readable ONNX model"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "x.tif").exists()
