"""Benchmark: seconds per training step of train_sam / train_unet, against a baseline revision.

A step is what the training loop does per step: draw a batch of tiles from the project's
training split (params train.<model>), forward, loss, backward, optimiser. The baseline is the
same measurement with the source of another git revision (a temporary worktree put first on
PYTHONPATH); rounds alternate between the two so drift on a noisy machine hits both alike.
Run it in a project that has made its data (and, for SAM, its foundation), e.g. after
`make repro`; the machine must be otherwise idle.

    .venv/bin/python benchmarks/bench_train_step.py --model sam --baseline a81aff0 [--steps 40 --rounds 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def measure(model: str, steps: int, warmup: int) -> float:
    """Median seconds per step, in this process (whatever xctsam is importable)."""
    import torch

    from xctsam.config.params import load_params
    from xctsam.train.runtime import start_runtime
    from xctsam.train.stage import prepare_training
    from xctsam.train.trainer import Trainer

    params = load_params(Path("params.yaml"))
    prepared = prepare_training(model, params, Path(params.study.root))
    trainer = Trainer(prepared.model, prepared.config, start_runtime(None))
    times = []
    with prepared.sampler as sampler:
        for index in range(warmup + steps):
            began = time.perf_counter()
            images, labels = sampler.batch(prepared.config.batch)
            trainer.step(torch.as_tensor(images), torch.as_tensor(labels))
            if index >= warmup:
                times.append(time.perf_counter() - began)
    return statistics.median(times)


def run_tree(src: Path, args: argparse.Namespace) -> float:
    env = {**os.environ, "PYTHONPATH": str(src)}
    command = [sys.executable, __file__, "--model", args.model, "--steps", str(args.steps), "--warmup", str(args.warmup), "--child"]
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["sam", "unet"], default="sam")
    parser.add_argument("--baseline", help="git revision to compare with (default: none, this tree only)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(measure(args.model, args.steps, args.warmup))
        return
    current = REPO / "src"
    if args.baseline is None:
        print(f"{args.model}: {statistics.median(run_tree(current, args) for _ in range(args.rounds)):.4f} s/step")
        return
    with tempfile.TemporaryDirectory() as folder:
        tree = Path(folder) / "baseline"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--quiet", "--detach", str(tree), args.baseline], check=True)
        try:
            base, new = [], []
            for round_ in range(args.rounds):
                base.append(run_tree(tree / "src", args))
                new.append(run_tree(current, args))
                print(f"round {round_ + 1}: {args.baseline} {base[-1]:.4f} s/step, this tree {new[-1]:.4f} s/step")
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)
    b, n = statistics.median(base), statistics.median(new)
    print(f"{args.model}: {args.baseline} {b:.4f} s/step, this tree {n:.4f} s/step: x{b / n:.2f} (medians of {args.rounds} rounds of {args.steps} steps)")


if __name__ == "__main__":
    main()
