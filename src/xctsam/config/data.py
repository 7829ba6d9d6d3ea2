"""Params `data`: phantoms, defect recipes, scanners, splits and imports (the simulator's and importers' settings).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from xctsam.config.base import Float, Fraction, Int, NonNegativeFloat, PositiveFloat, StrictModel

# The materials the simulator has attenuation tables for (xctsam.sim.materials.MATERIALS holds
# one per name; a test keeps the two lists equal). Named here so params are checked on load.
MaterialName = Literal["steel", "316L", "Ti64", "Ni", "W", "Cu", "Al"]


# ---------------------------------------------------------------- phantoms
class LogNormalSize(StrictModel):
    """Radii in voxels: log-normal with this median and log-space standard deviation."""

    median: PositiveFloat
    sigma: NonNegativeFloat = 0.3


class DefectPopulation(StrictModel):
    """One kind of defect; `fraction` is its target share of the specimen's volume."""

    fraction: Fraction = 0.0
    radius: LogNormalSize = LogNormalSize(median=1.5)


class LackOfFusionPopulation(DefectPopulation):
    """Flat, irregular voids lying in the build (z) layers."""

    thickness: PositiveFloat = 1.0  # voxels across the layer
    irregularity: Fraction = 0.5  # 0: smooth ellipse, 1: ragged outline


class KeyholePopulation(DefectPopulation):
    """Near-spherical voids elongated along the build direction (z)."""

    elongation: Annotated[Float, Field(ge=1)] = 1.8


class DefectRecipe(StrictModel):
    gas_pore: DefectPopulation = DefectPopulation()
    lack_of_fusion: LackOfFusionPopulation = LackOfFusionPopulation()
    keyhole: KeyholePopulation = KeyholePopulation()
    inclusion: DefectPopulation = DefectPopulation()

    @property
    def pore_fraction(self) -> float:
        return self.gas_pore.fraction + self.lack_of_fusion.fraction + self.keyhole.fraction


class PhantomGeometry(StrictModel):
    """The coupon: a cylinder (axis z) holding CAD-like blocks, bars and rods with air between."""

    shape: tuple[Annotated[Int, Field(ge=1)], Annotated[Int, Field(ge=16)], Annotated[Int, Field(ge=16)]]
    specimen_radius: Annotated[Float, Field(gt=0, le=1)] = 0.92  # of the in-plane half-width
    features: tuple[Annotated[Int, Field(ge=1)], Annotated[Int, Field(ge=1)]] = (4, 9)
    feature_size: tuple[Fraction, Fraction] = (0.12, 0.4)  # of the specimen radius

    @model_validator(mode="after")
    def _ordered_ranges(self) -> PhantomGeometry:
        if self.shape[1] != self.shape[2]:
            raise ValueError("shape: slices must be square (Y == X) for the tomography")
        if self.features[0] > self.features[1]:
            raise ValueError("features: min greater than max")
        if self.feature_size[0] > self.feature_size[1]:
            raise ValueError("feature_size: min greater than max")
        return self


# ---------------------------------------------------------------- scanners
class Filtration(StrictModel):
    material: MaterialName = "Cu"
    thickness_mm: NonNegativeFloat = 0.5


class Scanner(StrictModel):
    """One scanner setting: source, detector and acquisition of a parallel-beam XCT scan."""

    kvp: Annotated[Float, Field(ge=20, le=600)]
    filter: Filtration = Filtration()
    photons: PositiveFloat = 2.0e4  # unattenuated counts per detector pixel and view
    views: Annotated[Int, Field(ge=8)] = 180
    detector_blur: NonNegativeFloat = 0.6  # Gaussian sigma, detector pixels
    ring_gain_std: NonNegativeFloat = 0.0  # relative per-pixel gain error -> rings
    energy_step_kev: PositiveFloat = 2.0
    geometry: Literal["parallel"] = "parallel"


class IdealRender(StrictModel):
    """Domain A: monochromatic, noise-free, sharp attenuation map of the labels."""

    energy_kev: PositiveFloat = 80.0


# ---------------------------------------------------------------- splits
class SplitRecipe(StrictModel):
    """How one split is made.

    kind `synthetic`: the idealised render (domain A), stored under data/synthetic/<split>.
    kind `real`: physics-simulated experimental scans standing in for real ones, stored under
    data/real/<split>, where imported real scans go too.
    """

    kind: Literal["synthetic", "real"]
    labelled: bool = True
    volumes: Annotated[Int, Field(ge=1)] = 1
    recipe: str
    alloy: MaterialName
    inclusion_material: MaterialName = "Ni"
    scanner: str | None = None

    @model_validator(mode="after")
    def _scanner_matches_kind(self) -> SplitRecipe:
        if self.kind == "real" and self.scanner is None:
            raise ValueError("a real (scanned) split needs a scanner")
        if self.kind == "synthetic" and self.scanner is not None:
            raise ValueError("a synthetic split is rendered without a scanner; remove scanner")
        if self.kind == "synthetic" and not self.labelled:
            raise ValueError("a synthetic split is labelled by construction; remove labelled")
        return self


class ImportSpec(StrictModel):
    source: Path
    format: Literal["samgan", "tiff-dir", "tiff", "hdf5", "npy"] = "samgan"


class DataConfig(StrictModel):
    voxel_size_mm: PositiveFloat = 0.025
    phantom: PhantomGeometry
    render: IdealRender = IdealRender()
    recipes: dict[str, DefectRecipe]
    scanners: dict[str, Scanner]
    splits: dict[str, SplitRecipe]
    imports: dict[str, ImportSpec] = {}
