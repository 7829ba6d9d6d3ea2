"""Whole-volume prediction: tiling and Gaussian blending, 2.5D context at the ends, streaming, outputs.

Fake segmenters with exactly predictable outputs stand in for trained models.
"""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F
from torch import nn

from xctsam.config.eval import PredictConfig
from xctsam.data.datasets import IntensityWindow
from xctsam.data.volumes import Volume, write_volume
from xctsam.eval.campaign import predict_file
from xctsam.eval.predict import (
    context_indices,
    gaussian_importance,
    predict_volume,
    tile_starts,
)
from xctsam.eval.writers import write_prediction
from xctsam.models.base import Segmenter
from xctsam.util.errors import InputError

UNIT = IntensityWindow(0.0, 1.0)


# ---------------------------------------------------------------- fake models
class FakeSegmenter(Segmenter):
    """Base of the fakes: one parameter (so .to() and devices work), scores are the outputs."""

    def __init__(self, context: int = 1) -> None:
        super().__init__()
        self.context = context
        self.anchor = nn.Parameter(torch.zeros(()))
        self.modes_seen: set[bool] = set()

    def loss(self, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return outputs.sum() * 0

    def probabilities(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs

    def to_labels(self, probabilities: torch.Tensor) -> torch.Tensor:
        return probabilities.argmax(dim=1)


class QuantiseModel(FakeSegmenter):
    """Labels floor(4 * grey) of one input slice (the centre by default), as one-hot scores."""

    def __init__(self, context: int = 1, channel: int | None = None) -> None:
        super().__init__(context)
        self.channel = context // 2 if channel is None else channel

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.modes_seen.add(self.training)
        labels = (images[:, self.channel] * 4).floor().clamp(0, 3).long()
        return F.one_hot(labels, 4).permute(0, 3, 1, 2).float()


class SoftModel(FakeSegmenter):
    """Pointwise soft scores (a softmax of the grey value): blending must leave them unchanged."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        grey = images[:, :1]
        return torch.softmax(torch.cat([grey * k for k in (0.0, 3.0, -2.0, 1.0)], dim=1), dim=1)


class TileMeanModel(FakeSegmenter):
    """Scores constant over each tile (material = the tile's mean grey): blending is visible."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        mean = images[:, :1].mean(dim=(2, 3), keepdim=True).expand_as(images[:, :1])
        return torch.cat([1 - mean, mean, torch.zeros_like(mean), torch.zeros_like(mean)], dim=1)


def quantise(unit: np.ndarray) -> np.ndarray:
    return np.clip(np.floor(unit * 4), 0, 3).astype(np.uint8)


def predict_all(model: Segmenter, path: Path, config: PredictConfig, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    results = list(predict_volume(model, path, UNIT, config, "cpu", progress=False, **kwargs))
    assert [r.z for r in results] == list(range(len(results)))
    return np.stack([r.labels for r in results]), np.stack([r.probabilities for r in results])


@pytest.fixture
def grey_volume(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """A smooth-ish random volume whose slices are not multiples of the tile (5 x 50 x 70)."""
    rng = np.random.default_rng(0)
    image = rng.random((5, 50, 70)).astype(np.float32)
    path = tmp_path / "grey.h5"
    write_volume(path, image)
    return path, image


# ---------------------------------------------------------------- geometry
def test_tiles_cover_the_slice_with_the_last_one_flush() -> None:
    assert tile_starts(160, 128, 0.25) == [0, 32]
    assert tile_starts(512, 128, 0.25) == [0, 96, 192, 288, 384]
    assert tile_starts(128, 128, 0.5) == [0] and tile_starts(40, 128, 0.5) == [0]
    for size, tile, overlap in [(70, 32, 0.25), (50, 32, 0.5), (257, 64, 0.0)]:
        starts = tile_starts(size, tile, overlap)
        covered = np.zeros(size, bool)
        for start in starts:
            covered[start : start + tile] = True
        assert covered.all() and starts[-1] == size - tile
        assert max(np.diff(starts)) <= int(tile * (1 - overlap))


def test_importance_map_is_a_centred_gaussian_of_sigma_tile_over_8() -> None:
    weights = gaussian_importance(32)
    np.testing.assert_allclose(weights, weights.T)
    np.testing.assert_allclose(weights, weights[::-1, ::-1])
    assert weights.min() > 0 and weights[15, 15] == weights.max()
    # one pixel apart along a row, the ratio is that of a Gaussian of sigma 4 (= 32 / 8)
    ratio = weights[15, 5] / weights[15, 4]
    assert ratio == pytest.approx(np.exp(((4 - 15.5) ** 2 - (5 - 15.5) ** 2) / (2 * 4.0**2)), rel=1e-5)


def test_context_indices_mirror_like_numpy_reflect() -> None:
    np.testing.assert_array_equal(context_indices(4, 3), [[1, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 2]])
    np.testing.assert_array_equal(context_indices(2, 5)[0], np.pad(np.arange(2), 2, mode="reflect")[:5])
    np.testing.assert_array_equal(context_indices(1, 3), [[0, 0, 0]])


# ---------------------------------------------------------------- prediction
@pytest.mark.parametrize("tile,overlap,batch", [(32, 0.25, 3), (32, 0.5, 64), (128, 0.25, 2), (16, 0.0, 1)])
def test_tiled_blended_prediction_equals_the_untiled_one_for_a_pointwise_model(grey_volume, tile: int, overlap: float, batch: int) -> None:
    path, image = grey_volume
    labels, probabilities = predict_all(QuantiseModel(), path, PredictConfig(tile=tile, overlap=overlap, batch=batch))
    np.testing.assert_array_equal(labels, quantise(image))
    assert labels.dtype == np.uint8 and probabilities.shape == (5, 4, 50, 70)

    _, soft = predict_all(SoftModel(), path, PredictConfig(tile=tile, overlap=overlap, batch=batch))
    with torch.no_grad():
        untiled = SoftModel()(torch.from_numpy(image[:, None])).numpy()
    np.testing.assert_allclose(soft, untiled, rtol=1e-5, atol=1e-6)


def test_overlapping_tiles_are_blended_with_gaussian_weights(grey_volume) -> None:
    path, image = grey_volume
    tile, config = 32, PredictConfig(tile=32, overlap=0.5, batch=5)
    _, probabilities = predict_all(TileMeanModel(), path, config)

    weights = gaussian_importance(tile).astype(np.float64)
    ys, xs = tile_starts(50, tile, 0.5), tile_starts(70, tile, 0.5)
    for z in (0, 4):
        numerator, denominator = np.zeros((50, 70)), np.zeros((50, 70))
        for y in ys:
            for x in xs:
                numerator[y : y + tile, x : x + tile] += weights * image[z, y : y + tile, x : x + tile].mean()
                denominator[y : y + tile, x : x + tile] += weights
        np.testing.assert_allclose(probabilities[z, 1], numerator / denominator, rtol=1e-4)
    # the corner pixel is covered by one tile only: exactly that tile's mean
    assert probabilities[2, 1, 0, 0] == pytest.approx(image[2, :tile, :tile].mean(), rel=1e-5)


def test_slices_smaller_than_a_tile_are_reflect_padded(grey_volume) -> None:
    path, image = grey_volume
    labels, probabilities = predict_all(QuantiseModel(), path, PredictConfig(tile=96, overlap=0.25, batch=2))
    np.testing.assert_array_equal(labels, quantise(image))
    _, means = predict_all(TileMeanModel(), path, PredictConfig(tile=96, overlap=0.25, batch=2))
    padded = np.pad(image[3], ((0, 46), (0, 26)), mode="reflect")
    assert means[3, 1, 0, 0] == pytest.approx(padded.mean(), rel=1e-5)


@pytest.mark.parametrize("context,channel", [(3, 0), (3, 2), (5, 0), (5, 4), (7, 1)])
def test_context_neighbours_are_mirrored_at_the_volume_ends(tmp_path: Path, context: int, channel: int) -> None:
    # slice z holds grey (z + 0.5) / 4, so a model labelling one neighbour reveals which it saw
    n_slices = 4
    image = np.repeat(((np.arange(n_slices) + 0.5) / 4)[:, None, None], 20, axis=1).repeat(24, axis=2).astype(np.float32)
    write_volume(tmp_path / "steps.h5", image)
    labels, _ = predict_all(QuantiseModel(context, channel), tmp_path / "steps.h5", PredictConfig(tile=16, overlap=0.25, batch=3))
    source = np.pad(np.arange(n_slices), context // 2, mode="reflect")
    expected = source[np.arange(n_slices) + channel]
    np.testing.assert_array_equal(labels[:, 0, 0], expected)
    assert (labels == labels[:, :1, :1]).all()


def test_transform_applies_once_per_slice_to_normalised_input_and_is_clipped(grey_volume) -> None:
    path, image = grey_volume
    calls: list[float] = []

    def invert(unit: np.ndarray) -> np.ndarray:
        calls.append(float(unit.max()))
        return 1.0 - unit

    config = PredictConfig(tile=32, overlap=0.25, batch=4)
    labels, _ = predict_all(QuantiseModel(context=3), path, config, transform=invert)
    np.testing.assert_array_equal(labels, quantise(1.0 - image))
    assert len(calls) == image.shape[0] and max(calls) <= 1.0  # each slice once, already in [0, 1]

    _, bright = predict_all(TileMeanModel(), path, config, transform=lambda unit: unit + 5.0)
    np.testing.assert_allclose(bright[:, 1], 1.0)  # the model saw inputs clipped to 1, not 5..6
    with pytest.raises(ValueError, match="shape"):
        predict_all(QuantiseModel(), path, config, transform=lambda unit: unit[:10])


def test_window_maps_grey_values_before_the_model(tmp_path: Path, grey_volume) -> None:
    _, image = grey_volume
    write_volume(tmp_path / "scanner.h5", 1000.0 + 500.0 * image)
    window = IntensityWindow(1000.0, 1500.0)
    results = list(predict_volume(QuantiseModel(), tmp_path / "scanner.h5", window, PredictConfig(tile=32), "cpu", progress=False))
    np.testing.assert_array_equal(np.stack([r.labels for r in results]), quantise(window.normalise(1000.0 + 500.0 * image)))


def test_model_runs_in_eval_mode_and_gets_its_mode_back(grey_volume) -> None:
    model = QuantiseModel()
    model.train()
    predict_all(model, grey_volume[0], PredictConfig(tile=32))
    assert model.modes_seen == {False} and model.training


def test_even_context_is_refused(grey_volume) -> None:
    with pytest.raises(ValueError, match="odd"):
        predict_all(QuantiseModel(context=2, channel=0), grey_volume[0], PredictConfig(tile=32))


# ---------------------------------------------------------------- memory
def _peak_bytes(path: Path, keep: bool) -> int:
    """tracemalloc peak (numpy buffers included) while predicting `path`, outputs kept or dropped."""
    kept = []
    tracemalloc.start()
    try:
        for prediction in predict_volume(QuantiseModel(context=3), path, UNIT, PredictConfig(tile=32, overlap=0.25, batch=4), "cpu", progress=False):
            if keep:
                kept.append(prediction)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_peak_memory_does_not_grow_with_the_number_of_slices(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for n_slices in (8, 32):
        write_volume(tmp_path / f"z{n_slices}.h5", rng.random((n_slices, 64, 64)).astype(np.float32))
    short, long = (_peak_bytes(tmp_path / f"z{n}.h5", keep=False) for n in (8, 32))
    # Control: keeping every slice's output does grow with the slices, so the probe can see growth.
    short_kept, long_kept = (_peak_bytes(tmp_path / f"z{n}.h5", keep=True) for n in (8, 32))
    print(f"peak streamed: {short} B (8 slices), {long} B (32); outputs kept: {short_kept} B, {long_kept} B")
    slice_bytes = 64 * 64 * 4
    assert long - short < 2 * slice_bytes  # 24 more slices, not even 2 slices' worth more memory
    assert long_kept > 2.5 * short_kept


# ---------------------------------------------------------------- outputs
@pytest.mark.parametrize("name", ["pred.h5", "pred.tiff"])
def test_outputs_round_trip(tmp_path: Path, grey_volume, name: str) -> None:
    path, image = grey_volume
    out = predict_file(QuantiseModel(), path, UNIT, PredictConfig(tile=32), tmp_path / name, device="cpu", attrs={"model": "fake"}, progress=False)
    if name.endswith(".h5"):
        with Volume(out) as written:
            np.testing.assert_array_equal(written.labels(), quantise(image))
            np.testing.assert_array_equal(written.image(), image)
            assert written.attrs["model"] == "fake" and written.attrs["source"] == str(path)
            assert written.attrs["predict"]["tile"] == 32
        with h5py.File(out) as raw:
            assert raw["labels"].chunks == (1, 50, 70)
    else:
        np.testing.assert_array_equal(tifffile.imread(out), quantise(image))
        with tifffile.TiffFile(out) as tif:
            assert len(tif.pages) == 5 and tif.pages[0].dtype == np.uint8
            assert tif.is_imagej and tif.series[0].axes == "ZYX"  # opens as a stack in ImageJ/Fiji
            assert json.loads(tif.imagej_metadata["Info"])["model"] == "fake"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["grey.h5", name])  # no temp file left


def test_failed_prediction_leaves_no_output(tmp_path: Path, grey_volume) -> None:
    path, _ = grey_volume

    def broken(predictions):
        for prediction in predictions:
            if prediction.z == 3:
                raise RuntimeError("interrupted")
            yield prediction

    for name in ("pred.h5", "pred.tif"):
        with Volume(path) as source, pytest.raises(RuntimeError, match="interrupted"):
            write_prediction(broken(predict_volume(QuantiseModel(), source, UNIT, PredictConfig(tile=32), "cpu", progress=False)), tmp_path / name, source)
        assert not (tmp_path / name).exists()
    assert [p.name for p in tmp_path.iterdir()] == ["grey.h5"]


def test_out_of_order_or_missing_slices_are_refused(tmp_path: Path, grey_volume) -> None:
    path, image = grey_volume
    labels = quantise(image)
    with Volume(path) as source:
        with pytest.raises(ValueError, match="slice 1 arrived"):
            write_prediction([(0, labels[0]), (1, labels[1])][::-1], tmp_path / "a.h5", source)
        with pytest.raises(ValueError, match="2 predicted slices"):
            write_prediction([(0, labels[0]), (1, labels[1])], tmp_path / "b.tif", source)
        with pytest.raises(InputError, match="unknown output format"):
            write_prediction([], tmp_path / "c.png", source)


@pytest.mark.parametrize("channel", [0, 2])  # a neighbour below, a neighbour above: context is read
def test_predicting_chosen_slices_gives_the_whole_volume_labels_there(grey_volume: tuple[Path, np.ndarray], channel: int) -> None:
    path, _ = grey_volume
    model = QuantiseModel(context=3, channel=channel)
    whole, _ = predict_all(model, path, PredictConfig(tile=32))
    chosen = list(predict_volume(model, path, UNIT, PredictConfig(tile=32), "cpu", progress=False, slices=[4, 0, 2]))
    assert [p.z for p in chosen] == [0, 2, 4]
    for prediction in chosen:
        np.testing.assert_array_equal(prediction.labels, whole[prediction.z])
    with pytest.raises(ValueError, match="outside 0..4"):
        list(predict_volume(model, path, UNIT, PredictConfig(tile=32), "cpu", progress=False, slices=[5]))
