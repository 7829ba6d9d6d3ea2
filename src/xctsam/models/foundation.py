"""Which foundation a SAM run adapted: an official checkpoint, the stand-in, or random weights.

Reported as MLflow tags on every run that builds SAM from `sam.checkpoint`, and as part of the
trained model's meta, so a changed foundation file (same path, new content) means a new
training instead of "already finished".
"""

from __future__ import annotations

import json
from pathlib import Path

from xctsam.config.sam import SamConfig
from xctsam.models.sam_builder import has_official_name
from xctsam.util.hashing import file_sha256


def describe_foundation(config: SamConfig) -> dict[str, str]:
    """Tags: foundation (official | stand-in | checkpoint | random-init) and, for a file, its
    path and sha256; for the stand-in also the MLflow run that pretrained it."""
    if config.checkpoint is None:
        return {"foundation": "random-init"}
    path = Path(config.checkpoint)
    if not path.is_file():  # build_sam reports the missing file with its remedy
        return {"foundation": "missing", "foundation.path": str(path)}
    sha256 = file_sha256(path)
    tags = {"foundation.path": str(path), "foundation.sha256": sha256}
    sidecar = _stand_in_sidecar(path, sha256)
    if sidecar is not None:
        return {**tags, "foundation": "stand-in", "foundation.run_id": str(sidecar.get("mlflow_run_id"))}
    official = has_official_name(path)  # its hash is checked when it loads
    return {**tags, "foundation": "official" if official else "checkpoint"}


def _stand_in_sidecar(path: Path, sha256: str) -> dict | None:
    """The stand-in's sidecar (<name>.json beside it) when it describes this very file."""
    sidecar = path.with_suffix(".json")
    try:
        summary = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and summary.get("sha256") == sha256 else None
