"""The 2.5D U-Net: shapes at any size, context channels, size scaling, and that it can learn."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xctsam.config.unet import UNetConfig
from xctsam.models.losses import segmentation_loss
from xctsam.models.unet25d import UNet25D


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("depth", "height", "width"), [(2, 37, 50), (3, 37, 50), (4, 5, 3), (4, 64, 64)])
def test_logits_have_the_input_size(depth: int, height: int, width: int) -> None:
    model = UNet25D(UNetConfig(context=3, filters=4, depth=depth))
    assert model(torch.rand(2, 3, height, width)).shape == (2, 4, height, width)


def test_input_channels_are_the_context_slices() -> None:
    model = UNet25D(UNetConfig(context=5, filters=4, depth=2))
    assert model.context == 5
    with pytest.raises(ValueError, match="5 context slices"):
        model(torch.rand(1, 3, 16, 16))
    # every neighbour slice reaches the centre's logits
    images = torch.rand(1, 5, 16, 16, requires_grad=True)
    model(images)[0, :, 8, 8].sum().backward()
    assert (images.grad.abs().sum(dim=(2, 3)) > 0).all()


def test_parameters_grow_quadratically_with_filters() -> None:
    """Every weight is in*out channels (both proportional to filters) except the first conv's
    input side and the 1x1 head's output side (linear), and the head's biases (num_classes)."""
    filters = np.array([4, 8, 12, 16])
    counts = np.array([parameter_count(UNet25D(UNetConfig(context=5, filters=int(f), depth=3))) for f in filters])
    quadratic = np.polyfit(filters[:3], counts[:3], 2)
    assert np.polyval(quadratic, filters[3]) == pytest.approx(counts[3], abs=1e-3)
    assert quadratic[2] == pytest.approx(4, abs=1e-3)  # the head's biases
    assert counts[3] / counts[1] == pytest.approx(4, rel=0.05)


def test_probabilities_and_labels() -> None:
    model = UNet25D(UNetConfig(context=3, filters=4, depth=2))
    logits = torch.randn(2, 4, 6, 6)
    probabilities = model.probabilities(logits)
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(2, 6, 6))
    assert torch.equal(model.to_labels(probabilities), logits.argmax(dim=1))
    assert "class_weights" not in model.state_dict()


def test_class_weights_reach_the_loss() -> None:
    config = UNetConfig(context=3, filters=4, depth=2)
    logits, labels = torch.randn(2, 4, 6, 6), torch.randint(0, 4, (2, 6, 6))
    weights = (1.0, 2.0, 9.0, 5.0)
    model = UNet25D(config, weights, dice_weight=0.5)
    torch.testing.assert_close(model.loss(logits, labels), segmentation_loss(logits, labels, weights, 0.5))
    with pytest.raises(ValueError, match="3 values for 4 classes"):
        UNet25D(config, (1.0, 1.0, 1.0))


def test_overfits_a_tiny_25d_task() -> None:
    """Labels need the centre slice (material) and the previous one (a defect under it)."""
    torch.manual_seed(0)
    images = torch.rand(2, 3, 24, 24)
    labels = (images[:, 1] > 0.5).long() + 2 * (images[:, 0] > 0.7).long()
    model = UNet25D(UNetConfig(context=3, filters=8, depth=2), class_weights=(1.0, 1.0, 2.0, 2.0), dice_weight=1.0)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        optimiser.zero_grad()
        loss = model.loss(model(images), labels)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 5
    with torch.no_grad():
        accuracy = (model.to_labels(model.probabilities(model(images))) == labels).float().mean().item()
    assert accuracy > 0.9
