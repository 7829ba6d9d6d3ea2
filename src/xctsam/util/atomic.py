"""Write-then-rename helpers: a failure leaves nothing half-made under the final name.

They also turn the write failures a user can fix into one-line `InputError`s: a file where a
folder must be (`--out somefile/x.h5`), a full disk (ENOSPC, or the short write numpy reports
for it) or a file size limit (EFBIG).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from xctsam.util.errors import InputError

_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_DISK_FULL_REMEDY = "free space or choose another --out/--root"


class DiskFullError(InputError):
    """Writing `path` failed for want of space (full disk, quota, file size limit)."""

    def __init__(self, path: Path | str, problem: str = "no space left on device") -> None:
        super().__init__(path, problem, _DISK_FULL_REMEDY)


# numpy's `tofile` (tifffile writes image data with it) reports a short write without an errno;
# a file system stops a write short when it is out of space (or quota, or file size limit)
_SHORT_WRITE = re.compile(r"^(\d+) requested and (\d+) written$")


def _disk_full_problem(exc: OSError) -> str | None:
    """What a write failure for want of space says to the user; None for any other failure."""
    if exc.errno in _DISK_FULL:
        return os.strerror(exc.errno).lower()
    short = _SHORT_WRITE.match(str(exc)) if exc.errno is None else None
    if short is not None:
        return f"no space left on device ({short[2]} of {short[1]} bytes written)"
    return None


@contextmanager
def _disk_full_names(final: Path) -> Iterator[None]:
    """Turn an OSError for want of space inside the block into a DiskFullError naming `final`."""
    try:
        yield
    except OSError as exc:
        problem = _disk_full_problem(exc)
        if problem is None:
            raise
        raise DiskFullError(final, problem) from None


def ensure_folder(folder: Path) -> None:
    """Create `folder` and its parents; a file in the way is named instead of a traceback."""
    folder = Path(folder)
    for existing in (folder, *folder.parents):
        if existing.exists():
            if not existing.is_dir():
                needed = "" if existing == folder else f" (to create {folder})"
                raise InputError(existing, f"is a file where a folder is needed{needed}", "choose another --out/--root, or move the file")
            break
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(folder, f"cannot create this folder ({exc.strerror})", "choose another --out/--root") from None


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
    """Yield a temporary sibling path; rename it onto `final` only if the block succeeds.

    A full disk while the block writes becomes a DiskFullError naming `final`.
    """
    final = Path(final)
    if final.is_dir():
        raise InputError(final, "is a folder", "give a file name")
    ensure_folder(final.parent)
    tmp: Path | None = None
    try:
        with _disk_full_names(final):
            fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
            os.close(fd)
            tmp = Path(tmp_name)
            yield tmp
            _publish(tmp, final, 0o666)
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; it replaces `final` only if the block succeeds.

    Used where a stage writes a whole folder (an imported split): on bad input the old folder
    is untouched and no partial new one appears.
    """
    final = Path(final)
    if final.exists() and not final.is_dir():
        raise InputError(final, "is a file, not a folder", "choose another --out/--root, or move the file")
    ensure_folder(final.parent)
    with _disk_full_names(final):
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        with _disk_full_names(final):
            yield tmp
            _replace_folder(tmp, final)
    except DiskFullError as exc:
        # a file staged inside tmp is named where it was going to be
        raise DiskFullError(_moved(exc.path, tmp, final), exc.problem) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace_folder(tmp: Path, final: Path) -> None:
    """Put folder `tmp` in place of `final`. The old one is renamed aside first (a rename cannot
    half-fail the way deleting a tree can), so a failure leaves it where it was."""
    if not final.exists():
        _publish(tmp, final, 0o777)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
    os.replace(final, old)  # renaming a folder onto an empty one replaces it
    try:
        _publish(tmp, final, 0o777)
    except BaseException:
        os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _moved(path: Path, tmp: Path, final: Path) -> Path:
    """`path` inside `tmp` as it would be inside `final` (unchanged when not inside `tmp`)."""
    try:
        return final / Path(path).relative_to(tmp)
    except ValueError:
        return Path(path)


def refuse_existing(path: Path, option: str) -> None:
    """Refuse to write a new file where one exists (or a link, even a broken one): one line,
    naming it, before any work."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        raise InputError(path, "exists", f"choose another {option}, or move or delete it")


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
