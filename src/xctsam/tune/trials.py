"""Facts about one claimed trial, through Optuna's public storage API only.

A live `optuna.Trial` does not expose its storage id or its system attributes (where a retry
records the trial it repeats), and the heartbeat thread `Study.optimize` runs is private. The
storage we opened answers all three by the study's name and the trial's number.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def trial_id(storage: Any, study_name: str, number: int) -> int:
    """The storage's id of trial `number` of `study_name` (what heartbeats are recorded under)."""
    return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study_name), number)


def retry_of(storage: Any, trial_id: int) -> int | None:
    """The number of the trial this one retries (its worker died), or None."""
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    with warnings.catch_warnings():  # "experimental" since Optuna 2.8; what open_storage's retries record
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RetryHeartbeatStaleTrialCallback.retried_trial_number(storage.get_trial(trial_id))


@contextmanager
def heartbeat(storage: Any, trial_id: int) -> Iterator[None]:
    """Record the trial's heartbeat now and every heartbeat interval until the block ends.

    What `Study.optimize` does for its own trials: while it beats, no other worker's
    `fail_stale_trials` takes the trial for dead. Without an interval the storage has no
    heartbeat and nothing runs.
    """
    interval = storage.get_heartbeat_interval()
    if interval is None:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while True:
            storage.record_heartbeat(trial_id)
            if stop.wait(timeout=interval):
                return

    thread = threading.Thread(target=beat, name=f"heartbeat-trial-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
