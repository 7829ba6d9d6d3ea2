"""Params `pretrain`: the stand-in SAM foundation's promptable pretraining.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from xctsam.config.base import Float, Fraction, Int, NonNegativeFloat, PositiveFloat, StrictModel


# ---------------------------------------------------------------- stand-in SAM foundation
class PretrainConfig(StrictModel):
    """Promptable pretraining of the small SAM on a generic shapes corpus (`xctsam train pretrain`).

    A section of its own, apart from `sam.lora` and `train`, so the DVC stage that makes the
    stand-in foundation reruns only when these keys (or sam.small / sam.image_size) change.
    """

    # names of stand-in checkpoints the pipeline makes (models/<name>.pth); [] at paper scale,
    # where sam.checkpoint names an official file and the pretrain stage disappears
    stand_ins: list[str] = ["sam_small_pretrained"]
    seed: Int = 0
    steps: Annotated[Int, Field(ge=1)] = 1800
    batch: Annotated[Int, Field(ge=1)] = 2  # images per step
    prompts: Annotated[Int, Field(ge=1)] = 4  # objects prompted per image per step (decoder cost grows with it)
    objects: tuple[Annotated[Int, Field(ge=1)], Annotated[Int, Field(ge=1)]] = (3, 8)  # per image
    min_area: Annotated[Int, Field(ge=1)] = 150  # pixels: smaller visible parts are not objects
    box_share: Fraction = 0.5  # share of prompts that are boxes (the rest single points)
    box_jitter: Fraction = 0.1  # box corners moved by N(0, jitter x side), at most 20 px, as in SAM
    lr: PositiveFloat = 4e-4  # of the prompt encoder and mask decoder
    # the image encoder's lr is lr x this: SAM trained its (MAE-initialised) encoder with a
    # decayed lr; at a full lr the encoder drifts before the decoder has learned to localise
    encoder_lr_scale: Annotated[Float, Field(gt=0, le=1)] = 0.125
    weight_decay: NonNegativeFloat = 0.05
    warmup_steps: Annotated[Int, Field(ge=0)] = 50
    grad_clip: PositiveFloat = 1.0
    # SAM's 20:1 focal:dice collapses the box output to empty masks in a CPU-sized pretraining
    # (held-out box mIoU .03 at 20, .22 at 4, .26 at 1, .17 at 0; 600 steps)
    focal_weight: NonNegativeFloat = 1.0
    dice_weight: NonNegativeFloat = 1.0
    iou_weight: NonNegativeFloat = 1.0  # MSE of the predicted against the real mask IoU
    heldout_images: Annotated[Int, Field(ge=1)] = 32  # seeded images apart from training, scored at the end
    checkpoint_every: Annotated[Int, Field(ge=1)] = 50

    @model_validator(mode="after")
    def _ordered_objects(self) -> PretrainConfig:
        if self.objects[0] > self.objects[1]:
            raise ValueError("objects: min greater than max")
        return self
