"""Lending to the public mesh: a `split.rpc` tunnel for a public peer, gated by the Web of Trust and paid
in credits. The public mesh (services/public_mesh.py) only wires it: `SplitService.attach_public`.

Who. The owner allows it with `sharing.split_public: true` (default false), on top of `sharing.split`
and everything that gates private lending (sharing.enabled, the resource guard, the tools). Only a peer
this node's Web of Trust finds valid is served (the public gate refuses the others first; the handler
checks again), with RpcError("not_trusted"). With the switch off (read at join) the public mesh does
not register the kind at all (an open is refused `unknown_tunnel`), the handler would refuse anyway, and
the public link status says `lend: false`.

Payment, one lend = one tunnel (one rpc-server connection; llama-server may open more than one per
lender as it loads a split: it probes each server first). The borrower signs a PaymentCommitment to this
node for at least `credit.earn_per_split` and puts it in the tun.open payload (`open_payload`). In order, the
lender: checks the peer's validity, its own lend refusal, the request (model hash, memory), then accepts
the commitment (signature, addressed here, not replayed, at least the price, within the asker's credit
line: credits.CREDIT_LINE_RULE) -- only then does an rpc-server start or get connected. Once connected
it signs delivery at once and sends the receipt with tun.ok (the tunnel's reply); `settle` checks it
against the borrower's commitment and records it. Paying at open is the simplest sound scheme: what is
bought (a connection to this node's rpc-server for that model) exists when the receipt is signed, and a
lender that then closes the tunnel gains no more than a server that answers a query badly (the score,
not the ledger, is the remedy). The receipt's response_sha256 is `lend_digest(model sha256)`: it binds
the receipt to the model lent. If the rpc-server cannot be reached the commitment gets a failed receipt
(no credit moves, the asker's credit line here is freed); the borrower, which never sees it, gets its
reservation back when the commitment expires, as it does when the opener gives up (or its link goes)
between the lender's delivery and tun.ok.

Separation. Public borrowers get their own RpcServers (own cap on processes, so public borrowers cannot
use up the private mesh's slots) and their own weight cache folder (`rpc-cache-public/`): rpc-server's
cache answers "do you hold the tensor with this hash", which would tell a public peer what a private
peer loaded. Private-mesh lending stays free, like private-mesh queries (services/remote.py pays nothing).

Logging. As everywhere on the public mesh: peers, model hashes and outcomes only, at debug level unless
`logging.public_mesh` is on; tunnel bytes and payload fields other than those checked are never logged.
"""

from __future__ import annotations

import logging
import time

from pinkybrain.node.core.credits import (
    CreditError,
    PaymentCommitment,
    Receipt,
    format_credits,
    response_digest,
)
from pinkybrain.node.services.mesh import RpcError

log = logging.getLogger("pinkybrain.split")

PUBLIC_CACHE = "rpc-cache-public"
PUBLIC_MAX_SERVERS = 2
COMMITMENT_TTL = 300  # an open waits for rpc-server's start (up to a minute): the receipt comes well within


def lend_digest(sha256: str) -> str:
    """What a lend's receipt names as its response: the model that was lent."""
    return response_digest(f"split.rpc {sha256}")


def open_payload(ledger, identity, lender: str, sha256: str, share_bytes: int, price: float,
                 ttl: int = COMMITMENT_TTL) -> tuple[dict, PaymentCommitment]:
    """The borrower's tun.open payload for a public lender, with its commitment to pay `price`.
    Raises InsufficientCredit (with the hint) when this node cannot back it."""
    commitment = ledger.commit_payment(identity, lender, price, ttl=ttl)
    return {"sha256": sha256, "bytes": share_bytes, "commitment": commitment.to_dict()}, commitment


def settle(ledger, tunnel, commitment: PaymentCommitment, sha256: str) -> Receipt:
    """The borrower's check of the receipt a public lender sent with tun.ok; recorded, it is a spend.
    Raises CreditError naming the fault."""
    reply = tunnel.reply if isinstance(tunnel.reply, dict) else {}
    receipt = Receipt.from_dict(reply.get("receipt"))
    if receipt.query_id != commitment.query_id:
        raise CreditError("the receipt is for another payment")
    ledger.record_receipt(receipt, expected_digest=lend_digest(sha256))
    return receipt


class PublicLending:
    """The public mesh's `split.rpc` handler (see the module docstring)."""

    def __init__(self, service, valid):
        self.service, self.valid = service, valid
        runtime = service.runtime
        self.runtime = runtime
        self.level = logging.INFO if runtime.cfg["logging.public_mesh"] else logging.DEBUG

    def refusal(self) -> str | None:
        """Why no public peer may borrow now (None: valid peers may, if they pay)."""
        if not self.runtime.cfg["sharing.split_public"]:
            return "this node does not lend to the public mesh (sharing.split_public is false)"
        return self.service.lend_refusal()

    def status(self) -> dict:
        """For the public link status: lending is advertised only when it is allowed now."""
        if self.refusal() is not None:
            return {"lend": False, "free_bytes": None}
        return self.service.lend_status()

    def price(self) -> float:
        return float(self.runtime.cfg["credit.earn_per_split"])

    async def open(self, ctx, payload):
        peer = ctx.peer_id
        if not self.valid(peer):
            raise RpcError("not_trusted", "refused: not trusted (this node's Web of Trust does not find you "
                                          "valid; ask someone it trusts to vouch for you)")
        refusal = self.refusal()
        if refusal is not None:
            raise RpcError("busy", refusal)
        sha256 = self.service.check_request(payload)
        ledger, identity = self.runtime.ledger, self.runtime.identity
        try:
            commitment = PaymentCommitment.from_dict(payload.get("commitment"))
            if commitment.asker != peer:
                raise CreditError("the commitment is not the borrower's")
            ledger.accept_commitment(commitment, min_amount=self.price())
        except CreditError as exc:
            log.log(self.level, "public split lend to %s refused: payment (%s)", peer[:7], type(exc).__name__)
            raise RpcError("payment_refused", str(exc)) from None
        started = time.monotonic()
        try:
            reader, writer = await self.service.public_lending.connect(peer, sha256)
        except OSError as exc:
            ledger.deliver(identity, commitment, success=False, latency_ms=_ms_since(started),
                           response_sha256=lend_digest(sha256))
            raise RpcError("busy", f"rpc-server unavailable: {exc}") from None
        receipt = ledger.deliver(identity, commitment, success=True, latency_ms=_ms_since(started),
                                 response_sha256=lend_digest(sha256))
        log.log(self.level, "public split lend to %s: model %s, paid %s", peer[:7], sha256[:12],
                format_credits(commitment.amount))
        return reader, writer, {"receipt": receipt.to_dict()}


def _ms_since(started: float) -> int:
    return max(0, int((time.monotonic() - started) * 1000))
