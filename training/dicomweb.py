"""Storing series on a DICOMweb server (STOW-RS), whole or not at all.

A STOW-RS reply does not prove what was stored: Orthanc, for one, lists an instance that
its ``ReceivedInstanceFilter`` refused among the stored ones. So :func:`store_series`
asks the server afterwards (QIDO-RS) which instances of each series it holds. If any is
missing, or the request failed, the instances this call added are removed again, through
Orthanc's REST API (DICOMweb has no portable delete), and :class:`StowError` says which
series was refused and why; where they cannot be removed (not an Orthanc, or it refused),
the error says exactly which are left.

Credentials for a site's PACS come, as for MONAI Label's DICOMweb datastore, from
``MONAI_LABEL_DICOMWEB_USERNAME`` and ``MONAI_LABEL_DICOMWEB_PASSWORD``
(:func:`dicomweb_session`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import requests
from dicomweb_client import DICOMwebClient
from pydicom.dataset import Dataset

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 60.0
STOW_BATCH = 32  # instances per STOW request: a 512 x 512 slice is 0.5 MB


class StowError(RuntimeError):
    """A series the server did not store whole; ``series_uid`` names it (the message says what is left)."""

    def __init__(self, message: str, series_uid: str) -> None:
        super().__init__(message)
        self.series_uid = series_uid


class TimeoutSession(requests.Session):
    """A ``requests.Session`` whose requests time out (``requests`` waits forever by default)."""

    def __init__(self, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        super().__init__()
        self.timeout = timeout

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", self.timeout)
        return super().request(method, url, *args, **kwargs)


def dicomweb_session(timeout: float = DEFAULT_TIMEOUT_S, username: str | None = None,
                     password: str | None = None) -> TimeoutSession:
    """A session with a timeout and, where given or set in the environment, HTTP basic credentials."""
    session = TimeoutSession(timeout)
    username = username if username is not None else os.environ.get("MONAI_LABEL_DICOMWEB_USERNAME", "")
    password = password if password is not None else os.environ.get("MONAI_LABEL_DICOMWEB_PASSWORD", "")
    if username:
        session.auth = (username, password)
    return session


def dicomweb_client(url: str, session: requests.Session | None = None) -> DICOMwebClient:
    """A DICOMweb client for ``url`` (e.g. ``http://127.0.0.1:8042/dicom-web``) with a timing-out session."""
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"a DICOMweb URL starts with http:// or https://, got {url!r}")
    client = DICOMwebClient(url.rstrip("/"), session=session or dicomweb_session())
    # dicomweb-client retries every failure (a refused connection too) 5 times with back-off, 30 s in all:
    # once, a second later, is enough to ride out a busy server without hanging a request on a stopped one
    client.set_http_retry_params(max_attempts=2, wait_exponential_multiplier=500)
    return client


def stored_instances(client: DICOMwebClient, study_uid: str, series_uid: str) -> set[str]:
    """SOP Instance UIDs of a series that the server holds (QIDO-RS)."""
    found = client.search_for_instances(study_uid, series_uid, fields=["00080018"])
    return {item["00080018"]["Value"][0] for item in found if item.get("00080018", {}).get("Value")}


def store_series(client: DICOMwebClient, datasets: Sequence[Dataset]) -> list[str]:
    """Store the instances of one or more series; each series ends up whole on the server, or the call raises.

    Instances the server already holds (the same SOP Instance UID) are sent again and kept
    whatever happens: only what this call added is removed after a failure. Series are
    stored one after the other; when one fails, those stored before it in this call stay
    (each is whole).

    Args:
        client: see :func:`dicomweb_client`.
        datasets: CT, SEG, ... instances with file meta.

    Returns:
        the Series Instance UIDs stored, in order.

    Raises:
        StowError: a series refused in part or whole, or the request failed; the server's
            reason where it gave one.
        requests.ConnectionError: the server did not answer before anything of a series was sent.
    """
    by_series: dict[tuple[str, str], list[Dataset]] = {}
    for ds in datasets:
        by_series.setdefault((str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)), []).append(ds)
    stored = []
    for (study_uid, series_uid), instances in by_series.items():
        _store_one_series(client, study_uid, series_uid, instances)
        stored.append(series_uid)
    return stored


def _store_one_series(client: DICOMwebClient, study_uid: str, series_uid: str, instances: list[Dataset]) -> None:
    before = stored_instances(client, study_uid, series_uid)
    expected = {str(ds.SOPInstanceUID) for ds in instances}
    problem = ""
    start = 0
    try:
        for start in range(0, len(instances), STOW_BATCH):
            reply = client.store_instances(instances[start:start + STOW_BATCH], study_uid)
            failed = list(reply.get("FailedSOPSequence", []) or []) if reply is not None else []
            if failed:
                reasons = sorted({str(item.get("FailureReason", "?")) for item in failed})
                problem = f"the server refused {len(failed)} instances (failure reason {', '.join(reasons)})"
                break
    except requests.HTTPError as error:
        status = error.response.status_code if error.response is not None else "?"
        text = (error.response.text or "").strip()[:300] if error.response is not None else str(error)
        problem = f"the server answered HTTP {status}: {text}"
    except requests.ConnectionError:
        if start == 0:
            raise  # nothing was sent
        problem = "the connection was lost while storing"
    if not problem:
        missing = expected - stored_instances(client, study_uid, series_uid)
        if missing:
            problem = f"the server kept {len(expected) - len(missing)} of {len(expected)} instances (it refused the rest)"
    if not problem:
        log.info("stored series %s (%d instances)", series_uid, len(instances))
        return
    left = _remove_added(client, study_uid, series_uid, before)
    where = (f"; {len(left)} instances it did keep could not be removed, remove them by hand: {', '.join(left[:5])}"
             if left else "; nothing of it is left on the server")
    raise StowError(f"series {series_uid} was not stored: {problem}{where}", series_uid)


def orthanc_rest_url(client: DICOMwebClient) -> str:
    """Orthanc's REST root for its DICOMweb root (``.../dicom-web`` -> ``...``)."""
    base = client.base_url.rstrip("/")
    return base[: -len("/dicom-web")] if base.endswith("/dicom-web") else base


def _remove_added(client: DICOMwebClient, study_uid: str, series_uid: str, before: set[str]) -> list[str]:
    """Remove what a failed store added to a series; returns the SOP UIDs that remain against our will."""
    try:
        added = stored_instances(client, study_uid, series_uid) - before
    except requests.RequestException as error:
        log.warning("cannot list series %s after a failed store: %s", series_uid, error)
        return ["(unknown: the server cannot be asked)"]
    if not added:
        return []
    session = getattr(client, "_session", None) or requests.Session()
    rest = orthanc_rest_url(client)
    left = []
    for sop_uid in sorted(added):
        try:
            found = session.post(f"{rest}/tools/lookup", data=sop_uid)
            found.raise_for_status()
            ids = [item["ID"] for item in found.json() if item.get("Type") == "Instance"]
            for orthanc_id in ids:
                session.delete(f"{rest}/instances/{orthanc_id}").raise_for_status()
            if not ids:
                left.append(sop_uid)
        except (requests.RequestException, ValueError, KeyError, TypeError) as error:
            log.warning("cannot remove instance %s (not an Orthanc?): %s", sop_uid, error)
            left.append(sop_uid)
    if len(left) < len(added):
        log.info("removed %d instances of the refused series %s", len(added) - len(left), series_uid)
    return left
