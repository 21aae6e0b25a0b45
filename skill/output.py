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
    traffic = (f" ({private.get('links_down')} down; {size(private.get('bytes_in'))} in, "
               f"{size(private.get('bytes_out'))} out)" if "bytes_in" in private else "")
    mesh_line = (f"{private.get('peers', 0)} private peer(s){traffic}; public mesh "
                 f"{'joined' if public.get('joined') else 'not joined'}"
                 + (f" ({public.get('peers', 0)} peer(s), {public.get('relay_circuits', 0)} relay circuit(s))"
                    if public.get("joined") else "")
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
        ("split", split_capability(c.get("split"))),
    ])


def split_capability(split: Any) -> str:
    """Whether this node can lend for split inference, and why not."""
    if not isinstance(split, dict):
        return "unknown"
    if not split.get("rpc_server"):
        return "cannot lend or borrow: " + str(split.get("lend_refusal") or "llama.cpp's RPC tools are not built")
    lend = "lends" if split.get("can_lend") else f"does not lend ({split.get('lend_refusal')})"
    if split.get("can_lend") and split.get("lend_public_enabled"):
        lend += f", also to valid public peers ({split.get('public_price')} credits a tunnel)"
    backends = ", ".join(split.get("backends") or []) or "?"
    return f"{lend}; {size(split.get('free_bytes'))} free; backends {backends}; {split.get('lenders_now', 0)} lender(s) linked"


def params(n: Any) -> str:
    """A parameter count the way model cards write it: 268M, 7.24B."""
    if not isinstance(n, (int, float)) or isinstance(n, bool) or n <= 0:
        return "-"
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(int(n))


def context(n: Any) -> str:
    """A context length in tokens: 32768 -> 32K (powers of two are how they are quoted)."""
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        return "-"
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def render_models(d: dict) -> str:
    models = d.get("models") or []
    if not models:
        return f"no models in {d.get('shared_models_dir', 'the shared models folder')}"
    cloud = any(m.get("kind") == "cloud" for m in models)
    rows = []
    for m in models:
        usable = "yes" if m.get("usable", True) else f"no: {m.get('problem', '?')}"
        local = m.get("kind") != "cloud"
        row = [m.get("name", "?"), m.get("kind", "?"),
               (m.get("architecture") or "-") if local else "-",
               params(m.get("parameters")), m.get("quantization") or "-", context(m.get("context_length")),
               size(m.get("size_bytes")) if local else "-"]
        if cloud:  # the column only when there is something to put in it
            row.append(f"{m.get('provider', '?')} {m.get('model') or ''}".strip() if not local else "")
        rows.append([*row, "yes" if m.get("shared") else "no", usable])
    headers = ["NAME", "KIND", "ARCH", "PARAMS", "QUANT", "CONTEXT", "SIZE"]
    return table([*headers, *(["PROVIDER"] if cloud else []), "SHARED", "USABLE"], rows)


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
    text = _peer_table(d.get("peers") or [], "no peers connected")
    public, hidden = d.get("public") or [], d.get("public_stealth_peers") or 0
    if public or hidden:
        text += "\n\npublic mesh:\n" + _peer_table(public, "no public peers listed")
        for p in public:
            if p.get("trusted") is False:
                text += f"\n  {short_id(p.get('node_id'))} is not valid in this node's Web of Trust: not asked, not served"
        if hidden:
            text += f"\n  and {hidden} stealth peer(s), never listed"
    return text


def _peer_table(peers: list, empty: str) -> str:
    if not peers:
        return empty
    rows = []
    for p in peers:
        load, guard = p.get("load") or {}, p.get("guard") or {}
        latency = p.get("latency_ms")
        rows.append([
            p.get("name") or "?", short_id(p.get("node_id") or p.get("id")),
            "(stealth)" if p.get("stealth") else p.get("address") or p.get("url") or "",
            f"{latency:.1f} ms" if isinstance(latency, (int, float)) else "-",
            f"{percent(load.get('cpu_percent'))} / {percent(load.get('ram_percent'))}",
            len(p.get("shared_models") or []),
            "paused" if guard.get("sharing_paused") else (p.get("state") or "connected"),
        ])
    return table(["NAME", "NODE", "ADDRESS", "LATENCY", "CPU/RAM", "MODELS", "STATE"], rows)


def render_discover(d: dict) -> str:
    lines = []
    mdns = d.get("mdns") or {}
    nodes = mdns.get("nodes") or []
    if not mdns.get("available", True):
        lines.append("mDNS: unavailable on this node")
    else:
        lines.append(f"mDNS: {len(nodes)} node(s)")
        lines += [f"  {n.get('name', '?')}  {short_id(n.get('node_id'))}  {' '.join(n.get('urls') or [])}"
                  + ("  (linked)" if n.get("connected") else "") for n in nodes]
    ts = d.get("tailscale") or {}
    peers = ts.get("peers") or []
    if not ts.get("available"):
        lines.append(f"Tailscale: unavailable ({ts.get('detail') or 'not installed'})")
    else:
        lines.append(f"Tailscale: {len(peers)} peer(s)")
        lines += [f"  {p.get('name', '?')}  {' '.join(p.get('addresses') or [])}"
                  + ("" if p.get("online") else "  (offline)") + ("  (linked)" if p.get("connected") else "")
                  for p in peers]
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
    text = f"{score:.3f}" if isinstance(score, (int, float)) else str(score)
    lines = [f"{d.get('peer', '?')}: score {text}"]
    inputs = d.get("inputs") or {}
    if inputs:
        lines.append("inputs: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                            for k, v in inputs.items()))
    if d.get("formula"):
        lines.append(f"formula: {d['formula']}")
    return "\n".join(lines)


def render_trust(d: dict) -> str:
    verdict = d.get("verdict") or d
    subject = verdict.get("subject", "?")
    if verdict.get("valid"):
        head = f"{subject}: VALID at depth {verdict.get('depth')}"
        path = verdict.get("path") or []
        if path:
            head += " via " + " -> ".join(short_id(p) for p in path)
    else:
        head = f"{subject}: not valid"
    lines = [head] + [f"  {r}" for r in verdict.get("reasons") or []]
    if d.get("introducer"):
        lines.append(f"  introducer trust (owner-trust): {d['introducer']}")
    for att in d.get("attestations") or []:
        lines.append(f"  vouch by {short_id(att.get('issuer'))}: {att.get('level')} ({att.get('status', '?')})")
    return "\n".join(lines)


def answer_text(d: dict) -> str:
    """The answer of a query, whichever field the node puts it in; JSON when no text field is present."""
    for key in ("response", "answer", "text", "output", "content"):
        if isinstance(d.get(key), str):
            return d[key]
    return json.dumps(d, indent=2, ensure_ascii=False)


# -- queries -----------------------------------------------------------------------------------------
# A rendered query is a list of (text, to_stderr) chunks in display order: the answer goes to stdout and
# what describes it (votes, steps, sources, the status line) to stderr, so the answer alone can be piped.
Chunks = list[tuple[str, bool]]
_SHORT_RULE = 60  # a longer `rule` is the full description; the table then names it instead


def _ms(value: Any) -> str:
    return f"{value:.0f} ms" if isinstance(value, (int, float)) and not isinstance(value, bool) else "? ms"


def first_line(text: Any, width: int = 80) -> str:
    line = next((x.strip() for x in str(text or "").splitlines() if x.strip()), "")
    return line if len(line) <= width else line[: width - 1] + "…"


def status_line(d: dict, *, score: Any = None) -> str:
    """`specialist X (score s) · model M · node ID · N ms` for one answer (a query result or an `end` event)."""
    spec = f"specialist {d.get('specialist') or '?'}"
    if isinstance(score, (int, float)) and not isinstance(score, bool):
        spec += f" (score {score:.2f})"
    answers = [a for a in d.get("answers") or [] if isinstance(a, dict)]
    # The model of the answer shown (the first successful one), not just of the first asked.
    model = d.get("model") or next((a.get("model") for a in answers
                                    if a.get("specialist") == d.get("specialist") and a.get("model")), None)
    return " · ".join([spec, f"model {model or '?'}", f"node {short_id(d.get('node'))}", _ms(d.get("elapsed_ms"))])


def _models_of(d: dict) -> str:
    used = sorted({a.get("model") for a in d.get("answers") or [] if a.get("model")})
    return ", ".join(used) or "?"


def _errors(d: dict) -> Chunks:
    return [(f"{e.get('specialist', '?')} failed: {e.get('error', '?')}", True)
            for e in d.get("errors") or [] if isinstance(e, dict)]


def render_query(d: dict) -> Chunks:
    mode = d.get("mode")
    answers = [a for a in d.get("answers") or [] if isinstance(a, dict)]
    summary = " · ".join([f"{mode} · {len(answers)} answer(s)", f"model {_models_of(d)}",
                          f"node {short_id(d.get('node'))}", _ms(d.get("elapsed_ms"))])
    if mode == "vote":
        votes = d.get("votes") or {}
        model_of = {a.get("specialist"): a.get("model") for a in answers}
        rows = [[name, key, model_of.get(name) or ""] for name, key in votes.items()]
        rows += [[e.get("specialist", "?"), "(failed)", ""] for e in d.get("errors") or [] if isinstance(e, dict)]
        winner = d.get("winner") or {}
        rule = d.get("rule_name") or d.get("rule") or "?"
        rule = rule if len(rule) <= _SHORT_RULE else "majority of normalised answer keys"
        verdict = (f"winner {winner.get('key', '?')!r}: {winner.get('count', '?')} of {len(votes)} vote(s)"
                   + (", unanimous" if d.get("unanimous") else "") + f"; rule: {rule} (--json for the full rule)")
        return [(answer_text(d), False), (table(["SPECIALIST", "KEY", "MODEL"], rows), True), (verdict, True),
                (summary, True)]
    if mode == "chain":
        steps = [s for s in d.get("steps") or [] if isinstance(s, dict)]
        lines = []
        for s in steps:
            what = f"failed: {s['error']}" if s.get("error") else first_line(s.get("text"))
            role = f" ({s['role']})" if s.get("role") and s.get("role") != "step" else ""
            lines.append(f"step {s.get('step', '?')} · {s.get('specialist', '?')}{role} · {what}")
        return [("\n".join(lines), True), (answer_text(d), False), (summary, True)]
    if mode == "fuse":
        sources = [s for s in d.get("sources") or [] if isinstance(s, dict)]
        head = (f"fused by {d.get('fuser')} from {len(sources)} source(s):" if d.get("fused")
                else f"not fused ({d.get('note') or 'one source'}); sources:")
        lines = [head] + [f"  {s.get('specialist', '?')} · {s.get('model') or '?'}" for s in sources]
        return [(answer_text(d), False), ("\n".join(lines), True), *_errors(d), (summary, True)]
    if mode == "compare":
        blocks = []
        for a in answers:
            head = f"── {a.get('specialist', '?')} · {a.get('model') or '?'} · {_ms(a.get('elapsed_ms'))}"
            body = f"failed: {a['error']}" if a.get("error") else str(a.get("text") or "").strip()
            blocks.append(f"{head}\n{body}")
        fastest = f" · fastest {d['fastest']}" if d.get("fastest") else ""
        return [("\n\n".join(blocks), False), (summary + fastest, True)]
    if mode in ("single", "specialist") and answers:
        score = (d.get("routing") or {}).get("score") if mode == "single" else None
        others = [a.get("specialist", "?") for a in answers
                  if not a.get("error") and a.get("specialist") != d.get("specialist")]
        also = [(f"also answered: {', '.join(others)} (--json shows every answer)", True)] if others else []
        return [(answer_text(d), False), *_errors(d), *also, (status_line(d, score=score), True)]
    return [(answer_text(d), False)]


# -- streaming, chat, specialists, loaded models -----------------------------------------------------------

def loading_line(d: dict) -> str:
    """`loading gemma3-270m-q4-k-m (241.4 MiB)… 3s` while a cold model loads."""
    secs = d.get("elapsed_secs")
    took = f" {secs:.0f}s" if isinstance(secs, (int, float)) and not isinstance(secs, bool) else ""
    return f"loading {d.get('model') or 'model'} ({size(d.get('size_bytes'))})…{took}"


def cut_marker(d: dict) -> str | None:
    """`[cut at N tokens: --max-tokens]` for an answer max_tokens stopped; None for a complete one."""
    if d.get("finish_reason") != "length":
        return None
    answers = [a for a in d.get("answers") or [] if isinstance(a, dict) and a.get("specialist") == d.get("specialist")]
    tokens = d.get("completion_tokens") or d.get("max_tokens") or next((a.get("tokens") for a in answers), None)
    return f"[cut at {tokens if tokens is not None else '?'} tokens: --max-tokens]"


def answer_progress(a: dict) -> str:
    """One specialist's answer as it finishes, in a multi-specialist query."""
    if a.get("error"):
        return f"✗ {a.get('specialist', '?')} failed: {a['error']}"
    tokens = f" · {a['tokens']} tokens" if isinstance(a.get("tokens"), int) else ""
    cut = " (cut)" if a.get("finish_reason") == "length" else ""
    return f"✓ {a.get('specialist', '?')} · {a.get('model') or '?'} · {_ms(a.get('elapsed_ms'))}{tokens}{cut}"


def context_note(d: dict) -> str | None:
    """What of the conversation the model was sent: `2 earlier turns, 118 prompt tokens`."""
    hist = d.get("history") if isinstance(d.get("history"), dict) else {}
    parts = []
    if hist:
        turns = hist.get("turns", 0)
        parts.append(f"{turns} earlier turn{'' if turns == 1 else 's'}"
                     + (f" ({hist['dropped']} older left out)" if hist.get("dropped") else ""))
    if isinstance(d.get("prompt_tokens"), int):
        parts.append(f"{d['prompt_tokens']} prompt tokens")
    return ", ".join(parts) or None


def render_specialists(d: dict) -> str:
    rows = []
    for s in d.get("specialists") or []:
        if not isinstance(s, dict):
            continue
        hints = [str(h) for h in s.get("hints") or []]
        shown = ", ".join(hints[:4]) + (f" (+{len(hints) - 4})" if len(hints) > 4 else "")
        rows.append([s.get("name", "?"), first_line(s.get("description"), 48), shown,
                     ", ".join(s.get("preferred_models") or []) or "any"])
    return table(["NAME", "DESCRIPTION", "HINTS", "MODELS"], rows) if rows else "no specialists"


def split_line(parts: Any) -> str:
    """Who holds which layers of a split model: `split: here 0-5 (90 MiB), peer-b 6-11 (60 MiB)`."""
    held = []
    for p in parts if isinstance(parts, list) else []:
        if not isinstance(p, dict):
            continue
        who = "here" if p.get("local") else (p.get("name") or str(p.get("node", "?"))[:7])
        layers = p.get("layers") or []
        span = f"{layers[0]}-{layers[-1]}" if len(layers) == 2 else "no layers"
        held.append(f"{who} layers {span} ({size(p.get('bytes'))})")
    return "split: " + ", ".join(held)


def render_models_ps(d: dict) -> str:
    rows = []
    splits = []
    for m in d.get("models") or []:
        if not isinstance(m, dict):
            continue
        if m.get("split"):
            until = m.get("unloads_in_secs")
            parts = [p for p in m.get("parts") or [] if isinstance(p, dict)]
            rows.append([m.get("model", "?"), f"split over {len(parts)} nodes",
                         size(sum(p.get("bytes") or 0 for p in parts)), "-", m.get("n_ctx", "?"),
                         duration(m.get("idle_secs")), "never" if until is None else duration(until)])
            splits.append(f"{m.get('model', '?')} {split_line(parts)}")
            continue
        where = m.get("device") or "?"
        if where != "cpu" and m.get("layers"):
            where += f" ({m.get('gpu_layers', '?')}/{m['layers']} layers)"
        until = m.get("unloads_in_secs")
        rows.append([m.get("model", "?"), where, size(m.get("ram_bytes")), size(m.get("vram_bytes")),
                     m.get("n_ctx", "?"), "busy" if m.get("busy") else duration(m.get("idle_secs")),
                     "never" if until is None else duration(until)])
    if not rows:
        return "no model loaded (models load on first use)"
    return "\n".join([table(["MODEL", "WHERE", "RAM", "VRAM", "CONTEXT", "IDLE", "UNLOADS IN"], rows), *splits])
