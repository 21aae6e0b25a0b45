import signal
import time

import yaml

from pinkybrain.node.core.guard import GuardSettings, ResourceGuard


def guard(cooldown=10.0, sustain=3.0):
    return ResourceGuard(GuardSettings(cpu_threshold=80, ram_threshold=85, cooldown_secs=cooldown, sustain_secs=sustain))


def test_a_spike_shorter_than_sustain_does_not_pause():
    g = guard()
    assert not g.observe(99, 50, now=0)
    assert not g.observe(99, 50, now=2)
    assert not g.observe(10, 50, now=2.5)  # back under: the over-streak resets
    assert not g.observe(99, 50, now=4)
    assert not g.observe(99, 50, now=6.9)


def test_pauses_when_cpu_or_ram_stays_over_and_says_why():
    g = guard()
    g.observe(99, 50, now=0)
    assert g.observe(99, 50, now=3)
    assert "CPU 99% > 80%" in g.reason
    h = guard()
    h.observe(10, 90, now=0)
    assert h.observe(10, 90, now=3.5)
    assert "RAM 90% > 85%" in h.reason


def test_resumes_only_after_cooldown_under_thresholds():
    g = guard(cooldown=10)
    g.observe(99, 99, now=0)
    assert g.observe(99, 99, now=3)
    assert g.observe(10, 10, now=4)  # under, cooling down
    assert g.resume_in(now=4) == 10
    assert "cooling down" in g.reason
    assert g.observe(10, 10, now=13.9)
    assert g.observe(99, 10, now=14)  # over again: the cooldown restarts
    assert g.observe(10, 10, now=15)
    assert g.observe(10, 10, now=24.9)
    assert not g.observe(10, 10, now=25)
    assert g.reason == "" and g.snapshot(now=25)["sharing_paused"] is False


def wait_for(node, predicate, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = node.get("/api/status").json()["resource_guard"]
        if predicate(state):
            return state
        time.sleep(0.1)
    raise AssertionError(f"guard never reached the expected state; last: {state}")


def test_real_node_pauses_and_resumes_with_cooldown(node_factory):
    # RAM is always above 1%, so a 1% threshold pauses sharing on a real machine.
    node = node_factory(extra={"resource_guard.ram_threshold": 1, "resource_guard.cooldown_secs": 3,
                               "resource_guard.sustain_secs": 0.3, "resource_guard.sample_secs": 0.1})
    paused = wait_for(node, lambda s: s["sharing_paused"])
    assert paused["ram_percent"] > 1 and "RAM" in paused["reason"]
    assert paused["sharing_active"] is False
    cfg = yaml.safe_load(node.config_path.read_text())
    cfg["resource_guard"]["ram_threshold"] = 100
    node.config_path.write_text(yaml.safe_dump(cfg))
    node.proc.send_signal(signal.SIGHUP)  # the node reloads its thresholds
    cooling = wait_for(node, lambda s: s["ram_threshold"] == 100 and s["resume_in_secs"] is not None)
    assert cooling["sharing_paused"] is True and cooling["resume_in_secs"] > 0
    resumed = wait_for(node, lambda s: not s["sharing_paused"])
    assert resumed["sharing_active"] is True
    assert "sharing paused" in node.log() and "sharing resumed" in node.log()


def test_bad_reload_keeps_running_settings(node):
    node.config_path.write_text("resource_guard: {cpu_threshold: lots}\n")
    node.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "reload refused" not in node.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "resource_guard.cpu_threshold must be a number" in node.log()
    assert node.get("/api/status").json()["resource_guard"]["cpu_threshold"] == 100
