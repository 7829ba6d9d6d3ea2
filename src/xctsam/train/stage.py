"""The `train_sam` / `train_unet` stage: data, model and MLflow around the one training loop."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xctsam.config.params import Params
from xctsam.config.train import TrainConfig
from xctsam.data.datasets import IntensityWindow
from xctsam.data.split_folders import folders_digest
from xctsam.data.tiles import SegmentationTiles, validation_slices
from xctsam.models.base import Segmenter, trainable_parameters
from xctsam.models.factory import ModelKind, build_segmenter, model_meta
from xctsam.models.registry import registered_name
from xctsam.train.checkpoint import seed_everything
from xctsam.train.loop import TrainResult, process_rank, train_segmenter
from xctsam.train.validation import ValidationSource, whole_slice_batches
from xctsam.util.folder_lock import folder_lock


@dataclass
class Prepared:
    """Everything one training needs, built from params and the data (no MLflow involved)."""

    model: Segmenter
    sampler: SegmentationTiles  # a context manager: enter it around the training
    validation: ValidationSource
    config: TrainConfig
    meta: dict[str, Any]
    logged: dict[str, Any]  # what an MLflow run records as params

    def model_counts(self) -> dict[str, float]:
        counts = trainable_parameters(self.model)
        return {"model.trainable_params": counts["trainable"], "model.total_params": counts["total"], "model.trainable_share": counts["share"]}


def with_train_splits(params: Params, kind: ModelKind, splits: list[str]) -> Params:
    """`params` with train.<kind>.splits replaced (validated as params.yaml would be)."""
    section = getattr(params.train, kind).model_validate({**getattr(params.train, kind).model_dump(), "splits": list(splits)})
    return params.model_copy(update={"train": params.train.model_copy(update={kind: section})})


def prepare_training(kind: ModelKind, params: Params, data_root: Path) -> Prepared:
    """Model, tile sampler and held-out validation slices for params.train.<kind>."""
    config = getattr(params.train, kind)
    split_dirs = [Path(data_root) / split for split in config.splits]
    train_refs, val_refs = validation_slices(split_dirs, config.val_volumes)
    window = IntensityWindow.measure(train_refs, seed=params.seed, match_peaks=config.intensity == "peaks")
    architecture = params.sam if kind == "sam" else params.unet
    # the initial weights come from torch's RNG: seeded here, or every process starts from
    # other weights (the loop seeds its own streams only once the model exists). The same seed on
    # every rank: DDP starts all replicas from rank 0's weights anyway.
    seed_everything(params.seed)
    model = build_segmenter(kind, architecture, config)
    # the data's content is part of the model's identity: new data, new training
    meta = {**model_meta(kind, architecture, config, window), "data": folders_digest(split_dirs)}
    if kind == "sam":  # the foundation's content too: a new stand-in (same path) means a new training
        from xctsam.models.foundation import describe_foundation

        meta["foundation"] = describe_foundation(params.sam)
    sampler = SegmentationTiles(train_refs, window, config.tile, model.context, config.oversample, params.seed + process_rank(), noise=config.noise)
    validation = whole_slice_batches(val_refs, window, model.context, config.val_slices, params.seed, config.validation_tile)
    logged = {kind: meta["config"], "train": config.model_dump(mode="json"), "seed": params.seed}
    return Prepared(model, sampler, validation, config, meta, logged)


def train_model(kind: ModelKind, params: Params, data_root: Path, out_dir: Path, *, resume: bool = True, variant: str | None = None) -> TrainResult:
    """Train the `kind` model on params.train.<kind>.splits into out_dir (best.pt, training.json),
    registered as xctsam-<kind>[-<variant>] (the variant: what sets it apart, e.g. its data)."""
    import mlflow

    from xctsam.util import tracking

    # taken before the data are read and an MLflow run starts: a second run is refused at once
    with folder_lock(out_dir, enabled=process_rank() == 0):
        job = prepare_training(kind, params, data_root)
        tags = {"model": kind, **job.meta.get("foundation", {})}
        with job.sampler, tracking.stage_run(f"train_{kind}", job.logged, tags=tags):
            mlflow.log_metrics(job.model_counts())
            split_dirs = {split: Path(data_root) / split for split in job.config.splits}
            tracking.log_data_inputs(split_dirs, "training", job.meta["data"])
            result = train_segmenter(
                job.model, job.sampler, job.validation, job.config, out_dir, seed=params.seed, model_meta=job.meta, resume=resume,
                log_metrics=lambda metrics, step: mlflow.log_metrics(metrics, step=step), params_key=f"train.{kind}",
            )
            register_result(result, registered_name(kind, variant), job.logged, tags, job.config.tile)
            return result


def register_result(result: TrainResult, registered: str, logged: dict[str, Any], tags: dict[str, str], tile: int) -> None:
    """A finished training's best model into the active run and the registry as `registered`
    (once, from rank 0: every rank of a DDP run holds the same weights)."""
    from xctsam.models.registry import log_trained_model
    from xctsam.util.tracking import flatten

    trained = result.resumed_from < result.steps  # not a training found finished on disk
    if result.completed and trained and process_rank() == 0:
        log_trained_model(result.checkpoint, registered, params=flatten(logged), tags=tags, tile=tile)
