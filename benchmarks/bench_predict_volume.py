"""Benchmark: `xctsam predict` on a large scan, its speed and peak memory against a short one.

Writes a synthetic uint16 scan (default 512 x 1024 x 1024, 1 GiB) in the chosen format slab by
slab, saves an untrained model of params.yaml (speed and memory do not depend on the weights),
and runs the console script on it and on the scan's first `--short` slices, polling the
process's anonymous memory (RssAnon; plain RSS, also printed, counts the mapped pages of an
NPY scan too). Flat memory means the long scan's peak is the short one's, not 8x.

    .venv/bin/python benchmarks/bench_predict_volume.py [--kind unet] [--format npy|zarr|tif]
        [--shape 512 1024 1024] [--short 64]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

XCTSAM = Path(sys.executable).with_name("xctsam")


def write_scan(path: Path, shape: tuple[int, int, int], fmt: str) -> None:
    """A bright disc with noise, uint16, written 16 slices at a time."""
    depth, height, width = shape
    y, x = np.ogrid[:height, :width]
    disc = ((y - height / 2) ** 2 + (x - width / 2) ** 2 < (0.4 * min(height, width)) ** 2).astype(np.float32)
    rng = np.random.default_rng(0)

    def slab(z0: int, z1: int) -> np.ndarray:
        noise = rng.normal(0, 800, (z1 - z0, height, width)).astype(np.float32)
        return np.clip(12000 + 20000 * disc + noise, 0, 65535).astype(np.uint16)

    if fmt == "npy":
        array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint16, shape=shape)
        for z0 in range(0, depth, 16):
            array[z0 : z0 + 16] = slab(z0, min(z0 + 16, depth))
        array.flush()
    elif fmt == "tif":
        import tifffile

        with tifffile.TiffWriter(path, bigtiff=True) as tif:
            for z0 in range(0, depth, 16):
                for page in slab(z0, min(z0 + 16, depth)):
                    tif.write(page, contiguous=True, photometric="minisblack")
    else:
        from xctsam.data.omezarr import OmeZarrLabelsWriter

        with OmeZarrLabelsWriter(path, shape, np.uint16) as writer:  # an OME-Zarr scan (its labels unused)
            for z0 in range(0, depth, 16):
                image = slab(z0, min(z0 + 16, depth))
                writer.write(z0, image, np.zeros(image.shape, np.uint8))


def save_model(kind: str, path: Path) -> None:
    import torch

    from xctsam.config.params import load_params
    from xctsam.data.datasets import IntensityWindow
    from xctsam.models.checkpoint import save_segmenter_checkpoint
    from xctsam.models.factory import build_segmenter, model_meta

    params = load_params()
    torch.manual_seed(0)
    section = getattr(params, kind)
    if kind == "sam":  # random weights of the configured architecture: no foundation file needed
        section = section.model_copy(update={"checkpoint": None})
    model = build_segmenter(kind, section, getattr(params.train, kind))
    save_segmenter_checkpoint(path, model, model_meta(kind, section, getattr(params.train, kind), IntensityWindow(0.0, 65535.0)), {"step": 0})


def _anonymous_bytes(pid: int) -> int:
    """RssAnon: memory the process holds itself. Plain RSS also counts the pages of files it has
    memory-mapped (an NPY scan), which the kernel drops at will and which grow with what was read."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def run(scan: Path, model: Path, out: Path) -> tuple[float, int, int]:
    """(seconds, peak anonymous bytes, peak resident bytes) of the command and its children."""
    start = time.perf_counter()
    process = psutil.Popen([str(XCTSAM), "predict", str(scan), "--model", str(model), "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak_anon = peak_rss = 0
    while process.poll() is None:
        try:
            family = [process, *process.children(recursive=True)]
            peak_anon = max(peak_anon, sum(_anonymous_bytes(member.pid) for member in family))
            peak_rss = max(peak_rss, sum(member.memory_info().rss for member in family))
        except (psutil.NoSuchProcess, FileNotFoundError):
            break
        time.sleep(0.2)
    if process.returncode != 0:
        raise SystemExit(process.stderr.read().decode())
    return time.perf_counter() - start, peak_anon, peak_rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=["unet", "sam"], default="unet")
    parser.add_argument("--format", choices=["npy", "zarr", "tif"], default="npy")
    parser.add_argument("--shape", type=int, nargs=3, default=[512, 1024, 1024])
    parser.add_argument("--short", type=int, default=64, help="slices of the baseline scan")
    args = parser.parse_args()
    suffix = {"npy": ".npy", "zarr": ".zarr", "tif": ".tif"}[args.format]
    with tempfile.TemporaryDirectory(dir=".") as folder:
        folder = Path(folder)
        model = folder / "model.pt"
        save_model(args.kind, model)
        results = {}
        for name, depth in (("short", args.short), ("long", args.shape[0])):
            shape = (depth, args.shape[1], args.shape[2])
            scan = folder / f"{name}{suffix}"
            write_scan(scan, shape, args.format)
            seconds, anon, rss = run(scan, model, folder / f"{name}_labels.tif")
            results[name] = (depth, anon)
            print(f"{args.kind} {args.format} {shape}: {seconds:.0f} s, {depth / seconds:.2f} slices/s, peak anonymous {anon / 2**20:.0f} MiB, RSS {rss / 2**20:.0f} MiB (scan {np.prod(shape) * 2 / 2**20:.0f} MiB)", flush=True)
        (short_depth, short_peak), (long_depth, long_peak) = results["short"], results["long"]
        print(f"peak anonymous memory long / short: {long_peak / short_peak:.2f} for {long_depth / short_depth:.0f}x the slices")


if __name__ == "__main__":
    main()
