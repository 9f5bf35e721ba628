"""The dashboard in a real browser: Playwright driving Debian's Chromium against a real service.

Journeys of an operator (log in, provision and watch the steps live, reveal the password once,
decommission, the audit log's live tail) and of a tenant (deploy, stop, start, change the secret).
Screenshots of each main page go to test-output/screenshots/.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import playwright.async_api as playwright_api
import pytest_asyncio
from nats.aio.client import Client

from hero_deployer.web import web_server
from tests.conftest import TOKEN
from tests.fakes.forgejo import FakeForgejo
from tests.test_users_e2e import Users, forge_settings, users_service

expect = playwright_api.expect

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = Path(__file__).resolve().parents[1] / "test-output" / "screenshots"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LIVE = 30_000  # ms: how long a live update may take (provisioning runs real SSH)

# `make test` installs Debian's chromium; without it these tests fail rather than skip.
assert CHROMIUM.exists(), "the browser tests need /usr/bin/chromium: apt-get install chromium"


class Dashboard:
    def __init__(self, svc: Users, url: str, forge: FakeForgejo) -> None:
        self.svc = svc
        self.url = url
        self.forge = forge


@pytest_asyncio.fixture
async def dashboard(tmp_path: Path, nc: Client) -> AsyncIterator[Dashboard]:
    async with (
        FakeForgejo() as forge,
        users_service(tmp_path, nc, **forge_settings(forge)) as svc,
        web_server(svc.client, token=TOKEN, port=0) as url,
    ):
        yield Dashboard(svc, url, forge)


@pytest_asyncio.fixture
async def page(tmp_path: Path) -> AsyncIterator[Any]:
    async with playwright_api.async_playwright() as p:
        browser = await p.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS
        )
        context = await browser.new_context(viewport={"width": 1200, "height": 860})
        page = await context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.on(
            "console",
            lambda msg: errors.append(msg.text) if "Content Security Policy" in msg.text else None,
        )
        try:
            yield page
        finally:
            await browser.close()
        assert errors == [], f"script errors or CSP violations in the page: {errors}"


async def shot(page: Any, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


async def pattern_mismatches(page: Any, selector: str, values: list[str]) -> bool:
    """True when the input's `pattern` refuses every one of `values`, False when none."""
    verdicts = []
    for value in values:
        await page.fill(selector, value)
        verdicts.append(await page.eval_on_selector(selector, "el => el.validity.patternMismatch"))
    await page.fill(selector, "")
    assert len(set(verdicts)) == 1, f"mixed verdicts for {values}: {verdicts}"
    return bool(verdicts[0])


async def log_in(page: Any, url: str, then: str = "/users") -> None:
    await page.goto(url + then)
    await expect(page).to_have_url(re.compile(r"/login\?next="))
    await page.fill("#token", TOKEN)
    await page.click("button:has-text('Log in')")
    await expect(page).to_have_url(url + then)


async def test_operator_provisions_watches_live_reveals_once_and_decommissions(
    dashboard: Dashboard, page: Any
) -> None:
    url = dashboard.url
    # Without a session an operator page sends the browser to the login page.
    await page.goto(url + "/users")
    await expect(page).to_have_url(re.compile(r"/login\?next=%2Fusers|/login\?next=/users"))
    await shot(page, "login")
    await page.fill("#token", TOKEN)
    await page.click("button:has-text('Log in')")
    await expect(page).to_have_url(url + "/users")
    await expect(page.locator("#user-rows")).to_contain_text("No users yet")

    # The form's pattern is the core username rule, and Chromium compiles it (an invalid
    # pattern is ignored and would let everything through).
    assert await pattern_mismatches(page, "input[name=username]", ["-alice", "a__b", "al ice"])
    assert not await pattern_mismatches(page, "input[name=username]", ["alice", "a-b_c9"])

    # Provision through the form; the display name carries markup that must stay text.
    hostile = "<script>window.__xss = 1</script>Alice <b>A.</b>"
    await page.fill("input[name=username]", "alice")
    await page.fill("input[name=display_name]", hostile)
    await page.fill("input[name=email]", "alice@example.org")
    await page.click("button:has-text('Provision')")
    await expect(page).to_have_url(url + "/users/alice")
    await page.evaluate("window.__samePage = true")

    # The steps advance live, without a reload, to ready.
    await expect(page.locator("#user-status")).to_have_text("ready", timeout=LIVE)
    done = page.locator("ol.steps li[data-state=done]")
    await expect(done).to_have_count(9)
    assert await page.evaluate("window.__samePage === true"), "the page was reloaded"
    updates = int(await page.get_attribute("body", "data-live-updates") or "0")
    assert updates >= 2, "the page should have been updated step by step"
    timeline = page.locator("#timeline")
    await expect(timeline).to_contain_text("Verify health")
    await expect(timeline.locator("li.step .took").first).to_have_text(re.compile(r"\d"))
    await expect(page.locator("#display-name")).to_have_text(hostile)
    assert await page.evaluate("window.__xss === undefined")
    vm_sid = (await dashboard.svc.client.get_user("alice")).vm_sid
    await expect(page.locator("#vm-sid")).to_have_text(vm_sid)
    await expect(page.locator("#public-key")).to_contain_text("ssh-ed25519 ")
    await shot(page, "user")

    # The initial password is shown once; the second attempt says so in words.
    await page.click("button:has-text('Reveal initial password')")
    await page.click("#confirm-ok")
    password = dashboard.forge.users["alice"].password
    await expect(page.locator("#initial-password")).to_have_text(password)
    await page.click("button:has-text('Reveal initial password')")
    await page.click("#confirm-ok")
    await expect(page.locator("#password-error")).to_contain_text("already revealed")
    await expect(page.locator("#initial-password")).to_have_count(0)

    # The users table: escaped display name, status, gateway link.
    await page.goto(url + "/users")
    row = page.locator("tr[data-user=alice]")
    await expect(row).to_contain_text(hostile)
    await expect(row.locator(".badge")).to_have_text("ready")
    await expect(row.locator("a[target=_blank]")).to_have_attribute("href", re.compile("^http"))
    await shot(page, "users")

    # Decommission, with a confirmation, and watch it finish live.
    await page.goto(url + "/users/alice")
    await page.click("button:has-text('Decommission')")
    await expect(page.locator("#confirm-dialog")).to_be_visible()
    await page.click("#confirm-ok")
    await expect(page.locator("#user-status")).to_have_text("decommissioned", timeout=LIVE)
    await expect(page.locator("#timeline")).to_contain_text("Decommissioned")

    # The audit log follows new events live.
    await page.goto(url + "/audit")
    await expect(page.locator("#audit-rows")).to_contain_text("UserDecommissioned")
    await expect(page.locator("#live-dot")).to_be_visible()
    await dashboard.svc.client.deploy_vm(name="audit-probe", secret="probe")
    await expect(page.locator("#audit-rows tr.fresh").first).to_contain_text("vm:vm_")
    await shot(page, "audit")
    await page.goto(url + "/audit?stream=user:alice&type=ProvisioningCompleted")
    await expect(page.locator("#audit-rows tr")).to_have_count(1)

    await page.click("button:has-text('Log out')")
    await expect(page).to_have_url(url + "/login")
    await page.goto(url + "/audit")
    await expect(page).to_have_url(re.compile(r"/login\?next="))


async def test_tenant_deploys_stops_starts_and_changes_the_secret(
    dashboard: Dashboard, page: Any
) -> None:
    url = dashboard.url
    await page.goto(url + "/tenant")
    dialog = page.locator("#set-secret-dialog")
    await expect(dialog).to_be_visible()
    await page.fill("#set-secret-input", "tenant-secret-1")
    await page.click("#set-secret-save")
    await expect(dialog).to_be_hidden()
    await expect(page.locator("#vm-rows")).to_contain_text("No VMs for this secret yet")
    assert await page.evaluate("localStorage.getItem('hero-deployer.secret')") == "tenant-secret-1"

    assert await pattern_mismatches(page, "#vm-name", ["web 1", "web/1", "wéb"])
    assert not await pattern_mismatches(page, "#vm-name", ["web-1", "a.b_c"])
    await page.fill("#vm-name", "web-1")
    await page.click("#deploy-form button[type=submit]")
    row = page.locator("#vm-rows tr", has_text="web-1")
    await expect(row.locator(".badge")).to_have_text("running", timeout=LIVE)
    await row.locator("button[data-action=stop]").click()
    await expect(row.locator(".badge")).to_have_text("stopped", timeout=LIVE)
    await row.locator("button[data-action=start]").click()
    await expect(row.locator(".badge")).to_have_text("running", timeout=LIVE)
    await shot(page, "tenant")

    # A wrong current secret is refused in words; nothing changes.
    await page.click("#change-secret-open")
    await page.fill("#current-secret", "not-my-secret")
    await page.click("#change-secret-generate")
    await page.click("#change-secret-submit")
    await expect(page.locator("#change-secret-error")).to_have_text("Current secret is incorrect")
    assert await page.evaluate("localStorage.getItem('hero-deployer.secret')") == "tenant-secret-1"

    # The right one migrates the VM; the toast says so and localStorage holds the new secret.
    await page.fill("#current-secret", "tenant-secret-1")
    await page.click("#change-secret-generate")
    fresh = await page.input_value("#new-secret")
    assert len(fresh) == 43  # 32 random bytes, base64url
    await shot(page, "tenant-change-secret")
    await page.click("#change-secret-submit")
    await expect(page.locator("#toast")).to_have_text("✓ Secret updated — 1 VMs migrated")
    assert await page.evaluate("localStorage.getItem('hero-deployer.secret')") == fresh
    await expect(row.locator(".badge")).to_have_text("running")
    vms = await dashboard.svc.client.list_vms(fresh)
    assert [vm.name for vm in vms] == ["web-1"]
    assert await dashboard.svc.client.list_vms("tenant-secret-1") == []
    # No page of the operator side lists the tenant's VM.
    await page.goto(url + "/users")
    await expect(page).to_have_url(re.compile(r"/login"))


async def test_a_post_without_the_csrf_token_is_refused(dashboard: Dashboard) -> None:
    async with httpx.AsyncClient(base_url=dashboard.url) as http:
        page = await http.get("/login")
        assert page.status_code == 200 and "hd_session" in http.cookies
        login = await http.post("/login", data={"token": TOKEN})
        assert login.status_code == 403
        deploy = await http.post("/tenant/api/deploy", json={"secret": "s", "name": "x"})
        assert deploy.status_code == 403
        assert deploy.json()["error"]["code"] == "Forbidden"
        users = await http.get("/users")
        assert users.status_code == 302 and users.headers["location"].startswith("/login")
    assert await dashboard.svc.client.list_vms("s") == []
