"""torch.load of files a user hands over: weights only, and a refusal in one line of our own.

`weights_only=True` runs no code from the file, only rebuilds tensors and plain values. When it
refuses, torch's message is a page recommending `weights_only=False` (which would run whatever
the file holds); the user needs to know what the file is, not how to bypass the check.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from xctsam.util.errors import InputError

# torch words the refusal "GLOBAL x was not an allowed global" or "unsupported GLOBAL x whose module y is blocked"
_REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+) (?:was not an allowed global|whose module)")


def _unpickling_problem(exc: pickle.UnpicklingError) -> str:
    refused = _REFUSED_GLOBAL.search(str(exc))
    if refused:
        return f"not a PyTorch checkpoint of tensors: it holds a pickled {refused.group(1)} object, which is not loaded (it could run code)"
    return "not a PyTorch checkpoint: its contents do not unpickle (corrupt, or another kind of file)"


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_torch_file(path: Path, remedy: str, *, mmap: bool = False) -> Any:
    """torch.load(path, weights_only=True) on the CPU; InputError(path, ..., remedy) if it fails.

    mmap: memory-map a zip-format file (a 2.6 GB vit_h is then not held twice while copied in).
    """
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:  # weights_only's refusals all arrive as this type
        raise InputError(path, _unpickling_problem(exc), remedy) from None
    except Exception as exc:  # torn zip, empty file, wrong magic number: torch raises several unrelated types
        raise InputError(path, f"not a PyTorch checkpoint: unreadable, corrupt or truncated ({_first_line(exc)})", remedy) from None
