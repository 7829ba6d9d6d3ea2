"""SAM's training losses for promptable segmentation.

Mask loss = focal_weight x focal + dice_weight x Dice (SAM: 20 : 1), per prompt on the output
the prompt is read on: the single mask for a box, the best (lowest loss) of the three
multimask outputs for an ambiguous single point, so only that output learns from it.
IoU loss = MSE between the IoU head's prediction and the true IoU of the thresholded mask, on
every output the prompt is read on (the three for a point), as SAM trains its ranking.
"""

from __future__ import annotations

import torch

from xctsam.util.compat import ensure_torchvision

ensure_torchvision()  # torchvision.ops needs the CPU shim here

from torchvision.ops import sigmoid_focal_loss  # noqa: E402

from xctsam.pretrain.promptable import MULTI, SINGLE  # noqa: E402

SMOOTH = 1.0


def mask_terms(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(focal, Dice, true IoU), each (N, K), of (N, K, S, S) logits against (N, S, S) targets in
    [0, 1] (soft where masks were downsampled; the true IoU counts pixels over half covered)."""
    expanded = targets[:, None].expand_as(logits)
    focal = sigmoid_focal_loss(logits, expanded, alpha=0.25, gamma=2.0, reduction="none").mean(dim=(-2, -1))
    probs = logits.sigmoid()
    overlap = (probs * expanded).sum(dim=(-2, -1))
    dice = 1 - (2 * overlap + SMOOTH) / (probs.sum(dim=(-2, -1)) + expanded.sum(dim=(-2, -1)) + SMOOTH)
    with torch.no_grad():
        hard = logits > 0
        truth = expanded > 0.5
        union = (hard | truth).sum(dim=(-2, -1)).clamp(min=1)
        iou = (hard & truth).sum(dim=(-2, -1)) / union
    return focal, dice, iou


def promptable_loss(
    logits: torch.Tensor,
    iou_pred: torch.Tensor,
    targets: torch.Tensor,
    boxes: int,
    focal_weight: float,
    dice_weight: float,
    iou_weight: float,
) -> dict[str, torch.Tensor]:
    """{loss, mask, iou} of one image's prompts: the first `boxes` are boxes, the rest points."""
    focal, dice, true_iou = mask_terms(logits, targets)
    mask = focal_weight * focal + dice_weight * dice
    per_prompt = torch.cat([mask[:boxes, SINGLE], mask[boxes:, MULTI].min(dim=1).values])
    squared = (iou_pred - true_iou) ** 2
    iou_terms = torch.cat([squared[:boxes, SINGLE], squared[boxes:, MULTI].flatten()])
    mask_loss, iou_loss = per_prompt.mean(), iou_terms.mean()
    return {"loss": mask_loss + iou_weight * iou_loss, "mask": mask_loss, "iou": iou_loss}
