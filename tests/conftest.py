"""Shared fixtures: a tiny valid params mapping and the real-data location."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SAMGAN = REPO.parent / "shared" / "data" / "sam-material-gan"

os.environ.setdefault("XCTSAM_NO_PROGRESS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture
def default_params() -> dict:
    """The project's own params.yaml, parsed (a fresh copy per test)."""
    return copy.deepcopy(yaml.safe_load((REPO / "params.yaml").read_text()))


@pytest.fixture
def tiny_params(default_params: dict) -> dict:
    """The default study shrunk to seconds: small volumes, one volume per split."""
    params = default_params
    params["data"]["phantom"]["shape"] = [6, 48, 48]
    params["data"]["phantom"]["features"] = [2, 4]
    for split in params["data"]["splits"].values():
        split["volumes"] = 1
    for scanner in params["data"]["scanners"].values():
        scanner["views"] = min(scanner["views"], 60)
    # SAM from random weights: the stand-in foundation is a minutes-long stage of its own (tests/test_pretrain.py)
    params["sam"]["checkpoint"] = None
    params["pretrain"]["stand_ins"] = []
    params["zero_shot"] = {}
    return params


def write_params(path: Path, params: dict) -> Path:
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path
