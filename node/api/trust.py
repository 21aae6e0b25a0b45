"""Web of Trust and credit endpoints: vouch, revoke, show a key's validity, peers' scores, the ledger."""

from __future__ import annotations

import asyncio
from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Query
from pydantic import BaseModel, Field

from pinkybrain.node.api.deps import RuntimeDep
from pinkybrain.node.api.errors import errors
from pinkybrain.node.core.identity import IdentityError, validate_node_id
from pinkybrain.node.core.trust import MAX_TTL_SECS, TrustError

router = APIRouter()



def _error(status: int, code: str, detail: str) -> HTTPException:
    return HTTPException(status_code=status, detail={"error": code, "detail": detail})


def _node_id(text: str) -> str:
    try:
        return validate_node_id(text)
    except IdentityError as exc:
        raise _error(400, "bad_node_id", str(exc)) from None


class VouchRequest(BaseModel):
    node_id: str
    level: Literal["full", "marginal"] = "full"
    ttl_days: float = Field(default=90, gt=0, le=MAX_TTL_SECS / 86400)


class RevokeRequest(BaseModel):
    node_id: str


class IntroducerRequest(BaseModel):
    node_id: str
    introducer: Literal["none", "marginal", "full"]


@router.post("/api/trust/vouch", summary="Vouch for a node (signed, expiring attestation)", responses=errors(400))
async def vouch(runtime: RuntimeDep, body: VouchRequest):
    subject = _node_id(body.node_id)
    if subject == runtime.identity.node_id:
        raise _error(400, "self_vouch", "a node does not vouch for itself: it is always its own anchor")
    try:
        att = await asyncio.to_thread(runtime.trust.vouch, runtime.identity, subject, body.level,
                                      ttl=int(body.ttl_days * 86400))
    except TrustError as exc:
        raise _error(400, "invalid_vouch", str(exc)) from None
    return {"attestation": att.to_dict(), "verdict": runtime.trust.is_valid(subject).to_dict()}


@router.post("/api/trust/revoke", summary="Revoke this node's vouches for a node", responses=errors(400))
async def revoke(runtime: RuntimeDep, body: RevokeRequest):
    subject = _node_id(body.node_id)
    rev = await asyncio.to_thread(runtime.trust.revoke, runtime.identity, subject)
    return {"revocation": rev.to_dict(), "verdict": runtime.trust.is_valid(subject).to_dict()}


@router.post("/api/trust/set", summary="Set how far this node trusts a key to introduce others (owner-trust)",
             responses=errors(400))
async def set_introducer(runtime: RuntimeDep, body: IntroducerRequest):
    subject = _node_id(body.node_id)
    if subject == runtime.identity.node_id:
        raise _error(400, "self_trust", "this node's own key is always fully trusted: it is the anchor")
    try:
        await asyncio.to_thread(runtime.trust.set_owner_trust, subject, body.introducer)
    except TrustError as exc:
        raise _error(400, "invalid_trust", str(exc)) from None
    return {"node_id": subject, "introducer": body.introducer,
            "verdict": runtime.trust.is_valid(subject).to_dict()}


@router.get("/api/trust/{node_id}", summary="Whether this node finds a key valid, and why", responses=errors(400))
async def show(runtime: RuntimeDep, node_id: str):
    shown = await asyncio.to_thread(runtime.trust.show, _node_id(node_id))
    verdict_keys = set(runtime.trust.is_valid(shown["subject"]).to_dict())
    # Same shape as vouch/revoke answers: the verdict apart from what the node holds about the key.
    return {"verdict": {k: v for k, v in shown.items() if k in verdict_keys},
            **{k: v for k, v in shown.items() if k not in verdict_keys}}


@router.get("/api/score/{peer}", summary="Credit score for a peer", responses=errors(400))
async def score(runtime: RuntimeDep, peer: str):
    return await asyncio.to_thread(runtime.ledger.score, _node_id(peer))


@router.get("/api/credits", summary="This node's credit balance and ledger summary", responses=errors(400))
async def credits(
    runtime: RuntimeDep,
    receipts: Annotated[int, Query(ge=0, le=1000, description="also list the latest N receipts")] = 0,
):
    summary = await asyncio.to_thread(runtime.ledger.summary)
    if receipts:
        # Each receipt is the dual-signed evidence (amounts, parties, response digest); never any text.
        held = await asyncio.to_thread(runtime.ledger.receipts)
        summary["latest_receipts"] = [r.to_dict() for r in held[-receipts:]]
    return summary
