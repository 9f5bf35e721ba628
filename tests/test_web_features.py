"""The dashboard as its users expect (issue 14), over HTTP: sessions that survive a restart, the
reveal as post-redirect-get, users search, the audit log's actor and pages, tenant sizes and a
VM's page, banners for missing parts, the favicon.

A real service on a real nats-server behind it; aiohttp's test client. The browser's view of the
same (layout at 390 px, stale states live) is tests/test_web_browser.py.
"""

from __future__ import annotations

import html
import re
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer
from nats.aio.client import Client

from hero_deployer.sdk.client import HeroDeployerClient
from hero_deployer.web import create_app
from hero_deployer.web.sessions import COOKIE_NAME, KEY_FILE, REVOKED_FILE, SessionStore
from tests.conftest import TOKEN, Service
from tests.fakes.forgejo import FakeForgejo
from tests.helpers import wait_for_event
from tests.test_users_e2e import Users, forge_settings, users_service
from tests.test_web_app import csrf_of, login, tenant

Web = TestClient[Any, Any]


@asynccontextmanager
async def dashboard(client: HeroDeployerClient, **options: Any) -> AsyncIterator[Web]:
    async with TestClient(TestServer(create_app(client, token=TOKEN, **options))) as web:
        yield web


@pytest_asyncio.fixture
async def web(service: Service) -> AsyncIterator[Web]:
    async with dashboard(service.client) as client:
        yield client


@pytest_asyncio.fixture
async def with_forge(tmp_path: Path, nc: Client) -> AsyncIterator[tuple[Users, Web]]:
    async with (
        FakeForgejo() as forge,
        users_service(tmp_path, nc, **forge_settings(forge)) as svc,
        dashboard(svc.client) as client,
    ):
        yield svc, client


def cookie_of(web: Web) -> str:
    return web.session.cookie_jar.filter_cookies(web.make_url("/"))[COOKIE_NAME].value


async def text(web: Web, path: str) -> str:
    response = await web.get(path)
    assert response.status == 200, path
    return await response.text()


# Sessions -----------------------------------------------------------------------------------


async def test_a_login_survives_a_restart_and_a_logout_ends_it_for_good(
    service: Service, tmp_path: Path
) -> None:
    state = tmp_path / "web-state"
    async with dashboard(service.client, state_dir=state) as first:
        await login(first)
        cookie = cookie_of(first)
    assert stat.S_IMODE((state / KEY_FILE).stat().st_mode) == 0o600
    headers = {"Cookie": f"{COOKIE_NAME}={cookie}"}
    async with dashboard(service.client, state_dir=state) as second:  # a restart
        page = await second.get("/users", headers=headers, allow_redirects=False)
        assert page.status == 200, "the operator is still logged in"
        csrf = re.search(r'name="csrf-token" content="([^"]+)"', await page.text())
        assert csrf is not None
        out = await second.post(
            "/logout", data={"csrf": csrf.group(1)}, headers=headers, allow_redirects=False
        )
        assert out.status == 303
    assert stat.S_IMODE((state / REVOKED_FILE).stat().st_mode) == 0o600
    async with dashboard(service.client, state_dir=state) as third:  # and another restart
        again = await third.get("/users", headers=headers, allow_redirects=False)
        assert again.status == 302, "a logged-out cookie stays revoked"
    async with dashboard(service.client, state_dir=tmp_path / "other") as stranger:
        foreign = await stranger.get("/users", headers=headers, allow_redirects=False)
        assert foreign.status == 302, "another key does not accept the cookie"


def test_a_session_store_shows_no_session_id_csrf_token_or_key_in_its_repr() -> None:
    store = SessionStore()
    session = store.create(operator=True)
    shown = repr(store)
    assert session.id.split(".")[0] not in shown and session.csrf not in shown
    assert store._key.hex() not in shown and repr(store._key) not in shown


def test_signed_sessions_expire_and_refuse_tampering(tmp_path: Path) -> None:
    now = [1_000_000.0]
    store = SessionStore(max_age=100, clock=lambda: now[0], state_dir=tmp_path)
    session = store.create(operator=True)
    nonce, issued, mac = session.id.split(".")
    restarted = SessionStore(max_age=100, clock=lambda: now[0], state_dir=tmp_path)
    restored = restarted.get(session.id)
    assert restored is not None and restored.operator
    assert restored.csrf == session.csrf and restored.label == session.label
    assert restarted.get(f"{nonce}.{int(issued) + 50}.{mac}") is None, "a changed issue time"
    assert restarted.get(f"{nonce}.{issued}.{'A' * 43}") is None, "a forged signature"
    now[0] += 101
    assert (
        SessionStore(max_age=100, clock=lambda: now[0], state_dir=tmp_path).get(session.id) is None
    ), "past its maximum age"
    assert len(session.label) == 6 and session.label not in session.id  # opaque, not the cookie


# The initial password, once ----------------------------------------------------------------


async def test_reveal_is_post_redirect_get_and_shown_once(with_forge: tuple[Users, Web]) -> None:
    svc, web = with_forge
    await svc.client.provision_user("alice")
    await wait_for_event(svc.client, "user:alice", "ProvisioningCompleted", timeout=60)
    await login(web)
    page = await text(web, "/users/alice")
    assert "Reveal initial password" in page
    csrf = await csrf_of(web, "/users/alice")
    posted = await web.post("/users/alice/reveal", data={"csrf": csrf}, allow_redirects=False)
    assert posted.status == 303 and posted.headers["Location"] == "/users/alice"
    assert "initial-password" not in await posted.text(), "the POST's answer holds no password"
    shown = await text(web, "/users/alice")
    password = re.search(r'id="initial-password">([^<]+)<', shown)
    assert password is not None
    reloaded = await text(web, "/users/alice")
    assert "initial-password" not in reloaded and password.group(1) not in reloaded
    assert "Reveal initial password" not in reloaded, "nothing left to reveal"
    assert "revealed and destroyed" in reloaded
    events = await svc.client.events(stream="user:alice", limit=1000)
    assert [e.type for e in events.events].count("InitialPasswordRevealed") == 1


# Users --------------------------------------------------------------------------------------


async def test_the_users_list_searches_and_filters_by_status(
    with_forge: tuple[Users, Web],
) -> None:
    svc, web = with_forge
    await svc.client.provision_user("alice", display_name="Alice Example")
    await svc.client.provision_user("bob", forge_email="bob@example.org")
    await wait_for_event(svc.client, "user:alice", "ProvisioningCompleted", timeout=60)
    await wait_for_event(svc.client, "user:bob", "ProvisioningCompleted", timeout=60)
    await svc.client.decommission_user("bob")
    await login(web)

    def listed(page: str) -> list[str]:
        return re.findall(r'<tr data-user="([^"]+)"', page)

    assert sorted(listed(await text(web, "/users"))) == ["alice", "bob"]
    assert listed(await text(web, "/users?q=EXAMPLE.ORG")) == ["bob"]
    assert listed(await text(web, "/users?q=alice+ex")) == ["alice"]
    assert listed(await text(web, "/users?status=ready")) == ["alice"]
    assert listed(await text(web, "/users?status=ready&q=bob")) == []
    assert "No user matches this search." in await text(web, "/users?q=nobody")
    assert "1 of 2 users." in await text(web, "/users?status=ready")
    # The live refresh keeps the filter; an unknown status is no filter.
    await wait_for_event(svc.client, "user:bob", "UserDecommissioned", timeout=60)
    assert listed(await text(web, "/users/_rows?q=&status=decommissioned")) == ["bob"]
    assert sorted(listed(await text(web, "/users?status=bogus"))) == ["alice", "bob"]


# Audit ----------------------------------------------------------------------------------------


async def test_the_audit_log_names_the_actor_and_request_of_each_command(
    web: Web, service: Service
) -> None:
    deployed = await tenant(web, "/tenant/api/deploy", {"secret": "s", "name": "mine"})
    sid = (await deployed.json())["sid"]
    await service.client.with_actor("cli bob@box").deploy_vm(name="theirs", secret="s")
    await wait_for_event(service.client, f"vm:{sid}", "VmDeployed")
    await login(web)
    page = await text(web, f"/audit?stream=vm:{sid}")
    rows = re.findall(r'<tr data-position="\d+">(.*?)</tr>', page, re.S)
    by_type = {re.search(r'data-label="Type">(\w+)<', r).group(1): r for r in rows}  # type: ignore[union-attr]
    requested = by_type["VmDeployRequested"]
    assert re.search(r'class="who">dashboard tenant-[\w-]{6}<', requested)
    assert re.search(r'class="request-id"[^>]*>[^<]+<', requested)
    assert 'class="who">hero-deployer<' in by_type["VmDeployed"], "the service's own outcome"
    assert "<dt>name</dt><dd>mine</dd>" in requested, "data as key/value pairs"
    everything = await text(web, "/audit")
    assert 'class="who">cli bob@box<' in everything
    assert cookie_of(web) not in everything and TOKEN not in everything
    # An operator's command carries the session's label, never its cookie.
    csrf = await csrf_of(web, "/users")
    await web.post("/users", data={"csrf": csrf, "username": "carol"}, allow_redirects=False)
    carol = await text(web, "/audit?stream=user:carol&type=ProvisioningRequested")
    label = re.search(r'class="who">dashboard (op-[\w-]{6})<', carol)
    assert label is not None
    assert label.group(1)[3:] not in cookie_of(web)


async def test_the_audit_log_pages_through_the_log(web: Web, service: Service) -> None:
    for n in range(7):
        await service.client.deploy_vm(name=f"vm{n}", secret="s")
    for vm in await service.client.list_vms("s"):
        await wait_for_event(service.client, f"vm:{vm.sid}", "VmDeployed")
    head = (await service.client.health()).position
    await login(web)
    newest = await text(web, "/audit?limit=5")
    positions = [int(p) for p in re.findall(r'<tr data-position="(\d+)"', newest)]
    assert positions == list(range(head, head - 5, -1)), "the newest page, newest first"
    earlier = re.search(r'href="(/audit\?after=\d+[^"]*)" id="earlier"', newest)
    assert earlier is not None
    before = await text(web, html.unescape(earlier.group(1)))
    older = [int(p) for p in re.findall(r'<tr data-position="(\d+)"', before)]
    assert older == list(range(head - 5, head - 10, -1))
    assert 'id="later"' in before
    assert "Live tail" not in before and "Live tail" in newest


# Tenants ------------------------------------------------------------------------------------


async def test_a_tenant_chooses_the_size_within_the_core_limits(web: Web, service: Service) -> None:
    page = await text(web, "/tenant")
    for name, low, high in (
        ("cpu_count", 1, 64),
        ("memory_gb", 1, 1024),
        ("disk_gb", 1, 10240),
        ("rootfs_gb", 1, 1024),
    ):
        field = re.search(rf'<input name="{name}"[^>]*>', page)
        assert field is not None, name
        assert f'min="{low}"' in field.group(0) and f'max="{high}"' in field.group(0)
    body = {"secret": "s", "name": "small", "cpu_count": 2, "memory_gb": 4, "disk_gb": 50}
    deployed = await tenant(web, "/tenant/api/deploy", {**body, "rootfs_gb": 8})
    assert deployed.status == 200
    vm = (await service.client.list_vms("s"))[0]
    assert (vm.cpu_count, vm.memory_gb, vm.disk_gb, vm.rootfs_gb) == (2, 4, 50, 8)
    await wait_for_event(service.client, f"vm:{vm.sid}", "VmDeployed")  # nothing else follows
    before = (await service.client.health()).position
    too_big = await tenant(web, "/tenant/api/deploy", {**body, "cpu_count": 65})
    assert too_big.status == 400
    assert "cpu_count" in (await too_big.json())["error"]["message"]
    assert (await service.client.health()).position == before


async def test_a_tenant_vm_page_says_how_to_reach_it(web: Web, service: Service) -> None:
    deployed = await tenant(web, "/tenant/api/deploy", {"secret": "s", "name": "reach"})
    sid = (await deployed.json())["sid"]
    await wait_for_event(service.client, f"vm:{sid}", "VmDeployed")
    page = await text(web, f"/tenant/vms/{sid}")
    assert 'id="vm-ssh"' in page and f'data-sid="{sid}"' in page
    got = await tenant(web, "/tenant/api/vm", {"secret": "s", "sid": sid})
    vm = await got.json()
    assert vm["mycelium_ip"] and vm["ssh_command"] == f"ssh root@{vm['mycelium_ip']}"
    wrong = await tenant(web, "/tenant/api/vm", {"secret": "not-mine", "sid": sid})
    assert wrong.status == 404
    await service.client.delete_vm(sid, "s")
    await wait_for_event(service.client, f"vm:{sid}", "VmDeleted")
    gone = await (await tenant(web, "/tenant/api/vm", {"secret": "s", "sid": sid})).json()
    assert gone["status"] == "deleted" and gone["ssh_command"] == ""
    assert (await web.get("/tenant/vms/a%0Ab")).status == 404


# Banners and the favicon --------------------------------------------------------------------


async def test_operators_see_a_banner_for_each_missing_part(web: Web) -> None:
    assert "data-part=" not in await text(web, "/tenant"), "tenants are not told"
    await login(web)
    for path in ("/users", "/audit"):
        page = await text(web, path)
        assert re.findall(r'data-part="(\w+)"', page) == ["forge"], path
        assert "No Forge is configured" in page


async def test_operators_see_no_banner_when_every_part_is_there(
    with_forge: tuple[Users, Web],
) -> None:
    _, web = with_forge
    await login(web)
    assert "data-part=" not in await text(web, "/users")


async def test_the_favicon_is_served(web: Web) -> None:
    icon = await web.get("/favicon.ico")
    assert icon.status == 200 and icon.content_type == "image/svg+xml"
    assert b"<svg" in await icon.read()
    assert '<link rel="icon" href="/static/favicon.svg"' in await text(web, "/login")
