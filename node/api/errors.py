"""The API's error shape, `{error, detail}`, in one place: raised by routes and described in the OpenAPI.

Every status a route can answer is declared, so clients (and schemathesis) can rely on the description:
the statuses that any signed route can give come from the middleware and validation (COMMON_ERRORS), and
each route adds its own with `errors(...)`.
"""

from __future__ import annotations

from fastapi import HTTPException
from pydantic import BaseModel, ConfigDict

DESCRIPTIONS = {
    400: "Bad request: the detail says which value is wrong",
    401: "Missing, invalid, stale or replayed signature",
    402: "Not enough credit for a public-mesh query",
    403: "The caller's principal may not do this",
    404: "No such item",
    409: "Conflicts with the node's state",
    413: "Request body or value too large",
    422: "A parameter or body field failed validation",
    502: "No model produced an answer",
    503: "Busy or not ready: retry shortly",
}


class ErrorBody(BaseModel):
    """`error` is a stable machine-readable code, `detail` one line for people; some errors add fields."""

    model_config = ConfigDict(extra="allow")
    error: str
    detail: str


def api_error(status: int, code: str, detail: str, **extra) -> HTTPException:
    return HTTPException(status_code=status, detail={"error": code, "detail": detail, **extra})


def errors(*statuses: int) -> dict[int | str, dict]:
    """`responses=` entries for these statuses, each with the shared error body."""
    return {status: {"model": ErrorBody, "description": DESCRIPTIONS[status]} for status in statuses}


# What any route can answer: an unparseable body (400), the auth middleware (401; 403 for a principal
# below the route's; 413; 503 busy) and request validation (422).
COMMON_ERRORS = errors(400, 401, 403, 413, 422, 503)
