"""The `finetune_real` stage: SAM-GAN trained further on labelled real scans.

Two variants start from the same SAM-GAN checkpoint (`best.pt` of `xctsam train sam`):
- SAM-FineReal (`full`): every slice of the volumes named in params `finetune.volumes`;
- SAM-FineReal-Sub (`sub`): a seeded `finetune.sub_fraction` share of those slices.

The model keeps SAM-GAN's intensity window, so fine-tuned and base models see the same
normalised inputs and their IoU can be compared. Training settings are `train.sam` with
`finetune.steps` and `finetune.lr`.

Validation: there is no other labelled real data (every remaining real volume is what
forgetting is measured on, and must not be looked at), so the loop validates on
`train.sam.val_slices` seeded slices of the fine-tuning slices themselves. The "best"
checkpoint is therefore the epoch that fits the fine-tuning data best, not a held-out score.

Overlap: forgetting is measured on `evaluation_volumes`, every labelled volume of
`eval.splits` not named in `finetune.volumes` (a split with none left is not scored). The unit is the volume, not the slice: the Sub
variant's unused slices of a fine-tuning volume are not evaluated either (2.5D tiles read
their neighbours, and both variants must be scored on the same data). `check_no_overlap`
refuses any fine-tuning volume among the evaluation volumes; the fine-tuned checkpoint
records its volumes so forgetting can check again with the params in force then.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from xctsam.config.params import Params
from xctsam.config.train import FinetuneConfig
from xctsam.data.datasets import SliceRef, sample_slices
from xctsam.data.tiles import SegmentationTiles, volume_refs
from xctsam.eval.holdout import (
    PARAMS_KEY,
    check_no_overlap,
    evaluation_volumes,
    finetune_volume_paths,
)
from xctsam.models.registry import registered_name
from xctsam.train.loop import TrainResult, process_rank, train_segmenter
from xctsam.train.stage import register_result
from xctsam.train.validation import whole_slice_batches
from xctsam.util.errors import ConfigError, InputError
from xctsam.util.folder_lock import folder_lock
from xctsam.util.hashing import file_sha256

Variant = Literal["sub", "full"]
VARIANT_NAMES: dict[Variant, str] = {"sub": "SAM-FineReal-Sub", "full": "SAM-FineReal"}


# ---------------------------------------------------------------- which slices
def finetune_slices(config: FinetuneConfig, seed: int, data_root: Path, variant: Variant) -> list[SliceRef]:
    """Every labelled slice of the fine-tuning volumes (full), or a seeded sub_fraction of them (sub)."""
    refs = [
        ref
        for paths in finetune_volume_paths(config.volumes, data_root).values()
        for path in paths
        for ref in volume_refs(path)
    ]
    if not refs:
        raise ConfigError("params", PARAMS_KEY, "names no volume: nothing to fine-tune on")
    if variant == "full":
        return refs
    count = max(1, round(config.sub_fraction * len(refs)))
    return sample_slices(refs, count, seed)


# ---------------------------------------------------------------- the stage
def _finetune_meta(
    base_meta: Mapping[str, Any], base: Path, variant: Variant, refs: Sequence[SliceRef]
) -> dict[str, Any]:
    """The base's meta (kind, config, window: the same model and normalisation) plus what was
    fine-tuned on. Plain strings only: checkpoints are loaded with weights_only. The base's and
    volumes' hashes make a new SAM-GAN or changed real data retrain."""
    volumes = sorted({str(ref.volume) for ref in refs})
    meta = {key: value for key, value in base_meta.items() if key != "training"}
    meta["finetune"] = {
        "variant": variant,
        "base_sha256": file_sha256(base),
        "volumes": volumes,
        "volume_sha256": [file_sha256(Path(path)) for path in volumes],
        "slices": [[str(ref.volume), ref.z] for ref in refs],
    }
    return meta


def finetune_real(
    params: Params,
    data_root: Path,
    base: Path,
    out_dir: Path,
    variant: Variant,
    *,
    resume: bool = True,
) -> TrainResult:
    """Fine-tune SAM-GAN (`base`, a best.pt) on real slices into out_dir (best.pt, training.json)."""
    import mlflow

    from xctsam.models.factory import load_segmenter
    from xctsam.util import tracking

    if variant not in VARIANT_NAMES:
        raise ValueError(f"unknown variant {variant!r} (known: {', '.join(VARIANT_NAMES)})")
    with folder_lock(out_dir, enabled=process_rank() == 0):  # before the base loads: a second run is refused at once
        refs = finetune_slices(params.finetune, params.seed, data_root, variant)
        check_no_overlap(refs, evaluation_volumes(params.finetune.volumes, params.eval.splits, data_root))
        model, window, base_meta = load_segmenter(Path(base))
        if base_meta["kind"] != "sam":
            raise InputError(
                base,
                f"a {base_meta['kind']} model, not SAM-GAN",
                "give the best.pt of `xctsam train sam`",
            )
        config = params.train.sam.model_copy(
            update={"steps": params.finetune.steps, "lr": params.finetune.lr}
        )
        meta = _finetune_meta(base_meta, Path(base), variant, refs)
        sampler = SegmentationTiles(
            refs, window, config.tile, model.context, config.oversample, params.seed + process_rank()
        )
        validation = whole_slice_batches(refs, window, model.context, config.val_slices, params.seed, config.validation_tile)
        logged = {
            "finetune": params.finetune.model_dump(mode="json"),
            "train": config.model_dump(mode="json"),
            "seed": params.seed,
            "base": str(base),
            "variant": variant,
            "slices": len(refs),
        }
        tags = {"model": VARIANT_NAMES[variant]}
        with sampler, tracking.stage_run(f"finetune_real.{variant}", logged, tags=tags):
            folders = {split: Path(data_root) / split for split in params.finetune.volumes}
            tracking.log_data_inputs(folders, "training", dict(params.finetune.volumes))
            result = train_segmenter(
                model,
                sampler,
                validation,
                config,
                out_dir,
                seed=params.seed,
                model_meta=meta,
                resume=resume,
                log_metrics=lambda metrics, step: mlflow.log_metrics(metrics, step=step),
                params_key="finetune",  # its steps and lr come from there
            )
            register_result(result, registered_name("sam", f"finetune-{variant}"), logged, tags, config.tile)
            return result
