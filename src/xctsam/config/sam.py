"""Params `sam`: the PEFT-SAM (variant, foundation checkpoint, small architecture, Conv-LoRA).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from xctsam.config.base import Int, NonNegativeFloat, PositiveFloat, StrictModel
from xctsam.config.refine import RefineConfig


# ---------------------------------------------------------------- SAM
class SmallSamConfig(StrictModel):
    """The CPU-sized SAM image encoder (no official checkpoint exists for it)."""

    embed_dim: Annotated[Int, Field(ge=16)] = 192
    depth: Annotated[Int, Field(ge=1)] = 4
    num_heads: Annotated[Int, Field(ge=1)] = 4
    global_attn_indexes: tuple[Int, ...] = (1, 3)
    window_size: Annotated[Int, Field(ge=0)] = 8

    @model_validator(mode="after")
    def _buildable(self) -> SmallSamConfig:
        # both would build and then fail at the first forward pass
        if self.embed_dim % self.num_heads:
            raise ValueError(f"num_heads: {self.num_heads} does not divide embed_dim {self.embed_dim}")
        outside = [i for i in self.global_attn_indexes if not 0 <= i < self.depth]
        if outside:
            raise ValueError(f"global_attn_indexes: {outside} outside blocks 0..{self.depth - 1}")
        return self


class ConvLoraConfig(StrictModel):
    """Conv-LoRA on every image-encoder block's fused qkv projection."""

    rank: Annotated[Int, Field(ge=1)] = 4
    alpha: PositiveFloat = 4.0  # LoRA scale is alpha / rank (AutoGluon's SAM preset: 32)
    experts: Annotated[Int, Field(ge=1)] = 4  # expert i works at scale i (resize up by i)
    top_k: Annotated[Int, Field(ge=1)] = 1
    gate_noise: NonNegativeFloat = 1.0  # noisy top-k gating during training
    balance_weight: NonNegativeFloat = 0.01  # weight of the load-balancing loss
    gate_scales_output: bool = True  # the gate value scales the chosen expert, so the task trains the gate too
    # How expert i resizes the bottleneck up by i and back. bilinear_area: bilinear up, area (the
    # mean of each i x i cell) down, which does not alias. bicubic: bicubic both ways, as
    # AutoGluon's Conv-LoRA (the study's code) does; configs/conv-lora-reference.yaml sets it.
    interpolation: Literal["bilinear_area", "bicubic"] = "bilinear_area"
    # How the blocks' balance losses combine. mean: balance_weight means the same at any encoder
    # depth. sum: as AutoGluon's SAM encoder adds up its blocks' losses (depth x the mean: 12x on
    # vit_b, 32x on vit_h), so the study's balance weight is reproduced at its own strength.
    balance_reduction: Literal["mean", "sum"] = "mean"

    @model_validator(mode="after")
    def _top_k_within_experts(self) -> ConvLoraConfig:
        if self.top_k > self.experts:
            raise ValueError(f"top_k: {self.top_k} exceeds experts {self.experts}")
        return self


class SamConfig(StrictModel):
    variant: Literal["small", "vit_b", "vit_l", "vit_h"] = "small"
    checkpoint: Path | None = None  # official file, e.g. models/foundation/sam_vit_b_01ec64.pth
    image_size: Literal[256, 512, 1024] = 256
    small: SmallSamConfig = SmallSamConfig()
    lora: ConvLoraConfig = ConvLoraConfig()
    # multiclass: one prompt-free decoder with a mask per class (softmax);
    # per_class: the study's layout, one binary model per class, painted material -> pore -> inclusion
    layout: Literal["multiclass", "per_class"] = "multiclass"
    # 1: the grey slice in all three of SAM's colour channels; 3: the slice and its two
    # neighbours, one per channel (2.5D context, as the U-Net's): a pore persists across slices, noise does not
    context: Literal[1, 3] = 1
    refine: RefineConfig = RefineConfig()  # full-resolution head on the decoder's logits (channels 0: none)
