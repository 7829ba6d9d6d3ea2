"""User-facing errors: the CLI prints their message as one line and exits with code 2."""

from __future__ import annotations

from pathlib import Path


class XctsamError(Exception):
    """A problem the user can fix (bad input, bad params); never a bug in xctsam."""

    exit_code = 2


class InputError(XctsamError):
    """A file that cannot be used: missing, corrupt, wrong shape or dtype, bad values."""

    def __init__(self, path: Path | str, problem: str, remedy: str = "") -> None:
        self.path = Path(path)
        self.problem = problem
        self.remedy = remedy
        message = f"{path}: {problem}"
        if remedy:
            message += f"; {remedy}"
        super().__init__(message)


class ConfigError(XctsamError):
    """A params key that is unknown, of the wrong type, or refers to something undefined."""

    def __init__(self, source: Path | str, key: str, problem: str) -> None:
        self.key = key
        super().__init__(f"{source}: {key}: {problem}")


class TrainingDiverged(XctsamError):
    """A training whose loss or weights became NaN or infinite: stopped before it saves them."""


def listed(items: list[str], shown: int = 5) -> str:
    """'[a, b, c, ...]': the first `shown` items of a list a message names."""
    return f"[{', '.join(items[:shown])}{', ...' if len(items) > shown else ''}]"
