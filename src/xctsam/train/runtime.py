"""Where a training runs: one process or torchrun's several, and deterministic CPU kernels.

Several GPUs: launch under torchrun, e.g.
    torchrun --standalone --nproc_per_node=4 --no-python xctsam train sam
Each process trains on its own tiles (the caller seeds its sampler with `seed + process_rank()`),
gradients are averaged by DistributedDataParallel (effective batch: batch x processes), and
only rank 0 validates, logs and writes files. Without torchrun nothing of torch.distributed is
touched.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from xctsam.util.device import pick_device


@dataclass
class Runtime:
    """The single-process run: every collective is the identity."""

    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def gather(self, value: Any) -> list[Any]:
        return [value]

    def broadcast(self, value: Any) -> Any:
        return value

    def any(self, flag: bool) -> bool:
        return flag

    def close(self) -> None:
        pass


class DistributedRuntime(Runtime):
    """torchrun's processes: NCCL with one GPU each when there are enough GPUs, else gloo on CPUs."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self._dist = dist
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        local_size = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
        use_gpus = torch.cuda.is_available() and torch.cuda.device_count() >= local_size
        if use_gpus:
            torch.cuda.set_device(local_rank)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_gpus else "gloo")
        device = torch.device("cuda", local_rank) if use_gpus else torch.device("cpu")
        super().__init__(device, dist.get_rank(), dist.get_world_size())

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # top-k mixtures of experts leave unchosen experts without gradients in a step
        return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=True)

    def gather(self, value: Any) -> list[Any]:
        values: list[Any] = [None] * self.world_size
        self._dist.all_gather_object(values, value)
        return values

    def broadcast(self, value: Any) -> Any:
        box = [value]
        self._dist.broadcast_object_list(box, src=0)
        return box[0]

    def any(self, flag: bool) -> bool:
        tensor = torch.tensor([int(flag)], device=self.device)
        self._dist.all_reduce(tensor, op=self._dist.ReduceOp.MAX)
        return bool(tensor.item())

    def close(self) -> None:
        if self._dist.is_initialized():
            self._dist.destroy_process_group()


def process_rank() -> int:
    """This process's rank under torchrun (0 otherwise); seed per-process samplers with seed + rank."""
    return int(os.environ.get("RANK", "0"))


def start_runtime(device: torch.device | str | None = None) -> Runtime:
    """Distributed under torchrun with more than one process, else the plain single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return DistributedRuntime()
    return Runtime(torch.device(device) if device is not None else pick_device())


@contextmanager
def deterministic_on_cpu(device: torch.device) -> Iterator[None]:
    """Deterministic kernels on the CPU (where they cost nothing), the previous setting restored after."""
    if device.type != "cpu":
        yield
        return
    previous, previous_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)
