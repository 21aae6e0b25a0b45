"""Web of Trust: signed, expiring attestations ("I vouch for this node"), revocations, and the rule by
which a node decides, from its own anchor, which peers are valid. Pure logic: no I/O, time is passed in.

Validity follows GnuPG's classic model (VALIDITY_RULE): a vouch makes a key valid only when its issuer is
valid and this node's owner trusts it as an introducer (owner-trust, a local setting never shared).

An attestation is signed by its issuer over a canonical encoding with a domain prefix, so a signature
made for one purpose (a credit receipt, a catalog entry) can never be replayed as a vouch. Node ids carry
their public key, so anything here can be checked from the id alone.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Union

from pinkybrain.node.core.identity import Identity, IdentityError, require_signature, validate_node_id

DOMAIN_ATTESTATION = b"PINKYBRAIN-WOT-ATTESTATION-V1\n"
DOMAIN_REVOCATION = b"PINKYBRAIN-WOT-REVOCATION-V1\n"
LEVELS = ("full", "marginal")
DEFAULT_TTL_SECS = 90 * 86400
MAX_TTL_SECS = 366 * 86400  # bounds how long a revocation must be kept (see Revocation.prunable_after)
CLOCK_SKEW_SECS = 300  # an attestation dated this far in the future still counts
DEFAULT_MAX_DEPTH = 5  # GnuPG's default max-cert-depth
DEFAULT_MARGINALS_NEEDED = 3  # GnuPG's default marginals-needed

INTRODUCER_LEVELS = ("none", "marginal", "full")  # owner-trust: how far this node lets a key introduce

VALIDITY_RULE = (
    "GnuPG's classic trust model. Validity (is this key who it says?) and owner-trust (how far this node "
    "trusts a key to introduce others: none, marginal, full; set only by this node's owner and never sent "
    "to anyone) are separate. "
    "(1) The anchor (this node's own key) is valid at depth 0 and fully trusted as introducer. "
    "(2) An attestation counts only if its issuer's signature verifies, it is not expired at evaluation time "
    "(issued_at - 300 s <= now < expires_at), and no revocation by the same issuer supersedes it (one naming "
    "its serial, or one about the same subject issued at or after it). Its level is the issuer's own note "
    "and does not change its weight: the weight is this node's owner-trust in the issuer. "
    "(3) A key the anchor attests is valid at depth 1: the owner vouched for it. "
    "(4) Any other key is valid at depth d (2 <= d <= max_depth) if counting attestations about it come from "
    "at least one introducer with full owner-trust, or from at least marginals_needed distinct introducers "
    "with marginal owner-trust, where an introducer is a key valid at a depth below d; its depth is the "
    "smallest such d. A valid key with owner-trust none (or none set) introduces nobody. "
    "(5) Nothing else is valid: fewer marginals than needed leave a key not valid (GnuPG's 'marginal "
    "validity' is reported, never acted on), as do paths longer than max_depth, vouches by keys that are "
    "not valid, and loops of vouches that never reach the anchor."
)


class TrustError(ValueError):
    """An attestation or revocation that cannot be accepted; str() says why."""


class InvalidAttestation(TrustError):
    pass


class InvalidRevocation(TrustError):
    pass


def _canonical(domain: bytes, body: dict[str, Any]) -> bytes:
    return domain + json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _new_serial() -> str:
    return os.urandom(16).hex()


def _is_serial(value: object) -> bool:
    return isinstance(value, str) and len(value) == 32 and all(c in "0123456789abcdef" for c in value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _canonical_id(value: object, what: str, error: type[TrustError]) -> str:
    if not isinstance(value, str):
        raise error(f"{what} must be a node id")
    try:
        canonical = validate_node_id(value)
    except IdentityError as exc:
        raise error(f"{what}: {exc}") from None
    if canonical != value:
        # Signed bytes must have one spelling, or the same statement could carry two identities.
        raise error(f"{what} is not in canonical form ({canonical})")
    return value


def _signature_from(data: dict[str, Any], error: type[TrustError]) -> bytes:
    try:
        sig = bytes.fromhex(data["signature"])
    except (KeyError, TypeError, ValueError):
        raise error("signature must be 128 hex characters") from None
    return sig


@dataclass(frozen=True)
class Attestation:
    """`issuer` vouches for `subject` at `level` from `issued_at` until `expires_at` (unix seconds)."""

    issuer: str
    subject: str
    level: str
    issued_at: int
    expires_at: int
    serial: str
    signature: bytes = field(repr=False)

    @classmethod
    def sign(cls, identity: Identity, subject: str, level: str, *, ttl: int = DEFAULT_TTL_SECS,
             now: float, serial: str | None = None) -> Attestation:
        try:
            subject = validate_node_id(subject)
        except IdentityError as exc:
            raise InvalidAttestation(str(exc)) from None
        if level not in LEVELS:
            raise InvalidAttestation(f"level must be full or marginal, not {level!r}")
        if not _is_int(ttl) or not 0 < ttl <= MAX_TTL_SECS:
            raise InvalidAttestation(f"ttl must be 1..{MAX_TTL_SECS} seconds, got {ttl!r}")
        issued = int(now)
        unsigned = cls(identity.node_id, subject, level, issued, issued + ttl, serial or _new_serial(), b"")
        att = cls(**{**unsigned.__dict__, "signature": identity.sign(unsigned.signed_bytes())})
        att.check()
        return att

    def body(self) -> dict[str, Any]:
        return {"issuer": self.issuer, "subject": self.subject, "level": self.level,
                "issued_at": self.issued_at, "expires_at": self.expires_at, "serial": self.serial}

    def signed_bytes(self) -> bytes:
        return _canonical(DOMAIN_ATTESTATION, self.body())

    def check(self) -> None:
        """Raise InvalidAttestation naming the first fault; return if well formed and truly signed."""
        _canonical_id(self.issuer, "issuer", InvalidAttestation)
        _canonical_id(self.subject, "subject", InvalidAttestation)
        if self.issuer == self.subject:
            raise InvalidAttestation("a node cannot vouch for itself")
        if self.level not in LEVELS:
            raise InvalidAttestation(f"level must be full or marginal, not {self.level!r}")
        if not (_is_int(self.issued_at) and _is_int(self.expires_at)):
            raise InvalidAttestation("issued_at and expires_at must be integers (unix seconds)")
        if not 0 < self.expires_at - self.issued_at <= MAX_TTL_SECS:
            raise InvalidAttestation(f"lifetime must be 1..{MAX_TTL_SECS} seconds")
        if not _is_serial(self.serial):
            raise InvalidAttestation("serial must be 32 lowercase hex characters")
        require_signature(self.issuer, self.signed_bytes(), self.signature, InvalidAttestation, "signature",
                          f"issuer {self.issuer}")

    def verify(self) -> bool:
        try:
            self.check()
        except TrustError:
            return False
        return True

    def is_current(self, now: float) -> bool:
        return self.issued_at - CLOCK_SKEW_SECS <= now < self.expires_at

    def to_dict(self) -> dict[str, Any]:
        return {"type": "attestation", **self.body(), "signature": self.signature.hex()}

    @classmethod
    def from_dict(cls, data: Any) -> Attestation:
        """Parse (without verifying: call check()); raise InvalidAttestation for a malformed dict."""
        if not isinstance(data, dict) or data.get("type", "attestation") != "attestation":
            raise InvalidAttestation("not an attestation")
        try:
            return cls(data["issuer"], data["subject"], data["level"], data["issued_at"], data["expires_at"],
                       data["serial"], _signature_from(data, InvalidAttestation))
        except KeyError as exc:
            raise InvalidAttestation(f"attestation lacks {exc.args[0]!r}") from None


@dataclass(frozen=True)
class Revocation:
    """`issuer` withdraws its word about `subject`: the attestation `attestation_serial`, or (when it is
    None) every attestation it issued about `subject` at or before `issued_at`."""

    issuer: str
    subject: str
    attestation_serial: str | None
    issued_at: int
    serial: str
    signature: bytes = field(repr=False)

    @classmethod
    def sign(cls, identity: Identity, subject: str, *, now: float,
             attestation_serial: str | None = None) -> Revocation:
        try:
            subject = validate_node_id(subject)
        except IdentityError as exc:
            raise InvalidRevocation(str(exc)) from None
        unsigned = cls(identity.node_id, subject, attestation_serial, int(now), _new_serial(), b"")
        rev = cls(**{**unsigned.__dict__, "signature": identity.sign(unsigned.signed_bytes())})
        rev.check()
        return rev

    def body(self) -> dict[str, Any]:
        return {"issuer": self.issuer, "subject": self.subject, "attestation_serial": self.attestation_serial,
                "issued_at": self.issued_at, "serial": self.serial}

    def signed_bytes(self) -> bytes:
        return _canonical(DOMAIN_REVOCATION, self.body())

    def check(self) -> None:
        _canonical_id(self.issuer, "issuer", InvalidRevocation)
        _canonical_id(self.subject, "subject", InvalidRevocation)
        if self.attestation_serial is not None and not _is_serial(self.attestation_serial):
            raise InvalidRevocation("attestation_serial must be null or 32 lowercase hex characters")
        if not _is_int(self.issued_at):
            raise InvalidRevocation("issued_at must be an integer (unix seconds)")
        if not _is_serial(self.serial):
            raise InvalidRevocation("serial must be 32 lowercase hex characters")
        require_signature(self.issuer, self.signed_bytes(), self.signature, InvalidRevocation, "signature",
                          f"issuer {self.issuer}")

    def verify(self) -> bool:
        try:
            self.check()
        except TrustError:
            return False
        return True

    def supersedes(self, att: Attestation) -> bool:
        # Only an attestation's own issuer can withdraw it; ties go to the revocation (safer).
        if att.issuer != self.issuer or att.subject != self.subject:
            return False
        if self.attestation_serial is not None:
            return att.serial == self.attestation_serial
        return att.issued_at <= self.issued_at

    @property
    def prunable_after(self) -> int:
        """After this time every attestation it can supersede has expired, so it may be forgotten."""
        return self.issued_at + MAX_TTL_SECS + CLOCK_SKEW_SECS

    def to_dict(self) -> dict[str, Any]:
        return {"type": "revocation", **self.body(), "signature": self.signature.hex()}

    @classmethod
    def from_dict(cls, data: Any) -> Revocation:
        if not isinstance(data, dict) or data.get("type", "revocation") != "revocation":
            raise InvalidRevocation("not a revocation")
        try:
            return cls(data["issuer"], data["subject"], data.get("attestation_serial"), data["issued_at"],
                       data["serial"], _signature_from(data, InvalidRevocation))
        except KeyError as exc:
            raise InvalidRevocation(f"revocation lacks {exc.args[0]!r}") from None


Statement = Union[Attestation, Revocation]


def statement_from_dict(data: Any) -> Statement:
    """Parse a wire dict as an attestation or a revocation, by its "type"."""
    kind = data.get("type") if isinstance(data, dict) else None
    if kind == "attestation":
        return Attestation.from_dict(data)
    if kind == "revocation":
        return Revocation.from_dict(data)
    raise TrustError('expected a dict with "type": "attestation" or "revocation"')


@dataclass(frozen=True)
class Verdict:
    """The answer of TrustGraph.is_valid, with the evidence: for a valid key the path from the anchor
    and the introducers whose attestations made it valid; for any key, human-readable reasons."""

    subject: str
    valid: bool
    depth: int | None
    path: tuple[str, ...]
    introducers: tuple[tuple[str, str], ...]  # (issuer, owner-trust) that counted at the last hop
    reasons: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"subject": self.subject, "valid": self.valid, "depth": self.depth, "path": list(self.path),
                "introducers": [{"issuer": i, "level": lv} for i, lv in self.introducers],
                "reasons": list(self.reasons), "rule": VALIDITY_RULE}


@dataclass
class MergeResult:
    accepted: int = 0
    duplicates: int = 0
    rejected: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Validity:
    depth: dict[str, int]
    introducers: dict[str, tuple[tuple[str, str], ...]]
    parent: dict[str, str]


class TrustGraph:
    """Every attestation and revocation this node knows, from any source; validity is computed on demand
    from an anchor, so adding statements never changes what was already decided except through the rule."""

    def __init__(self) -> None:
        self._attestations: dict[tuple[str, str], Attestation] = {}  # (issuer, serial)
        self._revocations: dict[tuple[str, str], Revocation] = {}
        self._about: dict[str, dict[tuple[str, str], Attestation]] = {}
        self._revoked_pairs: dict[tuple[str, str], list[Revocation]] = {}  # (issuer, subject)

    # -- adding ---------------------------------------------------------------------------------------
    def validate(self, item: Statement) -> bool:
        """Raise TrustError if `item` may not be added; otherwise say whether it is new (no change made)."""
        if isinstance(item, Attestation):
            item.check()
            known = self._attestations.get((item.issuer, item.serial))
        elif isinstance(item, Revocation):
            item.check()
            known = self._revocations.get((item.issuer, item.serial))
        else:
            raise TrustError(f"not an attestation or revocation: {type(item).__name__}")
        if known is None:
            return True
        if known != item:
            # Only the issuer can sign either, but one serial must name one statement.
            raise TrustError(f"issuer {item.issuer} already used serial {item.serial} for a different statement")
        return False

    def add(self, item: Statement) -> bool:
        """Add a truly signed statement; True if it was new. Raises TrustError (nothing added) otherwise.

        Expired or not-yet-valid attestations are accepted: whether they count is decided at evaluation.
        """
        if not self.validate(item):
            return False
        if isinstance(item, Attestation):
            self._attestations[(item.issuer, item.serial)] = item
            self._about.setdefault(item.subject, {})[(item.issuer, item.serial)] = item
        else:
            self._revocations[(item.issuer, item.serial)] = item
            self._revoked_pairs.setdefault((item.issuer, item.subject), []).append(item)
        return True

    def merge(self, items: Iterable[Any]) -> MergeResult:
        """Add statements (objects or wire dicts) from a peer; bad ones are listed, not raised."""
        result = MergeResult()
        for raw in items:
            try:
                item = raw if isinstance(raw, (Attestation, Revocation)) else statement_from_dict(raw)
                if self.add(item):
                    result.accepted += 1
                else:
                    result.duplicates += 1
            except TrustError as exc:
                result.rejected.append(str(exc))
        return result

    def remove(self, item: Statement) -> None:
        if isinstance(item, Attestation):
            self._attestations.pop((item.issuer, item.serial), None)
            self._about.get(item.subject, {}).pop((item.issuer, item.serial), None)
        else:
            self._revocations.pop((item.issuer, item.serial), None)
            pair = self._revoked_pairs.get((item.issuer, item.subject), [])
            if item in pair:
                pair.remove(item)

    def prunable(self, now: float) -> list[Statement]:
        """Statements that can no longer affect any verdict at or after `now`."""
        old: list[Statement] = [a for a in self._attestations.values() if a.expires_at <= now]
        old += [r for r in self._revocations.values() if r.prunable_after <= now]
        return old

    # -- reading --------------------------------------------------------------------------------------
    def attestations(self) -> list[Attestation]:
        return sorted(self._attestations.values(), key=lambda a: (a.issued_at, a.issuer, a.serial))

    def revocations(self) -> list[Revocation]:
        return sorted(self._revocations.values(), key=lambda r: (r.issued_at, r.issuer, r.serial))

    def attestations_about(self, subject: str) -> list[Attestation]:
        return sorted(self._about.get(subject, {}).values(), key=lambda a: (a.issued_at, a.issuer, a.serial))

    def revocation_of(self, att: Attestation) -> Revocation | None:
        """The earliest known revocation that supersedes `att`, if any."""
        hits = [r for r in self._revoked_pairs.get((att.issuer, att.subject), ()) if r.supersedes(att)]
        return min(hits, key=lambda r: (r.issued_at, r.serial)) if hits else None

    def status(self, att: Attestation, now: float) -> str:
        """'counts', 'revoked', 'expired' or 'not yet valid' (signatures were checked on add)."""
        if self.revocation_of(att) is not None:
            return "revoked"
        if now >= att.expires_at:
            return "expired"
        if not att.is_current(now):
            return "not yet valid"
        return "counts"

    def __len__(self) -> int:
        return len(self._attestations) + len(self._revocations)

    # -- validity -------------------------------------------------------------------------------------
    def valid_keys(self, *, anchor: str, now: float, owner_trust: Mapping[str, str] | None = None,
                   max_depth: int = DEFAULT_MAX_DEPTH,
                   marginals_needed: int = DEFAULT_MARGINALS_NEEDED) -> dict[str, int]:
        """Every key valid from `anchor` under VALIDITY_RULE, with its depth."""
        return dict(self._compute(anchor, now, owner_trust or {}, max_depth, marginals_needed).depth)

    def is_valid(self, subject: str, *, anchor: str, now: float, owner_trust: Mapping[str, str] | None = None,
                 max_depth: int = DEFAULT_MAX_DEPTH, marginals_needed: int = DEFAULT_MARGINALS_NEEDED) -> Verdict:
        """Decide `subject`'s validity from `anchor` under VALIDITY_RULE and explain it."""
        try:
            subject = validate_node_id(subject)
        except IdentityError as exc:
            return Verdict(subject, False, None, (), (), (str(exc),))
        owner_trust = owner_trust or {}
        v = self._compute(anchor, now, owner_trust, max_depth, marginals_needed)
        if subject in v.depth:
            return self._valid_verdict(subject, anchor, v)
        return Verdict(subject, False, None, (), (),
                       tuple(self._refusal_reasons(subject, v, now, owner_trust, max_depth, marginals_needed)))

    def _counting(self, now: float) -> dict[str, list[Attestation]]:
        out: dict[str, list[Attestation]] = {}
        for att in self._attestations.values():
            if att.is_current(now) and self.revocation_of(att) is None:
                out.setdefault(att.subject, []).append(att)
        return out

    @staticmethod
    def _introducer_level(issuer: str, anchor: str, owner_trust: Mapping[str, str]) -> str:
        return "full" if issuer == anchor else owner_trust.get(issuer, "none")

    def _compute(self, anchor: str, now: float, owner_trust: Mapping[str, str], max_depth: int,
                 marginals_needed: int) -> _Validity:
        anchor = validate_node_id(anchor)
        if not _is_int(max_depth) or max_depth < 0:
            raise ValueError("max_depth must be an integer >= 0")
        if not _is_int(marginals_needed) or marginals_needed < 1:
            raise ValueError("marginals_needed must be an integer >= 1")
        counting = self._counting(now)
        by_issuer: dict[str, set[str]] = {}
        for subject, atts in counting.items():
            for att in atts:
                by_issuer.setdefault(att.issuer, set()).add(subject)
        depth = {anchor: 0}
        introducers: dict[str, tuple[tuple[str, str], ...]] = {}
        parent: dict[str, str] = {}
        # Only valid keys with owner-trust introduce; the frontier holds the newest such keys.
        frontier = {anchor}
        # Layer by layer: the valid set only grows and is capped at max_depth layers, so loops end.
        for d in range(1, max_depth + 1):
            candidates = sorted({s for i in frontier for s in by_issuer.get(i, ())} - depth.keys())
            newly: dict[str, tuple[tuple[str, str], ...]] = {}
            for subject in candidates:
                weight = {att.issuer: self._introducer_level(att.issuer, anchor, owner_trust)
                          for att in counting[subject] if att.issuer in depth}
                full = sorted(i for i, lv in weight.items() if lv == "full")
                marginal = sorted(i for i, lv in weight.items() if lv == "marginal")
                if full:
                    used = full
                elif len(marginal) >= marginals_needed:
                    used = marginal
                else:
                    continue
                # Explain with the shallowest introducers first; ids break ties so output is stable.
                used = sorted(used, key=lambda i: (depth[i], i))
                newly[subject] = tuple((i, weight[i]) for i in used)
            if not newly:
                break
            for subject, used in newly.items():
                depth[subject] = d
                introducers[subject] = used
                # Some introducer is at depth d-1 (else the key would have been valid a layer earlier);
                # following it makes the explained path exactly d edges long.
                parent[subject] = min(i for i, _ in used if depth[i] == d - 1)
            frontier = {k for k in newly if self._introducer_level(k, anchor, owner_trust) != "none"}
        return _Validity(depth, introducers, parent)

    def _valid_verdict(self, subject: str, anchor: str, v: _Validity) -> Verdict:
        path = [subject]
        while path[-1] != anchor:
            path.append(v.parent[path[-1]])
        path.reverse()
        d = v.depth[subject]
        used = v.introducers.get(subject, ())
        if d == 0:
            reason = "it is the anchor (this node)"
        elif d == 1:
            reason = "vouched for by this node's owner"
        elif used[0][1] == "full":
            reason = f"vouched for by {used[0][0]}, a fully trusted introducer valid at depth {v.depth[used[0][0]]}"
        else:
            reason = (f"vouched for by {len(used)} marginally trusted introducers: "
                      f"{', '.join(i for i, _ in used)}")
        return Verdict(subject, True, d, tuple(path), used, (reason,))

    def _refusal_reasons(self, subject: str, v: _Validity, now: float, owner_trust: Mapping[str, str],
                         max_depth: int, marginals_needed: int) -> list[str]:
        atts = self.attestations_about(subject)
        if not atts:
            return [f"no attestation about {subject} is known"]
        reasons = []
        marginal_from_valid: set[str] = set()
        for att in atts:
            state = self.status(att, now)
            who = f"vouch by {att.issuer} (serial {att.serial})"
            if state == "revoked":
                rev = self.revocation_of(att)
                reasons.append(f"{who} was revoked at {rev.issued_at if rev else '?'}")
            elif state == "expired":
                reasons.append(f"{who} expired at {att.expires_at}")
            elif state == "not yet valid":
                reasons.append(f"{who} is dated in the future ({att.issued_at})")
            elif att.issuer not in v.depth:
                reasons.append(f"{who} does not count: its issuer is not valid within depth {max_depth}")
            elif v.depth[att.issuer] >= max_depth:
                reasons.append(f"{who} does not count: its issuer is valid at depth {v.depth[att.issuer]}, "
                               f"so the path would exceed max_depth {max_depth}")
            elif owner_trust.get(att.issuer, "none") == "none":
                reasons.append(f"{who} does not count: its issuer is valid but not trusted to introduce "
                               "(owner-trust none; `trust set ID --introducer marginal|full`)")
            else:
                marginal_from_valid.add(att.issuer)
        if marginal_from_valid:
            reasons.append(f"marginal validity only: {len(marginal_from_valid)} marginally trusted "
                           f"introducer(s), {marginals_needed} needed (or one fully trusted)")
        return reasons
