"""Params `defects`: per-defect detection scores (xctsam.eval.defects), the study's way.

Pores and inclusions are scored as connected components: found or missed, surface or internal,
binned by equivalent diameter. Sizes are in voxels unless `diameter_unit` is "mm" (then the
caller passes the scan's voxel size).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from xctsam.config.base import Int, NonNegativeFloat, StrictModel


class DefectsConfig(StrictModel):
    """How defects are matched, split by location and binned by size."""

    # voxels the bounding box of a defect grows on every side before the other volume is looked
    # into; the study scored with 0 (the box itself)
    margin: Annotated[Int, Field(ge=0)] = 0
    # voxels the part (labels >= 1) is eroded by, face-connected steps as the study's
    # binary_erosion(iterations=3); a defect with a voxel outside the eroded part is a surface one
    surface_depth: Annotated[Int, Field(ge=0)] = 3
    # lower edges of the equivalent-diameter bins, increasing; the last bin is open-ended (params
    # refuse infinity). The defaults split voxel-scale defects: 1 voxel is 1.24 across, 8 are 2.48.
    diameter_bins: list[NonNegativeFloat] = [0.0, 2.0, 4.0, 8.0, 16.0]
    diameter_unit: Literal["voxel", "mm"] = "voxel"
    # components smaller than this are not defects (on both sides). The study's script skipped
    # single-voxel ground-truth flaws (in effect 2, truth only); 1 keeps everything.
    min_voxels: Annotated[Int, Field(ge=1)] = 1

    @model_validator(mode="after")
    def _bins_increasing(self) -> DefectsConfig:
        edges = self.diameter_bins
        if not edges:
            raise ValueError("diameter_bins: needs at least one edge")
        if any(high <= low for low, high in zip(edges, edges[1:])):
            raise ValueError("diameter_bins: edges must be strictly increasing")
        return self
