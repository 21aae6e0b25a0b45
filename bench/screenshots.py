"""Screenshots of every dashboard panel, at desktop and phone widths, for the README.

Starts three real nodes on 127.0.0.1 (A holds the embedded default model and links to B and C), writes a
few memory keys, asks one short question through the page, then photographs each panel in headless
Chromium (Debian's `chromium` and `chromium-driver`) in both themes' default (light) at 1280x860 and in
dark at 390x844 (a phone).

    .venv/bin/python bench/screenshots.py [--out docs/screenshots]

Exit status: 0 when every screenshot was written, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from model import place_default_model  # noqa: E402
from nodes import free_port, start_node, strong_secret, wait_until_up  # noqa: E402

PANELS = ("node", "mesh", "models", "credits", "memory", "conversations", "ask", "events")
SIZES = {"desktop": (1280, 860, "light"), "phone": (390, 844, "dark")}


def wait_for(check, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.25)
    raise TimeoutError


def browser(width: int, height: int):
    import shutil

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                f"--window-size={width},{height}", "--lang=en-US"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver") or "chromedriver"), options=options)


def shoot(node, out: Path, size: str) -> list[Path]:
    from selenium.webdriver.common.by import By

    width, height, theme = SIZES[size]
    driver = browser(width, height)
    written = []
    try:
        driver.get(node.url + node.post("/api/dashboard/login").json()["path"])
        driver.execute_script(f"localStorage.setItem('pb-theme', '{theme}')")
        driver.refresh()
        wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "#node-facts dd"), 30)
        wait_for(lambda: len(driver.find_elements(By.CSS_SELECTOR, "#mesh-graph g.peer.private")) >= 2, 60)
        for panel in PANELS:
            driver.find_element(By.ID, f"tab-{panel}").click()
            if panel == "memory":
                driver.find_element(By.CSS_SELECTOR, "#memory-search button").click()
            if panel == "conversations":
                driver.find_element(By.CSS_SELECTOR, "#conv-search button").click()
            if panel == "ask" and size == "desktop":
                driver.find_element(By.ID, "ask-prompt").send_keys("Name three primary colours.")
                box = driver.find_element(By.ID, "ask-max")
                box.clear()
                box.send_keys("48")
                driver.find_element(By.ID, "ask-send").click()
                wait_for(lambda: "Answered by" in driver.find_element(By.ID, "ask-meta").text, 300)
            time.sleep(0.8)
            path = out / f"{panel}-{size}.png"
            driver.save_screenshot(str(path))
            written.append(path)
    finally:
        driver.quit()
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pb-shots-") as tmp:
        tmp = Path(tmp)
        secret = strong_secret()
        ports = [free_port() for _ in range(3)]
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        place_default_model(tmp / "a" / "shared_models")
        fast = {"p2p.heartbeat_secs": 0.5, "memory.sync_interval_secs": 2.0}
        nodes = [
            start_node(tmp / "a", port=ports[0], secret=secret, wait=False,
                       extra={**fast, "node.name": "atlas", "p2p.peers": urls[1:]}),
            start_node(tmp / "b", port=ports[1], secret=secret, wait=False, extra={**fast, "node.name": "basil"}),
            start_node(tmp / "c", port=ports[2], secret=secret, wait=False, extra={**fast, "node.name": "cedar"}),
        ]
        try:
            for n in nodes:
                wait_until_up(n, timeout=120)
            a = nodes[0]
            for key, value in (("team/gpu-night", "thursday"), ("team/models", ["gemma3-270m"]),
                               ("notes/welcome", {"text": "hello mesh"})):
                a.post("/api/memory/set", json={"key": key, "value": value})
            written = [p for size in SIZES for p in shoot(a, args.out, size)]
        finally:
            for n in nodes:
                n.stop()
    for path in written:
        print(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}  {path.stat().st_size // 1024} KiB")
    return 0 if len(written) == len(PANELS) * len(SIZES) else 1


if __name__ == "__main__":
    sys.exit(main())
