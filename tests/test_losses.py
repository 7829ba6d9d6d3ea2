"""Cross-entropy + Dice and BCE + Dice losses, checked against direct and hand computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from xctsam.models.losses import binary_segmentation_loss, class_argmax, segmentation_loss

WEIGHTS = (1.0, 1.0, 3.0, 3.0)


def every_class_labels(seed: int = 0) -> torch.Tensor:
    labels = torch.randint(0, 4, (2, 6, 7), generator=torch.Generator().manual_seed(seed))
    labels[0, 0, :4] = torch.arange(4)  # every class present
    return labels


def test_perfect_logits_give_near_zero_loss() -> None:
    labels = every_class_labels()
    logits = 30.0 * F.one_hot(labels, 4).permute(0, 3, 1, 2).float()
    assert segmentation_loss(logits, labels, WEIGHTS, dice_weight=1.0).item() < 1e-4


def test_uniform_logits_give_log_classes_whatever_the_weights() -> None:
    labels = every_class_labels()
    logits = torch.zeros(2, 4, 6, 7)
    for weights in (WEIGHTS, (5.0, 0.1, 2.0, 1.0)):
        assert segmentation_loss(logits, labels, weights, dice_weight=0.0).item() == pytest.approx(math.log(4), rel=1e-6)


def test_class_weights_weight_the_cross_entropy_per_pixel() -> None:
    labels = every_class_labels(1)
    logits = torch.randn(2, 4, 6, 7, generator=torch.Generator().manual_seed(2))
    weights = torch.tensor([0.5, 1.0, 4.0, 8.0])
    nll = -logits.log_softmax(dim=1).gather(1, labels[:, None])[:, 0]
    expected = (weights[labels] * nll).sum() / weights[labels].sum()
    got = segmentation_loss(logits, labels, weights, dice_weight=0.0)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert got.item() != pytest.approx(segmentation_loss(logits, labels, (1.0,) * 4, dice_weight=0.0).item(), rel=1e-3)


def two_pixel_example() -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Pixel a: p = (0.25, 0.75), truth 1; pixel b: p = (0.5, 0.5), truth 0; and both Dice by hand."""
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]]).view(1, 2, 1, 2)
    labels = torch.tensor([[1, 0]]).view(1, 1, 2)
    dice_0 = 2 * 0.5 / (0.75 + 1)  # intersection 0.5 (pixel b), predicted mass 0.75, truth 1
    dice_1 = 2 * 0.75 / (1.25 + 1)  # intersection 0.75 (pixel a), predicted mass 1.25, truth 1
    return logits, labels, dice_0, dice_1


def dice_part(logits: torch.Tensor, labels: torch.Tensor, weights) -> float:
    return (segmentation_loss(logits, labels, weights, 1.0) - segmentation_loss(logits, labels, weights, 0.0)).item()


def test_dice_matches_hand_computation() -> None:
    logits, labels, dice_0, dice_1 = two_pixel_example()
    assert dice_part(logits, labels, (1.0, 3.0)) == pytest.approx(1 - (dice_0 + 3 * dice_1) / 4, abs=1e-5)


def test_class_absent_from_truth_and_prediction_is_left_out_of_dice() -> None:
    logits, labels, dice_0, dice_1 = two_pixel_example()
    # a third class with almost no mass and no pixel: neither a fake 1 nor a fake 0
    with_absent = torch.cat([logits, torch.full((1, 1, 1, 2), -30.0)], dim=1)
    assert dice_part(with_absent, labels, (1.0, 3.0, 5.0)) == pytest.approx(1 - (dice_0 + 3 * dice_1) / 4, abs=1e-5)


def test_falsely_predicted_class_scores_zero_dice() -> None:
    # pixel b is predicted class 2 (p = 0.8 there), which is nowhere in the truth
    logits = torch.log(torch.tensor([[[[0.25, 0.1]], [[0.75, 0.1]], [[1e-9, 0.8]]]])).view(1, 3, 1, 2)
    labels = torch.tensor([[1, 0]]).view(1, 1, 2)
    probabilities = logits.softmax(dim=1)[0, :, 0]
    dice_0 = 2 * probabilities[0, 1] / (probabilities[0].sum() + 1)
    dice_1 = 2 * probabilities[1, 0] / (probabilities[1].sum() + 1)
    dice_2 = 0.0
    expected = 1 - (dice_0 + dice_1 + dice_2).item() / 3
    assert dice_part(logits, labels, (1.0, 1.0, 1.0)) == pytest.approx(expected, abs=1e-5)


def test_gradients_are_finite_when_a_class_is_absent() -> None:
    labels = torch.randint(0, 2, (2, 8, 8), generator=torch.Generator().manual_seed(3))  # no pore, no inclusion
    logits = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4)).requires_grad_()
    loss = segmentation_loss(logits, labels, WEIGHTS, dice_weight=1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_loss_is_float32_under_autocast() -> None:
    labels = every_class_labels()
    logits = torch.randn(2, 4, 6, 7, generator=torch.Generator().manual_seed(5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = segmentation_loss(logits.bfloat16(), labels, WEIGHTS, 1.0)
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(segmentation_loss(logits.bfloat16().float(), labels, WEIGHTS, 1.0).item(), rel=1e-5)


def test_binary_loss_bce_part_uses_pos_weight() -> None:
    targets = torch.rand(2, 3, 5, 5, generator=torch.Generator().manual_seed(6)) > 0.7
    logits = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(7))
    pos_weight = (1.0, 4.0, 10.0)
    expected = F.binary_cross_entropy_with_logits(logits, targets.float(), pos_weight=torch.tensor(pos_weight).view(3, 1, 1))
    assert binary_segmentation_loss(logits, targets, 0.0, pos_weight).item() == pytest.approx(expected.item(), rel=1e-6)
    assert binary_segmentation_loss(logits, targets, 0.0).item() < expected.item()


def test_binary_loss_of_perfect_logits_is_near_zero() -> None:
    targets = torch.rand(2, 3, 5, 5, generator=torch.Generator().manual_seed(8)) > 0.5
    logits = 30.0 * (2 * targets.float() - 1)
    assert binary_segmentation_loss(logits, targets, 1.0).item() < 1e-4


def test_binary_dice_skips_channels_empty_in_truth_and_prediction() -> None:
    logits = torch.tensor([[math.log(3.0), 0.0]]).view(1, 1, 1, 2)  # p = (0.75, 0.5)
    targets = torch.tensor([[1.0, 0.0]]).view(1, 1, 1, 2)
    dice = 2 * 0.75 / (1.25 + 1)
    empty_channel = torch.full((1, 1, 1, 2), -30.0)  # predicted empty, truly empty
    both = binary_segmentation_loss(torch.cat([logits, empty_channel], 1), torch.cat([targets, torch.zeros_like(targets)], 1), 1.0)
    bce_only = binary_segmentation_loss(torch.cat([logits, empty_channel], 1), torch.cat([targets, torch.zeros_like(targets)], 1), 0.0)
    assert (both - bce_only).item() == pytest.approx(1 - dice, abs=1e-5)
    # nothing anywhere, nothing predicted: Dice adds nothing (not a fake zero score of 1)
    nothing = binary_segmentation_loss(empty_channel, torch.zeros_like(targets), 1.0)
    assert nothing.item() == pytest.approx(binary_segmentation_loss(empty_channel, torch.zeros_like(targets), 0.0).item())


def test_class_argmax_is_argmax_over_classes_first_on_ties() -> None:
    torch.manual_seed(0)
    scores = torch.randn(3, 4, 17, 19)
    scores[:, 2] = scores[:, 1]  # ties between classes 1 and 2: the first wins, as argmax
    scores[0, :, 0, 0] = 0.0  # all four equal: class 0
    assert torch.equal(class_argmax(scores), scores.argmax(dim=1))
    assert torch.equal(class_argmax(scores.contiguous(memory_format=torch.channels_last)), scores.argmax(dim=1))
    assert int(class_argmax(scores)[0, 0, 0]) == 0
    assert not bool((class_argmax(scores) == 2).any())
