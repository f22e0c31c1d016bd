"""Process pools for per-slice work (astra's CPU projector and BM3D are single-threaded)."""

from __future__ import annotations

import multiprocessing
import os
from multiprocessing.pool import Pool

_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def default_workers() -> int:
    """The number of cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def process_pool(workers: int | None = None) -> Pool:
    """A pool of ``workers`` spawned processes (default: every core), one numerical thread each.

    Spawned, not forked: a forked child inherits the parent's thread pools (torch,
    OpenMP) in whatever state they were, which can deadlock it. The thread limits must be
    in the environment when a worker starts, before it imports numpy, so they are set
    while the pool spawns its workers and restored afterwards.
    """
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    saved = {var: os.environ.get(var) for var in _THREAD_VARIABLES}
    os.environ.update({var: "1" for var in _THREAD_VARIABLES})
    try:
        return multiprocessing.get_context("spawn").Pool(workers)
    finally:
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
