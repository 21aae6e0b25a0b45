"""Human-readable rendering for the skill's commands: short lines, aligned tables, friendly units.

Renderers read answers with .get(), so a node that adds or omits a field changes the text, never
crashes the command.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any


def size(n: Any) -> str:
    if not isinstance(n, (int, float)) or isinstance(n, bool):
        return "?"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def duration(secs: Any) -> str:
    if not isinstance(secs, (int, float)) or isinstance(secs, bool):
        return "?"
    secs = int(secs)
    days, rest = divmod(secs, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h {minutes:02d}m"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {seconds:02d}s"
    return f"{seconds}s"


def percent(value: Any) -> str:
    return f"{value:.0f}%" if isinstance(value, (int, float)) and not isinstance(value, bool) else "?"


def short_id(node_id: Any) -> str:
    return node_id[:15] + "…" if isinstance(node_id, str) and len(node_id) > 16 else str(node_id or "?")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


def fields(pairs: Sequence[tuple[str, Any]]) -> str:
    """`label  value` lines with the labels aligned; pairs whose value is None are left out."""
    shown = [(k, v) for k, v in pairs if v is not None]
    width = max((len(k) for k, _ in shown), default=0)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in shown)


def value_text(value: Any) -> str:
    """A memory value as the user would want to read it: strings bare, the rest as JSON."""
    return value if isinstance(value, str) else json.dumps(value, indent=2, ensure_ascii=False)


# -- per-command renderers ---------------------------------------------------------------------------

def render_status(s: dict, url: str, via: str) -> str:
    guard = s.get("resource_guard") or {}
    mesh = s.get("mesh") or {}
    private = mesh.get("private") or {}
    public = mesh.get("public") or {}
    sharing = s.get("sharing") or {}
    if guard.get("sharing_paused"):
        state = f"PAUSED ({guard.get('reason') or 'over threshold'})"
    elif guard.get("sharing_enabled") is False or sharing.get("enabled") is False:
        state = "disabled in config"
    else:
        state = "active"
    guard_line = (f"CPU {percent(guard.get('cpu_percent'))} / {percent(guard.get('cpu_threshold'))}   "
                  f"RAM {percent(guard.get('ram_percent'))} / {percent(guard.get('ram_threshold'))}   "
                  f"sharing {state}")
    mesh_line = (f"{private.get('peers', 0)} private peer(s); public mesh "
                 f"{'joined' if public.get('joined') else 'not joined'}"
                 + ("; stealth" if mesh.get("stealth") else ""))
    credit = s.get("credit") or {}
    return fields([
        ("node", f"{s.get('name', '?')}  {s.get('node_id', '?')}"),
        ("version", s.get("version", "?")),
        ("uptime", f"{duration(s.get('uptime_secs'))} ({s.get('start_mode', '?')})"),
        ("api", f"{url} (found via {via})"),
        ("mesh", mesh_line),
        ("guard", guard_line),
        ("models", f"{sharing.get('models_shared', 0)} shared" if sharing else None),
        ("credit", credit.get("balance") if credit else None),
    ])


def render_capabilities(c: dict) -> str:
    cpu = c.get("cpu") or {}
    mem = c.get("memory") or {}
    disk = c.get("disk") or {}
    os_ = c.get("os") or {}
    llama = c.get("llama_cpp") or {}
    cores = f"{cpu.get('logical_cores', '?')} cores"
    if cpu.get("usable_cores") and cpu.get("usable_cores") != cpu.get("logical_cores"):
        cores += f" ({cpu['usable_cores']} usable)"
    gpus = c.get("gpus") or []
    gpu_text = ", ".join(
        f"{g.get('name') or g.get('vendor') or 'GPU'}"
        + (f" ({size(g['memory_total_bytes'])})" if g.get("memory_total_bytes") else "")
        for g in gpus
    ) or "none"
    memory_line = f"{size(mem.get('available_bytes'))} free of {size(mem.get('total_bytes'))}"
    if mem.get("cgroup_limit_bytes"):
        memory_line += f" (container limit {size(mem['cgroup_limit_bytes'])})"
    if llama.get("available"):
        offload = {True: "yes", False: "no"}.get(llama.get("gpu_offload"), "unknown")
        llama_line = f"{llama.get('version') or 'installed'} (GPU offload: {offload})"
    else:
        llama_line = "not available" + (f": {llama['reason']}" if llama.get("reason") else "")
    return fields([
        ("cpu", f"{cpu.get('model') or 'unknown CPU'} ({cpu.get('arch') or '?'}), {cores}"),
        ("memory", memory_line),
        ("disk", f"{size(disk.get('free_bytes'))} free of {size(disk.get('total_bytes'))} ({disk.get('path', '?')})"),
        ("gpus", gpu_text),
        ("os", f"{os_.get('system', '?')} {os_.get('release', '')}, Python {os_.get('python', '?')}".strip()),
        ("llama.cpp", llama_line),
    ])


def render_models(d: dict) -> str:
    models = d.get("models") or []
    if not models:
        return f"no models in {d.get('shared_models_dir', 'the shared models folder')}"
    rows = []
    for m in models:
        usable = "yes" if m.get("usable", True) else f"no: {m.get('problem', '?')}"
        rows.append([m.get("name", "?"), m.get("kind", "?"), size(m.get("size_bytes")),
                     "yes" if m.get("shared") else "no", usable])
    return table(["NAME", "KIND", "SIZE", "SHARED", "USABLE"], rows)


def render_daemon(d: dict) -> str:
    return fields([
        ("state", "running" if d.get("running") else "not running"),
        ("pid", d.get("pid")),
        ("mode", d.get("start_mode")),
        ("uptime", duration(d.get("uptime_secs"))),
        ("memory", f"{size(d.get('rss_bytes'))} RSS, {d.get('threads', '?')} threads"),
        ("version", f"{d.get('version', '?')} (Python {d.get('python', '?')})"),
        ("pid file", d.get("pid_file")),
        ("log", d.get("log_file")),
    ])


def render_peers(d: dict) -> str:
    peers = d.get("peers") or []
    if not peers:
        return "no peers connected"
    rows = [[p.get("name", "?"), short_id(p.get("node_id") or p.get("id")), p.get("url") or "",
             p.get("state") or p.get("status") or ""] for p in peers]
    return table(["NAME", "NODE", "URL", "STATE"], rows)


def render_discover(d: dict) -> str:
    lines = []
    mdns = d.get("mdns") or {}
    nodes = mdns.get("nodes") or []
    if not mdns.get("available", True):
        lines.append("mDNS: unavailable on this node")
    else:
        lines.append(f"mDNS: {len(nodes)} node(s)")
        lines += [f"  {n.get('name', '?')}  {short_id(n.get('node_id'))}  {' '.join(n.get('urls') or [])}"
                  for n in nodes]
    ts = d.get("tailscale") or {}
    peers = ts.get("peers") or []
    if not ts.get("available"):
        lines.append(f"Tailscale: unavailable ({ts.get('detail') or 'not installed'})")
    else:
        lines.append(f"Tailscale: {len(peers)} peer(s)")
        lines += [f"  {p.get('name', '?')}  {' '.join(p.get('addresses') or [])}"
                  + ("" if p.get("online") else "  (offline)") for p in peers]
    return "\n".join(lines)


def render_conversations(items: list) -> str:
    if not items:
        return "no conversations"
    rows = []
    for c in items:
        if not isinstance(c, dict):
            rows.append([str(c), "", "", ""])
            continue
        title = c.get("title") or c.get("snippet") or c.get("preview") or ""
        rows.append([c.get("session_id") or c.get("id") or "?", c.get("privacy") or "",
                     c.get("messages") if c.get("messages") is not None else c.get("message_count", ""),
                     str(title)[:60]])
    return table(["SESSION", "PRIVACY", "MESSAGES", "TITLE"], rows)


def render_search(d: dict) -> str:
    results = d.get("results") or []
    if not results:
        return f"no conversations match {d.get('query', '')!r}"
    lines = []
    for r in results:
        if not isinstance(r, dict):
            lines.append(str(r))
            continue
        text = " ".join(str(r.get("snippet") or r.get("text") or r.get("content") or "").split())
        lines.append(f"{r.get('session_id') or r.get('id') or '?'}  {text[:100]}")
    return "\n".join(lines)


def render_update(d: dict) -> str:
    current = d.get("current", "?")
    if d.get("update_available"):
        return f"update available: {current} -> {d.get('latest', '?')} (apply with `pinkybrain update apply`)"
    line = f"up to date ({current})" if d.get("latest") else f"current version {current}"
    return line + (f"; {d['detail']}" if d.get("detail") else "")


def render_score(d: dict) -> str:
    score = d.get("score")
    text = f"{score:g}" if isinstance(score, (int, float)) else str(score)
    line = f"{d.get('peer', '?')}: score {text}"
    return line + (f" ({d['formula']})" if d.get("formula") else "")


def answer_text(d: dict) -> str:
    """The answer of a query, whichever field the node puts it in; JSON when no text field is present."""
    for key in ("response", "answer", "text", "output", "content"):
        if isinstance(d.get(key), str):
            return d[key]
    return json.dumps(d, indent=2, ensure_ascii=False)
