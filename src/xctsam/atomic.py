"""Write-then-rename helpers: a failure leaves nothing half-made under the final name."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish(tmp: Path, final: Path, mode: int) -> None:
    """Give the temporary file or folder the permissions a plain create would have, then rename.

    mkstemp/mkdtemp create private (0600/0700) entries; outputs are meant to be shared.
    """
    os.chmod(tmp, mode & ~_umask())
    os.replace(tmp, final)


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto `final` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        _publish(tmp, final, 0o666)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; it replaces `final` only if the block succeeds.

    Used where a stage writes a whole folder (an imported split): on bad input the old folder
    is untouched and no partial new one appears.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        _publish(tmp, final, 0o777)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _missing_dirs(path: Path) -> list[Path]:
    """`path` and its ancestors that do not exist yet, deepest first."""
    return [folder for folder in (path, *path.parents) if not folder.exists()]


@contextmanager
def remove_created_dirs_on_failure(targets: Iterable[Path]) -> Iterator[None]:
    """On failure, remove the (still empty) folders created inside this block.

    atomic_path / atomic_dir create missing parents up front; without this a failed stage
    would leave empty folders (e.g. `real/`) behind.
    """
    created = sorted(
        {folder for target in targets for folder in _missing_dirs(Path(target))},
        key=lambda p: len(p.parts),
        reverse=True,
    )
    try:
        yield
    except BaseException:
        for folder in created:
            try:
                folder.rmdir()
            except OSError:  # not empty (someone else wrote there) or already gone: leave it
                pass
        raise
