"""The `xctsam` command line: one Typer app with a sub-app per noun.

Errors a user can fix (XctsamError) print one line to stderr and exit with code 2; `--debug`
shows the traceback instead.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from xctsam.util.errors import XctsamError
from xctsam.util.interrupt import Interrupted, signals_raise

app = typer.Typer(help="xctsam: SAM with Conv-LoRA for industrial XCT segmentation.", no_args_is_help=True, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Make, import and inspect XCT volumes.", no_args_is_help=True)
gan_app = typer.Typer(help="CycleGAN: idealised render -> experimental-looking XCT.", no_args_is_help=True)
eval_app = typer.Typer(help="Evaluate: FID of splits, (later) segmentation metrics.", no_args_is_help=True)
train_app = typer.Typer(help="Train the segmentation models (one loop for all).", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(train_app, name="train")
app.add_typer(gan_app, name="gan")
app.add_typer(eval_app, name="eval")
params_app = typer.Typer(help="Change params.yaml from the command line (comments and layout kept).", no_args_is_help=True)
app.add_typer(params_app, name="params")
tune_app = typer.Typer(help="Hyperparameter search (Optuna): run, show, apply the best values, dashboard.", no_args_is_help=True)
app.add_typer(tune_app, name="tune")

_state = {"debug": False}
_err = Console(stderr=True)

ParamsOption = Annotated[Path, typer.Option("--params", "-p", help="params.yaml to read.")]
SeedOption = Annotated[int | None, typer.Option(help="Override params `seed`.")]
DataRootOption = Annotated[Path, typer.Option("--root", help="Data root holding real/ and synthetic/.")]
FreshOption = Annotated[bool, typer.Option("--fresh", help="Ignore an existing checkpoint and start over.")]
ModelOutOption = Annotated[Path | None, typer.Option("--out", help="Model folder (default models/<model>).")]
SplitsOption = Annotated[list[str] | None, typer.Option("--split", "-s", help="Only this split (repeatable); default all.")]


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False) -> None:
    _state["debug"] = debug


# ---------------------------------------------------------------- data
@data_app.command("phantoms")
def data_phantoms(
    params: ParamsOption = Path("params.yaml"),
    out: Annotated[Path, typer.Option(help="Folder for the label volumes, one subfolder per split.")] = Path("data/phantoms"),
    seed: SeedOption = None,
    split: SplitsOption = None,
) -> None:
    """Generate the 3-D label phantoms (coupons with pores and inclusions) of every split."""
    from xctsam.config.params import load_params
    from xctsam.sim.splits import make_phantoms

    config = load_params(params)
    for path in make_phantoms(config, out, seed=seed, splits=split):
        print(path)


@data_app.command("simulate")
def data_simulate(
    params: ParamsOption = Path("params.yaml"),
    phantoms: Annotated[Path, typer.Option(help="Folder written by `xctsam data phantoms`.")] = Path("data/phantoms"),
    root: Annotated[Path, typer.Option(help="Data root: writes real/<split> and synthetic/<split>.")] = Path("data"),
    seed: SeedOption = None,
    split: SplitsOption = None,
) -> None:
    """Render each split: idealised (synthetic, domain A) or physics XCT at its scanner setting (real)."""
    from xctsam.config.params import load_params
    from xctsam.sim.splits import simulate_splits

    config = load_params(params)
    for path in simulate_splits(config, phantoms, root, seed=seed, splits=split):
        print(path)


@data_app.command("import")
def data_import(
    source: Annotated[Path, typer.Argument(help="A SAM-Material-GAN folder, TIFF folder, multi-page TIFF, HDF5 or NPY file.")],
    format: Annotated[str, typer.Option("--format", "-f", help="samgan | tiff-dir | tiff | hdf5 | npy")] = "samgan",
    root: Annotated[Path, typer.Option(help="Data root: samgan writes synthetic/Tr-GAN and real/Te-N here.")] = Path("data"),
    split: Annotated[str | None, typer.Option(help="Split folder for a single volume, e.g. real/Te-1 (not samgan).")] = None,
    name: Annotated[str | None, typer.Option(help="Volume name (default: the source's stem).")] = None,
    labels: Annotated[Path | None, typer.Option(help="Labels for a single volume, in the same format (values 0..3).")] = None,
    dataset: Annotated[str, typer.Option(help="HDF5 dataset path of the image.")] = "image",
    label_dataset: Annotated[str, typer.Option(help="HDF5 dataset path of the labels.")] = "labels",
    voxel_size_mm: Annotated[float | None, typer.Option(help="Voxel size to record, mm.")] = None,
) -> None:
    """Import real scans into the volume store (one HDF5 per scan, a manifest per split)."""
    from xctsam.data import importers, samgan

    if format == "samgan":
        written = samgan.import_samgan(source, root)
    else:
        if split is None:
            raise typer.BadParameter("give --split (e.g. real/Te-1) for a single-volume import", param_hint="--split")
        written = [
            importers.import_volume(
                source, format, root / split, name=name, labels=labels, dataset=dataset,
                label_dataset=label_dataset, voxel_size_mm=voxel_size_mm,
            )
        ]
    for path in written:
        print(path)


@data_app.command("info")
def data_info(paths: Annotated[list[Path], typer.Argument(help="Volume files (.h5) or split folders.")]) -> None:
    """Show shape, labels and class fractions of volumes."""
    from xctsam.data.volumes import describe_volumes

    _err.print(describe_volumes(paths))


# ---------------------------------------------------------------- gan
@gan_app.command("train")
def gan_train(
    params: ParamsOption = Path("params.yaml"),
    root: DataRootOption = Path("data"),
    out: Annotated[Path, typer.Option(help="Folder for checkpoints, the final generator and samples.")] = Path("models/gan"),
    seed: SeedOption = None,
    fresh: FreshOption = False,
) -> None:
    """Train the CycleGAN on tiles of gan.domain_a and gan.domain_b; resumes from its last checkpoint."""
    from xctsam.config.params import load_params
    from xctsam.gan.train import train_gan

    config = _with_seed(load_params(params), seed)
    result = train_gan(config, root, out, resume=not fresh)
    print(result)


@gan_app.command("synthesize")
def gan_synthesize(
    params: ParamsOption = Path("params.yaml"),
    root: DataRootOption = Path("data"),
    generator: Annotated[Path, typer.Option(help="Generator written by `xctsam gan train`.")] = Path("models/gan/generator_a2b.pt"),
) -> None:
    """Translate every labelled gan.domain_a volume into gan.output (labels unchanged)."""
    from xctsam.config.params import load_params
    from xctsam.gan.synthesize import synthesize

    for path in synthesize(load_params(params), root, generator):
        print(path)


# ---------------------------------------------------------------- train
def _train(kind: str, params: Path, root: Path, out: Path | None, seed: int | None, fresh: bool) -> None:
    from xctsam.config.params import load_params
    from xctsam.train.stage import train_model

    result = train_model(kind, _with_seed(load_params(params), seed), root, out or Path("models") / kind, resume=not fresh)
    print(f"{kind}: {result.steps} steps, best validation mIoU {result.best_val_miou:.4f} at step {result.best_step} -> {result.checkpoint}")




@train_app.command("sam")
def train_sam(params: ParamsOption = Path("params.yaml"), root: DataRootOption = Path("data"), out: ModelOutOption = None, seed: SeedOption = None, fresh: FreshOption = False) -> None:
    """PEFT-SAM (Conv-LoRA + prompt-free decoder) on params train.sam; resumes after a kill."""
    _train("sam", params, root, out, seed, fresh)


@train_app.command("unet")
def train_unet(params: ParamsOption = Path("params.yaml"), root: DataRootOption = Path("data"), out: ModelOutOption = None, seed: SeedOption = None, fresh: FreshOption = False) -> None:
    """The 2.5D U-Net baseline on params train.unet; resumes after a kill."""
    _train("unet", params, root, out, seed, fresh)


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


# ---------------------------------------------------------------- predict
@app.command("predict")
def predict(
    volume: Annotated[Path, typer.Argument(help="Volume file (.h5) to segment.")],
    model: Annotated[Path, typer.Option(help="Trained model (best.pt of `xctsam train`).")] = Path("models/sam/best.pt"),
    out: Annotated[Path, typer.Option(help="Output: .h5 (image + labels) or .tif (labels).")] = Path("prediction.h5"),
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Segment a whole volume: overlapping tiles, Gaussian blending, streamed slice by slice."""
    from xctsam.config.params import load_params
    from xctsam.eval.predict import predict_file
    from xctsam.models.factory import load_segmenter

    segmenter, window, meta = load_segmenter(model)
    print(predict_file(segmenter, volume, window, load_params(params).predict, out, attrs={"model": str(model), "model_kind": meta["kind"]}))


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
) -> None:
    """Score every model on every eval.splits split: IoU and Dice per class, mIoU."""
    import json

    from xctsam.config.params import load_params
    from xctsam.eval.evaluate import evaluate_models
    from xctsam.models.factory import load_segmenter

    config = load_params(params)
    loaded = {name: load_segmenter(path)[:2] for name, path in _named_models(model).items()}
    report = evaluate_models(loaded, config, root, out)
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


def _with_seed(config, seed: int | None):
    return config if seed is None else config.model_copy(update={"seed": seed})


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

    report = evaluate_forgetting(load_params(params), root, _named_models(model), out)
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
    from xctsam.eval.robustness import evaluate_robustness
    from xctsam.models.factory import load_segmenter

    loaded = {name: load_segmenter(path)[:2] for name, path in _named_models(model).items()}
    rows = evaluate_robustness(loaded, load_params(params), root, out, png_dir)
    print(f"{len(rows)} rows -> {out}; plots in {png_dir}")


# ---------------------------------------------------------------- report
@app.command("report")
def report(
    params: ParamsOption = Path("params.yaml"),
    out: Annotated[Path, typer.Option(help="Folder for study.md, study.html and overlays.")] = Path("reports"),
    root: Annotated[Path | None, typer.Option("--root", help="Data root for the overlays (default: params study.root).")] = None,
) -> None:
    """reports/study.md and a self-contained study.html: FID, IoU, forgetting, robustness, overlays."""
    from xctsam.config.params import load_params
    from xctsam.report import write_report

    for path in write_report(load_params(params), Path("."), out, data_root=root):
        print(path)


# ---------------------------------------------------------------- params
@params_app.command("apply")
def params_apply(
    overlay: Annotated[Path, typer.Argument(help="YAML of dotted keys and their new values, e.g. configs/real-samgan.yaml.")],
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Set every key the overlay lists in params.yaml; the result is validated before it is written."""
    from xctsam.params_file import apply_overlay

    def short(value: object) -> str:  # a whole section would flood the terminal
        text = str(value)
        return text if len(text) <= 60 else text[:57] + "..."

    for key, (before, after) in apply_overlay(params, overlay).items():
        print(f"{key}: {short(before)} -> {short(after)}")


# ---------------------------------------------------------------- ui
@app.command("ui")
def ui(port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 5000) -> None:
    """Start the MLflow UI on the project's store (127.0.0.1, lean settings); Ctrl-C stops it."""
    from xctsam.ui import serve

    raise typer.Exit(serve(port))


# ---------------------------------------------------------------- tune
StudyOption = Annotated[str | None, typer.Option("--study-name", help="Study name (default xctsam-<tune.model>); the same name continues a study.")]
StorageOption = Annotated[str | None, typer.Option("--storage", help="Optuna storage URL, e.g. postgresql://user@host/db (default: SQLite tune/optuna.db).")]


def _study_name(name: str | None, params: Path) -> str:
    from xctsam.config.params import load_params

    return name or f"xctsam-{load_params(params).tune.model}"


@tune_app.command("run")
def tune_run(
    params: ParamsOption = Path("params.yaml"),
    root: DataRootOption = Path("data"),
    study_name: StudyOption = None,
    storage: StorageOption = None,
    n_trials: Annotated[int | None, typer.Option("--n-trials", min=1, help="The study's total of finished trials, across workers and reruns (default tune.n_trials).")] = None,
    timeout: Annotated[float | None, typer.Option(min=0, help="Seconds after which no new trial starts.")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Local worker processes sharing the study.")] = 1,
    seed: SeedOption = None,
    worker_index: Annotated[int | None, typer.Option(help="Offsets the sampler seed per host (default $SLURM_ARRAY_TASK_ID or 0).")] = None,
) -> None:
    """Search params tune.space: each trial trains on tune.trial settings, scored on held-out validation slices."""
    import os

    from xctsam.tune.study import WorkerSpec, run_workers, study_summary

    index = worker_index if worker_index is not None else int(os.environ.get("SLURM_ARRAY_TASK_ID", "0") or 0)
    spec = WorkerSpec(params, root, _study_name(study_name, params), storage, n_trials, timeout, seed, index)
    code = run_workers(spec, workers)
    summary = study_summary(spec)
    best = summary["best"]
    states = ", ".join(f"{count} {state.lower()}" for state, count in sorted(summary["states"].items()))
    print(f"study {spec.study_name} ({summary['storage']}): {states}")
    if best is not None:
        print(f"best: trial {best['number']} value {best['value']:.4f} {best['params']}")
    if code:
        raise typer.Exit(code)


@tune_app.command("show")
def tune_show(
    params: ParamsOption = Path("params.yaml"),
    study_name: StudyOption = None,
    storage: StorageOption = None,
    top: Annotated[int, typer.Option(min=1, help="Trials in the table.")] = 10,
) -> None:
    """Best trials as a table, trial states and parameter importances."""
    from rich.console import Console

    from xctsam.tune.results import best_trials_table, importances, load_study, state_counts

    study = load_study(_study_name(study_name, params), storage)
    console = Console()
    console.print(best_trials_table(study, top))
    console.print("trials: " + ", ".join(f"{count} {state.lower()}" for state, count in sorted(state_counts(study).items())))
    weights = importances(study)
    if weights:
        console.print("importance: " + ", ".join(f"{key} {weight:.2f}" for key, weight in weights.items()))
    else:
        console.print("importance: needs at least 2 complete trials with different values")


@tune_app.command("apply")
def tune_apply(
    params: ParamsOption = Path("params.yaml"),
    study_name: StudyOption = None,
    storage: StorageOption = None,
    trial: Annotated[int | None, typer.Option("--trial", help="Apply this trial's values instead of the best's.")] = None,
) -> None:
    """Write the best trial's values into params.yaml (comments and layout kept) for the next `dvc repro`."""
    from xctsam.params_file import update_params_file
    from xctsam.tune.results import chosen_values, load_study

    study = load_study(_study_name(study_name, params), storage)
    number, values = chosen_values(study, trial)
    previous = update_params_file(params, values)
    for key, value in values.items():
        print(f"{key}: {previous[key]} -> {value}")
    print(f"{params}: trial {number}'s values written; `dvc repro` retrains what depends on them")


@tune_app.command("dashboard")
def tune_dashboard(
    storage: StorageOption = None,
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port on 127.0.0.1.")] = 8080,
) -> None:
    """Start optuna-dashboard on the study storage (127.0.0.1); Ctrl-C stops it."""
    from xctsam.tune.dashboard import serve

    raise typer.Exit(serve(storage, port))


# ---------------------------------------------------------------- entry point
def _show_progress_messages() -> None:
    """The library's info lines ("resuming from step N ...") reach the user on stderr, above
    any live progress bar (one console for both)."""
    from rich.logging import RichHandler

    from xctsam.util.progress import console

    logger = logging.getLogger("xctsam")
    if not logger.handlers:
        logger.addHandler(RichHandler(console=console, show_time=False, show_path=False, show_level=False, markup=False))
        logger.setLevel(logging.INFO)


def _exit_code(code: object) -> int:
    """SystemExit's code as the process exit status (None: 0; a message: printed, 1)."""
    if code is None or isinstance(code, int):
        return int(code or 0)
    print(code, file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns the exit code (also used by tests).

    Typer runs in standalone mode: usage errors (unknown command or option, missing argument,
    invalid value) print its own short usage message and exit 2, whatever Click it ships. A
    user error (XctsamError) is one line and code 2; a stop signal is one line and 128 + its
    number (130 Ctrl-C, 143 SIGTERM); `raise typer.Exit(n)` in a command exits n.
    """
    _show_progress_messages()
    try:
        with signals_raise():
            app(args=argv, prog_name="xctsam", standalone_mode=True)
    except SystemExit as exc:
        return _exit_code(exc.code)
    except XctsamError as exc:
        if _state["debug"]:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Interrupted as exc:
        print(exc.message, file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:  # a Ctrl-C that arrived before our handler was in place
        print(Interrupted().message, file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
