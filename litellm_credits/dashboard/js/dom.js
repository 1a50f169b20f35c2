// Small DOM helpers. Data always goes in as text (textContent), never as HTML.

export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") el.className = value;
    else if (name === "dataset") Object.assign(el.dataset, value);
    else if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

// A decimal string from the API, trimmed to at least two places; never parsed to a float.
export function credits(value) {
  if (value === null || value === undefined) return "—";
  const text = String(value);
  const match = /^(-?\d+)(?:\.(\d*?))?0*$/.exec(text);
  if (!match) return text;
  const [, whole, frac = ""] = match;
  const grouped = whole.replace(/\B(?=(\d{3})+(?!\d))/g, ",");
  return `${grouped}.${frac.padEnd(2, "0")}`;
}

// The sum of decimal strings (up to six places), exactly: in BigInt micro-credits, never floats.
export function sum(values) {
  let total = 0n;
  for (const v of values) {
    const m = /^(-?)(\d+)(?:\.(\d{0,6}))?$/.exec(String(v));
    if (!m) continue;
    const micro = BigInt(m[2]) * 1000000n + BigInt((m[3] || "").padEnd(6, "0"));
    total += m[1] ? -micro : micro;
  }
  const sign = total < 0n ? "-" : "";
  const abs = total < 0n ? -total : total;
  return `${sign}${abs / 1000000n}.${String(abs % 1000000n).padStart(6, "0")}`;
}

export function amount(value) {
  return h("span", { class: String(value).startsWith("-") ? "neg" : "pos", dataset: { raw: value } }, credits(value));
}

export function when(iso, withTime = true) {
  if (!iso) return "—";
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return iso;
  const opts = withTime
    ? { year: "numeric", month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", timeZone: "UTC" }
    : { year: "numeric", month: "short", day: "numeric", timeZone: "UTC" };
  return d.toLocaleString("en-GB", opts) + (withTime ? " UTC" : "");
}

export function card(label, value, { id, note, raw, meter } = {}) {
  const el = h("div", { class: "card", id },
    h("div", { class: "label" }, label),
    h("div", { class: "value", dataset: raw === undefined ? undefined : { raw } }, value),
    note ? h("div", { class: "note" }, note) : null);
  if (meter !== undefined) {
    const fill = h("span");
    fill.style.width = `${Math.min(100, Math.max(0, meter * 100)).toFixed(1)}%`;
    el.append(h("div", { class: meter >= 1 ? "meter over" : "meter", role: "presentation" }, fill));
  }
  return el;
}

export function panel(title, ...children) {
  return h("section", { class: "panel", "aria-label": title }, h("h2", {}, title), ...children);
}

// columns: [{label, cell(row) -> node|string, num?, wrap?, hideSm?}]
export function table(columns, rows, { caption, empty = "Nothing here yet." } = {}) {
  if (!rows.length) return h("p", { class: "empty" }, empty);
  const cls = (c) => [c.num ? "num" : "", c.wrap ? "wrap" : "", c.nowrap ? "nowrap" : "", c.hideSm ? "hide-sm" : ""]
    .join(" ").trim() || undefined;
  return h("div", { class: "table-wrap" },
    h("table", {},
      caption ? h("caption", { class: "muted" }, caption) : null,
      h("thead", {}, h("tr", {}, columns.map((c) => h("th", { scope: "col", class: cls(c) }, c.label)))),
      h("tbody", {}, rows.map((r) => h("tr", {}, columns.map((c) => h("td", { class: cls(c) }, c.cell(r))))))));
}

export function bar(fraction) {
  const fill = h("span");
  fill.style.width = `${Math.min(100, Math.max(0, fraction * 100)).toFixed(1)}%`;
  return h("div", { class: "bar", role: "presentation" }, fill);
}

export function field(label, input) {
  if (!input.id) input.id = `f-${Math.random().toString(36).slice(2, 9)}`;
  return h("div", { class: "field" }, h("label", { for: input.id }, label), input);
}

export function select(name, options, value) {
  return h("select", { name }, options.map(([v, label]) => h("option", { value: v, selected: v === value }, label)));
}

export function setStatus(message, isError = false) {
  const el = document.getElementById("status");
  el.textContent = message || "";
  el.classList.toggle("error", Boolean(isError));
}

const confirmDialog = () => document.getElementById("confirm");

// A modal confirmation; resolves true when confirmed.
export function confirmAction(title, text, okLabel = "Confirm") {
  const dialog = confirmDialog();
  dialog.querySelector("#confirm-title").textContent = title;
  dialog.querySelector("#confirm-text").textContent = text;
  dialog.querySelector("#confirm-ok").textContent = okLabel;
  dialog.returnValue = "";
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
    dialog.showModal();
    dialog.querySelector("#confirm-cancel").focus();
  });
}
