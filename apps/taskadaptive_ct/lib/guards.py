"""Checks on ``POST /train/{model}`` in the server, before MONAI Label starts a training process.

MONAI Label answers ``POST /train/{model}`` with 200 as soon as it has launched a
subprocess, which then reads the options: a bad option (an alpha of 2, an unknown model)
would only show as an ERROR in ``GET /train/`` a minute later. The app therefore looks at
that one request, once the server has started (:meth:`TaskAdaptiveCTApp.server_mode`): the
body is checked with the train task's own ``validate`` and a bad request is answered at
once with 404 or 422 and a message, without starting anything.

``DELETE /train/`` has the opposite gap: MONAI Label stops a training by killing its
process, and a task submitted a moment ago has none yet, so a stop sent right after the
start was silently ignored and the training ran on. The stop is therefore held (up to
:data:`STOP_WAIT_SECONDS`) until the newest train task has left ``SUBMITTED``. Every
other request passes through untouched.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any, Callable
from urllib.parse import unquote

from starlette.responses import JSONResponse

log = logging.getLogger(__name__)

TRAIN_PATH = re.compile(r"^/train/(?P<model>[^/]+)/?$")
STOP_PATH = re.compile(r"^/train/?$")
STOP_WAIT_SECONDS = 30.0
"""How long a stop waits for a just-submitted training to have a process to stop."""


async def _until_train_task_started(timeout: float = STOP_WAIT_SECONDS) -> None:
    """Return once MONAI Label's newest train task is no longer ``SUBMITTED`` (or after ``timeout``)."""
    from monailabel.utils.async_tasks.utils import background_tasks

    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        tasks = background_tasks.get("train") or []
        if not tasks or tasks[-1].get("status") != "SUBMITTED":
            return
        await asyncio.sleep(0.05)
    log.warning("the submitted training has not started within %.0f s; stopping what runs", timeout)


def guard_train_route(api: Any, check: Callable[[str, dict], tuple[int, str] | None]) -> None:
    """Check ``POST /train/{model}`` of ``api`` (the server's FastAPI app) with ``check(model, options)``.

    ``check`` returns None to let the request through, or ``(status, message)`` to refuse it.
    The app's ASGI stack is wrapped (Starlette builds it on the first call, the lifespan
    start-up, before this runs), so only that one path and method are looked at.
    """
    if api.middleware_stack is None:
        api.middleware_stack = api.build_middleware_stack()
    if not getattr(api.middleware_stack, "_taskadaptivect_guard", False):
        api.middleware_stack = _guarded(api.middleware_stack, check)


def _guarded(app: Callable, check: Callable[[str, dict], tuple[int, str] | None]) -> Callable:
    async def asgi(scope: dict, receive: Callable, send: Callable) -> None:
        http = scope.get("type") == "http"
        if http and scope.get("method") == "DELETE" and STOP_PATH.match(scope.get("path", "")):
            await _until_train_task_started()
            await app(scope, receive, send)
            return
        match = TRAIN_PATH.match(scope.get("path", "")) if http else None
        if match is None or scope.get("method") != "POST":
            await app(scope, receive, send)
            return
        messages, body, more = [], b"", True
        while more:
            message = await receive()
            messages.append(message)
            body += message.get("body", b"")
            more = message.get("more_body", False) and message.get("type") == "http.request"
        try:
            options = json.loads(body) if body.strip() else {}
        except ValueError as error:
            options, refusal = None, (422, f"the request body is not JSON: {error}")
        else:
            refusal = None if isinstance(options, dict) else (422, "the request body must be a JSON object of options")
        if refusal is None:
            refusal = check(unquote(match.group("model")), options)
        if refusal is not None:
            await JSONResponse({"detail": refusal[1]}, status_code=refusal[0])(scope, receive, send)
            return

        async def replay() -> dict:
            return messages.pop(0) if messages else await receive()

        await app(scope, replay, send)

    asgi._taskadaptivect_guard = True  # type: ignore[attr-defined]
    return asgi
