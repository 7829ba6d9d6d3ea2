"""Benchmark: what test-time augmentation and tri-planar fusion buy and cost, and how
calibrated the models are.

For every trained model and test split, one pass per variant (plain; `predict.tta: flips`;
`predict.planes: [z, y, x]`):
IoU per class with its 95% bootstrap interval (params `eval.bootstrap`, seed `seed`), seconds
per slice, and, on the same pass, the expected calibration error (eval.uncertainty, 15 bins)
of each class's blended probability against the truth. Run it in a project whose models are
trained (e.g. after `dvc repro evaluate`), the machine otherwise idle:

    .venv/bin/python benchmarks/bench_tta_calibration.py --model sam=models/sam/best.pt \
        --model unet=models/unet/best.pt [--split real/Te-1 ...] [--root data] [--slices 16]

`--temperature NAME=T` predicts that model at temperature T (after `xctsam calibrate`).
`--slices N` scores the first N slices of each volume (time and intervals say how many); the
tri-planar pass predicts every slice (its y and x passes need them) and scores the same N.
Prints a table and writes --json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

VARIANTS = {"plain": {}, "flips": {"tta": "flips"}, "tri-planar": {"planes": ["z", "y", "x"]}}


def main() -> None:
    import numpy as np

    from xctsam import CLASS_NAMES
    from xctsam.config.params import load_params
    from xctsam.data.volumes import Volume
    from xctsam.eval.evaluate import SplitCounts, eval_split_dirs, labelled_volumes
    from xctsam.eval.predict import predict_volume
    from xctsam.eval.uncertainty import CalibrationCounts
    from xctsam.models.registry import load_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, help="NAME=PATH (repeatable)")
    parser.add_argument("--split", action="append", help="split folder (default params eval.splits)")
    parser.add_argument("--root", type=Path, default=Path("data"))
    parser.add_argument("--slices", type=int, default=None, help="first N slices of each volume")
    parser.add_argument("--json", type=Path, default=Path("tta_calibration.json"))
    parser.add_argument("--variant", action="append", choices=list(VARIANTS), help="only these (default all)")
    parser.add_argument("--temperature", action="append", default=[], help="NAME=T: that model's predict.temperature (`xctsam calibrate`)")
    args = parser.parse_args()
    params = load_params()
    splits = eval_split_dirs(args.split or params.eval.splits, args.root)
    rows = []
    for item in args.model:
        name, _, path = item.partition("=")
        model, window, _ = load_model(path)
        temperature = float(dict(item.split("=", 1) for item in args.temperature).get(name, params.predict.temperature))
        for variant in args.variant or list(VARIANTS):
            config = params.predict.model_copy(update={**VARIANTS[variant], "temperature": temperature})
            for split, folder in splits.items():
                counts, calibration, seconds, slices = SplitCounts(), CalibrationCounts(len(CLASS_NAMES)), [], 0
                for index, volume_path in enumerate(labelled_volumes(folder)):
                    with Volume(volume_path) as volume:
                        chosen = range(min(args.slices or volume.n_slices, volume.n_slices))
                        predicted = volume.n_slices if config.planes != ["z"] else len(chosen)
                        start = time.perf_counter()
                        for z, labels, probabilities in predict_volume(model, volume, window, config, "cpu", progress=False, slices=chosen):
                            truth = volume.labels(z, z + 1)[0]
                            counts.per_slice.append(counts.counter.update(labels, truth))
                            counts.volume_of_slice.append(index)
                            calibration.add(probabilities, truth)
                            slices += 1
                        seconds.append((time.perf_counter() - start) / predicted)
                summary = counts.summary_with_intervals(params.eval.bootstrap, params.seed)
                row = {"model": name, "variant": variant, "temperature": temperature, "split": split, "slices": slices, "s_per_slice": statistics.median(seconds),
                       "iou": summary["iou"], "iou_ci": summary["iou_ci"], "ece": {cls: calibration.error(i) for i, cls in enumerate(CLASS_NAMES)}}
                rows.append(row)
                print(_line(row), flush=True)
    args.json.write_text(json.dumps(rows, indent=1, default=lambda v: None if isinstance(v, float) and np.isnan(v) else v))
    print(f"-> {args.json}")


def _line(row: dict) -> str:
    def cell(cls: str) -> str:
        iou, (low, high) = row["iou"][cls], row["iou_ci"][cls]
        return f"{cls} {iou:.3f} [{low:.3f}, {high:.3f}] ece {row['ece'][cls]:.4f}"

    classes = " | ".join(cell(cls) for cls in ("material", "pore", "inclusion"))
    return f"{row['model']:5} {row['variant']:10} T={row['temperature']:.3g} {row['split']:10} {row['slices']:3} slices {row['s_per_slice']:.2f} s/slice | {classes}"


if __name__ == "__main__":
    main()
