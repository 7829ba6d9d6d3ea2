"""MLflow conventions: where the store is, which experiment, how stage runs are named.

Store: SQLite at <project>/mlruns/mlflow.db with artifacts under <project>/mlruns/artifacts,
both absolute, so runs made from DVC's temporary experiment copies land in the project's own
store. MLFLOW_TRACKING_URI (a team server) overrides it. Metric keys follow DESIGN.md:
`iou.<split>.<class>`, `dice.<split>.<class>`, `miou.<split>`, `fid.<split>`, ...
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

EXPERIMENT = os.environ.get("XCTSAM_EXPERIMENT", "xctsam")
STORE_DIR = "mlruns"


def project_root(start: Path | None = None) -> Path:
    """The folder holding dvc.yaml or params.yaml, searched upwards from `start` (cwd)."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file() or (folder / "params.yaml").is_file():
            return folder
    return here


def _outside_dvc_temp(root: Path) -> Path:
    """DVC queued/temp experiments run in <project>/.dvc/tmp/exps/...: log to the project itself."""
    parts = root.parts
    if ".dvc" in parts:
        return Path(*parts[: parts.index(".dvc")])
    return root


def store_dir(root: Path | None = None) -> Path:
    return _outside_dvc_temp(project_root(root)) / STORE_DIR


def tracking_uri(root: Path | None = None) -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    store = store_dir(root)
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def configure(root: Path | None = None) -> str:
    """Point mlflow at the project's store and experiment (created once); returns its id."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(root))
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    if experiment is not None:
        return experiment.experiment_id
    artifacts = None if os.environ.get("MLFLOW_TRACKING_URI") else (store_dir(root) / "artifacts").as_uri()
    try:
        return mlflow.create_experiment(EXPERIMENT, artifact_location=artifacts)
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


@contextmanager
def stage_run(stage: str, params: Mapping[str, Any] | None = None, tags: Mapping[str, str] | None = None) -> Iterator[Any]:
    """An MLflow run for one pipeline stage, with its params flattened and a `stage` tag."""
    import mlflow

    experiment_id = configure()
    with mlflow.start_run(experiment_id=experiment_id, run_name=stage, tags={"stage": stage, **dict(tags or {})}) as run:
        if params:
            mlflow.log_params({k: str(v)[:6000] for k, v in flatten(params).items()})
        yield run
