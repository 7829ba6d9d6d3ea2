"""`xctsam predict` (a root command) and `xctsam eval`: segment a volume, score models and data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from xctsam.cli.common import DataRootOption, ParamsOption, SeedOption, _with_seed, app

eval_app = typer.Typer(help="Evaluate: FID of splits, (later) segmentation metrics.", no_args_is_help=True)


# ---------------------------------------------------------------- predict
@app.command("predict")
def predict(
    sources: Annotated[list[Path], typer.Argument(help="Scans: .h5, .tif stack, folder of .tif slices, .npy, .zarr (OME-Zarr), or folders of them.", show_default=False)],
    model: Annotated[str, typer.Option(help="Trained model: a best.pt of `xctsam train`, an exported .onnx, or a registered one, models:/xctsam-sam/<version, latest or @alias>.")] = "models/sam/best.pt",
    out: Annotated[Path | None, typer.Option(help="Output file (.h5 image + labels, .tif labels, .zarr OME-Zarr) for one scan, or a folder (default prediction.h5 for one scan, predictions/ for several).")] = None,
    out_format: Annotated[str | None, typer.Option(help="Format of each output in an --out folder: tif, h5 or zarr (default: the input's family).")] = None,
    input_format: Annotated[str | None, typer.Option("--format", help="Reader of every scan: tiff, tiff-dir, hdf5, npy, zarr (default: from the path).")] = None,
    dataset: Annotated[str, typer.Option(help="HDF5 dataset holding the scan.")] = "image",
    shard: Annotated[str | None, typer.Option(help="Predict only share i/n of the scans (scan k when k mod n = i); default from SLURM_ARRAY_TASK_ID/COUNT or torchrun's RANK/WORLD_SIZE.")] = None,
    uncertainty: Annotated[bool, typer.Option(help="Also write <out>.uncertainty.tif: per-voxel normalised entropy x 255.")] = False,
    report: Annotated[bool, typer.Option(help="Also write each part's defect report: <name>.defects.csv / .json / .png beside its output.")] = False,
    voxel_size: Annotated[float | None, typer.Option(help="Voxel size in mm: the report's sizes and volumes in mm (default voxels).")] = None,
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Segment whole scans slice by slice (overlapping tiles, Gaussian blending), memory flat in
    depth; outputs are written atomically and existing ones kept, so a rerun finishes a campaign."""
    from xctsam.config.params import load_params
    from xctsam.data.readers import VOLUME_FORMATS
    from xctsam.data.scans import scan_inputs
    from xctsam.eval.campaign import (
        parse_shard,
        plan_jobs,
        predict_campaign,
        shard_from_env,
        shard_jobs,
    )
    from xctsam.eval.writers import FORMATS_BY_SUFFIX
    from xctsam.models.registry import load_model

    if input_format is not None and input_format not in VOLUME_FORMATS:
        raise typer.BadParameter(f"{input_format!r} is not one of {', '.join(VOLUME_FORMATS)}", param_hint="--format")
    fmt = FORMATS_BY_SUFFIX.get(f".{out_format}".lower()) if out_format is not None else None
    if out_format is not None and fmt is None:
        raise typer.BadParameter(f"{out_format!r} is not tif, h5 or zarr", param_hint="--out-format")
    if voxel_size is not None:  # inf, NaN or 1e300 would end in a report of inf/NaN/0 volumes
        from xctsam.config.base import voxel_size_problem

        if problem := voxel_size_problem(voxel_size):
            raise typer.BadParameter(problem, param_hint="--voxel-size")
    try:
        share = parse_shard(shard) if shard is not None else shard_from_env()
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--shard") from None
    loaded = load_params(params)
    config = loaded.predict
    scans = scan_inputs(sources)
    target = out if out is not None else Path("prediction.h5" if len(scans) == 1 else "predictions")
    jobs = shard_jobs(plan_jobs(scans, target, fmt, input_format, uncertainty=uncertainty, report=report), share)
    segmenter, window, meta = load_model(model)
    if segmenter.fixed_tile is not None:  # an exported graph: its tile, its temperature built in
        config = config.model_copy(update={"tile": segmenter.fixed_tile, "temperature": 1.0})
    result = predict_campaign(segmenter, window, jobs, config, input_format=input_format, dataset=dataset, out_format=fmt, attrs={"model": str(model), "model_kind": meta["kind"]}, uncertainty=uncertainty, defects=loaded.defects if report else None, voxel_size=voxel_size)
    for path in result.written:
        print(path)


@app.command("export")
def export(
    model: Annotated[str, typer.Option(help="Trained model: a best.pt or models:/xctsam-<model>/<version>.")] = "models/sam/best.pt",
    out: Annotated[Path, typer.Option(help="ONNX file to write.")] = Path("model.onnx"),
    tile: Annotated[int | None, typer.Option(help="Tile size the graph takes (default params predict.tile).", min=16)] = None,
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Export a trained segmenter as ONNX (tiles in, probabilities and labels out, the grey
    window and labelling rule in its metadata); `xctsam predict --model x.onnx` runs it."""
    from xctsam.config.params import load_params
    from xctsam.models.export import export_onnx
    from xctsam.models.registry import load_model

    if out.exists():
        raise typer.BadParameter(f"{out} exists; choose another name or delete it", param_hint="--out")
    from xctsam.config.eval import MAX_TILE

    if tile is not None and tile > MAX_TILE:  # predict.tile's own bound: the graph runs at this tile
        raise typer.BadParameter(f"{tile} is more than {MAX_TILE} pixels, wider than any XCT slice (params predict.tile's bound)", param_hint="--tile")
    segmenter, window, meta = load_model(model)
    predict_config = load_params(params).predict
    print(export_onnx(segmenter, window, meta, out, tile or predict_config.tile, predict_config.temperature))


@app.command("calibrate")
def calibrate(
    model: Annotated[str, typer.Option(help="Trained model: a best.pt or models:/xctsam-<model>/<version>.")] = "models/sam/best.pt",
    root: DataRootOption = Path("data"),
    out: Annotated[Path | None, typer.Option(help="Also write the fit as JSON here (a new file: an existing one is refused).")] = None,
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Fit a temperature on the model's held-out validation slices (train.<model>.val_volumes):
    prints it with the calibration error per class before and after; set predict.temperature to use it."""
    import json

    from xctsam.config.params import load_params
    from xctsam.models.registry import load_model
    from xctsam.train.calibration import calibrate as fit
    from xctsam.util.atomic import refuse_existing
    from xctsam.util.jsonfile import write_json

    if out is not None:  # before the fit; never onto a file, the model calibrated least of all
        refuse_existing(out, "--out")
    segmenter, window, meta = load_model(model)
    if segmenter.fixed_tile is not None:
        raise typer.BadParameter("an exported graph ends in probabilities; calibrate its checkpoint", param_hint="--model")
    result = fit(segmenter, window, meta["kind"], load_params(params), root)
    if out is not None:
        refuse_existing(out, "--out")  # again: the fit takes a while, another run may have written it
        write_json(out, result)
    print(json.dumps(result, indent=1))


# ---------------------------------------------------------------- eval
ModelsOption = Annotated[list[str], typer.Option("--model", help="NAME=PATH of a trained model (repeatable).")]
DEFAULT_MODELS = ["SAM-GAN=models/sam/best.pt", "U-Net=models/unet/best.pt"]


def _named_models(models: list[str]) -> dict[str, Path]:
    named = {}
    for item in models:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise typer.BadParameter(f"'{item}' is not NAME=PATH", param_hint="--model")
        named[name] = Path(path)
    return named


@eval_app.command("models")
def eval_models(
    model: ModelsOption = ["sam=models/sam/best.pt", "unet=models/unet/best.pt"],  # noqa: B006
    params: ParamsOption = Path("params.yaml"),
    root: DataRootOption = Path("data"),
    out: Annotated[Path, typer.Option(help="Metrics file (JSON).")] = Path("metrics/eval.json"),
    defects_out: Annotated[Path, typer.Option(help="Per-defect detection metrics (JSON).")] = Path("metrics/defects.json"),
    defects: Annotated[bool, typer.Option(help="Score every defect too (needs each whole predicted volume in memory).")] = True,
) -> None:
    """Score every model on every eval.splits split: IoU (with bootstrap intervals) and Dice per
    class, mIoU, and per-defect detection of pores and inclusions."""
    import json

    from xctsam.config.params import load_params
    from xctsam.eval.evaluate import evaluate_models
    from xctsam.eval.label_cache import LabelCache
    from xctsam.models.factory import load_segmenter

    config = load_params(params)
    loaded = {name: load_segmenter(path)[:2] for name, path in _named_models(model).items()}
    report = evaluate_models(loaded, config, root, out, defects_out=defects_out if defects else None, cache=LabelCache.default())
    print(json.dumps({"miou": report["miou"]}, indent=2))


@eval_app.command("zero-shot")
def eval_zero_shot(
    params: ParamsOption = Path("params.yaml"),
    root: DataRootOption = Path("data"),
    out: Annotated[Path, typer.Option(help="Metrics file (JSON, laid out like eval.json).")] = Path("metrics/zero_shot/default.json"),
    checkpoint: Annotated[Path | None, typer.Option(help="Pretrained SAM to score (default: params sam.checkpoint).")] = None,
) -> None:
    """A pretrained SAM with a box per ground-truth component, before any XCT training."""
    import json

    from xctsam.config.params import load_params
    from xctsam.pretrain.zero_shot import zero_shot

    report = zero_shot(load_params(params), root, out, checkpoint=checkpoint)
    print(json.dumps({"miou": report["miou"]}, indent=2))


@eval_app.command("fid")
def eval_fid(
    params: ParamsOption = Path("params.yaml"),
    root: DataRootOption = Path("data"),
    out: Annotated[Path, typer.Option(help="Metrics file (JSON).")] = Path("metrics/fid.json"),
    seed: SeedOption = None,
) -> None:
    """FID of each test split (and each fid.pairs entry) against the training set."""
    import json

    from xctsam.config.params import load_params
    from xctsam.eval.fid import compute_fid

    result = compute_fid(_with_seed(load_params(params), seed), root, out)
    print(json.dumps(result, indent=2))


@eval_app.command("forgetting")
def eval_forgetting(
    model: ModelsOption = ["SAM-GAN=models/sam/best.pt", "SAM-FineReal-Sub=models/finetune_sub/best.pt", "SAM-FineReal=models/finetune_full/best.pt"],  # noqa: B006
    params: ParamsOption = Path("params.yaml"),
    root: DataRootOption = Path("data"),
    out: Annotated[Path, typer.Option(help="Metrics file (JSON).")] = Path("metrics/forgetting.json"),
) -> None:
    """IoU after minus before re-fine-tuning (per variant, split, class; mean over splits)."""
    import json

    from xctsam.config.params import load_params
    from xctsam.eval.forgetting import evaluate_forgetting
    from xctsam.eval.label_cache import LabelCache

    report = evaluate_forgetting(load_params(params), root, _named_models(model), out, cache=LabelCache.default())
    print(json.dumps({variant: deltas["mean"] for variant, deltas in report["deltas"].items()}, indent=2))


@eval_app.command("robustness")
def eval_robustness(
    model: ModelsOption = DEFAULT_MODELS,  # noqa: B006
    params: ParamsOption = Path("params.yaml"),
    root: DataRootOption = Path("data"),
    out: Annotated[Path, typer.Option(help="IoU per noise level (JSON rows, a DVC plot).")] = Path("plots/robustness.json"),
    png_dir: Annotated[Path, typer.Option(help="Folder for a PNG per split and class.")] = Path("reports/robustness"),
) -> None:
    """IoU per class as Gaussian and Poisson noise grow on robustness.splits, for each model."""
    from xctsam.config.params import load_params
    from xctsam.eval.label_cache import LabelCache
    from xctsam.eval.robustness import evaluate_robustness
    from xctsam.models.factory import load_segmenter

    loaded = {name: load_segmenter(path)[:2] for name, path in _named_models(model).items()}
    rows = evaluate_robustness(loaded, load_params(params), root, out, png_dir, cache=LabelCache.default())
    print(f"{len(rows)} rows -> {out}; plots in {png_dir}")
