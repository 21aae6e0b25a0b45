"""The API's JSON responses, serialised by orjson: several times faster than the standard library, and on
the hot routes (ping, status) it also spares FastAPI's jsonable_encoder walk over the answer."""

from __future__ import annotations

from typing import Any

import orjson

# Non-string keys (ints in a few views) need OPT_NON_STR_KEYS, which makes orjson take a slow path for
# every dict (2.5 times the time for the status answer): tried only when the fast path refuses.
_NON_STR_KEYS = orjson.OPT_NON_STR_KEYS


def _fallback(value: Any) -> Any:
    # Types orjson does not know (sets, Paths, pydantic models): FastAPI's encoder makes them JSON-able.
    # Imported here: the hot routes answer before FastAPI is loaded (node/api/front.py).
    from fastapi.encoders import jsonable_encoder

    return jsonable_encoder(value)


def dumps(content: Any) -> bytes:
    try:
        return orjson.dumps(content, default=_fallback)
    except TypeError:
        return orjson.dumps(content, default=_fallback, option=_NON_STR_KEYS)


def __getattr__(name: str) -> Any:
    # FastJSONResponse is made on first use: starlette loads with FastAPI, after the hot routes have
    # answered (node/api/front.py), and this module is imported by them.
    if name != "FastJSONResponse":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from starlette.responses import JSONResponse

    class FastJSONResponse(JSONResponse):
        """A JSONResponse rendered by orjson (compact, UTF-8; NaN and infinities become null)."""

        def render(self, content: Any) -> bytes:
            return dumps(content)

    globals()[name] = FastJSONResponse
    return FastJSONResponse
