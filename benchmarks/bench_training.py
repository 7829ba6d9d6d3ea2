"""Benchmark: PEFT-SAM (Conv-LoRA, frozen encoder) against full fine-tuning of the same model.

Same architecture, batch and tiles in one command; each configuration runs in its own spawned
process so its peak resident memory (ru_maxrss) is its own. Figures: median step time
(forward + backward + AdamW step) over --steps steps after --warmup, and peak RSS.

    .venv/bin/python benchmarks/bench_training.py [--variants small vit_b] [--batch 2] [--image-size 256]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import time


def _run(variant: str, full: bool, batch: int, image_size: int, tile: int, steps: int, warmup: int, queue: mp.Queue) -> None:
    import torch

    from xctsam.config.sam import SamConfig
    from xctsam.models.base import trainable_parameters
    from xctsam.models.sam_peft import PeftSam

    torch.manual_seed(0)
    model = PeftSam(SamConfig(variant=variant, image_size=image_size))
    if full:  # full fine-tuning: every weight of the same model trains
        for parameter in model.parameters():
            parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    images = torch.rand(batch, 1, tile, tile)
    labels = torch.randint(0, 4, (batch, tile, tile))
    times = []
    for step in range(warmup + steps):
        began = time.perf_counter()
        outputs = model(images)
        loss = model.loss(outputs, labels) + model.auxiliary_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= warmup:
            times.append(time.perf_counter() - began)
    counts = trainable_parameters(model)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put({"step_s": statistics.median(times), "peak_mb": peak_mb, **counts})


def measure(variant: str, full: bool, args: argparse.Namespace) -> dict:
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_run, args=(variant, full, args.batch, args.image_size, args.tile, args.steps, args.warmup, queue))
    process.start()
    process.join()
    if process.exitcode != 0:
        raise SystemExit(f"{variant} ({'full' if full else 'PEFT'}) run failed with exit code {process.exitcode}")
    return queue.get()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["small", "vit_b"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--tile", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    print(f"batch {args.batch}, tiles {args.tile} resized to {args.image_size}, median of {args.steps} steps")
    for variant in args.variants:
        peft, full = measure(variant, False, args), measure(variant, True, args)
        for name, result in (("PEFT (Conv-LoRA)", peft), ("full fine-tuning", full)):
            print(
                f"{variant:6s} {name:18s} step {result['step_s']:.3f} s   peak RSS {result['peak_mb']:.0f} MB   "
                f"trainable {result['trainable']:,} of {result['total']:,} ({100 * result['share']:.2f}%)"
            )
        print(f"{variant:6s} full / PEFT: step time x{full['step_s'] / peft['step_s']:.2f}, peak memory x{full['peak_mb'] / peft['peak_mb']:.2f}")


if __name__ == "__main__":
    main()
