"""A full-resolution refinement head: class logits corrected from the grey input itself.

    logits (B, K, H, W), images (B, C, H, W)
      -> concat -> [3x3 conv - ReLU] x layers -> 1x1 conv -> + logits

No normalisation layer, so the absolute grey level (background against material) reaches the
output; the 1x1 output starts at zero, so a new head begins as the identity and training adds
only what helps (the idea of HQ-SAM's high-resolution features into the mask, in its lightest form).
"""

from __future__ import annotations

import torch
from torch import nn

from xctsam.config.refine import RefineConfig


class RefineHead(nn.Module):
    def __init__(self, classes: int, image_channels: int, config: RefineConfig) -> None:
        super().__init__()
        if config.channels < 1:
            raise ValueError("a refinement head needs refine.channels >= 1")
        layers: list[nn.Module] = []
        width = classes + image_channels
        for _ in range(config.layers):
            layers += [nn.Conv2d(width, config.channels, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            width = config.channels
        output = nn.Conv2d(width, classes, kernel_size=1)
        nn.init.zeros_(output.weight)
        nn.init.zeros_(output.bias)
        self.net = nn.Sequential(*layers, output)

    def forward(self, logits: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        correction = self.net(torch.cat([logits, images.to(logits.dtype)], dim=1))
        return logits + correction


def refine_head(classes: int, image_channels: int, config: RefineConfig) -> RefineHead | None:
    """The head `config` asks for, or None (refine.channels 0)."""
    return RefineHead(classes, image_channels, config) if config.channels else None
