"""Benchmark: one AdamW step over the small SAM's parameters, torch's per-tensor loop (its CPU
default) against the fused kernel xctsam.util.optim.adamw uses. Medians of 30 steps.

    .venv/bin/python benchmarks/bench_optim.py [--params params.yaml]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from xctsam.config.params import load_params
from xctsam.models.sam_builder import build_sam
from xctsam.pretrain.train import stand_in_config
from xctsam.util.optim import adamw


def median_step_ms(optimizer: torch.optim.Optimizer, repeats: int = 30) -> float:
    for _ in range(3):  # allocate the state first
        optimizer.step()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - began)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    torch.manual_seed(0)
    parameters = list(build_sam(stand_in_config(load_params(args.params).sam)).parameters())
    for parameter in parameters:
        parameter.grad = torch.randn_like(parameter)
    loop = median_step_ms(torch.optim.AdamW(parameters, lr=1e-4, weight_decay=0.05, foreach=False))
    fused = median_step_ms(adamw(parameters, 1e-4, 0.05))
    print(f"AdamW step over {len(parameters)} tensors ({sum(p.numel() for p in parameters) / 1e6:.1f} M values), torch threads {torch.get_num_threads()}")
    print(f"  per-tensor loop {loop:.2f} ms   fused {fused:.2f} ms   speed-up x{loop / fused:.2f}")


if __name__ == "__main__":
    main()
