// Entry point: sign in with an API key, then the admin or the user view.
import { adminView } from "./admin.js";
import { accountView } from "./account.js";
import { ApiError, get, session } from "./api.js";
import { setStatus } from "./dom.js";

const $ = (id) => document.getElementById(id);

// An admin key can read the admin routes; any other key gets a 401 or 403 there.
async function whoIs(key) {
  try {
    await get("admin/credits/accounts", { limit: 1 }, key);
    return { role: "admin" };
  } catch (e) {
    if (!(e instanceof ApiError) || (e.status !== 401 && e.status !== 403)) throw e;
  }
  const account = await get("credits/balance", {}, key);
  return { role: "user", subject: account.user_id };
}

function signedOut(message) {
  session.clear();
  $("who").hidden = true;
  $("view").replaceChildren();
  $("signin").hidden = false;
  $("signin-error").textContent = message || "";
  setStatus("");
  $("key").focus();
}

async function show() {
  const key = session.key;
  if (!key) return signedOut();
  setStatus("Loading…");
  let who;
  try {
    who = await whoIs(key);
  } catch (e) {
    return signedOut(e instanceof ApiError && e.status === 401 ? "This key was not accepted." : `Could not sign in: ${e.message}`);
  }
  $("signin").hidden = true;
  $("who").hidden = false;
  $("role").textContent = who.role;
  $("subject").textContent = who.subject || "";
  const view = $("view");
  view.dataset.role = who.role;
  $("main").focus();
  try {
    if (who.role === "admin") await adminView(view);
    else await accountView(view, { coupons: true });
    setStatus("");
    document.body.dataset.ready = who.role;
  } catch (e) {
    setStatus(e instanceof ApiError ? e.message : String(e), true);
  }
}

$("signin-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const key = $("key").value.trim();
  $("key").value = "";
  if (!key) return;
  session.set(key);
  show();
});
$("signout").addEventListener("click", () => signedOut());
show();
