"""Params `sam.refine` and `unet.refine`: the full-resolution refinement head on a model's logits.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from xctsam.config.base import Int, StrictModel


class RefineConfig(StrictModel):
    """A few unnormalised convolutions at the input's resolution over (logits, grey input).

    channels 0: no head (the model as it was). The head sees what the model's own layers lose:
    SAM's decoder predicts at a quarter of its input size (few-pixel pores blur away), and the
    U-Net's GroupNorm removes each tile's absolute grey level (a tile of bare background looks
    like one of bare material).
    """

    channels: Annotated[Int, Field(ge=0)] = 0
    layers: Annotated[Int, Field(ge=1)] = 2  # 3x3 convolutions before the 1x1 output
