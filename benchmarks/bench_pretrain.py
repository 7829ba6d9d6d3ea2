"""Benchmark: the stand-in SAM foundation, its cost and whether it is worth keeping.

Two figures, one command each (run from a project folder; MLflow logs go to its store):

  pretrain  time of `pretrain_sam` on the params' defaults (must stay under 10 min on 2 CPU
            cores), and held-out promptable mIoU (box and point prompts) of the stand-in
            against the same architecture's random initialisation, scored in the same process.

      .venv/bin/python benchmarks/bench_pretrain.py pretrain [--params params.yaml] [--out /tmp/stand_in.pth]

  compare   PEFT-SAM adapted from the stand-in against PEFT-SAM adapted from random weights:
            the same train.sam params, data and seed, one training each of exactly the same
            steps (early stopping off), then IoU per class on every eval.splits split
            (whole-volume prediction, as `xctsam eval models`).

      .venv/bin/python benchmarks/bench_pretrain.py compare --stand-in models/foundation/sam_small_pretrained.pth [--root data] [--steps N]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from xctsam import CLASS_NAMES


def bench_pretrain(args: argparse.Namespace) -> None:
    import torch

    from xctsam.config.params import load_params
    from xctsam.models.sam_builder import build_sam
    from xctsam.pretrain.train import heldout_scores, pretrain_sam, stand_in_config

    params = load_params(args.params)
    out = Path(args.out or Path(tempfile.mkdtemp(prefix="stand_in_")) / "sam_small_pretrained.pth")
    began = time.perf_counter()
    result = pretrain_sam(params, out, resume=False)
    seconds = time.perf_counter() - began
    torch.manual_seed(params.pretrain.seed)
    random_init = heldout_scores(build_sam(stand_in_config(params.sam)), params.pretrain, torch.device("cpu"))
    heldout = result.summary["heldout"]
    print(f"pretraining: {result.steps} steps in {seconds:.0f} s wall ({seconds / 60:.1f} min; training alone {result.summary['train_seconds']:.0f} s), torch threads {torch.get_num_threads()}")
    print(f"held-out promptable mIoU over {heldout['heldout.objects']:.0f} objects of {params.pretrain.heldout_images} unseen images:")
    for key in ("heldout.miou_box", "heldout.miou_point"):
        print(f"  {key:20s} stand-in {heldout[key]:.4f}   random init {random_init[key]:.4f}")
    print(f"checkpoint: {out}")


def _train_and_score(params, root: Path, out: Path) -> dict:
    from xctsam.eval.evaluate import evaluate_models
    from xctsam.models.factory import load_segmenter
    from xctsam.train.stage import train_model

    result = train_model("sam", params, root, out)
    model, window, _ = load_segmenter(result.checkpoint)
    report = evaluate_models({"sam": (model, window)}, params, root, out / "eval.json", log_mlflow=False, progress=False)
    return {"iou": report["iou"]["sam"], "miou": report["miou"]["sam"], "best_val_miou": result.best_val_miou, "steps": result.steps}


def bench_compare(args: argparse.Namespace) -> None:
    from xctsam.config.params import load_params

    params = load_params(args.params)
    steps = args.steps if args.steps is not None else params.train.sam.steps
    # no early stopping: both trainings run exactly `steps` (each scored on its best-val checkpoint)
    train = params.train.sam.model_copy(update={"steps": steps, "patience": steps})
    params = params.model_copy(update={"train": params.train.model_copy(update={"sam": train})})
    work = Path(args.work or tempfile.mkdtemp(prefix="compare_"))
    scores = {}
    for name, checkpoint in (("stand-in", Path(args.stand_in)), ("random-init", None)):
        sam = params.sam.model_copy(update={"checkpoint": checkpoint})
        began = time.perf_counter()
        scores[name] = _train_and_score(params.model_copy(update={"sam": sam}), Path(args.root), work / name)
        scores[name]["seconds"] = round(time.perf_counter() - began)
        print(f"{name}: {scores[name]['steps']} steps, best val mIoU {scores[name]['best_val_miou']:.4f}, {scores[name]['seconds']} s", flush=True)
    (work / "compare.json").write_text(json.dumps(scores, indent=2, default=str) + "\n")
    print(f"\nIoU per class (stand-in / random init / difference); train.sam.steps {params.train.sam.steps}")
    print(f"{'split':6s} " + " ".join(f"{cls:>24s}" for cls in CLASS_NAMES) + f" {'mIoU':>24s}")
    for split in scores["stand-in"]["iou"]:
        cells = []
        for cls in CLASS_NAMES:
            a, b = scores["stand-in"]["iou"][split][cls], scores["random-init"]["iou"][split][cls]
            cells.append("n/a" if a is None or b is None else f"{a:.3f}/{b:.3f}/{a - b:+.3f}")
        a, b = scores["stand-in"]["miou"][split], scores["random-init"]["miou"][split]
        print(f"{split:6s} " + " ".join(f"{cell:>24s}" for cell in cells) + f" {f'{a:.3f}/{b:.3f}/{a - b:+.3f}':>24s}")
    print(f"results: {work / 'compare.json'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    one = sub.add_parser("pretrain")
    one.add_argument("--params", default="params.yaml")
    one.add_argument("--out", default=None)
    two = sub.add_parser("compare")
    two.add_argument("--params", default="params.yaml")
    two.add_argument("--stand-in", required=True)
    two.add_argument("--root", default="data")
    two.add_argument("--steps", type=int, default=None, help="override train.sam.steps for both trainings")
    two.add_argument("--work", default=None, help="folder for the two trainings (default: a temp folder)")
    args = parser.parse_args()
    bench_pretrain(args) if args.what == "pretrain" else bench_compare(args)


if __name__ == "__main__":
    main()
