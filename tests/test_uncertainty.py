"""Test-time augmentation, tri-planar fusion, the uncertainty map beside predictions, and
calibration error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from tests.test_bad_input_data import TinyModel, predict_args, tiny_model, xctsam  # noqa: F401 (fixture)
from tests.test_predict import UNIT, FakeSegmenter, QuantiseModel, SoftModel, predict_all
from xctsam.config.eval import PredictConfig
from xctsam.data.volumes import write_volume
from xctsam.eval.campaign import predict_file
from xctsam.eval.uncertainty import calibration_error, normalised_entropy
from xctsam.eval.writers import uncertainty_path


class RampModel(FakeSegmenter):
    """Material probability rises left to right across every tile, whatever the input: not
    mirror-equivariant, so mirrored views disagree and their average is 1/2 everywhere."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        width = images.shape[-1]
        ramp = torch.linspace(0.0, 1.0, width).expand_as(images[:, :1])
        zeros = torch.zeros_like(ramp)
        return torch.cat([1 - ramp, ramp, zeros, zeros], dim=1)


@pytest.fixture
def volume(tmp_path: Path) -> Path:
    path = tmp_path / "grey.h5"
    write_volume(path, np.random.default_rng(0).random((3, 40, 48)).astype(np.float32))
    return path


def test_flip_tta_leaves_a_mirror_equivariant_model_unchanged(volume: Path) -> None:
    for model in (QuantiseModel(), SoftModel()):
        plain = predict_all(model, volume, PredictConfig(tile=32))
        mirrored = predict_all(model, volume, PredictConfig(tile=32, tta="flips"))
        np.testing.assert_array_equal(plain[0], mirrored[0])
        np.testing.assert_allclose(plain[1], mirrored[1], atol=1e-6)


def test_flip_tta_averages_the_mirrored_views(volume: Path) -> None:
    _, plain = predict_all(RampModel(), volume, PredictConfig(tile=48, overlap=0.0))
    _, mirrored = predict_all(RampModel(), volume, PredictConfig(tile=48, overlap=0.0, tta="flips"))
    assert np.ptp(plain[:, 1]) > 0.9  # the ramp itself
    np.testing.assert_allclose(mirrored[:, 1], 0.5, atol=1e-6)  # its mirror images averaged out


def test_tri_planar_fusion_leaves_a_pointwise_model_unchanged(volume: Path) -> None:
    from tests.test_predict import QuantiseModel

    for context in (1, 3):
        plain = predict_all(QuantiseModel(context=context), volume, PredictConfig(tile=32))
        fused = predict_all(QuantiseModel(context=context), volume, PredictConfig(tile=32, planes=["z", "y", "x"]))
        np.testing.assert_array_equal(plain[0], fused[0])
        np.testing.assert_allclose(plain[1], fused[1], atol=1e-6)


def test_tri_planar_fusion_averages_the_three_orientations(volume: Path) -> None:
    """The ramp runs along each pass's in-plane x: X for the z and y passes, Y for the x pass."""
    _, fused = predict_all(RampModel(), volume, PredictConfig(tile=48, overlap=0.0, planes=["z", "y", "x"]))
    depth, height, width = fused.shape[0], fused.shape[2], fused.shape[3]
    ramp_x = np.linspace(0, 1, 48)[:width]  # one 48-wide tile covers x (reflect-padded)
    ramp_y = np.linspace(0, 1, 48)[:height]
    expected = (2 * ramp_x[None, None, :] + ramp_y[None, :, None]) / 3
    np.testing.assert_allclose(fused[:, 1], np.broadcast_to(expected, (depth, height, width)), atol=1e-5)


def test_planes_are_each_named_once() -> None:
    with pytest.raises(ValueError, match="planes"):
        PredictConfig(planes=["z", "z"])
    with pytest.raises(ValueError, match="planes"):
        PredictConfig(planes=[])


def test_entropy_is_zero_for_certainty_and_one_for_ignorance() -> None:
    one_hot = np.zeros((4, 2, 3), np.float32)
    one_hot[1] = 1
    np.testing.assert_allclose(normalised_entropy(one_hot), 0.0, atol=1e-6)
    np.testing.assert_allclose(normalised_entropy(np.full((4, 2, 3), 0.25, np.float32)), 1.0, atol=1e-6)
    half = np.array([0.5, 0.5, 0.0, 0.0], np.float32)[:, None]
    np.testing.assert_allclose(normalised_entropy(half), [0.5], atol=1e-6)  # log 2 / log 4


def test_the_uncertainty_map_is_written_beside_the_labels(tmp_path: Path, volume: Path) -> None:
    out = predict_file(SoftModel(), volume, UNIT, PredictConfig(tile=32), tmp_path / "p.zarr", device="cpu", progress=False, uncertainty=True)
    side = uncertainty_path(out)
    assert side == tmp_path / "p.uncertainty.tif"
    _, probabilities = predict_all(SoftModel(), volume, PredictConfig(tile=32))
    expected = np.stack([np.round(normalised_entropy(p) * 255).astype(np.uint8) for p in probabilities])
    with tifffile.TiffFile(side) as tif:
        assert tif.series[0].shape == (3, 40, 48) and tif.series[0].axes == "ZYX"
        np.testing.assert_array_equal(tif.asarray(), expected)


def test_the_command_writes_the_uncertainty_map_on_request(tmp_path: Path, volume: Path, tiny_model: TinyModel) -> None:  # noqa: F811
    plain = xctsam(*predict_args(tiny_model, volume, tmp_path / "a.tif"), cwd=tmp_path)
    asked = xctsam(*predict_args(tiny_model, volume, tmp_path / "b.tif"), "--uncertainty", cwd=tmp_path)
    assert plain.returncode == 0 and asked.returncode == 0, (plain.stderr, asked.stderr)
    assert not (tmp_path / "a.uncertainty.tif").exists()
    assert tifffile.imread(tmp_path / "b.uncertainty.tif").shape == (3, 40, 48)


def test_calibration_error_is_near_zero_when_calibrated_and_the_gap_when_overconfident() -> None:
    rng = np.random.default_rng(0)
    p = rng.random(200_000).astype(np.float32)
    truth = (rng.random(p.size) < p).astype(np.int64)  # the class is present with probability p
    calibrated = np.stack([1 - p, p])
    assert calibration_error(calibrated, truth, cls=1) < 0.01
    sure = np.stack([np.full(p.size, 0.1, np.float32), np.full(p.size, 0.9, np.float32)])
    coin = (rng.random(p.size) < 0.5).astype(np.int64)
    assert calibration_error(sure, coin, cls=1) == pytest.approx(0.4, abs=0.01)
