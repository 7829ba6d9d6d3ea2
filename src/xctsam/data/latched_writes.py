"""The file object HDF5 writes new volumes through, so that a full disk fails cleanly."""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import Any


class LatchedWrites:
    """The file object HDF5 writes a new volume through (h5py's file-object driver).

    HDF5 cannot recover from a failed write: after "No space left on device" while flushing,
    the file can neither be closed nor left (the process segfaults at exit). So the first
    OSError of a write is kept here and later writes are dropped (the temporary file is
    deleted anyway): HDF5 closes cleanly and the writer raises the kept error afterwards.
    """

    def __init__(self, path: Path) -> None:
        # unbuffered, so a write error surfaces in write(); closed by close()
        self._raw = open(path, "w+b", buffering=0)  # noqa: SIM115
        self.error: OSError | None = None

    def readinto(self, buffer: Any) -> int | None:
        return self._raw.readinto(buffer)

    def read(self, size: int = -1) -> bytes | None:
        return self._raw.read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if self.error is None:
            try:
                while view.nbytes:  # a write cut short by a full disk returns fewer bytes
                    view = view[self._raw.write(view) :]
            except OSError as exc:
                self.error = exc
        return memoryview(data).nbytes

    def truncate(self, size: int | None = None) -> int:
        if self.error is None:
            try:
                return self._raw.truncate(size)
            except OSError as exc:
                self.error = exc
        return self._raw.tell() if size is None else size

    def flush(self) -> None:
        """Nothing is buffered here (unbuffered file)."""

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self, exc_type: type[BaseException] | None = None, exc: BaseException | None = None, tb: TracebackType | None = None) -> None:
        """Close the file; raise a kept write error unless another error is already on its way."""
        self._raw.close()
        if exc_type is None:
            self.raise_error()
