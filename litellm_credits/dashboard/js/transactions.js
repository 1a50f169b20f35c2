// The transaction history: filters, paging, CSV export. For an admin, ``userId`` names the account.
import { ApiError, download, get } from "./api.js";
import { amount, credits, field, h, select, table, when } from "./dom.js";

const TYPES = ["allocation", "bonus", "refund", "usage", "coupon", "adjustment", "expiry", "topup"];
const PAGE = 20;

export function transactionsPanel({ userId } = {}) {
  const state = { offset: 0, total: 0 };
  const type = select("type", [["", "All types"], ...TYPES.map((t) => [t, t])], "");
  const from = h("input", { type: "date", name: "start_date" });
  const to = h("input", { type: "date", name: "end_date" });
  const body = h("div", { class: "tx-body" });
  const info = h("span", { class: "muted", "aria-live": "polite" });
  const prev = h("button", { type: "button", class: "secondary", onclick: () => go(state.offset - PAGE) }, "Previous");
  const next = h("button", { type: "button", class: "secondary", onclick: () => go(state.offset + PAGE) }, "Next");
  const error = h("p", { class: "error", role: "alert" });

  const filters = () => ({ type: type.value, start_date: from.value, end_date: to.value, user_id: userId });

  async function go(offset) {
    error.textContent = "";
    try {
      const page = await get("credits/transactions", { ...filters(), limit: PAGE, offset: Math.max(0, offset) });
      state.offset = page.offset;
      state.total = page.total;
      body.replaceChildren(render(page.items));
      const last = Math.min(page.offset + page.items.length, page.total);
      info.textContent = page.total ? `${page.offset + 1}–${last} of ${page.total}` : "";
      prev.disabled = page.offset === 0;
      next.disabled = last >= page.total;
    } catch (e) {
      error.textContent = e instanceof ApiError ? e.message : String(e);
    }
  }

  async function exportCsv() {
    error.textContent = "";
    try {
      await download("credits/transactions/export", { format: "csv", ...filters() }, "credits.csv");
    } catch (e) {
      error.textContent = e instanceof ApiError ? e.message : String(e);
    }
  }

  const form = h("form", { class: "filters", onsubmit: (ev) => { ev.preventDefault(); go(0); } },
    field("Type", type), field("From", from), field("To", to),
    h("button", { type: "submit" }, "Apply"),
    h("button", { type: "button", class: "secondary", onclick: exportCsv }, "Export CSV"));

  const el = h("section", { class: "panel", id: "transactions", "aria-label": "Transactions" },
    h("div", { class: "panel-head" }, h("h2", {}, "Transactions")),
    form, error, body, h("div", { class: "pager" }, info, prev, next));
  go(0);
  el.refresh = () => go(0); // after a change elsewhere on the page (a coupon redeemed)
  return el;
}

function render(items) {
  return table([
    { label: "When (UTC)", nowrap: true, cell: (t) => [when(t.created_at, false), h("div", { class: "muted" }, t.created_at.slice(11, 16))] },
    { label: "Type", cell: (t) => t.type },
    { label: "Amount", num: true, cell: (t) => amount(t.amount) },
    { label: "Balance", num: true, hideSm: true, cell: (t) => credits(t.balance_after) },
    { label: "Details", wrap: true, cell: (t) => details(t) },
  ], items, { empty: "No transactions match." });
}

function details(t) {
  const parts = [];
  if (t.description) parts.push(h("div", { class: "desc" }, t.description));
  if (t.model) {
    const tokens = t.prompt_tokens != null ? ` · ${t.prompt_tokens} in / ${t.completion_tokens ?? 0} out` : "";
    parts.push(h("div", { class: "muted" }, `${t.model}${t.power_level ? ` (${t.power_level})` : ""}${tokens}`));
  }
  return parts.length ? parts : "—";
}
