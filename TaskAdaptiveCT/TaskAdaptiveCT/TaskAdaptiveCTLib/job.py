"""Reconstruct & Segment as a job of small steps, so that a GUI stays responsive.

:class:`ReconstructSegmentJob` cuts the volume into slabs of slices along the axis closest
to superior (the app's networks work slice by slice, so a slab's answer is the same as the
whole volume's), sends one slab per :meth:`~ReconstructSegmentJob.step` to the app's
``reconstruct_segment`` as an uploaded NRRD, checks that each answer lies on the slab's
voxels, and places it into the full-size results. The Slicer module calls ``step()`` from
a timer (or a worker thread) and reads :attr:`~ReconstructSegmentJob.progress` for the bar
and the time left; :meth:`~ReconstructSegmentJob.cancel` stops it between slabs.

The results carry the input's own IJK -> RAS matrix, exactly: the server's geometry is
only compared with it (within :data:`GEOMETRY_TOLERANCE_MM`), never copied.
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from TaskAdaptiveCTLib.client import MalformedReply, ServerError, TaskAdaptiveClient
from TaskAdaptiveCTLib.geometry import Volume, slab, slice_axis, write_volume

DEFAULT_SLAB_SLICES = 8
GEOMETRY_TOLERANCE_MM = 1e-3
"""Largest distance between a voxel of a slab and the same voxel of the server's answer."""

PENDING, RUNNING, DONE, CANCELLED, FAILED = "pending", "running", "done", "cancelled", "failed"


@dataclass(frozen=True)
class Progress:
    """Where a job stands.

    Attributes:
        done, total: slices answered, slices in all.
        elapsed: seconds since the first slab was sent.
        remaining: estimated seconds left (None before the first slab is back).
    """

    done: int
    total: int
    elapsed: float
    remaining: float | None

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0

    def text(self) -> str:
        """``12/40 slices, about 1 min 05 s left``."""
        left = "estimating time left" if self.remaining is None else f"about {format_duration(self.remaining)} left"
        if self.done >= self.total:
            return f"{self.total}/{self.total} slices in {format_duration(self.elapsed)}"
        return f"{self.done}/{self.total} slices, {left}"


@dataclass
class JobResult:
    """What Reconstruct & Segment gives, on the input volume's grid.

    Attributes:
        reconstruction: f's reconstruction, float32 HU.
        labels: g's labels on it, uint8 (0 background, 1 liver, 2 tumour).
        variant: the reconstructor that answered.
        warnings: the server's warnings about the input (each once).
    """

    reconstruction: Volume
    labels: Volume
    variant: str
    warnings: list[str] = field(default_factory=list)


class ReconstructSegmentJob:
    """One Reconstruct & Segment of a volume, slab by slab.

    Args:
        client: the app's client.
        volume: the low-dose CT (HU) with its geometry.
        variant: the reconstructor (None: the server's default).
        slab_slices: slices sent per request.
        clock: seconds, monotonic (for tests).

    Use::

        job = ReconstructSegmentJob(client, volume, "ta0.003")
        while job.step():
            show(job.progress.text())
        result = job.result
    """

    def __init__(self, client: TaskAdaptiveClient, volume: Volume, variant: str | None = None,
                 slab_slices: int = DEFAULT_SLAB_SLICES, clock: Callable[[], float] = time.monotonic) -> None:
        if slab_slices < 1:
            raise ValueError(f"slab_slices must be at least 1, got {slab_slices}")
        if volume.array.dtype.kind not in "iuf":
            raise ValueError(f"the volume holds {volume.array.dtype} values, not CT numbers")
        self.client, self.volume, self.variant = client, volume, variant
        self.clock = clock
        self.axis = slice_axis(volume.ijk_to_ras)
        count = volume.array.shape[self.axis]
        self.slabs = [(start, min(start + slab_slices, count)) for start in range(0, count, slab_slices)]
        self.state = PENDING
        self.error: str | None = None
        self._cancel = threading.Event()
        self._next = 0
        self._started: float | None = None
        self._finished: float | None = None
        self._reconstruction = np.zeros(volume.array.shape, dtype=np.float32)
        self._labels = np.zeros(volume.array.shape, dtype=np.uint8)
        self._warnings: list[str] = []
        self._answered_by: str | None = None

    # ------------------------------------------------------------------ state

    @property
    def total_slices(self) -> int:
        return self.volume.array.shape[self.axis]

    @property
    def done_slices(self) -> int:
        return sum(stop - start for start, stop in self.slabs[: self._next])

    @property
    def finished(self) -> bool:
        return self.state in (DONE, CANCELLED, FAILED)

    @property
    def progress(self) -> Progress:
        if self._started is None:
            return Progress(0, self.total_slices, 0.0, None)
        elapsed = (self._finished if self._finished is not None else self.clock()) - self._started
        done = self.done_slices
        remaining = elapsed / done * (self.total_slices - done) if done else None
        return Progress(done, self.total_slices, elapsed, remaining)

    def cancel(self) -> None:
        """Stop before the next slab; a slab already sent is answered first.

        Safe to call from another thread than the one running :meth:`step` (the GUI's, while
        a worker runs the job): it only raises a flag, which ``step`` reads before and after
        each slab. A job that has not started is cancelled at once.
        """
        self._cancel.set()
        if self.state == PENDING:
            self._end(CANCELLED)

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def _end(self, state: str) -> None:
        self.state = state
        self._finished = self.clock()

    # ------------------------------------------------------------------ work

    def step(self) -> bool:
        """Send the next slab and place its answer; returns whether more steps are needed.

        On a server error the job fails: :attr:`state` is ``failed`` and :attr:`error` the
        server's message; the error is raised as well.
        """
        if self.finished:
            return False
        if self._cancel.is_set():
            self._end(CANCELLED)
            return False
        if self._started is None:
            self._started = self.clock()
        self.state = RUNNING
        start, stop = self.slabs[self._next]
        piece = slab(self.volume, self.axis, start, stop)
        try:
            reply = self._send(piece)
        except ServerError as error:
            self.error = str(error)
            self._end(FAILED)
            raise
        index = [slice(None)] * 3
        index[self.axis] = slice(start, stop)
        self._reconstruction[tuple(index)] = reply[0]
        self._labels[tuple(index)] = reply[1]
        self._next += 1
        if self._next == len(self.slabs):  # complete, even if a cancel came during the last slab
            self._end(DONE)
            return False
        return True

    def run(self, on_progress: Callable[[Progress], None] | None = None) -> JobResult:
        """All steps in a row (for scripts and tests); the GUI calls :meth:`step` instead."""
        while self.step():
            if on_progress is not None:
                on_progress(self.progress)
        if on_progress is not None:
            on_progress(self.progress)
        return self.result

    @property
    def result(self) -> JobResult:
        """The assembled results (only once the job is done)."""
        if self.state != DONE:
            raise RuntimeError(f"the job is {self.state}: results exist only when it is done")
        return JobResult(Volume(self._reconstruction, self.volume.ijk_to_ras.copy()),
                         Volume(self._labels, self.volume.ijk_to_ras.copy()),
                         self._answered_by or "", list(self._warnings))

    def _send(self, piece: Volume) -> tuple[np.ndarray, np.ndarray]:
        params = {"result_extension": ".nrrd", "output_dtype": "float32", "return_reconstruction": True}
        if self.variant:
            params["variant"] = self.variant
        with tempfile.TemporaryDirectory() as folder:
            path = write_volume(Volume(np.asarray(piece.array, dtype=np.float32), piece.ijk_to_ras),
                                Path(folder) / "slab.nrrd")
            reply = self.client.infer_file("reconstruct_segment", path, params)
        what = f"slab {piece.array.shape} of reconstruct_segment"
        if reply.reconstruction is None:
            raise MalformedReply(f"{what}: the reply carries no reconstruction")
        for name, answer in (("labels", reply.result), ("reconstruction", reply.reconstruction)):
            if not piece.same_grid(answer, GEOMETRY_TOLERANCE_MM):
                raise MalformedReply(f"{what}: the {name} came back on another grid (shape {answer.array.shape}); "
                                     "the server must answer on the input's voxels")
        labels = np.asarray(reply.result.array)
        if labels.dtype.kind not in "iu" or not set(np.unique(labels).tolist()) <= {0, 1, 2}:
            raise MalformedReply(f"{what}: the labels hold values other than 0, 1, 2")
        variant = str(reply.params.get("variant", self.variant or ""))
        if self._answered_by is not None and variant != self._answered_by:
            raise MalformedReply(f"{what}: answered by {variant!r}, earlier slabs by {self._answered_by!r}; the "
                                 "server's default changed during the job: choose a variant and run it again")
        self._answered_by = variant
        for warning in reply.params.get("warnings", []):
            if warning not in self._warnings:
                self._warnings.append(warning)
        return np.asarray(reply.reconstruction.array, dtype=np.float32), labels.astype(np.uint8)


def format_duration(seconds: float) -> str:
    """``45 s``, ``3 min 05 s``, ``1 h 02 min``."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"
