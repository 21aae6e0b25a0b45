"""The owner's dashboard: one-time login, cookie sessions with CSRF, served assets, and a real headless
Chromium driving it against a three-node mesh."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import httpx
import pytest

from nodes import RunningNode, free_port, run_cli, start_node, strong_secret, wait_for, wait_until_up
from pinkybrain.node.dashboard.sessions import DashboardSessions, LoginRefused


# -- pure session logic -----------------------------------------------------------------------------
def test_login_token_is_single_use_and_expires():
    s = DashboardSessions(login_ttl=120)
    token = s.issue_login(now=1000)
    session_id, session = s.exchange(token, now=1010)
    assert s.session(session_id, now=1011) is session
    with pytest.raises(LoginRefused):
        s.exchange(token, now=1012)  # replayed link
    late = s.issue_login(now=2000)
    with pytest.raises(LoginRefused):
        s.exchange(late, now=2121)  # expired
    with pytest.raises(LoginRefused):
        s.exchange("made-up", now=2000)


def test_csrf_token_must_match_the_session():
    s = DashboardSessions(idle_secs=60)
    session_id, session = s.exchange(s.issue_login(now=0), now=0)
    assert s.authorise(session_id, session.csrf, now=1)
    assert not s.authorise(session_id, None, now=1)
    assert not s.authorise(session_id, session.csrf + "x", now=1)
    assert not s.authorise("other", session.csrf, now=1)
    assert not s.authorise(session_id, session.csrf, now=200)  # idle too long
    s2 = DashboardSessions()
    sid, sess = s2.exchange(s2.issue_login(now=0), now=0)
    s2.end(sid)
    assert not s2.authorise(sid, sess.csrf, now=1)


# -- over HTTP against a real node --------------------------------------------------------------------
def login(node: RunningNode, client: httpx.Client) -> str:
    """Ask for a link (owner-signed), follow it; returns the page's CSRF token."""
    link = node.post("/api/dashboard/login").json()["path"]
    r = client.get(link)
    assert r.status_code == 303 and r.headers["location"] == "/dashboard/"
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    page = client.get("/dashboard/")
    assert page.status_code == 200
    return re.search(r'name="pinkybrain-csrf" content="([^"]+)"', page.text).group(1)


def test_dashboard_session_reaches_the_api_only_with_its_csrf_token(node):
    with httpx.Client(base_url=node.url, timeout=30) as browser:
        assert browser.get("/dashboard/").status_code == 401
        assert browser.get("/api/status").status_code == 401  # no signature, no cookie
        link = node.post("/api/dashboard/login").json()["path"]
        assert browser.get(link).status_code == 303
        assert browser.get(link).status_code == 403  # the same link again: refused
        page = browser.get("/dashboard/")
        csrf = re.search(r'name="pinkybrain-csrf" content="([^"]+)"', page.text).group(1)
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert browser.get("/api/status").status_code == 401  # cookie alone (a cross-site request) is not enough
        ok = browser.get("/api/status", headers={"X-PinkyBrain-CSRF": csrf})
        assert ok.status_code == 200 and ok.json()["node_id"]
        assert browser.get("/api/status", headers={"X-PinkyBrain-CSRF": "forged"}).status_code == 401
        assert browser.get("/dashboard/static/app.js").headers["content-type"].startswith("text/javascript")
        assert browser.get("/dashboard/static/%2e%2e/%2e%2e/routes.py").status_code == 404
        assert browser.get("/dashboard/static/index.html").status_code == 404  # only through /dashboard/
        events = browser.get("/api/events", headers={"X-PinkyBrain-CSRF": csrf}).json()
        assert isinstance(events["events"], list)
        browser.post("/dashboard/logout", headers={"X-PinkyBrain-CSRF": csrf})
        assert browser.get("/api/status", headers={"X-PinkyBrain-CSRF": csrf}).status_code == 401
    with httpx.Client(base_url=node.url, timeout=30) as other:
        other.cookies.set("pb_dashboard", "guessed")
        assert other.get("/dashboard/").status_code == 401


def test_a_node_with_the_dashboard_turned_off_serves_no_page_and_the_cli_says_why(node_factory):
    node = node_factory(extra={"dashboard.enabled": False})
    refused = node.post("/api/dashboard/login")
    assert refused.status_code == 404 and refused.json()["error"] == "dashboard_disabled"
    with httpx.Client(base_url=node.url, timeout=30) as browser:
        assert browser.get("/dashboard/").status_code == 404
    out = run_cli("dashboard", "--no-browser", "--url", node.url, env=node.env)
    assert out.returncode != 0 and "dashboard.enabled: false" in out.stdout + out.stderr, out
    assert node.get("/api/status").status_code == 200  # the API itself is unchanged


def test_assets_ship_in_the_package_and_load_nothing_from_elsewhere():
    from importlib import resources

    from pinkybrain.node.dashboard.routes import ASSETS

    static = resources.files("pinkybrain.node.dashboard").joinpath("static")
    for name in [*ASSETS, "index.html"]:
        text = static.joinpath(*name.split("/")).read_text("utf-8")
        assert not re.search(r"(src|href)=[\"']?(https?:)?//", text), name
        assert "cdn" not in text.lower() or name.endswith(".json"), name


# -- a real browser against a three-node mesh -------------------------------------------------------
FAST = {"p2p.heartbeat_secs": 0.5, "p2p.dead_after_secs": 3.0, "memory.sync_interval_secs": 2.0}


def chrome(width: int = 1280, height: int = 900):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not binary or not driver:
        pytest.fail("the browser test needs Debian's chromium and chromium-driver (.ci/run installs them: "
                    "apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}", "--lang=en-US"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)


@pytest.fixture
def mesh(tmp_path):
    from model import place_default_model

    secret = strong_secret()
    ports = [free_port() for _ in range(3)]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    place_default_model(tmp_path / "a" / "shared_models")
    nodes = [
        start_node(tmp_path / "a", port=ports[0], secret=secret, wait=False,
                   extra={**FAST, "p2p.peers": [urls[1], urls[2]]}),
        start_node(tmp_path / "b", port=ports[1], secret=secret, wait=False, extra=FAST),
        start_node(tmp_path / "c", port=ports[2], secret=secret, wait=False, extra=FAST),
    ]
    try:
        for n in nodes:
            wait_until_up(n, timeout=120)
        yield nodes
    finally:
        for n in nodes:
            n.stop()


def test_browser_logs_in_sees_the_mesh_streams_an_answer_and_edits_memory(mesh):
    from selenium.webdriver.common.by import By

    a, b, c = mesh
    ids = {name: n.get("/api/ping").json()["node_id"] for name, n in (("b", b), ("c", c))}
    driver = chrome()
    try:
        link = a.url + a.post("/api/dashboard/login").json()["path"]
        driver.get(link)
        wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "#node-facts dd"), 30, "the node panel")

        driver.find_element(By.ID, "tab-mesh").click()
        drawn = wait_for(
            lambda: {g.get_attribute("data-node-id")
                     for g in driver.find_elements(By.CSS_SELECTOR, "#mesh-graph g.peer.private")} >= set(ids.values())
            and driver.find_elements(By.CSS_SELECTOR, "#mesh-graph g.peer.private"),
            60, "both peers in the mesh graph")
        assert len(drawn) == 2

        driver.find_element(By.ID, "tab-ask").click()
        driver.find_element(By.ID, "ask-prompt").send_keys("Name a primary colour.")
        max_tokens = driver.find_element(By.ID, "ask-max")
        max_tokens.clear()
        max_tokens.send_keys("24")
        driver.find_element(By.ID, "ask-send").click()
        wait_for(lambda: "Answered by" in driver.find_element(By.ID, "ask-meta").text, 240, "the streamed answer")
        assert driver.find_element(By.ID, "ask-answer").text.strip()

        driver.find_element(By.ID, "tab-memory").click()
        driver.find_element(By.ID, "memory-key").send_keys("dash/edited")
        driver.find_element(By.ID, "memory-value").send_keys('{"by": "dashboard"}')
        driver.find_element(By.ID, "memory-save").click()
        wait_for(lambda: driver.find_element(By.ID, "confirm").get_attribute("open") is not None, 10, "the confirmation")
        driver.find_element(By.ID, "confirm-ok").click()
        wait_for(lambda: "Saved" in driver.find_element(By.ID, "memory-status").text, 20, "the save")
        seen = wait_for(lambda: (r := b.get("/api/memory/dash/edited")).status_code == 200 and r.json()["value"],
                        60, "the key on another node")
        assert seen == {"by": "dashboard"}

        # The same login link a second time, in a fresh browser session: refused.
        driver.delete_all_cookies()
        driver.get(link)
        assert "refused" in driver.find_element(By.TAG_NAME, "h1").text.lower()
        driver.get(a.url + "/dashboard/")
        assert "log in" in driver.find_element(By.TAG_NAME, "h1").text.lower()
    finally:
        driver.quit()


def test_dashboard_routes_answer_only_on_this_machine():
    from pinkybrain.node.dashboard.routes import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("127.3.4.5")
    assert not is_loopback("192.168.1.10") and not is_loopback("100.64.0.1") and not is_loopback(None)
    assert not is_loopback("garbage")


def test_screenshot_command_exists():
    assert (Path(__file__).parents[1] / "bench" / "screenshots.py").exists()
