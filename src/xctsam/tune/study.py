"""The study: storage, sampler and pruner from params, and the workers that share it.

Storage: by default SQLite at <project>/tune/optuna.db (one machine, no server); a
`postgresql://...` URL for many machines. Both are Optuna RDBStorages with a heartbeat: a
worker silent for 2 x tune.heartbeat_seconds is dead, its trial is failed, its MLflow run
marked FAILED and a copy queued (RetryHeartbeatStaleTrialCallback), which resumes from the
dead trial's last checkpoint. Running again with the same study name continues the study.

Trial cap: `n_trials` is the study's total of finished (complete or pruned) trials, across
workers, hosts and reruns. Optuna's MaxTrialsCallback checks the count after each trial, so
workers that start trials at the same moment overshoot it; here a worker claims its next trial
(count, then ask) under a lock on the study - a PostgreSQL advisory lock, or a file lock next
to the SQLite file - so the study ends with exactly `n_trials`. While the cap is reached only
counting running trials, a worker waits for them (and fails a dead one, so its retry runs).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from xctsam.config.params import Params, load_params
from xctsam.config.tune import TuneConfig
from xctsam.tune.trials import heartbeat, retry_of, trial_id
from xctsam.util import tracking
from xctsam.util.errors import XctsamError
from xctsam.util.interrupt import STOPPED, Interrupted, signals_raise
from xctsam.util.threads import available_cores, claim_cores, split_cores
from xctsam.util.urls import mask_secrets, redact_url, unescaped_password

log = logging.getLogger(__name__)

TUNE_DIR = "tune"
DB_NAME = "optuna.db"
FINISHED = ("COMPLETE", "PRUNED")


class TuneError(XctsamError):
    """A search that cannot start or go on (storage unreachable, every trial failing)."""


# ---------------------------------------------------------------- storage
def tune_dir(root: Path | None = None) -> Path:
    """<project>/tune (the project itself when run from a DVC temporary experiment copy)."""
    return tracking.store_dir(root).parent / TUNE_DIR


def check_storage_url(url: str) -> str:
    """`url`, refused in one line when a driver would misread it and echo part of its password."""
    if unescaped_password(url):
        raise TuneError(f"storage {storage_label(url)}: its password holds an unescaped @ or /; write them as %40 and %2F")
    return url


def resolve_storage_url(url: str | None, root: Path | None = None) -> str:
    if url:
        return check_storage_url(url)
    folder = tune_dir(root)
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / DB_NAME}"


def storage_label(url: str) -> str:
    """The URL without its password (userinfo or `?password=`): safe for MLflow tags and messages."""
    return redact_url(url)


class RetryDeadTrial:
    """Heartbeat-stale trial (its worker died): mark its MLflow run failed, queue a retry."""

    def __init__(self, max_retry: int) -> None:
        from optuna.storages import RetryHeartbeatStaleTrialCallback

        self.retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry, inherit_intermediate_values=True)

    def __call__(self, study: Any, trial: Any) -> None:
        from xctsam.tune.mlflow_log import mark_dead_trial

        try:
            mark_dead_trial(trial)
        except Exception as exc:  # the retry matters more than the run's status
            log.warning("trial %d: could not mark its MLflow run failed: %s", trial.number, exc)
        self.retry(study, trial)
        log.warning("trial %d: its worker stopped answering; failed and queued again", trial.number)


def open_storage(url: str, config: TuneConfig) -> Any:
    """An RDBStorage with heartbeat and retry of dead workers' trials; one line if unreachable."""
    import warnings

    import optuna

    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    try:
        with warnings.catch_warnings():  # the heartbeat is "experimental" since Optuna 2.9
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url, engine_kwargs=engine_kwargs, heartbeat_interval=config.heartbeat_seconds,
                grace_period=2 * config.heartbeat_seconds, heartbeat_stale_trial_callback=RetryDeadTrial(config.max_retry),
            )
    except Exception as exc:
        first = mask_secrets(str(exc).strip().splitlines()[0], url) if str(exc).strip() else type(exc).__name__
        raise TuneError(f"storage {storage_label(url)}: cannot open ({first}); check the URL and that the database server runs") from None


@contextmanager
def study_lock(storage: Any, study_name: str) -> Iterator[None]:
    """Exclusive across processes and, with PostgreSQL, across hosts; released if the holder dies."""
    from sqlalchemy import text

    url = storage.engine.url
    if url.get_backend_name() == "postgresql":
        key = int.from_bytes(hashlib.sha256(f"xctsam.tune:{study_name}".encode()).digest()[:8], "big", signed=True)
        with storage.engine.connect() as connection:
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": key})
            try:
                yield
            finally:
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
                connection.commit()
    elif url.get_backend_name() == "sqlite" and url.database:
        with open(f"{url.database}.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
    else:  # other databases: no lock, so concurrent workers may exceed the cap by a trial each
        yield


# ---------------------------------------------------------------- sampler, pruner, study
def make_sampler(config: TuneConfig, seed: int) -> Any:
    import optuna

    if config.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # constant liar: running trials count as bad results, so parallel workers spread out
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


def make_pruner(config: TuneConfig, epochs: int) -> Any:
    import optuna

    if config.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1)
    if config.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(epochs, 1))
    return optuna.pruners.NopPruner()


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker process needs; picklable, so `--workers N` can hand it to spawned processes."""

    params_path: Path
    data_root: Path
    study_name: str
    storage: str | None = None
    n_trials: int | None = None  # study total; None: params tune.n_trials
    timeout: float | None = None  # seconds after which no new trial is started
    seed: int | None = None  # None: params seed
    worker_index: int = 0  # offsets the sampler's seed, so workers draw different values
    root: Path | None = None  # project root (default: found from the working directory)
    cores: tuple[int, ...] | None = None  # a local worker's share of the cores (None: all of this process's)
    threads: int | None = None  # params tune.threads_per_worker


@dataclass
class Opened:
    params: Params
    storage: Any
    study: Any
    url: str


def open_study(spec: WorkerSpec) -> Opened:
    """Load params, check the space, create or load the study (load_if_exists)."""
    import optuna

    from xctsam.tune.objective import epochs_of, trial_params
    from xctsam.tune.space import check_keys

    params = load_params(spec.params_path)
    if spec.seed is not None:
        params = params.model_copy(update={"seed": spec.seed})
    check_keys(params, spec.params_path)
    if not params.tune.space:
        raise TuneError(f"{spec.params_path}: tune.space is empty; add the params keys to search (README, Tuning)")
    config = params.tune
    url = resolve_storage_url(spec.storage, spec.root)
    storage = open_storage(url, config)
    epochs = epochs_of(trial_params(params, {}, spec.params_path))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=spec.study_name, storage=storage, load_if_exists=True, direction=config.direction, pruner=make_pruner(config, epochs),
    )
    # a rerun must not replay the first run's draws: the seed moves on with the study's size
    study.sampler = make_sampler(config, params.seed + spec.worker_index + len(study.get_trials(deepcopy=False)))
    return Opened(params, storage, study, url)


def _logged(params: Params, spec: WorkerSpec, url: str) -> dict[str, Any]:
    return {"tune": params.tune.model_dump(mode="json"), "study": spec.study_name, "storage": storage_label(url), "seed": params.seed}


def prepare(spec: WorkerSpec) -> tuple[Opened, str]:
    """Study and MLflow parent run, made once (under the study lock) before any trial."""
    from xctsam.tune.mlflow_log import parent_run

    opened = open_study(spec)
    tracking.configure()
    with study_lock(opened.storage, spec.study_name):
        parent = parent_run(opened.study, storage_label(opened.url), _logged(opened.params, spec, opened.url))
    return opened, parent


# ---------------------------------------------------------------- one worker
def _claim(study: Any, storage: Any, cap: int) -> Any:
    """The next trial to run, "wait" (the cap is reached counting running trials), or None (done)."""
    import warnings

    import optuna
    from optuna.trial import TrialState

    with study_lock(storage, study.study_name), warnings.catch_warnings():
        # fail_stale_trials is "experimental"; ask() warns that the heartbeat is meant for
        # Study.optimize, but run_worker runs the same heartbeat thread that optimize does
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", "Heartbeat of storage is supposed to be used")
        optuna.storages.fail_stale_trials(study)
        states = [trial.state.name for trial in study.get_trials(deepcopy=False)]
        finished = sum(state in FINISHED for state in states)
        if finished >= cap:
            return None
        if finished + states.count(TrialState.RUNNING.name) >= cap:
            return "wait"
        trial = study.ask()
        # a heartbeat from the start: a worker dying before its trial's heartbeat thread runs
        # would otherwise leave a trial RUNNING that no one can ever fail
        storage.record_heartbeat(trial_id(storage, study.study_name, trial.number))
        return trial


@dataclass
class WorkerReport:
    trials: dict[int, str]  # number -> final state, of the trials this worker ran


def run_worker(spec: WorkerSpec) -> WorkerReport:
    """Claim and run trials until the study has its cap of finished trials or time runs out."""
    from xctsam.tune.mlflow_log import log_study_summary
    from xctsam.tune.objective import Objective

    opened, parent = prepare(spec)
    study, params = opened.study, opened.params
    cap = spec.n_trials or params.tune.n_trials
    objective = Objective(params, spec.data_root, tune_dir(spec.root) / "trials" / spec.study_name)
    deadline = None if spec.timeout is None else time.monotonic() + spec.timeout
    report = WorkerReport({})
    error: BaseException | None = None
    try:
        while deadline is None or time.monotonic() < deadline:
            trial = _claim(study, opened.storage, cap)
            if trial is None:
                break
            if trial == "wait":
                time.sleep(params.tune.heartbeat_seconds)
                continue
            report.trials[trial.number] = _run_trial(study, opened.storage, trial, objective, parent, spec)
    except BaseException as exc:
        error = exc
        raise
    finally:
        log_study_summary(parent, study, error)
    return report


def _run_trial(study: Any, storage: Any, trial: Any, objective: Any, parent: str, spec: WorkerSpec) -> str:
    """Train one claimed trial under a heartbeat, tell the study, close its MLflow run; its final state.

    A failing trial stops the worker (raised after it is told), as Study.optimize does: a bug
    or bad params would fail every trial alike. Ctrl-C queues the trial again, so the next
    run resumes it from its checkpoint.
    """
    import optuna
    from optuna.trial import TrialState

    from xctsam.tune.mlflow_log import TrialRun
    from xctsam.tune.space import suggest

    tune = objective.params.tune
    state, value, error, run, values = TrialState.FAIL, None, None, None, {}
    claimed = trial_id(storage, spec.study_name, trial.number)
    retried = retry_of(storage, claimed)
    with heartbeat(storage, claimed):
        try:
            values = suggest(trial, tune.space)
            run = TrialRun(parent, trial, values, spec.study_name, retried)
            value = objective(trial, values, run, retried)
            state = TrialState.COMPLETE
        except optuna.TrialPruned as exc:
            state = TrialState.PRUNED
            log.info("trial %d pruned: %s", trial.number, exc)
        except (Exception, *STOPPED) as exc:
            error = exc
    if state == TrialState.COMPLETE and (value is None or math.isnan(value)):
        state, error = TrialState.FAIL, TuneError(f"trial {trial.number}: {tune.metric} undefined at every epoch; more val_slices or val_volumes?")
    frozen = study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
    shown = f" {tune.metric} {frozen.value:.4f}" if frozen.state == TrialState.COMPLETE else ""
    print(f"worker {spec.worker_index}: trial {trial.number} {frozen.state.name.lower()}{shown} {values}", flush=True)
    if run is not None:
        run.finish(frozen.state.name, frozen.value if frozen.state == TrialState.COMPLETE else None, error)
    if isinstance(error, STOPPED):
        RetryDeadTrial(tune.max_retry).retry(study, storage.get_trial(claimed))
    if error is not None:
        raise error
    return frozen.state.name


# ---------------------------------------------------------------- several workers
def enter_worker(spec: WorkerSpec) -> int:
    """A spawned worker's set-up: no live progress bars (several would garble one terminal) and
    its own cores, so the workers never oversubscribe them; returns its thread count."""
    os.environ["XCTSAM_NO_PROGRESS"] = "1"
    return claim_cores(spec.cores, spec.threads)


def _worker_main(spec: WorkerSpec) -> None:
    """A spawned worker: user errors as one line and exit code 2, as the CLI does."""
    try:
        enter_worker(spec)
        with signals_raise():
            run_worker(spec)
    except XctsamError as exc:
        print(f"error: worker {spec.worker_index}: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except Interrupted as exc:
        sys.exit(exc.exit_code)


def run_workers(spec: WorkerSpec, workers: int) -> int:
    """`workers` processes sharing the study (1: this process); returns the worst exit code."""
    if workers <= 1:
        run_worker(spec)
        return 0
    prepare(spec)  # one process creates the study and the parent run before the others start
    context = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch threads or DB connections
    processes = [context.Process(target=_worker_main, args=(worker,), name=f"tune-worker-{i}") for i, worker in enumerate(worker_specs(spec, workers))]
    for process in processes:
        process.start()
    try:
        for process in processes:
            process.join()
    except STOPPED:  # the terminal's Ctrl-C reached the workers too: let them save and stop
        for process in processes:
            process.join()
        raise
    return worst_exit_code([process.exitcode or 0 for process in processes])


def worker_specs(spec: WorkerSpec, workers: int) -> list[WorkerSpec]:
    """One spec per local worker: its sampler offset and its share of this process's cores."""
    threads = load_params(spec.params_path).tune.threads_per_worker
    shares = split_cores(available_cores(), workers)
    return [
        replace(spec, worker_index=spec.worker_index * workers + i, cores=tuple(share), threads=threads)
        for i, share in enumerate(shares)
    ]


def worst_exit_code(codes: list[int]) -> int:
    """The code to exit with: the largest, a worker killed by signal N (exitcode -N) as 128 + N."""
    return max((128 - code if code < 0 else code for code in codes), default=0)


def study_summary(spec: WorkerSpec) -> dict[str, Any]:
    """Counts per state and the best trial, for the CLI's last line."""
    opened = open_study(spec)
    states: dict[str, int] = {}
    for trial in opened.study.get_trials(deepcopy=False):
        states[trial.state.name] = states.get(trial.state.name, 0) + 1
    best = None
    if states.get("COMPLETE"):
        best = {"number": opened.study.best_trial.number, "value": opened.study.best_value, "params": opened.study.best_params}
    return {"states": states, "best": best, "storage": storage_label(opened.url)}
