"""Params `gan`: the CycleGAN that translates the idealised render into experimental-looking XCT.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from xctsam.config.base import Fraction, Int, NonNegativeFloat, PositiveFloat, StrictModel


# ---------------------------------------------------------------- CycleGAN
class GeneratorConfig(StrictModel):
    filters: Annotated[Int, Field(ge=4)] = 32  # ngf: channels of the first convolution
    blocks: Annotated[Int, Field(ge=1)] = 6  # ResNet blocks at the bottleneck
    # channels of N(0, 1) noise beside the image into the A -> B generator: the render is
    # noise-free, and a deterministic map of it cannot make a scanner's grain (0: none)
    noise_channels: Annotated[Int, Field(ge=0)] = 0


class DiscriminatorConfig(StrictModel):
    filters: Annotated[Int, Field(ge=4)] = 32  # ndf
    layers: Annotated[Int, Field(ge=1)] = 3  # strided layers of the PatchGAN


class GanConfig(StrictModel):
    """Unpaired translation domain A (idealised render) <-> domain B (experimental scans)."""

    domain_a: str = "synthetic/Tr-sim"  # split folders under the data root
    domain_b: str = "real/Tr-real"
    output: str = "synthetic/Tr-GAN"  # where `gan synthesize` writes the translated split
    tile: Annotated[Int, Field(ge=16)] = 64
    batch: Annotated[Int, Field(ge=1)] = 4
    steps: Annotated[Int, Field(ge=1)] = 1000
    decay_start: Annotated[Int, Field(ge=0)] = 500  # LR held until here, then linear to 0
    lr: PositiveFloat = 2e-4
    beta1: Fraction = 0.5
    generator: GeneratorConfig = GeneratorConfig()
    discriminator: DiscriminatorConfig = DiscriminatorConfig()
    lambda_cycle: NonNegativeFloat = 10.0
    lambda_identity: NonNegativeFloat = 0.5  # times lambda_cycle, as in the reference code
    pool_size: Annotated[Int, Field(ge=0)] = 50
    checkpoint_every: Annotated[Int, Field(ge=1)] = 100
    sample_every: Annotated[Int, Field(ge=1)] = 250
    log_every: Annotated[Int, Field(ge=1)] = 10

    @model_validator(mode="after")
    def _decay_within_steps(self) -> GanConfig:
        if self.decay_start > self.steps:
            raise ValueError("decay_start: must not exceed steps")
        return self
