"""The `train_sam` / `train_unet` stage: data, model and MLflow around the one training loop."""

from __future__ import annotations

from pathlib import Path

from xctsam.config import Params
from xctsam.data.datasets import IntensityWindow
from xctsam.data.tiles import SegmentationTiles, validation_slices
from xctsam.hashing import folders_digest
from xctsam.models.base import trainable_parameters
from xctsam.models.factory import ModelKind, build_segmenter, model_meta
from xctsam.train.loop import TrainResult, process_rank, train_segmenter, whole_slice_batches


def train_model(kind: ModelKind, params: Params, data_root: Path, out_dir: Path, *, resume: bool = True) -> TrainResult:
    """Train the `kind` model on params.train.<kind>.splits into out_dir (best.pt, training.json)."""
    import mlflow

    from xctsam import tracking

    config = getattr(params.train, kind)
    split_dirs = [Path(data_root) / split for split in config.splits]
    train_refs, val_refs = validation_slices(split_dirs, config.val_volumes)
    window = IntensityWindow.measure(train_refs, seed=params.seed)
    model = build_segmenter(kind, params)
    # the data's content is part of the model's identity: new data, new training
    meta = {**model_meta(kind, params, window), "data": folders_digest(split_dirs)}
    sampler = SegmentationTiles(train_refs, window, config.tile, model.context, config.oversample, params.seed + process_rank())
    validation = whole_slice_batches(val_refs, window, model.context, config.val_slices, params.seed)
    logged = {kind: meta["config"], "train": config.model_dump(mode="json"), "seed": params.seed}
    with sampler, tracking.stage_run(f"train_{kind}", logged, tags={"model": kind}):
        counts = trainable_parameters(model)
        mlflow.log_metrics({"model.trainable_params": counts["trainable"], "model.total_params": counts["total"], "model.trainable_share": counts["share"]})
        return train_segmenter(
            model, sampler, validation, config, out_dir, seed=params.seed, model_meta=meta, resume=resume,
            log_metrics=lambda metrics, step: mlflow.log_metrics(metrics, step=step),
        )
