// One account's view: figures, usage charts and tables, grants, coupon, transactions.
// The signed-in user sees their own; an admin opens any account (``userId``).
import { ApiError, get, post } from "./api.js";
import { dailyStacked } from "./charts.js";
import { bar, card, credits, field, h, panel, select, setStatus, table, when } from "./dom.js";
import { transactionsPanel } from "./transactions.js";

const MAX_PAGES = 20; // of 1000 usage rows: the chart's input, enough for a month of heavy use

export async function accountView(container, { userId, coupons = false, actions } = {}) {
  const q = { user_id: userId };
  const account = await get("credits/balance", q);
  const figures = h("div", { class: "cards", id: "figures" });
  renderFigures(figures, account);
  const usage = h("div", { id: "usage" });
  const grants = h("div", { id: "grants" });
  const transactions = transactionsPanel({ userId });
  const refresh = () => Promise.all([grantsPanel(grants, q), transactions.refresh()]);
  container.replaceChildren(figures, actions ? actions(account, figures) : "", usage, grants,
    coupons ? couponPanel(figures, refresh) : "", transactions);
  await Promise.all([usagePanels(usage, q), grantsPanel(grants, q)]);
  return account;
}

export function renderFigures(el, a) {
  const cap = a.monthly_cap;
  const capNote = cap === null ? `no monthly cap · resets ${when(a.month_resets_at, false)}`
    : `of ${credits(cap)} · resets ${when(a.month_resets_at, false)}`;
  const capUse = cap === null || Number(cap) === 0 ? undefined : Number(a.month_spend) / Number(cap);
  const next = a.grants && a.grants.next_expiry;
  el.replaceChildren(
    card("Balance", credits(a.balance), { id: "card-balance", raw: a.balance, note: `tier ${a.tier} · ${a.status}` }),
    card("Available", credits(a.available), { id: "card-available", raw: a.available, note: "balance minus held" }),
    card("Held", credits(a.held), { id: "card-held", raw: a.held, note: "open requests' worst case" }),
    card("Spent this month", credits(a.month_spend), { id: "card-month", raw: a.month_spend, note: capNote, meter: capUse }),
    next ? card("Next expiry", credits(next.amount), { id: "card-expiry", raw: next.amount, note: `expires ${when(next.at)}` }) : null,
  );
}

async function usagePanels(el, q) {
  const range = select("days", [["7", "Last 7 days"], ["30", "Last 30 days"], ["90", "Last 90 days"]], "30");
  const chart = h("div", { class: "chart", id: "usage-chart" });
  const note = h("p", { class: "muted", id: "usage-note" });
  const byModel = h("div", { id: "by-model" });
  const byLevel = h("div", { id: "by-level" });
  const head = h("div", { class: "panel-head" }, h("h2", {}, "Usage by day"), field("Period", range));
  el.replaceChildren(
    h("section", { class: "panel", "aria-label": "Usage by day" }, head, note, chart),
    h("div", { class: "grid2" }, panel("By model", byModel), panel("By power level", byLevel)));
  const load = async () => {
    const days = Number(range.value);
    const p = { ...q, days };
    const [stats, models, levels] = await Promise.all([
      get("credits/usage/stats", p), get("credits/usage/by-model", p), get("credits/usage/by-power-level", p)]);
    note.textContent = `${stats.requests} requests · ${credits(stats.charged)} credits charged · `
      + `${stats.prompt_tokens + stats.completion_tokens} tokens`;
    byModel.replaceChildren(breakdown(models.items, "model"));
    byLevel.replaceChildren(breakdown(levels.items, "power_level"));
    await drawDaily(chart, q, stats);
  };
  range.addEventListener("change", () => load().catch((e) => setStatus(e.message, true)));
  await load();
}

function breakdown(items, key) {
  const top = Math.max(0, ...items.map((i) => Number(i.charged)));
  return table([
    { label: key === "model" ? "Model" : "Power level", wrap: true, cell: (i) => [i[key] ?? "—", bar(top ? Number(i.charged) / top : 0)] },
    { label: "Requests", num: true, cell: (i) => String(i.requests) },
    { label: "Tokens", num: true, hideSm: true, cell: (i) => String(i.prompt_tokens + i.completion_tokens) },
    { label: "Charged", num: true, cell: (i) => h("span", { dataset: { raw: i.charged } }, credits(i.charged)) },
  ], items, { empty: "No usage in this period." });
}

// Usage rows of the period, summed per day and model (floats: only for the chart's pixels).
async function drawDaily(el, q, stats) {
  const start = stats.start.slice(0, 10);
  const days = [];
  for (let d = new Date(`${start}T00:00:00Z`); d.toISOString().slice(0, 10) <= stats.end.slice(0, 10); d.setUTCDate(d.getUTCDate() + 1)) {
    days.push(d.toISOString().slice(0, 10));
  }
  const sums = new Map();
  let before;
  for (let i = 0; i < MAX_PAGES; i++) {
    const page = await get("credits/transactions", { ...q, type: "usage", start_date: stats.start, limit: 1000, before });
    for (const t of page.items) {
      const model = t.model || "other";
      if (!sums.has(model)) sums.set(model, new Map());
      const day = t.created_at.slice(0, 10);
      const m = sums.get(model);
      m.set(day, (m.get(day) || 0) - Number(t.amount));
    }
    if (!page.next_before) break;
    before = page.next_before;
  }
  if (!sums.size) {
    el.replaceChildren(h("p", { class: "empty" }, "No usage in this period."));
    return;
  }
  const models = [...sums.keys()].sort();
  const values = models.map((m) => days.map((d) => sums.get(m).get(d) || 0));
  dailyStacked(el, days, models, values);
}

async function grantsPanel(el, q) {
  const page = await get("credits/grants", { ...q, limit: 50 });
  if (!page.total) {
    el.replaceChildren();
    return;
  }
  el.replaceChildren(panel("Grants", table([
    { label: "Source", cell: (g) => `${g.source} · ${g.category}` },
    { label: "Amount", num: true, cell: (g) => credits(g.amount) },
    { label: "Remaining", num: true, cell: (g) => h("span", { dataset: { raw: g.remaining } }, credits(g.remaining)) },
    { label: "Expires", cell: (g) => (g.expires_at ? when(g.expires_at) : "never") },
    { label: "Status", cell: (g) => g.status },
  ], page.items)));
}

function couponPanel(figures, refresh) {
  const code = h("input", { name: "code", required: true, maxlength: 64, autocomplete: "off", spellcheck: "false" });
  const message = h("p", { role: "status", id: "coupon-result" });
  const submit = async (ev) => {
    ev.preventDefault();
    message.className = "";
    try {
      const r = await post("credits/coupons/redeem", { code: code.value.trim() });
      message.className = "ok";
      message.textContent = `Redeemed ${r.code}: ${credits(r.credited)} credits added.`;
      code.value = "";
      renderFigures(figures, await get("credits/balance"));
      await refresh();
    } catch (e) {
      message.className = "error";
      message.textContent = e instanceof ApiError ? e.message : String(e);
    }
  };
  return panel("Redeem a coupon",
    h("form", { class: "inline", onsubmit: submit }, field("Coupon code", code), h("button", { type: "submit" }, "Redeem")),
    message);
}
