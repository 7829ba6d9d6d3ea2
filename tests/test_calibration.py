"""Temperature scaling: the fit recovers a known temperature, prediction applies it, labels by
argmax do not move, and `xctsam calibrate` reports it with the calibration error."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_predict import UNIT, FakeSegmenter, predict_all
from xctsam.config.eval import PredictConfig
from xctsam.data.volumes import write_volume
from xctsam.train.calibration import fit_temperature, negative_log_likelihood


class LogitModel(FakeSegmenter):
    """Pointwise logits of the grey value, probabilities by softmax (a multi-class head)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        grey = images[:, :1]
        return torch.cat([grey * k for k in (0.0, 6.0, -4.0, 2.0)], dim=1)

    def probabilities(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs.float().softmax(dim=1)


@pytest.mark.parametrize("true_temperature", [0.5, 2.0])
def test_the_fit_recovers_the_temperature_the_labels_were_drawn_at(true_temperature: float) -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(100_000, 4, generator=generator) * 3
    labels = torch.multinomial((logits / true_temperature).softmax(dim=1), 1, generator=generator)[:, 0]
    model = LogitModel()
    found = fit_temperature(model, logits, labels)
    assert found == pytest.approx(true_temperature, rel=0.05)
    assert negative_log_likelihood(model, logits, labels, found) < negative_log_likelihood(model, logits, labels, 1.0)


def test_prediction_divides_the_logits_by_the_temperature_and_keeps_argmax_labels(tmp_path: Path) -> None:
    image = np.random.default_rng(0).random((3, 40, 48)).astype(np.float32)
    write_volume(tmp_path / "grey.h5", image)
    labels, plain = predict_all(LogitModel(), tmp_path / "grey.h5", PredictConfig(tile=32))
    scaled_labels, scaled = predict_all(LogitModel(), tmp_path / "grey.h5", PredictConfig(tile=32, temperature=2.0))
    logits = torch.from_numpy(UNIT.normalise(image))[:, None] * torch.tensor([0.0, 6.0, -4.0, 2.0])[None, :, None, None]
    np.testing.assert_allclose(scaled, (logits / 2.0).softmax(dim=1).numpy(), atol=1e-5)
    np.testing.assert_array_equal(labels, scaled_labels)
    assert not np.allclose(plain, scaled)
    assert math.isclose(float(scaled.max()), float((logits / 2).softmax(dim=1).max()), rel_tol=1e-5)
