"""Benchmark: the spread of the headline comparison (SAM-GAN minus U-Net) over training seeds.

The bootstrap intervals in metrics/eval.json say how sure one trained pair of models is about
its test slices; they do not say how much another seed would have trained differently. This
reruns train_sam, train_unet and the evaluation with `seed` = each of --seeds (data and GAN
output as they are under --root, made by `dvc repro`), and prints per split and class each
seed's IoU of both models and the difference, then the median, min-max and std over seeds, and
whether each seed's paired interval excludes 0.

    .venv/bin/python benchmarks/bench_seeds.py [--params params.yaml] [--root data] [--seeds 0 1 2] [--out /tmp/seeds]

Heavy: about (train_sam + train_unet + evaluate) per seed, ~8 min each on 2 CPU cores on the
embedded default. Run nothing else meanwhile.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from xctsam import CLASS_NAMES
from xctsam.util.jsonfile import write_json


def run_seed(params, root: Path, out: Path) -> dict:
    from xctsam.eval.evaluate import evaluate_models
    from xctsam.models.factory import load_segmenter
    from xctsam.train.stage import train_model

    models = {}
    for kind in ("sam", "unet"):
        result = train_model(kind, params, root, out / kind)
        models[kind] = load_segmenter(result.checkpoint)[:2]
    return evaluate_models(models, params, root, out / "eval.json", log_mlflow=False, progress=False)


def main() -> None:
    from xctsam.config.params import load_params

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--root", type=Path, default=Path("data"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="xctsam_seeds_"))
    base = load_params(args.params)
    reports = {}
    for seed in args.seeds:
        began = time.perf_counter()
        reports[seed] = run_seed(base.model_copy(update={"seed": seed}), args.root, out / f"seed-{seed}")
        print(f"seed {seed}: {time.perf_counter() - began:.0f} s", flush=True)
    write_json(out / "seeds.json", {str(seed): report["differences"] for seed, report in reports.items()})

    print(f"\nSAM-GAN - U-Net IoU over seeds {args.seeds} (per seed: sam / unet / diff, * = paired 95% interval excludes 0)")
    first = reports[args.seeds[0]]
    for split in first["iou"]["sam"]:
        for cls in CLASS_NAMES[1:]:
            cells, diffs = [], []
            for report in reports.values():
                sam, unet = report["iou"]["sam"][split][cls], report["iou"]["unet"][split][cls]
                entry = report["differences"]["sam - unet"][split][cls]
                if entry["value"] != entry["value"]:  # NaN: the class is undefined on this split
                    continue
                diffs.append(entry["value"])
                cells.append(f"{sam:.3f}/{unet:.3f}/{entry['value']:+.3f}{'*' if entry['significant'] else ' '}")
            if not diffs:
                continue
            spread = statistics.pstdev(diffs) if len(diffs) > 1 else 0.0
            print(f"  {split:6s} {cls:10s} {'  '.join(cells)}   median {statistics.median(diffs):+.3f}  range [{min(diffs):+.3f}, {max(diffs):+.3f}]  std {spread:.3f}")
    print(f"\nper-seed models and eval.json under {out}")


if __name__ == "__main__":
    main()
