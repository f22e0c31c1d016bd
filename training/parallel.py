"""Process pools for per-slice work (astra's CPU projector and BM3D are single-threaded)."""

from __future__ import annotations

import multiprocessing
import os
from multiprocessing.pool import Pool

_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def default_workers() -> int:
    """The number of cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _init_worker() -> None:
    # One numerical thread per process: the pool already uses every core.
    for var in _THREAD_VARIABLES:
        os.environ[var] = "1"


def process_pool(workers: int | None = None) -> Pool:
    """A pool of ``workers`` spawned processes (default: every core).

    Spawned, not forked: a forked child inherits the parent's thread pools (torch,
    OpenMP) in whatever state they were, which can deadlock it.
    """
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    return multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker)
