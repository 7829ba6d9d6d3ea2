"""How many threads a process computes with: one per core it is given, never more.

Two processes of 2 torch threads each on 2 cores were measured to slow a CycleGAN from 2.9 to
about 0.3 steps/s. A single process is already sized right: torch's default pool follows the
CPU affinity (what `taskset`, SLURM's cgroups or a parent gave it). Processes that share one
affinity are not, so `xctsam tune run --workers N` splits its cores between the workers and
pins each to its share.

A single process: XCTSAM_THREADS if set, else OMP_NUM_THREADS if the user set it, else torch's
default (its cores). A tune worker: XCTSAM_THREADS if set, else params
`tune.threads_per_worker`, else its share of the cores (an inherited OMP_NUM_THREADS is the
parent's count, not the worker's).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from xctsam.util.errors import XctsamError

THREADS_ENV = "XCTSAM_THREADS"


def available_cores() -> list[int]:
    """The cores this process may run on (its affinity), sorted."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # no affinity on this platform (macOS): all of them
        return list(range(os.cpu_count() or 1))


def split_cores(cores: Sequence[int], workers: int) -> list[list[int]]:
    """`workers` contiguous, near-equal shares of `cores`; more workers than cores share them
    one core each, round robin (oversubscribed, but at one thread each)."""
    if workers < 1:
        raise ValueError(f"workers: {workers}; need at least 1")
    if workers >= len(cores):
        return [[cores[i % len(cores)]] for i in range(workers)]
    size, extra = divmod(len(cores), workers)
    shares, start = [], 0
    for index in range(workers):
        end = start + size + (1 if index < extra else 0)
        shares.append(list(cores[start:end]))
        start = end
    return shares


def thread_override() -> int | None:
    """XCTSAM_THREADS as a count, None when unset; a bad value is refused by name."""
    value = os.environ.get(THREADS_ENV, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise XctsamError(f"environment {THREADS_ENV}={value!r}: must be a whole number of threads >= 1; fix or unset it")
    return int(value)


def size_pool_before_import() -> None:
    """XCTSAM_THREADS, when set, becomes OMP_NUM_THREADS (read by torch, NumPy's BLAS and OpenMP
    when they load) for this process and its children; the CLI calls it first thing. Unset,
    torch already sizes its pool from the affinity (or the user's OMP_NUM_THREADS)."""
    override = thread_override()
    if override is not None:
        os.environ["OMP_NUM_THREADS"] = str(override)


def claim_cores(cores: Sequence[int] | None, threads: int | None = None) -> int:
    """Pin this process to `cores` (None: keep its affinity) and size torch's pool to them.

    `threads`: the caller's count (a param); XCTSAM_THREADS still overrides it. Returns the
    thread count set.
    """
    import torch

    if cores:
        os.sched_setaffinity(0, cores)
    count = thread_override() or threads or len(cores or available_cores())
    os.environ["OMP_NUM_THREADS"] = str(count)  # for what this process starts
    torch.set_num_threads(count)
    return count
