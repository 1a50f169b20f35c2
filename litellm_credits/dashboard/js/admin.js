// The admin view: system totals, top spenders, balance distribution, account search, one
// account's view, and allocating credits (after a confirmation).
import { accountView } from "./account.js";
import { ApiError, get, post } from "./api.js";
import { categoryStacked } from "./charts.js";
import { card, confirmAction, credits, field, h, panel, select, setStatus, sum, table } from "./dom.js";

export async function adminView(container) {
  const range = select("days", [["1", "Last 24 hours"], ["7", "Last 7 days"], ["30", "Last 30 days"], ["90", "Last 90 days"]], "30");
  const totals = h("div", { class: "cards", id: "system" });
  const spenders = h("div", { id: "top-spenders" });
  const dist = h("div", { class: "chart", id: "distribution-chart" });
  const distTable = h("div", { id: "distribution" });
  const account = h("div", { id: "account" });
  const search = searchPanel((id) => openAccount(account, id));
  container.replaceChildren(
    h("div", { class: "panel-head" }, h("h1", {}, "System"), field("Period", range)),
    totals,
    h("div", { class: "grid2" }, panel("Top spenders", spenders), panel("Balance distribution", dist, distTable)),
    search, account);
  const load = async () => {
    const days = range.value;
    const [sys, top] = await Promise.all([
      get("admin/credits/analytics/system", { days }), get("admin/credits/analytics/top-spenders", { days, limit: 10 })]);
    renderSystem(totals, sys);
    spenders.replaceChildren(table([
      { label: "#", num: true, cell: (s) => String(s.rank) },
      { label: "Account", wrap: true, cell: (s) => h("button", { type: "button", class: "link", onclick: () => openAccount(account, s.user_id) }, s.user_id) },
      { label: "Requests", num: true, cell: (s) => String(s.requests) },
      { label: "Charged", num: true, cell: (s) => credits(s.charged) },
    ], top.items, { empty: "No spending in this period." }));
  };
  range.addEventListener("change", () => load().catch(fail));
  await Promise.all([load(), distribution(dist, distTable)]);
}

function fail(e) {
  setStatus(e instanceof ApiError ? e.message : String(e), true);
}

function renderSystem(el, s) {
  const credited = Object.entries(s.credited || {});
  const added = sum(credited.map(([, v]) => v));
  el.replaceChildren(
    card("Requests", String(s.requests), { id: "sys-requests", raw: String(s.requests), note: `${s.succeeded} ok · ${s.failed} failed` }),
    card("Credits charged", credits(s.charged), { id: "sys-charged", raw: s.charged, note: `cost ${credits(s.cost)}` }),
    card("Credits added", credits(added), { id: "sys-credited", raw: added,
      note: credited.length ? credited.map(([t, v]) => `${t} ${credits(v)}`).join(" · ") : "none in the period" }),
    card("Outstanding balance", credits(s.outstanding_balance), { id: "sys-outstanding", raw: s.outstanding_balance, note: `held ${credits(s.held)}` }),
    card("Accounts", String(s.accounts), { id: "sys-accounts", raw: String(s.accounts), note: `${s.active_accounts} with usage in the period · ${s.accounts_active} active` }),
  );
}

async function distribution(chart, tableEl) {
  const d = await get("admin/credits/analytics/distribution");
  if (!d.tiers.length) {
    chart.replaceChildren(h("p", { class: "empty" }, "No accounts yet."));
    return;
  }
  const ranges = d.tiers[0].histogram.map((b) => b.range);
  categoryStacked(chart, ranges, d.tiers.map((t) => t.tier), d.tiers.map((t) => t.histogram.map((b) => b.accounts)), { unit: "accounts" });
  tableEl.replaceChildren(table([
    { label: "Tier", cell: (t) => t.tier },
    { label: "Accounts", num: true, cell: (t) => String(t.accounts) },
    { label: "Balance", num: true, cell: (t) => credits(t.balance) },
    { label: "Held", num: true, cell: (t) => credits(t.held) },
  ], d.tiers));
}

function searchPanel(open) {
  const text = h("input", { type: "search", name: "search", maxlength: 256, placeholder: "id or name", id: "account-search" });
  const status = select("status", [["", "Any status"], ["active", "active"], ["disabled", "disabled"]], "");
  const results = h("div", { id: "search-results" });
  const error = h("p", { class: "error", role: "alert" });
  const run = async (ev) => {
    ev?.preventDefault();
    error.textContent = "";
    try {
      const page = await get("admin/credits/accounts", { search: text.value.trim(), status: status.value, limit: 20 });
      results.replaceChildren(table([
        { label: "Account", wrap: true, cell: (a) => h("button", { type: "button", class: "link", onclick: () => open(a.user_id) }, a.user_id) },
        { label: "Name", wrap: true, hideSm: true, cell: (a) => a.display_name || "—" },
        { label: "Tier", cell: (a) => a.tier },
        { label: "Balance", num: true, cell: (a) => credits(a.balance) },
      ], page.items, { empty: "No account matches.", caption: `${page.total} found` }));
    } catch (e) {
      error.textContent = e instanceof ApiError ? e.message : String(e);
    }
  };
  run();
  return panel("Accounts",
    h("form", { class: "filters", role: "search", onsubmit: run }, field("Search", text), field("Status", status), h("button", { type: "submit" }, "Search")),
    error, results);
}

async function openAccount(el, userId) {
  setStatus("");
  const title = h("h1", { id: "account-title" }, "Account ", h("code", {}, userId));
  const body = h("div");
  el.replaceChildren(h("section", { "aria-labelledby": "account-title" }, title, body));
  title.scrollIntoView({ block: "start" });
  // After an allocation the whole view is drawn again (figures, grants, transactions), and the
  // allocation's result stays on top of it.
  let result = null;
  const render = () => accountView(body, {
    userId,
    actions: () => allocatePanel(userId, result, async (r) => {
      result = r;
      await render();
    }),
  });
  try {
    await render();
  } catch (e) {
    body.replaceChildren(h("p", { class: "error" }, e instanceof ApiError ? e.message : String(e)));
  }
}

function allocatePanel(userId, result, done) {
  const amount = h("input", { name: "amount", required: true, inputmode: "decimal", pattern: "\\d+(\\.\\d{1,6})?", placeholder: "10.00", id: "allocate-amount" });
  const reason = h("input", { name: "reason", maxlength: 500, id: "allocate-reason" });
  const type = select("type", [["allocation", "allocation"], ["bonus", "bonus"]], "allocation");
  const expires = h("input", { type: "date", name: "expires_at", id: "allocate-expires" });
  const message = h("p", { role: "status", id: "allocate-result", class: result ? "ok" : "" }, result || "");
  const submit = async (ev) => {
    ev.preventDefault();
    message.className = "";
    message.textContent = "";
    const what = `Add ${amount.value} credits (${type.value}) to ${userId}` + (expires.value ? `, expiring ${expires.value}` : "") + "?";
    if (!(await confirmAction("Allocate credits", what, "Allocate"))) return;
    const body = { user_id: userId, amount: amount.value.trim(), type: type.value };
    if (reason.value.trim()) body.reason = reason.value.trim();
    if (expires.value) body.expires_at = `${expires.value}T00:00:00Z`;
    try {
      const r = await post("admin/credits/allocate", body);
      await done(`Done: balance is now ${credits(r.balance)} (transaction ${r.transaction_id}).`);
    } catch (e) {
      message.className = "error";
      message.textContent = e instanceof ApiError ? e.message : String(e);
    }
  };
  return panel("Allocate credits",
    h("form", { class: "inline", id: "allocate", onsubmit: submit },
      field("Amount", amount), field("Type", type), field("Reason", reason), field("Expires (optional)", expires),
      h("button", { type: "submit" }, "Allocate…")),
    message);
}
