"""Params `predict`, `eval`, `robustness` and `fid`: inference, scoring and distances between splits.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from xctsam.config.base import Float, Int, NonNegativeFloat, PositiveFloat, StrictModel

# ---------------------------------------------------------------- inference and evaluation
# Upper bounds of sizes that are allocated whole: past them a params typo (1e8 for 8) asks for
# terabytes, and the run grows until the kernel kills it instead of stopping with a message.
# Slices larger than a tile are cut into more tiles and smaller ones mirror-padded up to it,
# so a tile wider than most detectors' 4096 pixels only adds padding, computed all the same
# (one float32 plane of a 4096 tile is 64 MiB).
MAX_TILE = 4096
# Pixels of a batch of tiles (batch x tile^2): 2^27 is 128 SAM tiles of 1024^2, or 8 tiles of
# 4096^2. Such a batch's inputs and class probabilities (context + 4 float32 planes a pixel) are
# about 5 GiB at context 5, the most a GPU of 24 GB holds beside a SAM and its activations.
MAX_BATCH_PIXELS = 2**27


class PredictConfig(StrictModel):
    tile: Annotated[Int, Field(ge=16, le=MAX_TILE)] = 128
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

    @field_validator("batch")
    @classmethod
    def _batch_fits(cls, batch: int, info: ValidationInfo) -> int:
        tile = info.data.get("tile")  # absent when tile itself was refused
        if tile is not None and batch * tile**2 > MAX_BATCH_PIXELS:
            raise ValueError(
                f"{batch} tiles of {tile} x {tile} are {batch * tile**2} pixels a batch"
                f" ({_gib(batch * tile**2 * 4)} per float32 plane), more than {MAX_BATCH_PIXELS} (2^27);"
                " lower predict.batch or predict.tile"
            )
        return batch

    @field_validator("planes")
    @classmethod
    def _planes_distinct(cls, planes: list[str]) -> list[str]:
        if not planes or len(set(planes)) != len(planes):
            raise ValueError("planes: one or more of z, y, x, each once")
        return planes


class BootstrapConfig(StrictModel):
    """95% percentile intervals of IoU by resampling slices' confusion counts (eval.bootstrap)."""

    # Percentile intervals settle within a few thousand resamples (Efron & Tibshirani advise
    # 1000-2000); each resample holds an int64 weight per slice (bootstrap_weights), so the
    # bound, 1e5 resamples of the study's ~600 test slices, already takes 0.5 GB.
    resamples: Annotated[Int, Field(ge=1, le=100_000)] = 1000
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
# Every crop of a split leaves a feature vector in memory (2048 float32 with Inception, the
# largest backbone): 1e5 crops are 0.8 GB a split, and the distances' statistics settle long
# before (FID is usually reported from 1e4-5e4 samples).
MAX_FID_CROPS = 100_000
FEATURE_BYTES = 2048 * 4


def _gib(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:,.1f} GiB"


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
    # Crops a split (samples x crops_per_slice) are bounded by MAX_FID_CROPS.
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

    @field_validator("crops_per_slice")
    @classmethod
    def _crops_fit(cls, crops: int, info: ValidationInfo) -> int:
        samples = info.data.get("samples")  # absent when samples itself was refused
        if samples is not None and samples * crops > MAX_FID_CROPS:
            raise ValueError(
                f"{samples} samples x {crops} crops are {samples * crops} crops a split"
                f" ({_gib(samples * crops * FEATURE_BYTES)} of features), more than {MAX_FID_CROPS};"
                " lower fid.crops_per_slice or fid.samples"
            )
        return crops

    @model_validator(mode="after")
    def _window_increasing(self) -> FidConfig:
        if self.window is not None and not self.window[1] > self.window[0]:
            raise ValueError("window: high must exceed low")
        return self
