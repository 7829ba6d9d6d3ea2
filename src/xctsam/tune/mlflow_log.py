"""MLflow runs of a search: one parent run per study, one child run per trial.

optuna-integration's MLflowCallback is deprecated and logs flat runs after the fact; here each
trial's run exists while it trains, so its per-epoch metrics stream into the UI, and every
run sits under the study's parent. Everything goes through an explicit MlflowClient: workers
are separate processes and no global "active run" is shared or needed.

The parent is found by tags (study name + storage), and its id is kept in the study's user
attributes. The caller holds the study's lock (xctsam.tune.study.study_lock) around
`parent_run`, so concurrent workers create it exactly once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from xctsam.util import tracking

STUDY_TAG = "xctsam.tune.study"
STORAGE_TAG = "xctsam.tune.storage"
PARENT_ATTR = "mlflow_parent_run_id"  # study user attribute
RUN_ATTR = "mlflow_run_id"  # trial user attribute: the trial's child run
STATE_TAG = "optuna.state"


def _client() -> Any:
    import mlflow

    return mlflow.MlflowClient()


def _exists(client: Any, run_id: str) -> bool:
    try:
        return client.get_run(run_id).info.lifecycle_stage == "active"
    except Exception:  # another MLflow store (a worker pointed elsewhere) or a deleted run
        return False


def parent_run(study: Any, storage_label: str, logged: Mapping[str, Any]) -> str:
    """The study's parent run id: remembered in the study, found by tags, or created."""
    experiment_id = tracking.configure()
    client = _client()
    remembered = study.user_attrs.get(PARENT_ATTR)
    if remembered and _exists(client, remembered):
        client.update_run(remembered, status="RUNNING")  # a rerun continues the study
        return remembered
    name = study.study_name
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.`{STUDY_TAG}` = '{name}' and tags.`{STORAGE_TAG}` = '{storage_label}'", max_results=1
    )
    if found:
        run_id = found[0].info.run_id
    else:
        run = client.create_run(experiment_id, run_name=f"tune {name}", tags={STUDY_TAG: name, STORAGE_TAG: storage_label, "stage": "tune"})
        run_id = run.info.run_id
        for key, value in tracking.flatten(logged).items():
            client.log_param(run_id, key, str(value)[:6000])
    study.set_user_attr(PARENT_ATTR, run_id)
    client.update_run(run_id, status="RUNNING")
    return run_id


class TrialRun:
    """The child run of one trial: params when it starts, metrics as it trains, state at the end."""

    def __init__(self, parent_id: str, trial: Any, values: Mapping[str, Any], study_name: str, retry_of: int | None = None) -> None:
        self.client = _client()
        self.parent_id = parent_id
        self.number = trial.number
        experiment_id = self.client.get_run(parent_id).info.experiment_id
        tags = {"mlflow.parentRunId": parent_id, STUDY_TAG: study_name, "stage": "tune_trial", "optuna.trial_number": str(trial.number)}
        if retry_of is not None:  # the trial a dead worker left, which this one repeats
            tags["optuna.retry_of"] = str(retry_of)
        self.run_id = self.client.create_run(experiment_id, run_name=f"trial {trial.number}", tags=tags).info.run_id
        trial.set_user_attr(RUN_ATTR, self.run_id)
        for key, value in {**values, "trial_number": trial.number}.items():
            self.client.log_param(self.run_id, key, str(value))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = _now_ms()
        batch = [Metric(key, float(value), now, step) for key, value in metrics.items() if not math.isnan(float(value))]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def finish(self, state: str, value: float | None, error: BaseException | None = None) -> None:
        """state: an Optuna TrialState name. Complete and pruned trials end FINISHED; others FAILED,
        or KILLED when a stop signal (`error`) ended them."""
        if value is not None and not math.isnan(value):
            self.client.log_metric(self.run_id, "objective", value)
            self.client.log_metric(self.parent_id, "objective", value, step=self.number)
        self.client.set_tag(self.run_id, STATE_TAG, state)
        self.client.set_terminated(self.run_id, "FINISHED" if state in ("COMPLETE", "PRUNED") else tracking.end_status(error or RuntimeError()))


def mark_dead_trial(trial: Any) -> None:
    """A trial whose worker died: its child run ends FAILED instead of RUNNING forever."""
    run_id = trial.user_attrs.get(RUN_ATTR)
    if not run_id:
        return
    client = _client()
    if _exists(client, run_id) and client.get_run(run_id).info.status == "RUNNING":
        client.set_tag(run_id, STATE_TAG, "FAIL")
        client.set_terminated(run_id, "FAILED")


def log_study_summary(parent_id: str, study: Any, error: BaseException | None = None) -> None:
    """The best value and its params on the parent, updated by each worker as it ends (its status
    from `error`: the last worker to end leaves it right; an earlier one may mark it while others
    still run)."""
    from optuna.trial import TrialState

    client = _client()
    client.set_terminated(parent_id, tracking.end_status(error))
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return
    best = study.best_trial
    client.log_metric(parent_id, "best_value", best.value)
    client.log_metric(parent_id, "trials_complete", len(complete))
    client.set_tag(parent_id, "best_trial", str(best.number))
    for key, value in best.params.items():
        client.set_tag(parent_id, f"best.{key}", str(value))


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)
