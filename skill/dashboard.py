"""`pinkybrain dashboard`: ask the node (an owner-signed call) for a one-time login link and open it.

The link is good once and for two minutes; the browser trades it for a session cookie. Without a
graphical session (no DISPLAY/WAYLAND_DISPLAY on Linux) the URL is printed instead of starting a
terminal browser.
"""

from __future__ import annotations

import os
import sys
import webbrowser

import typer

from pinkybrain.skill.cli import JsonOpt, TimeoutOpt, UrlOpt, call, emit, handled


def _has_gui() -> bool:
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


@handled
def dashboard(
    no_browser: bool = typer.Option(False, "--no-browser", help="print the login URL only"),
    as_json: JsonOpt = False,
    url: UrlOpt = None,
    timeout: TimeoutOpt = None,
) -> None:
    """Open the node's dashboard in the browser (a one-time login link; the owner's alone)."""
    data, conn = call(url, timeout, "POST", "/api/dashboard/login")
    link = conn.url.rstrip("/") + data["path"]
    opened = not no_browser and not as_json and _has_gui() and webbrowser.open(link)
    result = {"url": link, "expires_in_secs": data["expires_in_secs"], "opened": bool(opened)}
    emit(result, as_json, lambda: (f"opened the dashboard in your browser: {link}" if opened else
                                   f"open this one-time link within {int(data['expires_in_secs'])} s: {link}"))
