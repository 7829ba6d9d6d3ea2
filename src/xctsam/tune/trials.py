"""Facts about one Optuna trial that its public API does not expose."""

from __future__ import annotations

from typing import Any


def retry_of(trial: Any) -> int | None:
    """The number of the trial this one retries (its worker died), or None."""
    frozen = trial.study._storage.get_trial(trial._trial_id)  # a live Trial does not expose system attrs
    return frozen.system_attrs.get("failed_trial")
