"""`xctsam train`: the segmentation models, the stand-in SAM's pretraining, real fine-tuning."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from xctsam.cli.common import (
    DataRootOption,
    FreshOption,
    ModelOutOption,
    ParamsOption,
    SeedOption,
    _with_seed,
)

train_app = typer.Typer(help="Train the segmentation models (one loop for all).", no_args_is_help=True)

TrainSplitOption = Annotated[
    list[str] | None,
    typer.Option("--train-split", help="Train on this split folder instead of train.<model>.splits (repeatable): the GAN ablation trains on the untranslated render."),
]


def _train(kind: str, params: Path, root: Path, out: Path | None, seed: int | None, fresh: bool, splits: list[str] | None = None) -> None:
    from xctsam.config.params import load_params
    from xctsam.models.registry import splits_variant
    from xctsam.train.stage import train_model, with_train_splits

    config = _with_seed(load_params(params), seed)
    if splits:
        config = with_train_splits(config, kind, splits)
    variant = splits_variant(splits) if splits else None  # the ablation on synthetic/Tr-sim: xctsam-sam-sim
    result = train_model(kind, config, root, out or Path("models") / kind, resume=not fresh, variant=variant)
    print(f"{kind}: {result.steps} steps, best validation mIoU {result.best_val_miou:.4f} at step {result.best_step} -> {result.checkpoint}")


@train_app.command("sam")
def train_sam(params: ParamsOption = Path("params.yaml"), root: DataRootOption = Path("data"), out: ModelOutOption = None, seed: SeedOption = None, fresh: FreshOption = False, train_split: TrainSplitOption = None) -> None:
    """PEFT-SAM (Conv-LoRA + prompt-free decoder) on params train.sam; resumes after a kill."""
    _train("sam", params, root, out, seed, fresh, train_split)


@train_app.command("unet")
def train_unet(params: ParamsOption = Path("params.yaml"), root: DataRootOption = Path("data"), out: ModelOutOption = None, seed: SeedOption = None, fresh: FreshOption = False, train_split: TrainSplitOption = None) -> None:
    """The 2.5D U-Net baseline on params train.unet; resumes after a kill."""
    _train("unet", params, root, out, seed, fresh, train_split)


@train_app.command("pretrain")
def train_pretrain(
    params: ParamsOption = Path("params.yaml"),
    out: Annotated[Path, typer.Option("--out", help="Stand-in checkpoint (.pth); a sidecar .json is written beside it.")] = Path("models/foundation/sam_small_pretrained.pth"),
    state: Annotated[Path | None, typer.Option(help="Resume state file (default: <out>.state.pt).")] = None,
    fresh: FreshOption = False,
) -> None:
    """Pretrain the small SAM, promptable, on generic shapes (params pretrain): the stand-in foundation."""
    from xctsam.config.params import load_params
    from xctsam.pretrain.train import pretrain_sam

    result = pretrain_sam(load_params(params), out, state_path=state, resume=not fresh)
    heldout = result.summary["heldout"]
    print(f"stand-in SAM: {result.steps} steps, held-out promptable mIoU box {heldout['heldout.miou_box']:.4f} point {heldout['heldout.miou_point']:.4f} -> {result.checkpoint}")


@train_app.command("finetune-real")
def train_finetune_real(
    variant: Annotated[str, typer.Option(help="sub: SAM-FineReal-Sub (finetune.sub_fraction of the slices); full: SAM-FineReal.")] = "full",
    base: Annotated[Path, typer.Option(help="SAM-GAN: the GAN-trained PEFT-SAM to start from.")] = Path("models/sam/best.pt"),
    params: ParamsOption = Path("params.yaml"),
    root: DataRootOption = Path("data"),
    out: ModelOutOption = None,
    fresh: FreshOption = False,
) -> None:
    """Continue training SAM-GAN on labelled real volumes (finetune.volumes); resumes after a kill."""
    from xctsam.config.params import load_params
    from xctsam.train.finetune import VARIANT_NAMES, finetune_real

    if variant not in VARIANT_NAMES:
        raise typer.BadParameter(f"'{variant}' is not one of {', '.join(VARIANT_NAMES)}", param_hint="--variant")
    result = finetune_real(load_params(params), root, base, out or Path("models") / f"finetune_{variant}", variant, resume=not fresh)
    print(f"{VARIANT_NAMES[variant]}: {result.steps} steps -> {result.checkpoint}")
