"""Content hashes: of files (checkpoints, volumes) and of settings."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def fingerprint(*parts: Any) -> str:
    """Short stable hash of JSON-able parts (settings, seeds, other hashes)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, streamed (official SAM checkpoints are 0.4 to 2.6 GB)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()
