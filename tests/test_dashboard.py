"""The web dashboard at /credits/: its static serving, and, in a real Chromium against the real
proxy, what a user and an admin see (figures equal to the API's, charts drawn, data shown as text,
no CSP violation, usable at 375 px). Screenshots go to test-artifacts/screenshots/; with
CREDITS_UPDATE_SCREENSHOTS=1 the user and admin ones also replace docs/images/ (the README's), so
an ordinary run leaves the checkout as it found it."""

from __future__ import annotations

import http.client
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import openai
import pytest

from litellm_credits.dashboard import CSP, load_assets

from .conftest import ROOT, Proxy

pytestmark = pytest.mark.proxy

CHROMIUM = os.environ.get("CREDITS_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SHOTS = ROOT / "test-artifacts" / "screenshots"
DOCS_IMAGES = ROOT / "docs" / "images"
XSS = "<img src=x onerror=window.__xss=1>"
WATCH_CSP = (
    "window.__csp = [];"
    "document.addEventListener('securitypolicyviolation',"
    " e => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));"
)
TIMEOUT_MS = 30_000


def shown(value: str) -> str:
    """A decimal string as the dashboard shows it: grouped, at least two places."""
    whole, _, frac = value.partition(".")
    frac = frac.rstrip("0").ljust(2, "0")
    sign = "-" if whole.startswith("-") else ""
    return f"{sign}{int(whole.lstrip('-')):,}.{frac}"


# -- static serving ----------------------------------------------------------------------------


def raw_get(proxy: Proxy, path: str) -> tuple[int, str]:
    """GET with the path sent exactly as written (httpx would resolve the dot segments)."""
    url = urlsplit(proxy.url)
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode("utf-8", "replace")
    finally:
        conn.close()


def test_dashboard_files_are_served_safely(proxy: Proxy) -> None:
    with httpx.Client(base_url=proxy.url, timeout=30) as c:
        r = c.get("/credits")
        assert r.status_code == 308 and r.headers["location"] == "/credits/"
        page = c.get("/credits/")
        assert page.status_code == 200
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        assert page.headers["content-security-policy"] == CSP
        assert page.headers["x-frame-options"] == "DENY"
        assert '<script type="module" src="js/app.js">' in page.text
        assert "<style" not in page.text and " style=" not in page.text
        types = {
            "/credits/js/app.js": "text/javascript; charset=utf-8",
            "/credits/css/dashboard.css": "text/css; charset=utf-8",
            "/credits/vendor/uPlot.esm.js": "text/javascript; charset=utf-8",
        }
        for path, content_type in types.items():
            r = c.get(path)
            assert r.status_code == 200 and r.headers["content-type"] == content_type, path
            assert r.headers["x-content-type-options"] == "nosniff"
            again = c.get(path, headers={"If-None-Match": r.headers["etag"]})
            assert again.status_code == 304 and again.content == b""
        assert c.head("/credits/js/app.js").status_code == 200
        for path in ("/credits/nope.js", "/credits/__init__.py", "/credits/vendor/VENDORED.md",
                     "/credits/js/", "/credits/%2e%2e/__init__.py", "/credits/..%2f__init__.py",
                     "/credits/js/..%2F..%2Fproxy.py", "/credits/%00"):  # fmt: skip
            r = c.get(path)
            assert r.status_code == 404, (path, r.status_code)
        assert c.post("/credits/", json={}).status_code == 405
    for path in ("/credits/../__init__.py", "/credits/../../pyproject.toml", "/credits/js/../../proxy.py",
                 "/credits/..", "/credits//etc/passwd", "/credits/js/%2e%2e/%2e%2e/db.py"):  # fmt: skip
        status, body = raw_get(proxy, path)
        assert status in (404, 400), (path, status)
        assert "import" not in body


def test_only_shipped_assets_are_servable() -> None:
    names = set(load_assets())
    assert {"index.html", "js/app.js", "css/dashboard.css", "vendor/uPlot.esm.js"} <= names
    assert not [n for n in names if n.endswith((".py", ".md", ".pyc")) or ".." in n]


# -- in the browser ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    required = os.environ.get("CREDITS_REQUIRE_BROWSER") == "1"
    if not Path(CHROMIUM).exists():
        if required:
            pytest.fail(f"CREDITS_REQUIRE_BROWSER=1 but there is no Chromium at {CHROMIUM}")
        pytest.skip(f"no Chromium at {CHROMIUM} (set CREDITS_CHROMIUM, or CREDITS_REQUIRE_BROWSER=1 to fail)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if required:
            raise
        pytest.skip("Playwright for Python is not installed")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


class Session:
    """A page in its own browser context that records console errors and CSP violations."""

    def __init__(
        self, browser: Any, proxy: Proxy, *, width: int = 1280, height: int = 900, dark: bool = False
    ) -> None:
        self.proxy = proxy
        self.context = browser.new_context(
            viewport={"width": width, "height": height},
            color_scheme="dark" if dark else "light",
            accept_downloads=True,
        )
        self.context.set_default_timeout(TIMEOUT_MS)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.add_init_script(WATCH_CSP)

    def sign_in(self, key: str, role: str) -> Any:
        page = self.page
        page.goto(self.proxy.url + "/credits")
        assert page.url == self.proxy.url + "/credits/"
        page.get_by_label("API key").fill(key)
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_selector(f"body[data-ready={role}]")
        assert key not in page.url and self.context.cookies() == []
        assert page.evaluate("sessionStorage.getItem('credits.apiKey')") == key
        return page

    def raw(self, selector: str) -> str | None:
        return self.page.get_attribute(selector, "data-raw")

    def assert_clean(self) -> None:
        assert self.page.evaluate("window.__csp") == []
        # signing in asks an admin route first: a user key's 403 there is how the page knows
        assert [e for e in self.errors if "status of 403" not in e] == []
        assert self.page.evaluate("typeof window.__xss") == "undefined"

    def shot(self, name: str, docs: str | None = None) -> None:
        SHOTS.mkdir(parents=True, exist_ok=True)
        path = SHOTS / name
        self.page.screenshot(path=str(path), full_page=True)
        if docs and os.environ.get("CREDITS_UPDATE_SCREENSHOTS") == "1":
            DOCS_IMAGES.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, DOCS_IMAGES / docs)

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def session(browser: Any, proxy: Proxy) -> Iterator[Session]:
    s = Session(browser, proxy)
    yield s
    s.close()


def chat(proxy: Proxy, key: str, model: str, usage: str, **extra: Any) -> None:
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0) as oa:
        oa.chat.completions.create(
            model=model, messages=[{"role": "user", "content": usage}], max_tokens=1000, **extra
        )


@pytest.fixture(scope="module")
def customer(proxy: Proxy) -> tuple[str, str]:
    """An account with a cap, a grant that expires, a credit whose reason is HTML, and usage of
    two models at two power levels."""
    user, key = proxy.create_account("25", monthly_cap="100")
    expires = (datetime.now(timezone.utc) + timedelta(days=20)).replace(microsecond=0).isoformat()
    with proxy.admin() as admin:
        admin.patch(
            f"/api/v1/admin/credits/accounts/{user}", json={"display_name": "Dashboard Customer"}
        ).raise_for_status()
        admin.post(
            "/api/v1/admin/credits/allocate", json={"user_id": user, "amount": "3.5", "reason": XSS}
        ).raise_for_status()
        admin.post(
            "/api/v1/admin/credits/allocate",
            json={
                "user_id": user,
                "amount": "20",
                "type": "bonus",
                "reason": "welcome",
                "expires_at": expires,
            },
        ).raise_for_status()
    chat(proxy, key, "fake-custom", "usage=1000,1000")
    chat(proxy, key, "fake-gpt", "usage=2000,500", extra_body={"metadata": {"power_level": "eco"}})
    chat(proxy, key, "fake-custom", "usage=300,200", extra_body={"metadata": {"power_level": "precision"}})
    with httpx.Client(base_url=proxy.url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as me:
        deadline = time.monotonic() + 30
        while me.get("/api/v1/credits/transactions", params={"type": "usage"}).json()["total"] < 3:
            assert time.monotonic() < deadline, "usage was not settled"
            time.sleep(0.1)
    return user, key


def api(proxy: Proxy, key: str, path: str, **params: Any) -> Any:
    with httpx.Client(base_url=proxy.url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as c:
        r = c.get("/api/v1/" + path, params=params)
        r.raise_for_status()
        return r.json()


def test_user_dashboard(session: Session, proxy: Proxy, customer: tuple[str, str]) -> None:
    user, key = customer
    page = session.sign_in(key, "user")
    balance = api(proxy, key, "credits/balance")
    assert page.text_content("#subject") == user
    for card, field in (("balance", "balance"), ("available", "available"), ("held", "held"),
                        ("month", "month_spend")):  # fmt: skip
        assert session.raw(f"#card-{card} .value") == balance[field]
        assert page.text_content(f"#card-{card} .value") == shown(balance[field])
    month_note = page.text_content("#card-month .note") or ""
    assert "of 100.00" in month_note and "resets" in month_note
    assert session.raw("#card-expiry .value") == balance["grants"]["next_expiry"]["amount"]

    # usage by day, stacked by model: a drawn canvas, one series per model
    page.wait_for_selector("#usage-chart canvas")
    box = page.locator("#usage-chart canvas").bounding_box()
    assert box and box["width"] > 200 and box["height"] > 100
    assert page.locator("#usage-chart .u-legend .u-series").count() == 1 + 2  # x and two models
    by_model = api(proxy, key, "credits/usage/by-model")["items"]
    rows = page.locator("#by-model tbody tr")
    assert rows.count() == len(by_model) == 2
    assert {r["charged"] for r in by_model} == {
        session.page.get_attribute(f"#by-model tbody tr:nth-child({i + 1}) [data-raw]", "data-raw")
        for i in range(2)
    }
    assert page.locator("#by-level tbody tr").count() == 3
    assert page.locator("#grants tbody tr").count() >= 3  # opening, the HTML-reason credit, the bonus
    assert page.locator("#grants").get_by_text("never").count() >= 1

    # the HTML in a reason is text, and never ran
    tx = page.locator("#transactions")
    tx.get_by_text(XSS, exact=True).wait_for()
    assert page.locator("#transactions img").count() == 0
    total = api(proxy, key, "credits/transactions")["total"]
    assert page.text_content("#transactions .pager .muted") == f"1–{total} of {total}"

    # filters
    page.select_option("#transactions select[name=type]", "usage")
    page.locator("#transactions").get_by_role("button", name="Apply").click()
    page.locator("#transactions .pager .muted").filter(has_text="of 3").wait_for()
    assert page.locator("#transactions tbody tr").count() == 3

    # CSV export: fetched with the bearer header, downloaded from a Blob
    with page.expect_download() as download:
        page.locator("#transactions").get_by_role("button", name="Export CSV").click()
    lines = Path(download.value.path()).read_text().splitlines()
    assert lines[0].startswith("id,created_at,type,amount") and len(lines) == 1 + 3
    assert re.match(r"credits-\d{4}-\d{2}-\d{2}\.csv", download.value.suggested_filename)

    page.select_option("#transactions select[name=type]", "")
    page.locator("#transactions").get_by_role("button", name="Apply").click()
    page.locator("#transactions .pager .muted").filter(has_text=f"of {total}").wait_for()

    # a coupon
    code = "DASH" + secrets.token_hex(4).upper()
    with proxy.admin() as admin:
        admin.post(
            "/api/v1/admin/credits/coupons", json={"code": code, "type": "fixed", "value": "2"}
        ).raise_for_status()
    page.get_by_label("Coupon code").fill(code)
    page.get_by_role("button", name="Redeem").click()
    page.locator("#coupon-result").filter(has_text="2.00 credits added").wait_for()
    after = api(proxy, key, "credits/balance")["balance"]
    assert Decimal(after) == Decimal(balance["balance"]) + 2
    page.locator(f"#card-balance .value[data-raw='{after}']").wait_for()
    page.locator("#grants tbody tr").filter(has_text="coupon").wait_for()
    # the history shows the redemption without a reload
    page.locator("#transactions tbody tr").filter(has_text=f"coupon {code}").wait_for()
    page.locator("#transactions .pager .muted").filter(has_text=f"of {total + 1}").wait_for()
    page.evaluate("window.scrollTo(0, 0)")
    session.shot("user.png", docs="dashboard-user.png")
    session.assert_clean()

    page.get_by_role("button", name="Sign out").click()
    page.get_by_label("API key").wait_for()
    assert page.evaluate("sessionStorage.length") == 0


def test_user_dashboard_on_a_phone_in_dark_mode(
    browser: Any, proxy: Proxy, customer: tuple[str, str]
) -> None:
    for dark, name in ((False, "user-375.png"), (True, "user-375-dark.png")):
        s = Session(browser, proxy, width=375, height=812, dark=dark)
        try:
            page = s.sign_in(customer[1], "user")
            page.wait_for_selector("#usage-chart canvas")
            page.locator("#transactions tbody tr").first.wait_for()
            assert page.evaluate("document.documentElement.scrollWidth") <= 375
            canvas = page.locator("#usage-chart canvas").bounding_box()
            assert canvas and canvas["width"] <= 375
            background = page.evaluate("getComputedStyle(document.body).backgroundColor")
            assert (background == "rgb(15, 20, 27)") == dark, background
            # keyboard: signing in moves focus to the content; the header's sign-out is before it
            assert page.evaluate("document.activeElement.id") == "main"
            page.keyboard.press("Shift+Tab")
            assert page.evaluate("document.activeElement.id") == "signout"
            page.keyboard.press("Tab")
            assert page.evaluate("document.activeElement.name") == "days"
            s.shot(name)
            s.assert_clean()
        finally:
            s.close()


def test_a_wrong_key_is_refused(session: Session) -> None:
    page = session.page
    page.goto(session.proxy.url + "/credits/")
    page.get_by_label("API key").fill("sk-credits-not-a-key")
    page.get_by_role("button", name="Sign in").click()
    page.locator("#signin-error").filter(has_text="not accepted").wait_for()
    assert page.evaluate("sessionStorage.length") == 0
    # the policy is enforced, and the watcher the other tests rely on sees it
    page.evaluate(
        "() => { const s = document.createElement('script'); s.textContent = 'window.__inline = 1';"
        " document.body.append(s); document.body.setAttribute('style', 'color: red'); }"
    )
    page.wait_for_function("window.__csp.length >= 2")
    assert page.evaluate("typeof window.__inline") == "undefined"
    assert {v.split()[0] for v in page.evaluate("window.__csp")} >= {"script-src-elem", "style-src-attr"}


def test_transactions_are_paged(session: Session, proxy: Proxy) -> None:
    user, key = proxy.create_account("1")
    with proxy.admin() as admin:
        for i in range(21):
            admin.post(
                "/api/v1/admin/credits/allocate", json={"user_id": user, "amount": "0.5", "reason": f"r{i}"}
            ).raise_for_status()
    page = session.sign_in(key, "user")
    tx = page.locator("#transactions")
    info = tx.locator(".pager .muted")
    info.filter(has_text="1–20 of 22").wait_for()
    assert tx.get_by_role("button", name="Previous").is_disabled()
    tx.get_by_role("button", name="Next").click()
    info.filter(has_text="21–22 of 22").wait_for()
    assert tx.locator("tbody tr").count() == 2
    assert tx.get_by_role("button", name="Next").is_disabled()
    tx.get_by_role("button", name="Previous").click()
    info.filter(has_text="1–20 of 22").wait_for()
    assert tx.locator("tbody tr").first.get_by_text("r20").count() == 1  # newest first
    session.assert_clean()


def test_admin_dashboard(session: Session, proxy: Proxy, customer: tuple[str, str]) -> None:
    user, key = customer
    page = session.sign_in(proxy.master_key, "admin")
    system = api(proxy, proxy.master_key, "admin/credits/analytics/system", days=30)
    assert session.raw("#sys-charged .value") == system["charged"]
    assert session.raw("#sys-outstanding .value") == system["outstanding_balance"]
    assert session.raw("#sys-accounts .value") == str(system["accounts"])
    assert session.raw("#sys-requests .value") == str(system["requests"])
    added = sum((Decimal(v) for v in system["credited"].values()), Decimal(0))
    assert Decimal(session.raw("#sys-credited .value") or "") == added
    top = api(proxy, proxy.master_key, "admin/credits/analytics/top-spenders", days=30, limit=10)["items"]
    assert page.locator("#top-spenders tbody tr").count() == len(top) > 0
    page.wait_for_selector("#distribution-chart canvas")
    assert page.locator("#distribution tbody tr").count() >= 1

    # search finds the account by part of its name; open it
    page.fill("#account-search", "dashboard cust")
    page.get_by_role("search").get_by_role("button", name="Search").click()
    page.locator("#search-results caption").filter(has_text="1 found").wait_for()
    page.locator("#search-results").get_by_role("button", name=user).click()
    page.locator("#account-title").filter(has_text=user).wait_for()
    before = api(proxy, key, "credits/balance")["balance"]
    page.locator(f"#account #card-balance .value[data-raw='{before}']").wait_for()
    page.locator("#account #transactions").get_by_text(XSS, exact=True).wait_for()

    # allocate, with a confirmation: cancelling changes nothing
    page.fill("#allocate-amount", "7.25")
    page.fill("#allocate-reason", XSS)
    page.get_by_role("button", name="Allocate…").click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_text(f"Add 7.25 credits (allocation) to {user}?").wait_for()
    dialog.get_by_role("button", name="Cancel").click()
    assert api(proxy, key, "credits/balance")["balance"] == before
    page.get_by_role("button", name="Allocate…").click()
    dialog.get_by_role("button", name="Allocate").click()
    page.locator("#allocate-result").filter(has_text="Done").wait_for()
    after = api(proxy, key, "credits/balance")["balance"]
    assert Decimal(after) == Decimal(before) + Decimal("7.25")
    page.locator(f"#account #card-balance .value[data-raw='{after}']").wait_for()
    # the account's grants and history show the allocation too, and the result stays in view
    page.locator("#account #grants tbody tr").filter(has_text="7.25").wait_for()
    page.locator("#account #transactions tbody tr").filter(has_text="7.25").wait_for()
    assert page.locator("#account #transactions").get_by_text(XSS, exact=True).count() == 2
    page.locator("#allocate-result").filter(has_text="Done").wait_for()

    page.evaluate("window.scrollTo(0, 0)")
    session.shot("admin.png", docs="dashboard-admin.png")
    session.assert_clean()


def test_admin_dashboard_in_dark_mode(browser: Any, proxy: Proxy, customer: tuple[str, str]) -> None:
    s = Session(browser, proxy, dark=True)
    try:
        page = s.sign_in(proxy.master_key, "admin")
        page.wait_for_selector("#distribution-chart canvas")
        s.shot("admin-dark.png")
        s.assert_clean()
    finally:
        s.close()
