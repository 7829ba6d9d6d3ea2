"""Benchmark: whole-volume inference speed (slices/s) at 512 x 512 for PEFT-SAM and the U-Net.

Both models as params.yaml configures them (random weights: speed does not depend on them),
`predict_volume` with params `predict` (overlapping tiles, Gaussian blending, 2.5D context
for the U-Net), on a synthetic volume; median over --repeats passes.

    .venv/bin/python benchmarks/bench_inference.py [--slices 6] [--size 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    from xctsam.config.params import load_params
    from xctsam.data.datasets import IntensityWindow
    from xctsam.data.volumes import Volume, write_volume
    from xctsam.eval.predict import predict_volume
    from xctsam.models.factory import build_segmenter

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=6)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    params = load_params()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "volume.h5"
        write_volume(path, np.random.default_rng(0).random((args.slices, args.size, args.size), dtype=np.float32))
        print(f"{args.slices} slices of {args.size}x{args.size}, tile {params.predict.tile}, overlap {params.predict.overlap}, torch threads {torch.get_num_threads()}")
        for kind in ("sam", "unet"):
            section = getattr(params, kind)
            if kind == "sam":  # random weights: no foundation file needed, same speed
                section = section.model_copy(update={"checkpoint": None})
            model = build_segmenter(kind, section, getattr(params.train, kind)).eval()
            rates = []
            for _ in range(args.repeats):
                began = time.perf_counter()
                with Volume(path) as volume:
                    for _prediction in predict_volume(model, volume, IntensityWindow(0.0, 1.0), params.predict, progress=False):
                        pass
                rates.append(args.slices / (time.perf_counter() - began))
            print(f"{kind:5s} {statistics.median(rates):.2f} slices/s (median of {args.repeats})")


if __name__ == "__main__":
    main()
