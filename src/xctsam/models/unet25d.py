"""The 2.5D U-Net baseline: `context` adjacent slices in as channels, the centre slice's classes out.

A standard U-Net (Ronneberger et al. 2015): per level two 3x3 conv - GroupNorm - ReLU blocks,
2x2 max-pooling down, 2x2 transposed convolution up, skip connections concatenated. Channels
start at `filters` and double per level; `depth` counts resolution levels, so the input is
halved depth - 1 times. Any H, W is accepted: the input is edge-padded to a multiple of
2**(depth - 1) and the logits cropped back.

GroupNorm rather than BatchNorm: training batches are a handful of tiles (4 by default) and
inference runs on other tile counts, where BatchNorm's batch statistics are noisy and its
running averages differ from what training saw; GroupNorm behaves the same for any batch.
Its price: each tile's absolute grey level is normalised away, so a tile of bare background
(Te-3's sparse part in a 1024^2 field) can look like one of bare material. `unet.norm: batch`
keeps the level (BatchNorm's running statistics at inference; under DDP each process keeps its
own); `unet.refine` adds a norm-free full-resolution head over (logits, input) (models/refine.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from xctsam import NUM_CLASSES
from xctsam.config.unet import UNetConfig
from xctsam.models.base import MulticlassSegmenter
from xctsam.models.refine import refine_head

_MAX_GROUPS = 8


def conv_block(in_channels: int, out_channels: int, norm: str = "group") -> nn.Sequential:
    """Two 3x3 conv - norm - ReLU layers (no conv bias: the norm's shift replaces it)."""
    layers: list[nn.Module] = []
    for channels_in in (in_channels, out_channels):
        layers += [
            nn.Conv2d(channels_in, out_channels, kernel_size=3, padding=1, bias=False),
            _norm(norm, out_channels),
            nn.ReLU(inplace=True),
        ]
    return nn.Sequential(*layers)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.GroupNorm(math.gcd(_MAX_GROUPS, channels), channels)


class UpLevel(nn.Module):
    """Upsample by a transposed conv, concatenate the skip, then a conv block."""

    def __init__(self, in_channels: int, out_channels: int, norm: str = "group") -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
        self.block = conv_block(2 * out_channels, out_channels, norm)

    def forward(self, features: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.block(torch.cat([skip, self.up(features)], dim=1))


class UNet25D(MulticlassSegmenter):
    """2.5D U-Net: (B, context, H, W) in [0, 1] -> logits (B, num_classes, H, W)."""

    def __init__(
        self,
        config: UNetConfig,
        class_weights: Sequence[float] | torch.Tensor = (1.0,) * NUM_CLASSES,
        dice_weight: float = 1.0,
        num_classes: int = NUM_CLASSES,
    ) -> None:
        super().__init__()
        if len(class_weights) != num_classes:
            raise ValueError(f"class_weights: {len(class_weights)} values for {num_classes} classes")
        self.context = config.context
        self.depth = config.depth
        self.dice_weight = float(dice_weight)
        # a buffer so it follows .to(device); not persistent: the weights are a training choice,
        # and a checkpoint should load under any of them
        self.register_buffer("class_weights", torch.as_tensor(class_weights, dtype=torch.float32), persistent=False)
        widths = [config.filters * 2**level for level in range(config.depth)]
        self.down = nn.ModuleList(conv_block(c_in, c_out, config.norm) for c_in, c_out in zip([config.context, *widths[:-1]], widths))
        self.up = nn.ModuleList(UpLevel(c_in, c_out, config.norm) for c_in, c_out in zip(widths[:0:-1], widths[-2::-1]))
        self.head = nn.Conv2d(widths[0], num_classes, kernel_size=1)
        self.refine = refine_head(num_classes, config.context, config.refine)
        # channels-last (NHWC) weights and activations: oneDNN's convolutions run about twice as
        # fast in inference on CPU (measured, same outputs to 1e-5); .to(device) and checkpoint
        # loading keep the layout
        self.to(memory_format=torch.channels_last)

    def _pad(self, images: torch.Tensor) -> torch.Tensor:
        multiple = 2 ** (self.depth - 1)
        height, width = images.shape[-2:]
        pad_y, pad_x = -height % multiple, -width % multiple
        if not (pad_y or pad_x):
            return images
        # edge values rather than zeros: zero is a real grey value (background) in [0, 1]
        return F.pad(images, (0, pad_x, 0, pad_y), mode="replicate")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] != self.context:
            raise ValueError(f"expected {self.context} context slices as channels, got {images.shape[1]}")
        height, width = images.shape[-2:]
        features = self._pad(images).contiguous(memory_format=torch.channels_last)
        skips = []
        for level, block in enumerate(self.down):
            if level:
                features = F.max_pool2d(features, 2)
            features = block(features)
            skips.append(features)
        for up, skip in zip(self.up, reversed(skips[:-1])):
            features = up(features, skip)
        logits = self.head(features)[..., :height, :width]
        return logits if self.refine is None else self.refine(logits, images)

