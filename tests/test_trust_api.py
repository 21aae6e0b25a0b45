"""Web of Trust and credits through the CLI against a real node."""

import json

from nodes import run_cli
from pinkybrain.node.core.identity import Identity


def cli(node, *args):
    out = run_cli(*args, "--json", env=dict(node.env, PINKYBRAIN_URL=node.url, P2P_SECRET=node.secret))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_vouch_show_revoke_round_trip(node_factory):
    node = node_factory(extra={"credit.initial_balance": 7.5})
    stranger = Identity.generate().node_id
    assert cli(node, "trust", "show", stranger)["verdict"]["valid"] is False
    vouched = cli(node, "trust", "vouch", stranger, "--level", "marginal", "--ttl-days", "2")
    assert vouched["attestation"]["level"] == "marginal" and vouched["verdict"]["valid"] is True
    shown = cli(node, "trust", "show", stranger)
    assert shown["verdict"]["valid"] is True and shown["verdict"]["depth"] == 1
    revoked = cli(node, "trust", "revoke", stranger)
    assert revoked["verdict"]["valid"] is False
    assert cli(node, "trust", "show", stranger)["verdict"]["valid"] is False
    human = run_cli("trust", "show", stranger, env=dict(node.env, PINKYBRAIN_URL=node.url, P2P_SECRET=node.secret))
    assert "not valid" in human.stdout
    bad = run_cli("trust", "vouch", stranger[:-1] + "A", env=dict(node.env, PINKYBRAIN_URL=node.url,
                                                                  P2P_SECRET=node.secret))
    assert bad.returncode != 0 and "checksum" in bad.stderr and "Traceback" not in bad.stderr
    own = node.get("/api/ping").json()["node_id"]
    assert node.post("/api/trust/vouch", json={"node_id": own}).status_code == 400


def test_score_and_credits_come_from_the_ledger(node_factory):
    node = node_factory(extra={"credit.initial_balance": 7.5})
    peer = Identity.generate().node_id
    score = cli(node, "score", peer)
    assert score["peer"] == peer and score["score"] == 0 and score["inputs"]["volume"] == 0
    assert "success_rate" in score["formula"]
    assert cli(node, "credits")["balance"] == 7.5
    assert node.get("/api/status").json()["credit"]["balance"] == 7.5


def test_introducer_trust_is_set_apart_from_validity(node_factory):
    node = node_factory()
    env = dict(node.env, PINKYBRAIN_URL=node.url, P2P_SECRET=node.secret)
    peer = Identity.generate().node_id
    # Owner-trust in a key nobody vouched for makes it no more valid: the two are separate.
    set_full = cli(node, "trust", "set", peer, "--introducer", "full")
    assert set_full["introducer"] == "full" and set_full["verdict"]["valid"] is False
    shown = cli(node, "trust", "show", peer)
    assert shown["introducer"] == "full" and shown["verdict"]["valid"] is False
    assert cli(node, "trust", "vouch", peer)["verdict"]["valid"] is True
    human = run_cli("trust", "show", peer, env=env)
    assert "VALID at depth 1" in human.stdout and "introducer trust (owner-trust): full" in human.stdout
    assert cli(node, "trust", "set", peer, "--introducer", "none")["introducer"] == "none"
    assert cli(node, "trust", "show", peer)["introducer"] == "none"
    bad = run_cli("trust", "set", peer, "--introducer", "ultimate", env=env)
    assert bad.returncode != 0 and "none, marginal or full" in bad.stderr and "Traceback" not in bad.stderr
    own = node.get("/api/ping").json()["node_id"]
    r = node.post("/api/trust/set", json={"node_id": own, "introducer": "none"})
    assert r.status_code == 400 and "anchor" in r.text
