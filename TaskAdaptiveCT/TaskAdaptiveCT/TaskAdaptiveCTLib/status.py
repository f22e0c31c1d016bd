"""Small decisions of the module's GUI, kept here so that they are tested: recent server URLs,
what a training status means, and what a finished job tells the user."""

from __future__ import annotations

import re
from typing import Any

from TaskAdaptiveCTLib.job import CANCELLED, DONE, FAILED, ReconstructSegmentJob

MAX_RECENT_URLS = 8
DEFAULT_URL = "http://127.0.0.1:8000"
TRAINING_ACTIVE = ("RUNNING", "QUEUED", "SUBMITTED")


def recent_urls(stored: Any) -> list[str]:
    """The recent URLs as settings return them (None, one string, or a list), never empty."""
    if isinstance(stored, str):
        stored = [stored]
    urls = [str(u).strip().rstrip("/") for u in (stored or []) if str(u).strip()]
    return urls[:MAX_RECENT_URLS] or [DEFAULT_URL]


def remember_url(recent: list[str], url: str, limit: int = MAX_RECENT_URLS) -> list[str]:
    """``recent`` with ``url`` first (once, without a trailing slash), at most ``limit`` entries."""
    url = url.strip().rstrip("/")
    if not url:
        return list(recent)[:limit]
    return [url] + [u for u in recent if u.rstrip("/") != url][: limit - 1]


_LOG_PREFIX = re.compile(r"^(\[[^\]]*\]\s*)+(\([^)]*\)\s*)?-\s*")
"""``[time] [pid] [thread] [LEVEL] (logger:line) - `` before a server log message."""
_EPOCH_LINE = re.compile(r"\bepoch \d+/\d+")


def training_text(status: dict[str, Any]) -> tuple[bool, str]:
    """(whether a training runs, one line for the status label) from ``GET /train/``.

    Shows the engine's last ``epoch N/M`` line (the log's other lines are ignite's and
    MONAI Label's), without the logging prefix; else the last line.
    """
    state = str(status.get("status", "NONE")).upper()
    details = [_LOG_PREFIX.sub("", str(line)).strip() for line in status.get("details") or []]
    epochs = [line for line in details if _EPOCH_LINE.search(line)]
    last = (epochs or details or [""])[-1]
    if state == "NONE":
        return False, "No training has run on this server since it started."
    running = state in TRAINING_ACTIVE
    line = f"Training {state.lower()}"
    if last:
        line += f": {last[-160:]}"
    return running, line


def job_outcome(job: ReconstructSegmentJob) -> str:
    """What to tell the user when a Reconstruct & Segment job has ended."""
    progress = job.progress
    if job.state == DONE:
        result = job.result
        text = f"Done: {progress.text()} with {result.variant or 'the default variant'}."
        if result.warnings:
            text += " Server warnings: " + " ".join(result.warnings)
        return text
    if job.state == CANCELLED:
        return f"Cancelled after {job.done_slices} of {job.total_slices} slices; nothing was added to the scene."
    if job.state == FAILED:
        return f"Failed: {job.error}"
    return progress.text()
