"""Which outputs of a prediction campaign are finished, and which files in its way are its own.

Each file of a scan (its output, uncertainty map, defect report) is written atomically, but not
all at once: a kill or a full disk can fall between two of them. And a file that exists says
nothing about who wrote it (the user's own `part.tif`, a truncated copy). So each output has a
record beside it, `<output name>.xctsam.json`, written atomically:

- before the first byte of a scan's files, the names about to be written (`writing`), so that
  after a kill a rerun knows them for its own;
- once they are in, each name with its size in bytes (`complete`; a folder: all its files).

Reading a record settles it: a `writing` name that exists was published whole (atomic writes
publish nothing else), so it counts as complete at its present size; one that does not exist
was never written. A file is the campaign's to keep or replace only when its record names it
at its present size; any other file at a name the campaign would write is the user's, refused
before any work, and never replaced or deleted.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from xctsam.util.errors import InputError
from xctsam.util.jsonfile import write_json

RECORD_SUFFIX = ".xctsam.json"
_KIND = "xctsam predict record"


def record_path(out: Path) -> Path:
    """Where the record of output `out` goes: `<out name>.xctsam.json` beside it."""
    out = Path(out)
    return out.with_name(out.name + RECORD_SUFFIX)


def size_of(path: Path) -> int:
    """Bytes of a file, or of all files under a folder (an OME-Zarr output)."""
    if not path.is_dir():
        return path.stat().st_size
    return sum(os.path.getsize(os.path.join(folder, name)) for folder, _, names in os.walk(path) for name in names)


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


class Record:
    """The record of one output: its finished files with their sizes (see the module)."""

    def __init__(self, out: Path, complete: dict[str, int] | None = None) -> None:
        self.out = Path(out)
        self.path = record_path(self.out)
        self.complete = dict(complete or {})

    @classmethod
    def read(cls, out: Path) -> Record:
        """The record beside `out`, settled; an empty one where there is none."""
        path = record_path(out)
        if not _exists(path):
            return cls(out)
        try:
            data = json.loads(path.read_text())
            complete, writing = dict(data["complete"]), list(data["writing"])
            if data.get("kind") != _KIND or not all(isinstance(size, int) for size in complete.values()):
                raise ValueError("not a record")
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
            raise InputError(path, "is not a record xctsam predict wrote", "move or delete it, or choose another --out") from None
        record = cls(out, complete)
        record._settle(writing)
        return record

    def _file(self, name: str) -> Path:
        return self.out.parent / name

    def _settle(self, writing: Iterable[str]) -> None:
        """Names being written: whole where they exist (see the module), never written where not."""
        for name in writing:
            path = self._file(name)
            if _exists(path):
                self.complete[name] = size_of(path)
            else:
                self.complete.pop(name, None)

    def owns(self, path: Path) -> bool:
        """Whether `path` exists as the campaign finished it (named here, at its recorded size)."""
        size = self.complete.get(Path(path).name)
        return size is not None and Path(path).parent == self.out.parent and _exists(path) and size_of(path) == size

    def finished(self) -> bool:
        return self.owns(self.out)

    def missing(self) -> list[Path]:
        """Files recorded as finished that are gone (deleted, or lost since)."""
        return [self._file(name) for name in sorted(self.complete) if not _exists(self._file(name))]

    def refuse_foreign(self, paths: Iterable[Path]) -> None:
        """Refuse (one line, naming it) any existing path the campaign would write but does not own."""
        for path in paths:
            if _exists(path) and not self.owns(path):
                raise InputError(path, self._why_foreign(Path(path)), "move or delete it to predict its scan again, or choose another --out")

    def _why_foreign(self, path: Path) -> str:
        recorded = self.complete.get(path.name)
        if recorded is not None:
            return f"differs from the output xctsam finished ({size_of(path)} bytes, {recorded} recorded in {self.path.name})"
        if path == self.out:
            return f"exists, but xctsam has no record of finishing it (no {self.path.name} naming it): it may be incomplete, or another program's"
        return f"exists and is not a file xctsam wrote for {self.out.name} (its {self.path.name} does not name it)"

    def discard(self) -> None:
        """Delete every file this record owns, then the record: an unfinished scan starts clean
        (its old side files describe a prediction that is gone). Files it does not own stay."""
        for name in sorted(self.complete):
            path = self._file(name)
            if self.owns(path) and path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif self.owns(path):
                path.unlink()
        self.complete = {}
        self._remove()

    @contextlib.contextmanager
    def writing(self, paths: Iterable[Path]) -> Iterator[None]:
        """Record `paths` as being written, run the block, then record what got written: all of
        them, or after a failure the whole files it published (the rest are written again by a
        rerun). Files in the way that this record does not own are refused first."""
        paths = list(paths)
        self.refuse_foreign(paths)
        names = [Path(path).name for path in paths]
        self._save(names)
        try:
            yield
        except BaseException:
            self._settle(names)
            # best effort, the block's error is the one to report: a record still saying
            # `writing` settles the same way when read
            with contextlib.suppress(OSError, InputError):
                self._close()
            raise
        self._settle(names)
        self._close()

    def _remove(self) -> None:
        if _exists(self.path):  # (unlink's missing_ok still fails where a file stands for the folder)
            self.path.unlink()

    def _save(self, writing: list[str]) -> None:
        write_json(self.path, {"kind": _KIND, "output": self.out.name, "complete": dict(sorted(self.complete.items())), "writing": writing})

    def _close(self) -> None:
        """The settled record on disk; none when nothing is complete (a failed first scan leaves nothing)."""
        if self.complete:
            self._save([])
        else:
            self._remove()
