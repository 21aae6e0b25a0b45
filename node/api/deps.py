"""The route dependencies every API module shares: the node's runtime and the caller's principal.

Both are `async def` on purpose: FastAPI runs a plain `def` dependency in its thread pool, which cost a
thread hand-off (about a third of a signed request's server CPU) on every request for a dictionary lookup."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from pinkybrain.node.api.auth import principal_of
from pinkybrain.node.core.principals import Principal
from pinkybrain.node.services.runtime import NodeRuntime


async def get_runtime(request: Request) -> NodeRuntime:
    return request.app.state.runtime


async def get_principal(request: Request) -> Principal:
    return principal_of(request)


RuntimeDep = Annotated[NodeRuntime, Depends(get_runtime)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]
