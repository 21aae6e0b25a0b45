// The dashboard page: every call goes to the node's own API with the session cookie and the CSRF token,
// so it passes the same checks as the CLI. Live values arrive over one server-sent event stream.
import { loadCatalog, t, translatePage } from "./i18n.js";
import * as panels from "./panels.js";

const csrf = document.querySelector('meta[name="pinkybrain-csrf"]').content;

export async function api(method, path, body) {
  const init = { method, credentials: "same-origin", headers: { "X-PinkyBrain-CSRF": csrf } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  if (!response.ok) {
    let detail = `${response.status}`;
    try { const data = await response.json(); detail = data.detail || data.error || detail; } catch { /* not JSON */ }
    throw new Error(detail);
  }
  return response;
}

export const getJSON = async (path) => (await api("GET", path)).json();

export function confirmDialog(text) {
  const dialog = document.getElementById("confirm");
  document.getElementById("confirm-text").textContent = text;
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
    dialog.showModal();
    document.getElementById("confirm-ok").focus();
  });
}

function setupTabs() {
  const tabs = [...document.querySelectorAll('[role="tab"]')];
  const select = (tab) => {
    tabs.forEach((other) => {
      const on = other === tab;
      other.setAttribute("aria-selected", String(on));
      other.tabIndex = on ? 0 : -1;
      document.getElementById(other.getAttribute("aria-controls")).hidden = !on;
    });
    panels.opened(tab.id.replace("tab-", ""));
  };
  tabs.forEach((tab, i) => {
    tab.addEventListener("click", () => select(tab));
    tab.addEventListener("keydown", (event) => {
      const step = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
      if (step) { const next = tabs[(i + step + tabs.length) % tabs.length]; next.focus(); select(next); }
    });
  });
  select(tabs[0]);
}

function setupTheme() {
  const saved = localStorage.getItem("pb-theme");
  if (saved) document.documentElement.dataset.theme = saved;
  document.getElementById("theme").addEventListener("click", () => {
    const dark = (document.documentElement.dataset.theme
      || (matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light")) === "dark";
    document.documentElement.dataset.theme = dark ? "light" : "dark";
    localStorage.setItem("pb-theme", document.documentElement.dataset.theme);
  });
}

function live() {
  const pill = document.getElementById("conn");
  const source = new EventSource("/dashboard/live");
  source.addEventListener("open", () => { pill.textContent = t("live.on"); pill.className = "pill ok"; });
  source.addEventListener("error", () => { pill.textContent = t("live.off"); pill.className = "pill warn"; });
  source.addEventListener("snapshot", (event) => panels.snapshot(JSON.parse(event.data)));
  source.addEventListener("logout", () => location.reload());
}

async function main() {
  await loadCatalog(navigator.language?.split("-")[0]);
  translatePage();
  setupTheme();
  panels.setup();
  setupTabs();
  document.getElementById("logout").addEventListener("click", async () => {
    await fetch("/dashboard/logout", { method: "POST", credentials: "same-origin", headers: { "X-PinkyBrain-CSRF": csrf } });
    location.reload();
  });
  live();
}

main();
