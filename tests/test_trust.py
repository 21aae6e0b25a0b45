"""Web of Trust: signed, expiring attestations and revocations and what counts for nothing (forged,
re-targeted, from unknown issuers); the durable trust store with owner-trust. The validity rule itself is
checked case by case, against GnuPG, in test_trust_wot.py."""

import dataclasses
import sqlite3
import time

import pytest

from pinkybrain.node.core.identity import Identity
from pinkybrain.node.core.trust import (
    DOMAIN_ATTESTATION,
    VALIDITY_RULE,
    Attestation,
    InvalidAttestation,
    InvalidRevocation,
    Revocation,
    TrustError,
    TrustGraph,
    statement_from_dict,
)
from pinkybrain.node.services.trust_store import TrustStore, TrustStoreCorrupt, TrustStoreLocked

NOW = 1_750_000_000
DAY = 86400


@pytest.fixture
def ids():
    class Ids:
        def __getattr__(self, name):  # ids.a, ids.b, ... : one fresh key per name
            ident = Identity.generate()
            setattr(self, name, ident)
            return ident

    return Ids()


def vouch(issuer, subject, level="full", *, now=NOW, ttl=30 * DAY):
    return Attestation.sign(issuer, subject.node_id, level, ttl=ttl, now=now)


def graph_of(*items):
    g = TrustGraph()
    for item in items:
        assert g.add(item)
    return g


def check(g, me, subject, *, now=NOW, **kw):
    return g.is_valid(subject.node_id, anchor=me.node_id, now=now, **kw)


# -- validity (the rule itself: test_trust_wot.py, case by case against GnuPG) ----------------------
def test_marginals_from_one_issuer_count_once(ids):
    g = graph_of(vouch(ids.me, ids.a), *(vouch(ids.a, ids.x, "marginal", now=NOW + i) for i in range(3)))
    assert not check(g, ids.me, ids.x, owner_trust={ids.a.node_id: "marginal"}).valid


def test_forged_attestations_are_refused(ids):
    good = vouch(ids.me, ids.a)
    flipped = dataclasses.replace(good, signature=bytes([good.signature[0] ^ 1]) + good.signature[1:])
    # The attacker signs an attestation that claims to be from the anchor.
    claimed = Attestation(ids.me.node_id, ids.x.node_id, "full", NOW, NOW + DAY, "ab" * 16, b"")
    forged = dataclasses.replace(claimed, signature=ids.mallory.sign(claimed.signed_bytes()))
    # A signature made for another purpose (no WoT domain prefix) does not verify either.
    body = claimed.signed_bytes()[len(DOMAIN_ATTESTATION):]
    cross = dataclasses.replace(claimed, signature=ids.me.sign(body))
    g = TrustGraph()
    for bad in (flipped, forged, cross):
        assert not bad.verify()
        with pytest.raises(InvalidAttestation, match="signature does not verify"):
            g.add(bad)
    assert len(g) == 0
    assert not check(g, ids.me, ids.x).valid


def test_an_attestation_moved_to_another_subject_is_refused(ids):
    att = vouch(ids.me, ids.a)
    moved = dataclasses.replace(att, subject=ids.x.node_id)
    with pytest.raises(InvalidAttestation, match="signature does not verify"):
        TrustGraph().add(moved)
    for field, value in (("level", "marginal"), ("expires_at", att.expires_at + DAY), ("issuer", ids.b.node_id)):
        assert not dataclasses.replace(att, **{field: value}).verify()


def test_malformed_attestations_are_refused_with_a_reason(ids):
    with pytest.raises(InvalidAttestation, match="itself"):
        Attestation.sign(ids.me, ids.me.node_id, "full", now=NOW)
    with pytest.raises(InvalidAttestation, match="level"):
        Attestation.sign(ids.me, ids.a.node_id, "ultimate", now=NOW)
    with pytest.raises(InvalidAttestation, match="ttl"):
        Attestation.sign(ids.me, ids.a.node_id, "full", now=NOW, ttl=10 * 365 * DAY)
    with pytest.raises(InvalidAttestation, match="node id"):
        Attestation.sign(ids.me, "not-a-node", "full", now=NOW)
    with pytest.raises(TrustError):
        statement_from_dict({"type": "attestation", "issuer": ids.me.node_id})
    with pytest.raises(TrustError):
        statement_from_dict(["nonsense"])


def test_revocation_by_serial_withdraws_only_that_attestation(ids):
    first, second = vouch(ids.me, ids.a, now=NOW), vouch(ids.me, ids.a, now=NOW + 1)
    g = graph_of(first, second, Revocation.sign(ids.me, ids.a.node_id, now=NOW + 2,
                                                 attestation_serial=second.serial))
    assert g.status(first, NOW + 3) == "counts" and g.status(second, NOW + 3) == "revoked"
    assert check(g, ids.me, ids.a, now=NOW + 3).valid


def test_only_the_issuer_can_revoke(ids):
    att = vouch(ids.me, ids.a)
    g = graph_of(att)
    g.add(Revocation.sign(ids.mallory, ids.a.node_id, now=NOW + 1))  # well signed, but not by the issuer
    assert check(g, ids.me, ids.a, now=NOW + 2).valid
    claimed = Revocation(ids.me.node_id, ids.a.node_id, None, NOW + 1, "cd" * 16, b"")
    forged = dataclasses.replace(claimed, signature=ids.mallory.sign(claimed.signed_bytes()))
    with pytest.raises(InvalidRevocation, match="signature does not verify"):
        g.add(forged)
    assert check(g, ids.me, ids.a, now=NOW + 2).valid


def test_attestations_from_unknown_issuers_count_for_nothing(ids):
    g = graph_of(vouch(ids.stranger, ids.x), *(vouch(s, ids.y, "marginal") for s in (ids.s1, ids.s2, ids.s3)))
    v = check(g, ids.me, ids.x)
    assert not v.valid and any("issuer is not valid" in r for r in v.reasons)
    assert not check(g, ids.me, ids.y).valid
    assert any("no attestation" in r for r in check(g, ids.me, ids.z).reasons)


def test_verdicts_do_not_depend_on_arrival_order(ids):
    items = [vouch(ids.me, ids.a), vouch(ids.me, ids.b), vouch(ids.a, ids.c, "marginal"),
             vouch(ids.b, ids.c, "full"), vouch(ids.c, ids.d)]
    forward, backward = graph_of(*items), graph_of(*reversed(items))
    for k in (ids.a, ids.b, ids.c, ids.d):
        assert check(forward, ids.me, k) == check(backward, ids.me, k)


def test_a_large_graph_is_evaluated_quickly(ids):
    keys = [Identity.generate() for _ in range(120)]
    items = [vouch(ids.me, keys[0])]
    items += [vouch(keys[i], keys[j], "marginal") for i in range(len(keys)) for j in (i + 1, i + 7, i * 3 % 120)
              if j < len(keys) and j != i]
    g = graph_of(*items)
    started = time.monotonic()
    verdict = check(g, ids.me, keys[-1])
    assert time.monotonic() - started < 2.0
    assert verdict.depth is None or verdict.depth <= 5


def test_statements_round_trip_through_their_wire_form(ids):
    att, rev = vouch(ids.me, ids.a), Revocation.sign(ids.me, ids.b.node_id, now=NOW)
    for item in (att, rev):
        back = statement_from_dict(item.to_dict())
        assert back == item and back.verify()
    assert att.signed_bytes().startswith(b"PINKYBRAIN-WOT-ATTESTATION-V1\n")
    g = TrustGraph()
    bad = {**att.to_dict(), "level": "marginal"}
    result = g.merge([att.to_dict(), att.to_dict(), bad, {"type": "other"}])
    assert (result.accepted, result.duplicates, len(result.rejected)) == (1, 1, 2)
    assert "owner-trust" in VALIDITY_RULE and "max_depth" in VALIDITY_RULE


# -- the store -----------------------------------------------------------------------------------------
def open_store(path, me, **kw):
    return TrustStore.open(path, me.node_id, clock=lambda: NOW, **kw)


def test_store_keeps_vouches_revocations_and_peers_statements_across_reopen(tmp_path, ids):
    with open_store(tmp_path, ids.me) as store:
        store.vouch(ids.me, ids.a.node_id, "full")
        store.vouch(ids.me, ids.b.node_id, "marginal")
        store.set_owner_trust(ids.a.node_id, "full")
        peer_att = vouch(ids.a, ids.c)
        assert store.add(peer_att.to_dict())
        assert not store.add(peer_att)  # already known
        store.revoke(ids.me, ids.b.node_id, now=NOW + 1)
        with pytest.raises(InvalidAttestation):
            store.add(dataclasses.replace(vouch(ids.a, ids.d), subject=ids.x.node_id))
    with open_store(tmp_path, ids.me) as store:
        assert store.is_valid(ids.a.node_id).valid
        assert store.is_valid(ids.c.node_id).depth == 2  # owner-trust survives the reopen too
        assert store.owner_trust(ids.a.node_id) == "full" and store.owner_trust(ids.c.node_id) == "none"
        assert store.show(ids.a.node_id)["introducer"] == "full"
        store.set_owner_trust(ids.a.node_id, "none")
        assert not store.is_valid(ids.c.node_id).valid
        assert any("not trusted to introduce" in r for r in store.is_valid(ids.c.node_id).reasons)
        with pytest.raises(TrustError):
            store.set_owner_trust(ids.a.node_id, "ultimate")
        with pytest.raises(TrustError):
            store.set_owner_trust(ids.me.node_id, "none")
        assert not store.is_valid(ids.b.node_id, now=NOW + 2).valid
        assert not store.is_valid(ids.x.node_id).valid
        shown = store.show(ids.b.node_id, now=NOW + 2)
        assert shown["valid"] is False and shown["attestations"][0]["status"] == "revoked"
        assert shown["revocations"] and shown["rule"] == VALIDITY_RULE


def test_store_revouch_right_after_revoke_counts(tmp_path, ids):
    with open_store(tmp_path, ids.me) as store:
        store.vouch(ids.me, ids.a.node_id, "full")
        store.revoke(ids.me, ids.a.node_id)
        assert not store.is_valid(ids.a.node_id).valid
        store.vouch(ids.me, ids.a.node_id, "full")  # same second: dated just after the revocation
        assert store.is_valid(ids.a.node_id, now=NOW + 1).valid


def test_export_for_peer_sends_only_what_counts_from_valid_issuers(tmp_path, ids):
    with open_store(tmp_path, ids.me) as store:
        store.vouch(ids.me, ids.a.node_id, "full")
        store.vouch(ids.me, ids.b.node_id, "full")
        store.revoke(ids.me, ids.b.node_id, now=NOW + 1)
        store.add(vouch(ids.a, ids.c))
        store.add(vouch(ids.stranger, ids.d))  # issuer not valid here: not relayed
        store.add(vouch(ids.a, ids.e, ttl=10))  # expired at export time
        out = store.export_for_peer(now=NOW + 20)
    pairs = {(a["issuer"], a["subject"]) for a in out["attestations"]}
    assert pairs == {(ids.me.node_id, ids.a.node_id), (ids.a.node_id, ids.c.node_id)}
    assert [(r["issuer"], r["subject"]) for r in out["revocations"]] == [(ids.me.node_id, ids.b.node_id)]
    # What a peer receives lets it reach the same conclusions from its own anchor.
    peer = TrustGraph()
    result = peer.merge(out["attestations"] + out["revocations"])
    assert result.accepted == 3 and not result.rejected


def test_merge_from_a_peer_can_refuse_strangers_but_follows_chains_in_one_batch(tmp_path, ids):
    with open_store(tmp_path, ids.me) as store:
        store.vouch(ids.me, ids.a.node_id, "full")
        store.set_owner_trust(ids.a.node_id, "full")
        store.set_owner_trust(ids.b.node_id, "full")
        batch = [vouch(ids.b, ids.c).to_dict(), vouch(ids.a, ids.b).to_dict(),  # order does not matter
                 vouch(ids.stranger, ids.d).to_dict(), {"type": "attestation"}]
        result = store.merge(batch, only_from_valid=True)
        assert result.accepted == 2 and len(result.rejected) == 2
        assert any("not valid for this node" in r for r in result.rejected)
        assert store.is_valid(ids.c.node_id).depth == 3
        assert store.merge(batch).duplicates == 2
    with open_store(tmp_path, ids.me) as store:
        assert store.is_valid(ids.c.node_id).valid
        assert len(store) == 4  # me->a, a->b, b->c, and the stranger's (taken without only_from_valid)


def test_prune_forgets_what_can_no_longer_matter(tmp_path, ids):
    with open_store(tmp_path, ids.me) as store:
        store.vouch(ids.me, ids.a.node_id, "full", ttl=100)
        store.vouch(ids.me, ids.b.node_id, "full")
        assert store.prune(now=NOW + 200) == 1
    with open_store(tmp_path, ids.me) as store:
        assert len(store) == 1


def test_an_edited_row_is_reported_as_corruption(tmp_path, ids):
    with open_store(tmp_path, ids.me) as store:
        store.vouch(ids.me, ids.a.node_id, "marginal")
    conn = sqlite3.connect(tmp_path / "trust.sqlite3")
    conn.execute("UPDATE attestations SET data = replace(data, '\"marginal\"', '\"full\"')")
    conn.commit()
    conn.close()
    with pytest.raises(TrustStoreCorrupt, match="was left as it is"):
        open_store(tmp_path, ids.me)


def test_a_damaged_or_busy_file_is_refused(tmp_path, ids):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "trust.sqlite3").write_bytes(b"not a database at all" * 10)
    with pytest.raises(TrustStoreCorrupt, match="SQLite header"):
        open_store(tmp_path / "bad", ids.me)
    with open_store(tmp_path, ids.me), pytest.raises(TrustStoreLocked):
        open_store(tmp_path, ids.me)
