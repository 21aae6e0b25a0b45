"""The meshes' WebSocket endpoints on the node's own port: `/p2p` (private), `/p2p/public` (public).

HTTP signing does not apply here (the middleware passes WebSocket scopes through): a link authenticates
itself with the Noise handshake, which proves the peer's identity (and, on /p2p, the network secret).
"""

from __future__ import annotations

from fastapi import APIRouter, WebSocket

from pinkybrain.node.services.peer_link import CLOSE_TRY_LATER, StarletteTransport

router = APIRouter()


@router.websocket("/p2p")
async def p2p_link(websocket: WebSocket) -> None:
    mesh = getattr(websocket.app.state.runtime, "mesh", None)
    # Refused before the upgrade when this address already holds its share of handshake slots.
    if mesh is None or not mesh.accepting(websocket.client.host if websocket.client else None):
        await websocket.close(code=CLOSE_TRY_LATER)  # before accept: the upgrade is refused
        return
    await websocket.accept()
    await mesh.accept(StarletteTransport(websocket, mesh.stats))


@router.websocket("/p2p/public")
async def public_link(websocket: WebSocket) -> None:
    # The public mesh (services/public_mesh.py): only while this node has joined it.
    public = getattr(websocket.app.state.runtime, "public", None)
    mesh = public.mesh if public is not None else None
    if mesh is None or not mesh.accepting(websocket.client.host if websocket.client else None):
        await websocket.close(code=CLOSE_TRY_LATER)
        return
    await websocket.accept()
    await mesh.accept(StarletteTransport(websocket, mesh.stats))
