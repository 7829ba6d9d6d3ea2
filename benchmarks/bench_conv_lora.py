"""Benchmark: one Conv-LoRA qkv layer, forward + backward, at vit_b shapes.

Today's layer against the implementation at --baseline (a git revision; default 4edf9e3, the
layer before B's path became one in-place accumulating addmm and the expert mixture a 2-D
index_add), loaded from git into this process and given the same weights and inputs; timed
interleaved, medians, the ratio and the largest output/gradient difference. With --profile,
the top operators of today's layer under torch.profiler.

    .venv/bin/python benchmarks/bench_conv_lora.py [--rank 4 --experts 4 --repeats 20 --baseline REV --profile]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from xctsam.config.sam import ConvLoraConfig
from xctsam.models.conv_lora import ConvLoRAQKV

# (N, H, W, C) as vit_b's attention hands them to qkv at a 1024^2 input: global blocks see the
# 64 x 64 grid; windowed blocks see 14 x 14 windows (25 per image, 2 images)
REPO = Path(__file__).resolve().parents[1]
SHAPES = {"global": (2, 64, 64, 768), "windowed": (50, 14, 14, 768)}


def baseline_module(revision: str) -> ModuleType:
    """models/conv_lora.py as it was at `revision`, imported under another name."""
    source = subprocess.run(["git", "show", f"{revision}:src/xctsam/models/conv_lora.py"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    folder = Path(tempfile.mkdtemp())
    (folder / "conv_lora_baseline.py").write_text(source)
    spec = importlib.util.spec_from_file_location("conv_lora_baseline", folder / "conv_lora_baseline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def step(forward: Callable[[torch.Tensor], torch.Tensor], tokens: torch.Tensor, upstream: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)  # the same gate noise for both variants
    tokens = tokens.detach().requires_grad_(True)
    output = forward(tokens)
    output.backward(upstream)
    return output.detach(), tokens.grad


def median_ms(runs: list[Callable[[], object]], repeats: int) -> list[float]:
    """Median ms of each run, the runs interleaved so that drifts of a noisy machine hit all alike."""
    for run in runs:
        run()
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for run, kept in zip(runs, times, strict=True):
            began = time.perf_counter()
            run()
            kept.append(time.perf_counter() - began)
    return [statistics.median(kept) * 1000 for kept in times]


def max_difference(layers: list[nn.Module], tokens: torch.Tensor, upstream: torch.Tensor) -> float:
    results = []
    for layer in layers:
        layer.zero_grad(set_to_none=True)
        output, token_grad = step(layer, tokens, upstream, seed=0)
        results.append([output, token_grad] + [p.grad.clone() for p in layer.parameters() if p.grad is not None])
    return max((a - b).abs().max().item() for a, b in zip(*results, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--baseline", default="4edf9e3", help="git revision of the layer to compare with")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    baseline = baseline_module(args.baseline)
    print(f"Conv-LoRA qkv forward+backward, rank {args.rank}, {args.experts} experts, torch threads {torch.get_num_threads()}")
    for name, shape in SHAPES.items():
        torch.manual_seed(0)
        layer = ConvLoRAQKV(nn.Linear(shape[-1], 3 * shape[-1]), ConvLoraConfig(rank=args.rank, experts=args.experts)).train()
        with torch.no_grad():
            layer.lora_b.weight.normal_(std=0.02)  # trained B: every path carries gradient
        old = baseline.ConvLoRAQKV(nn.Linear(shape[-1], 3 * shape[-1]), ConvLoraConfig(rank=args.rank, experts=args.experts)).train()
        old.load_state_dict(layer.state_dict())
        tokens = torch.randn(shape)
        upstream = torch.randn(*shape[:-1], 3 * shape[-1])
        difference = max_difference([layer, old], tokens, upstream)
        before, today = median_ms([partial(step, old, tokens, upstream, 0), partial(step, layer, tokens, upstream, 0)], args.repeats)
        print(f"  {name:8s} {tuple(shape)}: {args.baseline} {before:7.1f} ms   today {today:7.1f} ms   speed-up x{before / today:.2f}   max |difference| {difference:.1e}")
        if args.profile:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
                for _ in range(3):
                    step(layer, tokens, upstream, 0)
            print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


if __name__ == "__main__":
    main()
