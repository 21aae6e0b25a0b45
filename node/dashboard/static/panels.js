// One function per panel: it renders what the API or the live stream says, with text nodes only (never
// innerHTML from data), so nothing a peer names can inject markup.
import { api, confirmDialog, getJSON } from "./app.js";
import { drawMesh } from "./graph.js";
import { t } from "./i18n.js";

let latest = null;
let eventsSeen = 0;

const $ = (id) => document.getElementById(id);
const cell = (text) => { const td = document.createElement("td"); td.textContent = text ?? ""; return td; };
const row = (...cells) => { const tr = document.createElement("tr"); tr.append(...cells); return tr; };
const fact = (dl, label, value) => {
  const dt = document.createElement("dt"); dt.textContent = label;
  const dd = document.createElement("dd"); dd.textContent = value ?? "—";
  dl.append(dt, dd);
};
const bytes = (n) => (n == null ? "" : n > 1e9 ? `${(n / 1e9).toFixed(2)} GB` : `${(n / 1e6).toFixed(1)} MB`);
const duration = (s) => { s = Math.round(s); const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60); return h ? `${h}h ${m}m` : `${m}m ${s % 60}s`; };
const when = (ts) => (ts ? new Date(ts * 1000).toLocaleString() : "");
const showError = (where, error) => { $(where).textContent = t("error", { detail: error.message }); };

export function linkType(peer) {
  if (peer.relay || peer.via_relay) return "relay";
  const host = (peer.address || peer.url || "").replace(/^\w+:\/\//, "").replace(/:\d+(\/.*)?$/, "").replace(/[[\]]/g, "");
  if (/^127\.|^::1$|^localhost$/.test(host)) return "loopback";
  if (/^100\.(6[4-9]|[7-9]\d|1[01]\d|12[0-7])\./.test(host)) return "tailnet";
  if (/^10\.|^192\.168\.|^172\.(1[6-9]|2\d|3[01])\.|^fe80|^fd/.test(host)) return "lan";
  return "public";
}

// -- live stream: node, guard, mesh, events ---------------------------------------------------------
export function snapshot(snap) {
  latest = snap;
  renderNode(snap);
  renderMesh(snap);
  appendEvents(snap.events || []);
}

function renderNode(snap) {
  const dl = $("node-facts"); dl.replaceChildren();
  fact(dl, t("node.id"), snap.node.node_id);
  fact(dl, t("node.name"), snap.node.name);
  fact(dl, t("node.version"), snap.node.version);
  fact(dl, t("node.uptime"), duration(snap.node.uptime_secs));
  fact(dl, t("node.links"), String(snap.mesh.private.links_up ?? snap.peers.length));
  fact(dl, t("node.public"), snap.mesh.public.joined ? t("yes") : t("no"));
  const g = snap.resource_guard, box = $("guard"); box.replaceChildren();
  for (const [key, value, limit] of [["guard.cpu", g.cpu_percent, g.cpu_threshold], ["guard.ram", g.ram_percent, g.ram_threshold]]) {
    const label = document.createElement("label");
    label.textContent = `${t(key)} ${value == null ? "—" : value.toFixed(0) + "%"} (${t("guard.threshold", { value: limit })})`;
    const meter = document.createElement("meter");
    Object.assign(meter, { min: 0, max: 100, high: limit, optimum: 0, value: value ?? 0 });
    label.append(meter);
    box.append(label);
  }
  const state = document.createElement("p");
  state.className = g.sharing_paused ? "warn" : "ok";
  state.textContent = g.sharing_paused
    ? `${t("guard.paused", { reason: g.reason || "" })} ${g.resume_in_secs ? t("guard.cooldown", { secs: Math.round(g.resume_in_secs) }) : ""}`
    : t("guard.active");
  box.append(state);
}

function renderMesh(snap) {
  $("mesh-summary").textContent = t("mesh.summary", {
    private: snap.peers.length, public: snap.public_peers.length, stealth: snap.public_stealth_peers,
  });
  drawMesh($("mesh-graph"), snap.node, snap.peers.filter((p) => !p.stealth), snap.public_peers, linkType);
  const body = $("peers-table").tBodies[0]; body.replaceChildren();
  for (const p of [...snap.peers, ...snap.public_peers]) {
    const load = p.load ? `CPU ${p.load.cpu_percent ?? "—"}% · RAM ${p.load.ram_percent ?? "—"}%` : "";
    const guard = p.guard?.sharing_paused ? `paused: ${p.guard.reason || ""}` : "ok";
    body.append(row(cell(`${p.name || ""} ${(p.node_id || "").slice(0, 7)}`), cell(t(`link.${linkType(p)}`)),
      cell(p.latency_ms == null ? "" : `${p.latency_ms} ms`), cell(load), cell((p.shared_models || []).join(", ")), cell(guard)));
  }
}

function appendEvents(events) {
  const list = $("events");
  for (const e of events) {
    if (e.seq <= eventsSeen) continue;
    eventsSeen = e.seq;
    const li = document.createElement("li");
    li.className = e.level.toLowerCase();
    li.textContent = `${new Date(e.time * 1000).toLocaleTimeString()} ${e.level} ${e.logger}: ${e.message}`;
    list.prepend(li);
  }
  while (list.children.length > 300) list.lastChild.remove();
}

// -- panels loaded on opening ------------------------------------------------------------------------
export function opened(name) {
  const load = { models: loadModels, credits: loadCredits, memory: loadMemory, conversations: loadConversations };
  load[name]?.();
}

async function loadModels() {
  try {
    const data = await getJSON("/api/models");
    const body = $("models-table").tBodies[0]; body.replaceChildren();
    if (!data.models.length) body.append(row(cell(t("models.none"))));
    for (const m of data.models) {
      const facts = [m.architecture, m.parameters, m.quantization, m.context_length && `ctx ${m.context_length}`].filter(Boolean).join(" · ");
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = m.shared ? t("models.unshare") : t("models.share");
      button.addEventListener("click", async () => {
        try { await api("POST", `/api/models/${encodeURIComponent(m.name)}/${m.shared ? "unshare" : "share"}`); loadModels(); }
        catch (error) { showError("model-problems", error); }
      });
      const action = document.createElement("td"); action.append(button);
      body.append(row(cell(m.name), cell(m.kind), cell(m.shared ? t("yes") : t("no")), cell(facts), cell(bytes(m.size_bytes)), action));
    }
    const peers = $("peer-models"); peers.replaceChildren();
    for (const p of latest?.peers || []) {
      const li = document.createElement("li");
      li.textContent = `${p.name || p.node_id.slice(0, 7)}: ${(p.shared_models || []).join(", ") || "—"}`;
      peers.append(li);
    }
    $("model-problems").textContent = Object.entries(data.problems || {}).map(([k, v]) => `${k}: ${v}`).join("; ");
  } catch (error) { showError("model-problems", error); }
}

async function loadCredits() {
  try {
    const data = await getJSON("/api/credits?receipts=50");
    const dl = $("credit-facts"); dl.replaceChildren();
    for (const [k, v] of Object.entries(data)) if (typeof v !== "object") fact(dl, k.replaceAll("_", " "), String(v));
    const body = $("receipts-table").tBodies[0]; body.replaceChildren();
    const me = latest?.node.node_id;
    for (const r of (data.latest_receipts || []).reverse()) {
      const asker = r.asker || r.commitment?.asker, server = r.server || r.commitment?.server;
      const mine = server === me;
      body.append(row(cell(when(r.delivered_at || r.time)), cell(((mine ? asker : server) || "").slice(0, 12)),
        cell(mine ? "served" : "asked"), cell(`${mine ? "+" : "−"}${r.amount ?? r.commitment?.amount ?? ""}`)));
    }
  } catch (error) { showError("credit-facts", error); }
}

async function loadMemory(event) {
  event?.preventDefault();
  const prefix = $("memory-prefix").value;
  try {
    const data = await getJSON(`/api/memory?prefix=${encodeURIComponent(prefix)}`);
    const list = $("memory-keys"); list.replaceChildren();
    for (const key of data.keys) {
      const li = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button"; button.className = "link"; button.textContent = key;
      button.addEventListener("click", async () => {
        const value = await getJSON(`/api/memory/${encodeURIComponent(key)}`);
        $("memory-key").value = key;
        $("memory-value").value = typeof value.value === "string" ? value.value : JSON.stringify(value.value, null, 2);
      });
      li.append(button);
      list.append(li);
    }
  } catch (error) { showError("memory-status", error); }
}

function parseValue(text) {
  try { return JSON.parse(text); } catch { return text; }
}

async function saveMemory(event) {
  event.preventDefault();
  const key = $("memory-key").value;
  if (!(await confirmDialog(t("memory.confirm_save", { key })))) return;
  try {
    await api("POST", "/api/memory/set", { key, value: parseValue($("memory-value").value) });
    $("memory-status").textContent = t("memory.saved", { key });
    loadMemory();
  } catch (error) { showError("memory-status", error); }
}

async function deleteMemory() {
  const key = $("memory-key").value;
  if (!key || !(await confirmDialog(t("memory.confirm_delete", { key })))) return;
  try {
    await api("DELETE", `/api/memory/${encodeURIComponent(key)}`);
    $("memory-status").textContent = t("memory.deleted", { key });
    loadMemory();
  } catch (error) { showError("memory-status", error); }
}

async function loadConversations(event) {
  event?.preventDefault();
  const q = $("conv-q").value.trim();
  try {
    const data = q
      ? await (await api("POST", `/api/conversations/search?q=${encodeURIComponent(q)}`)).json()
      : await getJSON("/api/conversations?limit=100");
    const items = data.conversations || data.results || [];
    const body = $("conv-table").tBodies[0]; body.replaceChildren();
    for (const c of items) {
      const id = c.session_id;
      const select = document.createElement("select");
      select.setAttribute("aria-label", t("col.privacy"));
      for (const level of ["private", "peers-only", "public"]) select.append(new Option(level, level, false, level === c.privacy));
      select.addEventListener("change", () => api("POST", `/api/conversations/${id}/privacy`, { privacy: select.value }).catch((e) => showError("conv-view", e)));
      const read = document.createElement("button");
      read.type = "button"; read.textContent = t("conv.read");
      read.addEventListener("click", async () => {
        $("conv-view").textContent = await (await api("POST", `/api/conversations/${id}/export?format=markdown`)).text();
      });
      const privacy = document.createElement("td"); privacy.append(select);
      const actions = document.createElement("td"); actions.append(read);
      body.append(row(cell(id), cell(when(c.updated_at || c.created_at || c.time)), privacy, actions));
    }
  } catch (error) { showError("conv-view", error); }
}

// -- the query box: a streamed answer ---------------------------------------------------------------
async function ask(event) {
  event.preventDefault();
  const mode = $("ask-mode").value, specialist = $("ask-specialist").value || null;
  const body = { prompt: $("ask-prompt").value, mode, specialist, max_tokens: Number($("ask-max").value) || null,
    stream: mode === "single" || mode === "specialist" };
  const answer = $("ask-answer"), meta = $("ask-meta");
  answer.textContent = ""; meta.textContent = t("ask.thinking", { mode });
  $("ask-send").disabled = true;
  try {
    const response = await api("POST", "/api/query", body);
    if (!body.stream) {
      const data = await response.json();
      answer.textContent = data.answer ?? JSON.stringify(data, null, 2);
      meta.textContent = t("ask.done", { model: data.model || "", node: (data.node || "").slice(0, 7), ms: data.elapsed_ms ?? "" });
      return;
    }
    const reader = response.body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const frame = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
        const name = /^event: (.*)$/m.exec(frame)?.[1], data = /^data: (.*)$/m.exec(frame)?.[1];
        if (!data) continue;
        const payload = JSON.parse(data);
        if (name === "token") answer.textContent += payload.text;
        else if (name === "end") meta.textContent = t("ask.done", { model: payload.model, node: (payload.node || "").slice(0, 7), ms: payload.elapsed_ms });
        else if (name === "error") meta.textContent = t("error", { detail: payload.detail });
      }
    }
  } catch (error) { showError("ask-meta", error); }
  finally { $("ask-send").disabled = false; }
}

async function loadSpecialists() {
  try {
    const data = await getJSON("/api/specialists");
    const select = $("ask-specialist");
    for (const s of data.specialists || []) select.append(new Option(s.name, s.name));
  } catch { /* older nodes list none: automatic routing still works */ }
}

export function setup() {
  $("memory-search").addEventListener("submit", loadMemory);
  $("memory-edit").addEventListener("submit", saveMemory);
  $("memory-delete").addEventListener("click", deleteMemory);
  $("conv-search").addEventListener("submit", loadConversations);
  $("ask-form").addEventListener("submit", ask);
  loadSpecialists();
}
