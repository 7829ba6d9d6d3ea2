"""Stop signals: how Ctrl-C (SIGINT) and `kill` (SIGTERM) end a command.

Either signal becomes `Interrupted`, raised in the main thread, so every `with` block on the
way out runs (temporary files go, MLflow runs end KILLED) and the CLI exits 128 + signal
number: 130 for SIGINT, 143 for SIGTERM, as shells, DVC and SLURM read them.

`Interrupted` derives from BaseException, not KeyboardInterrupt: `except Exception` must not
swallow it, and the CLI framework must not turn it into its own exit code (Typer maps any
KeyboardInterrupt to 130, which would report a SIGTERM as a Ctrl-C).

Long loops install an `InterruptLatch` instead: the first signal only sets `requested`,
honoured between steps, so the checkpoint holds a whole step; a second signal stops at once.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """A stop signal reached the process; `detail` says what was kept (e.g. the checkpoint)."""

    def __init__(self, signum: int = signal.SIGINT, detail: str = "") -> None:
        self.signum = int(signum)
        self.detail = detail
        super().__init__(self.message)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def message(self) -> str:
        kept = self.detail or "finished outputs are kept"
        return f"interrupted ({signal.Signals(self.signum).name}): {kept}; run again to resume"


# What code that must clean up on any stop catches (KeyboardInterrupt: Python's own SIGINT
# handler, in processes that never installed `signals_raise`).
STOPPED = (Interrupted, KeyboardInterrupt)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()  # signals reach it only


def _raise(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


@contextmanager
def _handling(handler: Any) -> Iterator[None]:
    """`handler` for SIGINT and SIGTERM within the block; the previous handlers come back after."""
    if not _main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def signals_raise() -> AbstractContextManager[None]:
    """Within the block, SIGINT and SIGTERM raise `Interrupted`."""
    return _handling(_raise)


class InterruptLatch:
    """Ctrl-C or `kill` only records the signal, honoured between steps; a second one raises."""

    def __init__(self) -> None:
        self.signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise Interrupted(signum)
        self.signum = signum

    def interruption(self, detail: str) -> Interrupted:
        """The exception a loop raises once it has saved its state (SIGINT when another rank was signalled)."""
        return Interrupted(self.signum if self.signum is not None else signal.SIGINT, detail)

    @contextmanager
    def installed(self) -> Iterator[InterruptLatch]:
        with _handling(self._handle):
            yield self
