"""Params `predict`, `eval`, `robustness` and `fid`: inference, scoring and distances between splits.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from xctsam.config.base import Float, Int, NonNegativeFloat, PositiveFloat, StrictModel


# ---------------------------------------------------------------- inference and evaluation
class PredictConfig(StrictModel):
    tile: Annotated[Int, Field(ge=16)] = 128
    overlap: Annotated[Float, Field(ge=0, lt=1)] = 0.25  # of the tile, blended with a Gaussian window
    batch: Annotated[Int, Field(ge=1)] = 8
    # flips: test-time augmentation, every tile also predicted mirrored in x, in y and in both and
    # the four probabilities averaged (nnU-Net's in-plane mirroring; 4x the inference time)
    tta: Literal["none", "flips"] = "none"
    # the axes the 2.5D models slice the volume along; [z, y, x]: tri-planar fusion, the
    # probabilities of all three passes averaged (3x the time; the normalised volume and the
    # summed probabilities, 20 bytes a voxel, are held in temporary files, not in memory)
    planes: list[Literal["z", "y", "x"]] = ["z"]
    # logits divided by this before the model's probabilities (temperature scaling; `xctsam
    # calibrate` fits it on validation slices); 1 = as trained, labels by argmax unchanged
    temperature: PositiveFloat = 1.0

    @field_validator("planes")
    @classmethod
    def _planes_distinct(cls, planes: list[str]) -> list[str]:
        if not planes or len(set(planes)) != len(planes):
            raise ValueError("planes: one or more of z, y, x, each once")
        return planes


class BootstrapConfig(StrictModel):
    """95% percentile intervals of IoU by resampling slices' confusion counts (eval.bootstrap)."""

    resamples: Annotated[Int, Field(ge=1)] = 1000
    # volume: whole volumes with replacement; slice: slices within each volume; auto: volumes
    # from min_volumes volumes per split on (fewer make a poor bootstrap population)
    unit: Literal["auto", "volume", "slice"] = "auto"
    min_volumes: Annotated[Int, Field(ge=2)] = 5
    level: Annotated[Float, Field(gt=0, lt=1)] = 0.95


class EvalConfig(StrictModel):
    splits: list[str] = [f"real/Te-{i}" for i in range(1, 7)]
    bootstrap: BootstrapConfig = BootstrapConfig()
    # IoU differences to bootstrap paired (same slices, same resamples): (a, b) is a minus b,
    # by the names `xctsam eval models --model name=path` gives; a pair not evaluated is skipped
    compare: list[tuple[str, str]] = [("sam", "unet"), ("sam", "sam-sim"), ("unet", "unet-sim")]




class RobustnessConfig(StrictModel):
    """Models scored on chosen test splits with noise added to their normalised inputs."""

    splits: list[str] = ["real/Te-3"]
    gaussian: list[NonNegativeFloat] = [0.0, 0.02, 0.05, 0.1]  # std, in units of the model's window
    poisson: list[PositiveFloat] = [1000.0, 300.0, 100.0]  # photons at full scale (lower = noisier)


# ---------------------------------------------------------------- FID
class FidConfig(StrictModel):
    """Frechet distance of each test split (and named pairs) to the training set."""

    backbone: Literal["inception", "sam"] = "inception"
    reference: str = "synthetic/Tr-GAN"  # the training set, a split folder under the data root
    splits: list[str] = [f"real/Te-{i}" for i in range(1, 7)]
    pairs: dict[str, tuple[str, str]] = {}  # name -> (split folder, split folder)
    samples: Annotated[Int, Field(ge=2)] = 200  # slices per split, the same ones every run
    # Each sampled slice gives `crops_per_slice` crops (crop_fraction of its height and width)
    # at seeded positions: more samples per volume where volumes are few. 1 and 1.0: the whole
    # slice, once.
    crops_per_slice: Annotated[Int, Field(ge=1)] = 1
    crop_fraction: Annotated[Float, Field(gt=0, le=1)] = 1.0
    batch: Annotated[Int, Field(ge=1)] = 25
    # KID as torch-fidelity computes it: the mean and std over `kid_subsets` random subsets of
    # `kid_subset_size` samples per set (clipped to the smaller set)
    kid_subsets: Annotated[Int, Field(ge=1)] = 100
    kid_subset_size: Annotated[Int, Field(ge=2)] = 1000
    # the distances' floor: the same distance between two halves of the reference split, by
    # volume (even- and odd-numbered volumes); a distance near its floor says nothing
    floor: bool = True
    # grey values mapped to [0, 1] for every split; null: robust window of the reference split.
    # Imported 8-bit scans compare best on their full range, [0, 255].
    window: tuple[Float, Float] | None = None

    @model_validator(mode="after")
    def _window_increasing(self) -> FidConfig:
        if self.window is not None and not self.window[1] > self.window[0]:
            raise ValueError("window: high must exceed low")
        return self
