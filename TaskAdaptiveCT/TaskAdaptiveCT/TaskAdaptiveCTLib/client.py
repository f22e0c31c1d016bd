"""HTTP client of the TaskAdaptiveCT MONAI Label app (``apps/taskadaptive_ct``).

Every call has an explicit connect and read timeout, and every failure is a
:class:`ServerError` whose message can be shown to a clinician as it is:

* :class:`ConnectionFailed`: no server at the URL (refused, unreachable, timed out);
* :class:`RequestFailed`: the server answered 4xx/5xx; ``status`` and the server's own
  ``detail`` (the app says what was wrong with the request);
* :class:`MalformedReply`: a 2xx reply that is not what the app sends.

Replies with a file come back as MONAI Label's multipart (``params`` JSON and ``image``
file); they are parsed with the standard library, since Slicer bundles ``requests`` but not
``requests_toolbelt``.
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import gzip
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from TaskAdaptiveCTLib.geometry import Volume, read_volume

DEFAULT_CONNECT_TIMEOUT = 5.0
"""Seconds to wait for the server to accept a connection."""
DEFAULT_READ_TIMEOUT = 600.0
"""Seconds to wait for a reply once connected: a slab of a large volume on a CPU server."""


class ServerError(Exception):
    """A failed call to the app; ``str(error)`` is a message for the user."""


class ConnectionFailed(ServerError):
    """No answer from the server (refused connection, unknown host, timeout)."""


class RequestFailed(ServerError):
    """The server answered with an error status.

    Attributes:
        status: the HTTP status (e.g. 404, 422, 500).
        detail: what the server said was wrong.
    """

    def __init__(self, status: int, detail: str, what: str) -> None:
        self.status, self.detail = status, detail
        super().__init__(f"{what}: the server answered {status}: {detail}")


class MalformedReply(ServerError):
    """A successful reply that is not what the app sends."""


@dataclass(frozen=True)
class ServerModels:
    """What the server serves, from ``/info/``.

    Attributes:
        name: the app's name.
        variants: reconstructor name -> description (``alpha`` or ``C``, ``validation``, ``imaging``).
        default_variant: the one served when a request names none.
        segmenter: g's description (None when the server has no segmenter).
        train_tasks: the train tasks it offers (``segmentation``, ``reconstruction``, ``joint``).
    """

    name: str
    variants: dict[str, dict[str, Any]]
    default_variant: str | None
    segmenter: dict[str, Any] | None
    train_tasks: list[str] = field(default_factory=list)

    def label(self, variant: str) -> str:
        """A picker entry: ``ta0.003 (α = 0.003, validation PSNR 31.7 dB, Dice 0.487)``."""
        described = self.variants.get(variant, {})
        parts = []
        if "alpha" in described:
            parts.append(f"α = {described['alpha']:g}")
        if "C" in described:
            parts.append(f"joint, C = {described['C']:g}")
        validation = described.get("validation", {})
        if "val_psnr" in validation:
            parts.append(f"validation PSNR {validation['val_psnr']:.1f} dB")
        if "val_dice_volume" in validation:
            parts.append(f"Dice {validation['val_dice_volume']:.3f}")
        default = ", default" if variant == self.default_variant else ""
        return f"{variant} ({', '.join(parts)}{default})" if parts or default else variant


@dataclass(frozen=True)
class InferReply:
    """A reply of ``reconstruct_segment`` (or another infer task) for an uploaded file.

    Attributes:
        params: the reply's parameters (``warnings``, ``variant``, ``seconds``, ...).
        result: the result file (labels, or the reconstruction for ``reconstruction``).
        reconstruction: for ``reconstruct_segment``, f's reconstruction (HU), else None.
    """

    params: dict[str, Any]
    result: Volume
    reconstruction: Volume | None = None


class TaskAdaptiveClient:
    """Calls of the app's infer, datastore and train endpoints.

    Args:
        url: the server, e.g. ``http://127.0.0.1:8000``.
        connect_timeout, read_timeout: seconds (see the module constants).
        session: a ``requests.Session`` to reuse (default: a new one).
    """

    def __init__(self, url: str, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 read_timeout: float = DEFAULT_READ_TIMEOUT, session: requests.Session | None = None) -> None:
        url = (url or "").strip().rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"server URL {url!r} must start with http:// or https://")
        if connect_timeout <= 0 or read_timeout <= 0:
            raise ValueError("timeouts must be positive")
        self.url = url
        self.timeout = (connect_timeout, read_timeout)
        self.session = session or requests.Session()

    # ------------------------------------------------------------------ plumbing

    def _call(self, method: str, path: str, what: str, **kwargs: Any) -> requests.Response:
        try:
            reply = self.session.request(method, self.url + path, timeout=kwargs.pop("timeout", self.timeout), **kwargs)
        except requests.exceptions.ConnectTimeout:
            raise ConnectionFailed(f"{what}: {self.url} did not accept a connection within {self.timeout[0]:g} s") from None
        except requests.exceptions.ReadTimeout:
            raise ConnectionFailed(f"{what}: {self.url} did not answer within {self.timeout[1]:g} s") from None
        except requests.exceptions.ConnectionError:
            raise ConnectionFailed(f"{what}: cannot connect to {self.url}; is the TaskAdaptiveCT server running "
                                   "(make serve) and the URL right?") from None
        except requests.exceptions.RequestException as error:
            raise ConnectionFailed(f"{what}: {error}") from None
        if reply.status_code >= 400:
            raise RequestFailed(reply.status_code, _detail(reply), what)
        return reply

    def _json(self, reply: requests.Response, what: str) -> Any:
        try:
            return reply.json()
        except ValueError:
            raise MalformedReply(f"{what}: the server's reply is not JSON: {reply.text[:200]!r}") from None

    # ------------------------------------------------------------------ models

    def info(self) -> dict[str, Any]:
        """The server's ``/info/``."""
        info = self._json(self._call("GET", "/info/", "server information"), "server information")
        if not isinstance(info, dict) or not isinstance(info.get("models"), dict):
            raise MalformedReply(f"server information: {self.url}/info/ has no model list; is this a MONAI Label server?")
        return info

    def models(self) -> ServerModels:
        """The models and variants the server serves (for the model/variant picker)."""
        info = self.info()
        models = info["models"]
        reconstruction = models.get("reconstruct_segment") or models.get("reconstruction") or {}
        segmentation = models.get("segmentation") or {}
        if "reconstruct_segment" not in models:
            raise MalformedReply(f"server information: {self.url} has no reconstruct_segment task; it is not the "
                                 f"TaskAdaptiveCT app (its tasks: {', '.join(models) or 'none'})")
        variants = reconstruction.get("variants")
        if not isinstance(variants, dict):
            raise MalformedReply("server information: reconstruct_segment lists no variants")
        return ServerModels(name=str(info.get("name", "")), variants=variants,
                            default_variant=reconstruction.get("default_variant"),
                            segmenter=segmentation.get("segmenter") or reconstruction.get("segmenter"),
                            train_tasks=sorted((info.get("trainers") or {}).keys()))

    # ------------------------------------------------------------------ inference

    def infer_file(self, task: str, path: str | Path, params: dict[str, Any] | None = None) -> InferReply:
        """Run ``task`` on an uploaded volume file; the result (and an embedded reconstruction) as volumes."""
        path = Path(path)
        what = f"{task} of {path.name}"
        with open(path, "rb") as handle:
            reply = self._call("POST", f"/infer/{task}", what,
                               files={"params": (None, json.dumps(params or {})), "file": (path.name, handle)})
        parts = _multipart(reply, what)
        if "params" not in parts or "image" not in parts:
            raise MalformedReply(f"{what}: the reply lacks its params or its file")
        try:
            result_params = json.loads(parts["params"][1])
        except ValueError:
            raise MalformedReply(f"{what}: the reply's params are not JSON") from None
        result = _volume_from_bytes(parts["image"][1], parts["image"][0] or "result.nii.gz", what)
        reconstruction = None
        embedded = result_params.pop("reconstruction", None) if isinstance(result_params, dict) else None
        if isinstance(embedded, dict) and "data" in embedded:
            reconstruction = decode_embedded(embedded, what)
        return InferReply(result_params, result, reconstruction)

    # ------------------------------------------------------------------ datastore

    def has_image(self, image_id: str) -> bool:
        """Whether the datastore holds an image of this id."""
        try:
            self._call("HEAD", "/datastore/image", f"image {image_id}", params={"image": image_id})
        except RequestFailed as error:
            if error.status == 404:
                return False
            raise
        return True

    def upload_image(self, image_id: str, path: str | Path) -> str:
        """Add a CT volume file to the datastore under ``image_id``; returns the id the server gave it."""
        path = Path(path)
        with open(path, "rb") as handle:
            reply = self._call("PUT", "/datastore/image", f"upload of {image_id}", params={"image": image_id},
                               files={"params": (None, "{}"), "file": (path.name, handle)})
        return str(self._json(reply, f"upload of {image_id}").get("image", image_id))

    def save_label(self, image_id: str, path: str | Path, tag: str = "final",
                   info: dict[str, Any] | None = None) -> dict[str, Any]:
        """Store a label file for a datastore image (``tag`` ``final``: a clinician's correction)."""
        path = Path(path)
        what = f"label {tag} of {image_id}"
        with open(path, "rb") as handle:
            reply = self._call("PUT", "/datastore/label", what, params={"image": image_id, "tag": tag},
                               files={"params": (None, json.dumps({"label_info": info or {}} if info else {})),
                                      "label": (path.name, handle)})
        return self._json(reply, what)

    def label(self, image_id: str, tag: str = "final") -> Volume:
        """A datastore label (or stored volume, e.g. ``reconstruction_<variant>``) of an image."""
        what = f"label {tag} of {image_id}"
        reply = self._call("GET", "/datastore/label", what, params={"label": image_id, "tag": tag})
        name = _filename(reply.headers.get("content-disposition", "")) or f"{image_id}.nii.gz"
        return _volume_from_bytes(reply.content, name, what)

    # ------------------------------------------------------------------ training

    def train(self, task: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
        """Start a train task (``segmentation``, ``reconstruction`` with ``alpha``, ``joint`` with ``C``)."""
        reply = self._call("POST", f"/train/{task}", f"training {task}", json=options or {})
        return self._json(reply, f"training {task}")

    def train_status(self) -> dict[str, Any]:
        """The last train task's status (``status``: RUNNING, DONE, ERROR, STOPPED; ``details``: its log lines).

        ``{"status": "NONE", "details": []}`` when no training has run since the server started
        (MONAI Label answers that with a 404).
        """
        try:
            reply = self._call("GET", "/train/", "training status")
        except RequestFailed as error:
            if error.status == 404:
                return {"status": "NONE", "details": []}
            raise
        status = self._json(reply, "training status")
        return status if isinstance(status, dict) else {}

    def stop_training(self) -> dict[str, Any]:
        """Stop the running train task (the served models are untouched)."""
        reply = self._call("DELETE", "/train/", "stop training")
        status = self._json(reply, "stop training")
        return status if isinstance(status, dict) else {}


# ---------------------------------------------------------------------- replies


def _detail(reply: requests.Response) -> str:
    """The server's reason for an error reply: FastAPI's ``detail``, else the start of the body."""
    try:
        body = reply.json()
    except ValueError:
        return reply.text.strip()[:500] or reply.reason or "no reason given"
    if isinstance(body, dict) and "detail" in body:
        detail = body["detail"]
        if isinstance(detail, list):  # FastAPI's validation errors
            return "; ".join(f"{'.'.join(str(p) for p in d.get('loc', []))}: {d.get('msg', '')}" for d in detail
                             if isinstance(d, dict)) or json.dumps(detail)[:500]
        return str(detail)
    return json.dumps(body)[:500]


def _filename(disposition: str) -> str:
    if "filename=" not in disposition:
        return ""
    return disposition.split("filename=", 1)[1].split(";")[0].strip().strip('"')


def _multipart(reply: requests.Response, what: str) -> dict[str, tuple[str, bytes]]:
    """The parts of a multipart reply: form name -> (file name, bytes)."""
    content_type = reply.headers.get("content-type", "")
    if not content_type.startswith("multipart/"):
        raise MalformedReply(f"{what}: expected a multipart reply, got {content_type or 'no content type'}")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + reply.content)
    parts = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name:
            parts[str(name)] = (part.get_filename() or "", part.get_payload(decode=True) or b"")
    return parts


def _volume_from_bytes(data: bytes, name: str, what: str) -> Volume:
    suffix = "".join(Path(name).suffixes) or ".nii.gz"
    if suffix not in (".nii", ".nii.gz", ".nrrd", ".mha", ".mhd"):
        suffix = ".nii.gz" if data[:2] == b"\x1f\x8b" else ".nii"
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"reply{suffix}"
        path.write_bytes(data)
        try:
            return read_volume(path)
        except ValueError as error:
            raise MalformedReply(f"{what}: the reply's file is not a volume ({error})") from None


def decode_embedded(payload: dict[str, Any], what: str = "reply") -> Volume:
    """A volume embedded in a reply's params (``nifti+gzip+base64``, as the app embeds reconstructions)."""
    if payload.get("encoding") != "nifti+gzip+base64":
        raise MalformedReply(f"{what}: unknown encoding {payload.get('encoding')!r} of the embedded volume")
    try:
        data = gzip.decompress(base64.b64decode(payload["data"]))
    except (ValueError, OSError):
        raise MalformedReply(f"{what}: the embedded volume is not gzip-compressed base64") from None
    return _volume_from_bytes(data, "embedded.nii", what)
