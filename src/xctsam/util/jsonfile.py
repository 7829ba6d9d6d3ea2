"""Metrics and summaries as JSON files: one writer, so every file reads the same way.

JSON has no NaN or infinity, and a score that is undefined (a class in neither prediction nor
truth) is NaN: it is written as null, never as the non-standard `NaN` json.dumps would emit.
Files are written atomically, indented, with a final newline (diff- and DVC-friendly).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from xctsam.util.atomic import write_text_atomic


def json_ready(value: Any) -> Any:
    """NaN and infinities -> None (JSON null) throughout nested mappings, lists and tuples."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    return value


def json_text(value: Any) -> str:
    """`value` as the files hold it: non-finite numbers as null, indented, a final newline."""
    return json.dumps(json_ready(value), indent=2, allow_nan=False) + "\n"


def write_json(path: Path, value: Any) -> Path:
    """Write `value` to `path` atomically (see `json_text`); returns the path."""
    write_text_atomic(Path(path), json_text(value))
    return Path(path)
