// Message catalog: English ships; another language is one more JSON file with the same keys.
let messages = {};

export async function loadCatalog(lang) {
  const tryLang = async (code) => {
    const r = await fetch(`/dashboard/static/i18n/${code}.json`, { credentials: "same-origin" });
    return r.ok ? r.json() : null;
  };
  messages = (lang && lang !== "en" && (await tryLang(lang))) || (await tryLang("en")) || {};
}

export function t(key, vars = {}) {
  const text = messages[key] ?? key;
  return text.replace(/\{(\w+)\}/g, (_, name) => (name in vars ? String(vars[name]) : `{${name}}`));
}

export function translatePage(root = document) {
  root.querySelectorAll("[data-i18n]").forEach((el) => { el.textContent = t(el.dataset.i18n); });
  root.querySelectorAll("[data-i18n-label]").forEach((el) => { el.setAttribute("aria-label", t(el.dataset.i18nLabel)); });
}
