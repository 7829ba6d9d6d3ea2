"""Shared pieces of every params section: numbers that refuse booleans and NaN, the strict base model.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field


def _not_a_boolean(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError(f"must be a number, got {str(value).lower()}")
    return value


# Every number in params is one of these. pydantic's lax mode reads YAML's `true` as 1 (a bool
# is an int in Python); its strict mode would refuse that, but also `lr: 1e-3`, which PyYAML
# reads as the string "1e-3". So: lax, except for booleans.
Int = Annotated[int, BeforeValidator(_not_a_boolean)]
Float = Annotated[float, BeforeValidator(_not_a_boolean)]
PositiveFloat = Annotated[Float, Field(gt=0)]
NonNegativeFloat = Annotated[Float, Field(ge=0)]
Fraction = Annotated[Float, Field(ge=0, le=1)]

# A voxel's edge in mm: from 1 nm (finer than any X-ray microscope's ~50 nm voxels) to 1 m
# (coarser than any CT of a part). Reports give volumes in mm^3, and the cube of either bound
# is an ordinary float64 (1e-18 .. 1e9), where 1e300 mm overflows to inf and 1e-300 mm to 0.
MIN_VOXEL_MM, MAX_VOXEL_MM = 1e-6, 1e3


def voxel_size_problem(size: float) -> str | None:
    """Why `size` (mm, from a command-line option) is no voxel size; None if it is one."""
    if MIN_VOXEL_MM <= size <= MAX_VOXEL_MM:  # False for NaN
        return None
    return f"{size} is not a voxel size in mm: give a finite size from {MIN_VOXEL_MM:g} to {MAX_VOXEL_MM:g}"


class StrictModel(BaseModel):
    # allow_inf_nan=False: a float field refuses NaN and inf from any source (params files are
    # refused earlier, by safe_yaml, with the same message)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
