"""Benchmark: batched projector + FBP against scikit-image radon + iradon, slice by slice.

At 256 x 256 and 180 views, in one process:
- baseline: `radon` then `iradon` (circle=True, linear, ramp) on each of a few slices;
- ours: `ParallelBeamProjector.forward` then `.fbp` on a batch of slices, reported without the
  one-off operator build (what every scan after the first costs: the projector is cached per
  size and view count) and with it, amortised over the one batch;
- for information, the full physics scan (`XctScanner.scan`: polychromatic Beer-Lambert, Poisson,
  blur, rings, -log, FBP) per slice.
Each figure is the median of --repeats runs. The requirement is >= 5x per slice without the
build; the script exits with code 1 below that.

    .venv/bin/python benchmarks/bench_simulate.py [--size 256] [--views 180] [--batch 64]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
from skimage.transform import iradon, radon

from xctsam.config.data import Scanner
from xctsam.sim.physics import XctScanner
from xctsam.sim.projector import ParallelBeamProjector, inscribed_circle

REQUIRED_SPEEDUP = 5.0


def label_slices(count: int, size: int, seed: int = 0) -> np.ndarray:
    """Part-like label slices: a disc of material with random pores and inclusions."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:size, :size] - size // 2
    labels = np.zeros((count, size, size), dtype=np.uint8)
    labels[:, np.hypot(rows, cols) < 0.85 * size / 2] = 1
    for index in range(count):
        for label in rng.choice([2, 3], size=20):
            centre = rng.uniform(-0.5, 0.5, 2) * size
            radius = rng.uniform(1, 0.03 * size)
            labels[index, np.hypot(rows - centre[0], cols - centre[1]) < radius] = label
    return labels


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def show(label: str, seconds_per_slice: float) -> None:
    print(f"{label:<60} {seconds_per_slice * 1e3:8.1f} ms/slice")


def skimage_per_slice(images: np.ndarray, angles: np.ndarray, repeats: int) -> float:
    def run() -> None:
        for image in images:
            iradon(radon(image, theta=angles), theta=angles)

    return median_seconds(run, repeats) / len(images)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--views", type=int, default=180)
    parser.add_argument("--batch", type=int, default=64, help="slices per batched call")
    parser.add_argument("--baseline-slices", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    labels = label_slices(args.batch, args.size)
    images = (labels.astype(np.float32) * 0.05) * inscribed_circle(args.size)
    angles = np.linspace(0.0, 180.0, args.views, endpoint=False)
    print(f"{args.size}x{args.size}, {args.views} views, torch threads {torch.get_num_threads()}")

    baseline_images = images[: args.baseline_slices].astype(np.float64)
    baseline = skimage_per_slice(baseline_images, angles, args.repeats)
    show(f"skimage radon+iradon, slice by slice ({args.baseline_slices} slices)", baseline)

    build = median_seconds(lambda: ParallelBeamProjector(args.size, args.views), args.repeats)
    projector = ParallelBeamProjector(args.size, args.views)
    forward_fbp = median_seconds(lambda: projector.fbp(projector.forward(images)), args.repeats)
    batched = forward_fbp / args.batch
    with_build = batched + build / args.batch
    print(f"{'projector build (one-off, cached per size and views)':<60} {build:8.2f} s")
    show(f"ours forward+FBP, batch of {args.batch}, build excluded", batched)
    show("ours forward+FBP, build amortised over the one batch", with_build)

    settings = Scanner(kvp=150.0, views=args.views, ring_gain_std=0.005)
    xct = XctScanner(settings, "steel", "W", 0.025, args.size)
    rng = np.random.default_rng(0)
    scan = median_seconds(lambda: xct.scan(labels, rng), args.repeats) / args.batch
    show(f"ours full scan ({len(xct.spectrum.energies_kev)}-bin spectrum), build excluded", scan)

    speedup = baseline / batched
    print(
        f"speed-up without build: {speedup:.1f}x   with build: {baseline / with_build:.1f}x   "
        f"full scan: {baseline / scan:.1f}x   (required: >= {REQUIRED_SPEEDUP:.0f}x without build)"
    )
    return 0 if speedup >= REQUIRED_SPEEDUP else 1


if __name__ == "__main__":
    sys.exit(main())
