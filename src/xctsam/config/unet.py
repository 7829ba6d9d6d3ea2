"""Params `unet`: the 2.5D U-Net baseline.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from xctsam.config.base import Int, StrictModel
from xctsam.config.refine import RefineConfig


# ---------------------------------------------------------------- 2.5D U-Net
class UNetConfig(StrictModel):
    context: Annotated[Int, Field(ge=1)] = 5  # adjacent slices as input channels (odd; edges reflected)
    filters: Annotated[Int, Field(ge=4)] = 16  # channels at the first level, doubled per level
    depth: Annotated[Int, Field(ge=2, le=6)] = 4  # resolution levels
    # group: GroupNorm (the same for any batch, but it removes each tile's grey level); batch:
    # BatchNorm, whose running statistics keep it at inference
    norm: Literal["group", "batch"] = "group"
    refine: RefineConfig = RefineConfig()  # full-resolution head on the logits (channels 0: none)

    @model_validator(mode="after")
    def _odd_context(self) -> UNetConfig:
        if self.context % 2 == 0:
            raise ValueError(f"context: {self.context} must be odd (centre slice plus equal neighbours)")
        return self
