"""The private mesh's WebSocket endpoint on the node's own port.

HTTP signing does not apply here (the middleware passes WebSocket scopes through): a link authenticates
itself with the Noise handshake, which proves the network secret and the peer's identity.
"""

from __future__ import annotations

from fastapi import APIRouter, WebSocket

from pinkybrain.node.services.peer_link import CLOSE_TRY_LATER, StarletteTransport

router = APIRouter()


@router.websocket("/p2p")
async def p2p_link(websocket: WebSocket) -> None:
    mesh = getattr(websocket.app.state.runtime, "mesh", None)
    if mesh is None or not mesh.accepting():
        await websocket.close(code=CLOSE_TRY_LATER)  # before accept: the upgrade is refused
        return
    await websocket.accept()
    await mesh.accept(StarletteTransport(websocket, mesh.stats))
