"""HTTP errors with a message the client can act on.

MONAI Label turns any exception raised while serving a request into a bare 500 "Internal
Server Error"; FastAPI's ``HTTPException`` is the one kind that reaches the client with
its status and text, so everything the app refuses is raised as one of these.
"""

from __future__ import annotations

from fastapi import HTTPException


class BadRequest(HTTPException):
    """422: the request's input (file, parameter, label) cannot be used; ``detail`` says why."""

    def __init__(self, detail: str) -> None:
        super().__init__(status_code=422, detail=detail)


class NotFound(HTTPException):
    """404: an unknown model, variant or image id; ``detail`` names the ones that exist."""

    def __init__(self, detail: str) -> None:
        super().__init__(status_code=404, detail=detail)


class Unavailable(HTTPException):
    """503: the server cannot answer yet (e.g. no model of the kind asked for is in its model folder)."""

    def __init__(self, detail: str) -> None:
        super().__init__(status_code=503, detail=detail)


def choices(names) -> str:
    names = sorted(names)
    return ", ".join(names) if names else "none"
