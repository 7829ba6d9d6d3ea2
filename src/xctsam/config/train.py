"""Params `train` (one loop for every model) and `finetune` (re-fine-tuning on real volumes).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from xctsam.config.base import Float, Fraction, Int, NonNegativeFloat, PositiveFloat, StrictModel


# ---------------------------------------------------------------- training
class TrainConfig(StrictModel):
    """One training loop for every model; one instance per model under `train:`."""

    splits: list[str] = ["synthetic/Tr-GAN"]  # labelled split folders under the data root
    val_volumes: Annotated[Int, Field(ge=1)] = 1  # last volumes of the training splits held out for validation
    tile: Annotated[Int, Field(ge=16)] = 128  # native-resolution random crops
    batch: Annotated[Int, Field(ge=1)] = 4
    steps: Annotated[Int, Field(ge=1)] = 1000
    epoch_steps: Annotated[Int, Field(ge=1)] = 100  # validation, best checkpoint, early stopping per epoch
    lr: PositiveFloat = 1e-3
    weight_decay: NonNegativeFloat = 1e-4
    warmup_steps: Annotated[Int, Field(ge=0)] = 50
    schedule: Literal["cosine", "poly"] = "cosine"
    grad_clip: PositiveFloat = 1.0
    class_weights: tuple[PositiveFloat, PositiveFloat, PositiveFloat, PositiveFloat] = (1.0, 1.0, 3.0, 3.0)
    dice_weight: NonNegativeFloat = 1.0  # loss = CE + dice_weight * Dice
    oversample: Fraction = 0.5  # share of tiles drawn to contain a pore or inclusion
    patience: Annotated[Int, Field(ge=1)] = 5  # epochs without validation mIoU gain before stopping
    checkpoint_every: Annotated[Int, Field(ge=1)] = 100
    val_slices: Annotated[Int, Field(ge=1)] = 16  # validation slices (seeded), scored whole
    # slice: each validation slice is one input (SAM resizes it to its image size); tiles: cut
    # into `tile` crops, the scale training and prediction use (slices much larger than tiles)
    val_input: Literal["slice", "tiles"] = "slice"
    # window: one grey window for every volume (measured on the training slices). peaks: each
    # volume's background and material levels first matched to the training data's (scans at
    # other grey levels: other scanners, alloys, exports), the study's histogram match.
    intensity: Literal["window", "peaks"] = "window"
    # largest std (in the model's [0, 1] window) of Gaussian noise added to a training tile, its
    # std drawn per tile from [0, noise]; 0: none. Real scans are noisier than the training data.
    noise: Annotated[Float, Field(ge=0, le=1)] = 0.0

    @property
    def validation_tile(self) -> int | None:
        """The crop size validation slices are cut into (val_input tiles), or None (whole)."""
        return self.tile if self.val_input == "tiles" else None


class TrainSection(StrictModel):
    sam: TrainConfig = TrainConfig(lr=3e-4)
    unet: TrainConfig = TrainConfig()


class FinetuneConfig(StrictModel):
    """Re-fine-tuning SAM-GAN on labelled real scans (SAM-FineReal-Sub and SAM-FineReal).

    `volumes` names the real volumes used for fine-tuning, per split folder; every other
    volume of `eval.splits` is what forgetting is measured on, and any overlap is refused.
    """

    volumes: dict[str, list[str]] = {"real/Te-6": ["Te-6_000.h5"]}  # the study: the strongest-OoD split
    sub_fraction: Annotated[Float, Field(gt=0, le=1)] = 0.25  # SAM-FineReal-Sub's share of the fine-tuning slices
    steps: Annotated[Int, Field(ge=1)] = 300
    lr: PositiveFloat = 1e-4
