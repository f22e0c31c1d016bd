"""Worker pools: one numerical thread per worker, parent environment untouched."""

from __future__ import annotations

import os

import pytest

from training.parallel import process_pool


def _worker_threads(_: int) -> tuple[str | None, list[int]]:
    import numpy  # noqa: F401  (loads OpenBLAS, whose thread count threadpoolctl reports)
    import threadpoolctl

    return os.environ.get("OMP_NUM_THREADS"), [pool["num_threads"] for pool in threadpoolctl.threadpool_info()]


def test_workers_run_single_threaded_and_parent_env_is_restored(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    with process_pool(2) as pool:
        results = pool.map(_worker_threads, range(2))
    assert all(omp == "1" and threads and set(threads) == {1} for omp, threads in results), results
    assert os.environ["OMP_NUM_THREADS"] == "7"
    assert "OPENBLAS_NUM_THREADS" not in os.environ


def test_worker_count_is_validated():
    with pytest.raises(ValueError, match="workers must be at least 1, got 0"):
        process_pool(0)
