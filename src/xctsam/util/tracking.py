"""MLflow conventions: where the store is, which experiment, how stage runs are named.

Store: SQLite at <project>/mlruns/mlflow.db with artifacts under <project>/mlruns/artifacts,
both absolute, so runs made from DVC's temporary experiment copies land in the project's own
store. MLFLOW_TRACKING_URI (a team server) overrides it. Metric keys follow README (MLflow):
`iou.<split>.<class>`, `dice.<split>.<class>`, `miou.<split>`, `fid.<split>`, ...
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from xctsam.util.errors import XctsamError
from xctsam.util.interrupt import STOPPED
from xctsam.util.urls import redact_url

EXPERIMENT = os.environ.get("XCTSAM_EXPERIMENT", "xctsam")
STORE_DIR = "mlruns"
# MLflow 3's UI opens an experiment by its kind: untagged ones it may take for GenAI (traces,
# an assistant) instead of training runs. These runs are model training.
KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"


class TrackingUnavailable(XctsamError):
    """The tracking server named by MLFLOW_TRACKING_URI does not answer."""


def project_root(start: Path | None = None) -> Path:
    """The folder holding dvc.yaml or params.yaml, searched upwards from `start` (cwd)."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file() or (folder / "params.yaml").is_file():
            return folder
    return here


def outside_dvc_temp(root: Path) -> Path:
    """DVC queued/temp experiments run in <project>/.dvc/tmp/exps/...: log to the project itself."""
    parts = root.parts
    if ".dvc" in parts:
        return Path(*parts[: parts.index(".dvc")])
    return root


def store_dir(root: Path | None = None) -> Path:
    return outside_dvc_temp(project_root(root)) / STORE_DIR


def tracking_uri(root: Path | None = None) -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    store = store_dir(root)
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


# A server that does not answer: MLflow's defaults (120 s per request, 7 retries with backoff)
# leave a command silent for minutes before five chained tracebacks; a user's own settings win.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "20", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
PROBE_SECONDS = 5.0


def _probe_server(uri: str) -> None:
    """Refuse at once, in one line, a tracking server that does not answer its /health."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=PROBE_SECONDS):  # noqa: S310 (http(s) only: checked by the caller)
            return
    except urllib.error.HTTPError:
        return  # something answers (a proxy in front, a /health behind authentication): MLflow will say more
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise TrackingUnavailable(f"MLflow tracking server {redact_url(uri)} does not answer ({reason}); start it, or unset MLFLOW_TRACKING_URI to use the project's own store") from None


def connect(root: Path | None = None) -> str:
    """Point mlflow at the tracking store (the project's, or MLFLOW_TRACKING_URI's server, which
    must answer within seconds); returns the URI. Creates no experiment: loading a registered
    model needs none."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    # its download bars on stderr would bury a refusal's one line (and say nothing a user needs)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import logging

    import mlflow

    # "Creating initial MLflow database tables..." on a new store: noise on stderr, where a
    # failing command's one error line must stand alone
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    uri = tracking_uri(root)
    if uri.split(":", 1)[0].lower() in ("http", "https"):
        _probe_server(uri)
    mlflow.set_tracking_uri(uri)
    return uri


def configure(root: Path | None = None) -> str:
    """Point mlflow at the project's store and experiment (created once); returns its id."""
    import mlflow

    connect(root)
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    if experiment is not None:
        if experiment.tags.get(KIND_TAG) != MODEL_TRAINING:  # experiments made before the tag
            mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, KIND_TAG, MODEL_TRAINING)
        return experiment.experiment_id
    artifacts = None if os.environ.get("MLFLOW_TRACKING_URI") else (store_dir(root) / "artifacts").as_uri()
    try:
        return mlflow.create_experiment(EXPERIMENT, artifact_location=artifacts, tags={KIND_TAG: MODEL_TRAINING})
    except Exception:  # another process created it between our lookup and create
        found = mlflow.get_experiment_by_name(EXPERIMENT)
        if found is None:
            raise
        return found.experiment_id


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'sam': {'lora': {'rank': 4}}} -> {'sam.lora.rank': 4} (MLflow params are flat)."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


EXECUTION_TAG = "xctsam.execution"


def _dvc_ancestor() -> Any | None:
    """The `dvc` process this stage runs under (DVC runs each stage's cmd in a shell)."""
    import psutil

    def is_dvc(cmdline: list[str]) -> bool:  # `dvc ...` or `python -m dvc ...`
        return "dvc" in (Path(part).name for part in cmdline[:2]) or cmdline[1:3] == ["-m", "dvc"]

    process = psutil.Process().parent()
    try:
        while process is not None and not is_dvc(process.cmdline()):
            process = process.parent()
    except psutil.Error:
        return None
    return process


def execution_key() -> str | None:
    """A key every stage of one pipeline execution shares; None outside a pipeline.

    XCTSAM_EXECUTION if set; under `dvc exp run` the experiment's name and baseline; under
    `dvc repro` the dvc process itself (host, pid and start time: unique per execution).
    """
    if os.environ.get("XCTSAM_EXECUTION"):
        return os.environ["XCTSAM_EXECUTION"]
    if os.environ.get("DVC_EXP_NAME"):
        return f"exp:{os.environ['DVC_EXP_NAME']}:{os.environ.get('DVC_EXP_BASELINE_REV', '')}"
    if os.environ.get("DVC_STAGE") and (dvc := _dvc_ancestor()) is not None:
        import socket

        return f"repro:{socket.gethostname()}:{dvc.pid}:{dvc.create_time():.3f}"
    return None


def _git_tags(root: Path) -> dict[str, str]:
    import subprocess

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    return {"git.commit": git("rev-parse", "HEAD"), "git.dirty": str(bool(git("status", "--porcelain", "--untracked-files=no")))}


def data_hashes(lock: Path) -> dict[str, str]:
    """{"data.<path>": hash} of every output under data/ that dvc.lock records.

    Each stage tags its execution's parent run with these: a stage sees the lock as DVC left it
    after the stages before it, so by the last stage the parent names the data it ran on.
    """
    import yaml

    if not lock.is_file():
        return {}
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages") or {}
    return {
        f"data.{out['path']}": str(out.get("md5") or out.get("hash") or "")
        for stage in stages.values()
        for out in stage.get("outs", [])
        if str(out.get("path", "")).startswith("data/")
    }


def dvc_hash(folder: Path, hashes: Mapping[str, str]) -> str | None:
    """The hash `hashes` (data_hashes of dvc.lock) record for `folder` or the output folder holding it, or None."""
    relative = Path(os.path.relpath(Path(folder).resolve(), project_root())).as_posix()
    for path, digest in sorted(hashes.items(), key=lambda item: -len(item[0])):
        out = path.removeprefix("data.")
        if digest and (relative == out or relative.startswith(out.rstrip("/") + "/")):
            return digest
    return None


def log_data_inputs(folders: Mapping[str, Path], context: str, contents: Mapping[str, Any]) -> None:
    """Each named data folder as a dataset input of the active run (the runs table's Dataset
    column): its DVC hash where dvc.lock has it, else a digest of `contents[name]` (what the
    run read of it, e.g. its files' sha256), both cut to the 32 characters MLflow keeps."""
    import hashlib
    import json

    import mlflow
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource

    hashes = data_hashes(outside_dvc_temp(project_root()) / "dvc.lock")  # read once for every folder
    for name, folder in folders.items():
        digest = dvc_hash(folder, hashes) or hashlib.sha256(json.dumps(contents.get(name), sort_keys=True, default=str).encode()).hexdigest()
        dataset = MetaDataset(LocalArtifactDatasetSource(str(Path(folder).resolve())), name=name, digest=digest[:32])
        mlflow.log_input(dataset, context=context)


def _tag_parent(run_id: str, tags: Mapping[str, str]) -> None:
    import mlflow
    from mlflow.entities import RunTag

    if tags:
        mlflow.MlflowClient().log_batch(run_id, tags=[RunTag(key, value) for key, value in tags.items()])


def _pipeline_run(experiment_id: str, key: str) -> str:
    """Find the execution's parent run by its key, or create it (git tags, params.yaml artifact)."""
    import mlflow

    client = mlflow.MlflowClient()
    found = client.search_runs([experiment_id], filter_string=f"tags.`{EXECUTION_TAG}` = '{key}' and tags.stage = 'pipeline'", max_results=1)
    if found:
        return found[0].info.run_id
    root = outside_dvc_temp(project_root())
    tags = {EXECUTION_TAG: key, "stage": "pipeline", **_git_tags(root)}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.experiment"] = os.environ["DVC_EXP_NAME"]
    run = client.create_run(experiment_id, run_name=f"pipeline {key}"[:120], tags=tags)
    params_file = project_root() / "params.yaml"
    if params_file.is_file():
        import yaml

        for name, value in flatten(yaml.safe_load(params_file.read_text()) or {}).items():
            client.log_param(run.info.run_id, name, str(value)[:6000])
        client.log_artifact(run.info.run_id, str(params_file))
    return run.info.run_id


def source_tags() -> dict[str, str]:
    """The runs table's Source column: the command that made the run (`xctsam train sam ...`)."""
    import sys

    # the command's words up to its first option: the UI shows a source's last path part, so
    # `--out models/unet` would show as "unet"
    words = ["xctsam", *sys.argv[1:]] if Path(sys.argv[0]).name == "xctsam" else [Path(sys.argv[0]).name or "python"]
    command = " ".join(word for word in _leading_words(words))
    return {"mlflow.source.name": command[:500], "mlflow.source.type": "LOCAL"}


def _leading_words(words: list[str]) -> list[str]:
    leading = []
    for word in words:
        if word.startswith("-") or "/" in word:
            break
        leading.append(word)
    return leading or words[:1]


@contextmanager
def stage_run(stage: str, params: Mapping[str, Any] | None = None, tags: Mapping[str, str] | None = None) -> Iterator[Any]:
    """An MLflow run for one pipeline stage, with its params flattened and a `stage` tag.

    Inside a pipeline execution (execution_key) it is a child of that execution's parent run,
    found or created by the shared key, since every stage runs in a process of its own.
    """
    import mlflow

    experiment_id = configure()
    key = execution_key()
    parent = _pipeline_run(experiment_id, key) if key else None
    if parent is not None:
        _tag_parent(parent, data_hashes(project_root() / "dvc.lock"))
        _set_parent_status(parent, "RUNNING")
    run_tags = {"stage": stage, **source_tags(), **dict(tags or {}), **({EXECUTION_TAG: key} if key else {})}
    run = mlflow.start_run(experiment_id=experiment_id, run_name=stage, tags=run_tags, parent_run_id=parent)
    try:
        if params:
            mlflow.log_params({k: str(v)[:6000] for k, v in flatten(params).items()})
        yield run
    except BaseException as exc:
        mlflow.end_run(end_status(exc))
        if parent is not None:
            _set_parent_status(parent, end_status(exc))
        raise
    mlflow.end_run("FINISHED")
    if parent is not None:
        _roll_up(run.info.run_id, parent)
        lock = project_root() / "dvc.lock"
        if lock.is_file():
            mlflow.MlflowClient().log_artifact(parent, str(lock))
        _set_parent_status(parent, "FINISHED")


def _set_parent_status(parent_id: str, status: str) -> None:
    """The execution's parent run shows its latest stage: RUNNING while one runs, FINISHED after
    it, KILLED or FAILED when one was stopped or failed (no stage knows whether it is the last)."""
    import mlflow

    client = mlflow.MlflowClient()
    if status == "RUNNING":
        client.update_run(parent_id, status="RUNNING")
    else:
        client.set_terminated(parent_id, status)


def log_stage(
    stage: str,
    *,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, str] | None = None,
    metrics: Mapping[str, float] | None = None,
    artifacts: Iterable[Path] = (),
    artifact_path: str | None = None,
) -> None:
    """The MLflow run of a stage that logs once, when its results are written: its params and
    tags, final `metrics` (undefined, NaN, ones left out: MLflow would plot them as gaps of 0) and
    `artifacts` (files, under `artifact_path`)."""
    import mlflow

    with stage_run(stage, params=params, tags=tags):
        defined = {key: float(value) for key, value in (metrics or {}).items() if not math.isnan(float(value))}
        if defined:
            mlflow.log_metrics(defined)
        for path in artifacts:
            mlflow.log_artifact(str(path), artifact_path=artifact_path)


def end_status(error: BaseException | None) -> str:
    """The MLflow status a run ends with: FINISHED, KILLED when a stop signal ended it, else FAILED."""
    if error is None:
        return "FINISHED"
    return "KILLED" if isinstance(error, STOPPED) else "FAILED"


def parent_metric_key(metric: str, model: str | None) -> str:
    """A stage's metric as its parent holds it: prefixed with the model it scores, if any."""
    return f"{model}.{metric}" if model else metric


def _roll_up(child_id: str, parent_id: str) -> None:
    """Copy a finished stage run's final metric values onto its execution's parent run.

    The parent then holds every headline figure next to every param, so the UI's compare view
    lines up whole executions (two `dvc exp run`s) without opening their children.
    """
    import mlflow
    from mlflow.entities import Metric

    client = mlflow.MlflowClient()
    child = client.get_run(child_id)
    model = child.data.tags.get("model")
    now = int(time.time() * 1000)
    metrics = [Metric(parent_metric_key(key, model), value, now, 0) for key, value in child.data.metrics.items()]
    for start in range(0, len(metrics), 1000):  # MLflow's batch limit
        client.log_batch(parent_id, metrics=metrics[start : start + 1000])
