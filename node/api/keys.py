"""The /v1 API keys the owner issues (owner-only routes, core.principals.ROUTES): create (the key is in
this answer only), list (names, scopes, dates; never a key), revoke."""

from __future__ import annotations

import asyncio
from typing import Literal

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field

from pinkybrain.node.api.deps import RuntimeDep
from pinkybrain.node.api.errors import errors
from pinkybrain.node.services.credentials import CredentialError

router = APIRouter()



def _error(status: int, code: str, detail: str) -> HTTPException:
    return HTTPException(status_code=status, detail={"error": code, "detail": detail})


class KeyRequest(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    scope: Literal["owner", "query"] = Field(
        default="query", description="owner: everything /v1 offers, cloud models included; query: what a mesh "
                                     "member may use")
    replace: bool = Field(default=False, description="replace an existing key of that name")


@router.get("/api/keys", summary="List the /v1 API keys (names and scopes, never the keys)")
async def keys_list(runtime: RuntimeDep):
    items = runtime.api_keys.list()
    return {"keys": items, "count": len(items)}


@router.post("/api/keys", summary="Create a /v1 API key (shown in this answer only)", status_code=201,
             responses=errors(409))
async def keys_create(runtime: RuntimeDep, body: KeyRequest):
    try:
        key = await asyncio.to_thread(runtime.api_keys.create, body.name, body.scope, replace=body.replace)
    except CredentialError as exc:
        raise _error(400, "invalid_key_request", str(exc)) from None
    except FileExistsError as exc:
        raise _error(409, "key_exists", str(exc)) from None
    return {"name": body.name, "scope": body.scope, "api_key": key,
            "detail": "this is the only time the key is shown: only its hash is kept"}


@router.delete("/api/keys/{name}", summary="Revoke a /v1 API key", responses=errors(404))
async def keys_revoke(runtime: RuntimeDep, name: str):
    try:
        return {**await asyncio.to_thread(runtime.api_keys.revoke, name), "revoked": True}
    except KeyError as exc:
        raise _error(404, "not_found", str(exc.args[0])) from None
