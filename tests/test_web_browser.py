"""The dashboard in a real browser: Playwright driving Debian's Chromium against a real service.

Journeys of an operator (log in, provision and watch the steps live, reveal the password once,
decommission and see it so, the audit log's live tail and actors) and of a tenant (deploy with a
size, stop, start, the VM's page, change the secret); every page at 1280 and 390 px wide without
sideways scrolling. Screenshots of every page at both widths go to test-output/screenshots/.
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

from core.registry import OPERATIONS
from hero_deployer.web import web_server
from tests.conftest import TOKEN
from tests.fakes.forgejo import FakeForgejo
from tests.helpers import wait_for_event
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


class Browser:
    """A Chromium whose pages report script errors and CSP violations into `errors`."""

    def __init__(self, browser: Any) -> None:
        self.browser = browser
        self.errors: list[str] = []

    async def page(self, width: int = 1200, height: int = 860) -> Any:
        context = await self.browser.new_context(viewport={"width": width, "height": height})
        page = await context.new_page()
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        page.on(
            "console",
            lambda msg: (
                self.errors.append(msg.text) if "Content Security Policy" in msg.text else None
            ),
        )
        return page


@pytest_asyncio.fixture
async def chromium() -> AsyncIterator[Browser]:
    async with playwright_api.async_playwright() as p:
        launched = await p.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS
        )
        browser = Browser(launched)
        try:
            yield browser
        finally:
            await launched.close()
        assert browser.errors == [], f"script errors or CSP violations: {browser.errors}"


@pytest_asyncio.fixture
async def page(chromium: Browser) -> Any:
    return await chromium.page()


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

    # The initial password is shown once, after a redirect; then the button is gone, and a
    # reload neither shows it nor asks the service again.
    await page.click("button:has-text('Reveal initial password')")
    await page.click("#confirm-ok")
    password = dashboard.forge.users["alice"].password
    await expect(page.locator("#initial-password")).to_have_text(password)
    await expect(page).to_have_url(url + "/users/alice")
    await expect(page.locator("button:has-text('Reveal initial password')")).to_have_count(0)
    await expect(page.locator("#password-state")).to_have_text("revealed and destroyed")
    await page.reload()
    await expect(page.locator("#user-status")).to_have_text("ready")
    await expect(page.locator("#initial-password")).to_have_count(0)
    assert password not in await page.content()
    revealed = await dashboard.svc.client.events(stream="user:alice", limit=1000)
    assert [e.type for e in revealed.events].count("InitialPasswordRevealed") == 1

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
    # Stale state shown as it is: no VM or gateway link, every step chip decommissioned.
    await expect(page.locator("#gateway a")).to_have_count(0)
    await expect(page.locator("#gateway")).to_have_text("deleted")
    await expect(page.locator("#vm-sid")).to_have_text("deleted")
    await expect(page.locator("ol.steps li[data-state=decommissioned]")).to_have_count(9)
    await expect(page.locator("ol.steps li[data-state=done]")).to_have_count(0)
    await page.goto(url + "/users")
    await expect(page.locator("tr[data-user=alice] a[target=_blank]")).to_have_count(0)

    # The audit log follows new events live.
    await page.goto(url + "/audit")
    await expect(page.locator("#audit-rows")).to_contain_text("UserDecommissioned")
    await expect(page.locator("#live-dot")).to_be_visible()
    await dashboard.svc.client.deploy_vm(name="audit-probe", secret="probe")
    await expect(page.locator("#audit-rows tr.fresh").first).to_contain_text("vm:vm_")
    probe = page.locator("#audit-rows tr.fresh", has_text="VmDeployRequested")
    await expect(probe.locator(".who")).to_have_text("sdk")
    # The operator's own commands carry this session's label.
    decommissioned = page.locator("#audit-rows tr", has_text="DecommissionRequested")
    await expect(decommissioned.locator(".who")).to_have_text(re.compile(r"^dashboard op-"))
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
    # The size inputs carry core's bounds, so the browser refuses what the service would.
    assert await page.eval_on_selector("#vm-cpu_count", "el => [el.min, el.max]") == ["1", "64"]
    await page.fill("#vm-cpu_count", "65")
    assert await page.eval_on_selector("#vm-cpu_count", "el => el.validity.rangeOverflow")
    await page.fill("#vm-name", "web-1")
    await page.fill("#vm-cpu_count", "2")
    await page.fill("#vm-memory_gb", "4")
    await page.click("#deploy-form button[type=submit]")
    row = page.locator("#vm-rows tr", has_text="web-1")
    await expect(row.locator(".badge")).to_have_text("running", timeout=LIVE)
    await expect(row).to_contain_text("2 CPU · 4 GB")
    vm = (await dashboard.svc.client.list_vms("tenant-secret-1"))[0]
    assert (vm.cpu_count, vm.memory_gb) == (2, 4)

    # The VM's page says how to reach it.
    await row.locator("a", has_text="web-1").click()
    await expect(page).to_have_url(f"{url}/tenant/vms/{vm.sid}")
    await expect(page.locator("#vm-status")).to_have_text("running")
    await expect(page.locator("#vm-ssh")).to_have_text(f"ssh root@{vm.mycelium_ip}")
    await expect(page.locator("#vm-address")).to_have_text(vm.mycelium_ip)
    await expect(page.locator("#vm-gateway")).to_contain_text("no public gateway")
    await page.go_back()
    row = page.locator("#vm-rows tr", has_text="web-1")
    await expect(row.locator(".badge")).to_have_text("running")
    stop = row.locator("button[data-action=stop]")  # labelled from the registry's row
    await expect(stop).to_have_text("Stop")
    await expect(stop).to_have_attribute("title", OPERATIONS["stop_vm"].summary)
    await stop.click()
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


# Layout at a laptop's and a phone's width ------------------------------------------------------

WIDTHS = (1280, 390)


async def sideways(page: Any) -> int:
    """How far the page scrolls sideways: 0 when nothing is wider than the window."""
    return int(await page.evaluate("document.documentElement.scrollWidth - window.innerWidth"))


async def fleet(svc: Users) -> str:
    """A ready user with long texts, a decommissioned one, and a tenant VM; returns its sid."""
    client = svc.client
    await client.provision_user(
        "alice",
        display_name="Alice " + "Averyveryverylongfamilyname" * 2,
        forge_email="alice.with.a.rather.long.address@example.org",
    )
    await client.provision_user("bob")
    await wait_for_event(client, "user:alice", "ProvisioningCompleted", timeout=60)
    await wait_for_event(client, "user:bob", "ProvisioningCompleted", timeout=60)
    await client.decommission_user("bob")
    await wait_for_event(client, "user:bob", "UserDecommissioned", timeout=60)
    vm = await client.deploy_vm(name="tenant-vm-" + "x" * 50, secret="tenant-secret")
    await wait_for_event(client, f"vm:{vm.sid}", "VmDeployed")
    return vm.sid


async def test_no_page_scrolls_sideways_at_1280_or_390_px(
    dashboard: Dashboard, chromium: Browser
) -> None:
    url = dashboard.url
    sid = await fleet(dashboard.svc)
    for width in WIDTHS:
        page = await chromium.page(width=width)
        seen: list[tuple[str, int]] = []

        async def check(name: str, path: str, ready: str) -> None:
            await page.goto(url + path)
            await expect(page.locator(ready).first).to_be_visible()
            seen.append((name, await sideways(page)))
            await shot(page, f"{name}-{width}")

        await check("login", "/login", "#token")
        await page.goto(url + "/tenant")
        await page.fill("#set-secret-input", "tenant-secret")
        await page.click("#set-secret-save")
        await check("tenant", "/tenant", "#vm-rows tr[data-sid] .badge.running")
        await check("tenant-vm", f"/tenant/vms/{sid}", "#vm-status.running")
        await check("not-found", "/no-such-page", "h1:has-text('Not found')")
        await log_in(page, url)
        await check("users", "/users", "tr[data-user=alice]")
        await check("users-search", "/users?q=alice&status=ready", "#users-count")
        await check("user", "/users/alice", "#user-status:has-text('ready')")
        await check("user-decommissioned", "/users/bob", "#gone-note")
        await check("audit", "/audit", "#audit-rows tr[data-position]")
        await check("audit-stream", "/audit?stream=user:alice&limit=50", "#audit-rows tr")
        await check("logout", "/logout", "button:has-text('Log out')")
        assert [name for name, over in seen if over > 0] == [], f"{width} px: {seen}"
        cards = await page.goto(url + "/users")
        assert cards is not None
        thead = page.locator("table.users thead")
        if width == 390:  # a phone: each row is a card, each cell labelled
            await expect(thead).to_be_hidden()
            label = await page.eval_on_selector(
                "tr[data-user=alice] td[data-label=Status]",
                "el => getComputedStyle(el, '::before').content",
            )
            assert label == '"Status"'
        else:
            await expect(thead).to_be_visible()
        await page.context.close()
