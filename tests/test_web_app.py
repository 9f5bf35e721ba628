"""The dashboard's HTTP edge without a browser: headers, sessions, CSRF, the tenant API, limits.

A real service on a real nats-server behind it (the `service` fixture); aiohttp's test client.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer

from hero_deployer.web import create_app
from hero_deployer.web.ratelimit import FailureLimiter, TenantLimiter
from hero_deployer.web.sessions import COOKIE_NAME, SessionStore
from tests.conftest import TOKEN, Service

CSRF_META = re.compile(r'<meta name="csrf-token" content="([^"]+)">')


@pytest_asyncio.fixture
async def web(service: Service) -> AsyncIterator[TestClient[Any, Any]]:
    limiter = TenantLimiter(per_secret=FailureLimiter(allowance=3, base_delay=30.0))
    app = create_app(service.client, token=TOKEN, tenant_limiter=limiter, sse_heartbeat=0.5)
    async with TestClient(TestServer(app)) as client:
        yield client


async def csrf_of(web: TestClient[Any, Any], path: str = "/login") -> str:
    response = await web.get(path)
    match = CSRF_META.search(await response.text())
    assert match, "every page carries the session's CSRF token"
    return match.group(1)


async def login(web: TestClient[Any, Any]) -> None:
    token = await csrf_of(web)
    response = await web.post(
        "/login", data={"token": TOKEN, "csrf": token, "next": "/users"}, allow_redirects=False
    )
    assert response.status == 303
    assert response.headers["Location"] == "/users"


async def tenant(web: TestClient[Any, Any], path: str, body: dict[str, Any]) -> ClientResponse:
    token = await csrf_of(web, "/tenant")
    return await web.post(path, json=body, headers={"X-CSRF-Token": token})


async def test_pages_carry_security_headers_and_no_store(web: TestClient[Any, Any]) -> None:
    response = await web.get("/login")
    assert response.status == 200
    csp = response.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "'unsafe-inline'" not in csp
    assert "frame-ancestors 'none'" in csp
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["Referrer-Policy"] == "same-origin"
    assert response.headers["Cache-Control"] == "no-store"
    cookie = response.headers["Set-Cookie"]
    assert cookie.startswith(f"{COOKIE_NAME}=")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    body = await response.text()
    assert "<script>" not in body and "onclick" not in body  # no inline scripts
    static = await web.get("/static/app.css")
    assert static.status == 200
    assert static.headers["X-Content-Type-Options"] == "nosniff"


async def test_operator_pages_redirect_to_login_without_a_session(
    web: TestClient[Any, Any],
) -> None:
    for path in ("/users", "/users/alice", "/audit"):
        response = await web.get(path, allow_redirects=False)
        assert response.status == 302, path
        assert response.headers["Location"].startswith("/login?next=")
    root = await web.get("/", allow_redirects=False)
    assert root.headers["Location"] == "/login"
    assert (await web.get("/live")).status == 401
    assert (await web.get("/users/_rows")).status == 401


async def test_login_rotates_the_session_and_logout_ends_it(web: TestClient[Any, Any]) -> None:
    await csrf_of(web)
    before = web.session.cookie_jar.filter_cookies(web.make_url("/"))[COOKIE_NAME].value
    await login(web)
    after = web.session.cookie_jar.filter_cookies(web.make_url("/"))[COOKIE_NAME].value
    assert after != before, "a fresh session id after login: no fixation"
    page = await web.get("/users")
    assert page.status == 200
    assert TOKEN not in await page.text(), "the token never reaches a page"

    csrf = await csrf_of(web, "/users")
    out = await web.post("/logout", data={"csrf": csrf}, allow_redirects=False)
    assert out.status == 303
    again = await web.get("/users", allow_redirects=False)
    assert again.status == 302


async def test_a_wrong_token_is_refused_in_words(web: TestClient[Any, Any]) -> None:
    csrf = await csrf_of(web)
    response = await web.post("/login", data={"token": "nope", "csrf": csrf})
    assert response.status == 401
    assert "That token is not right." in await response.text()
    assert (await web.get("/users", allow_redirects=False)).status == 302


async def test_state_changes_without_the_csrf_token_are_refused(
    web: TestClient[Any, Any], service: Service
) -> None:
    await csrf_of(web)
    assert (await web.post("/login", data={"token": TOKEN})).status == 403
    wrong = await web.post("/login", data={"token": TOKEN, "csrf": "forged"})
    assert wrong.status == 403
    await login(web)
    assert (await web.post("/users", data={"username": "mallory"})).status == 403
    assert (await web.post("/tenant/api/vms", json={"secret": "s"})).status == 403
    csrf = await csrf_of(web, "/users")
    cross = await web.post(
        "/tenant/api/vms",
        json={"secret": "s"},
        headers={"X-CSRF-Token": csrf, "Origin": "https://evil.example"},
    )
    assert cross.status == 403
    assert await service.client.list_users() == []


async def test_tenant_api_deploys_lists_acts_and_migrates(
    web: TestClient[Any, Any], service: Service
) -> None:
    deployed = await tenant(web, "/tenant/api/deploy", {"secret": "s1", "name": "web-1"})
    assert deployed.status == 200, await deployed.text()
    sid = (await deployed.json())["sid"]
    listed = await (await tenant(web, "/tenant/api/vms", {"secret": "s1"})).json()
    assert [vm["sid"] for vm in listed["vms"]] == [sid]
    assert (await tenant(web, "/tenant/api/vms", {"secret": "other"})).status == 200

    unknown = await tenant(web, "/tenant/api/vms", {"secret": "s1", "extra": 1})
    assert unknown.status == 400
    bad = await tenant(web, "/tenant/api/action", {"secret": "s1", "sid": sid, "action": "nuke"})
    assert bad.status == 400

    migrated = await tenant(web, "/tenant/api/migrate", {"old_secret": "s1", "new_secret": "s2"})
    assert await migrated.json() == {"migrated_count": 1, "failed_count": 0}
    vm = await service.client.get_vm(sid, "s2")
    assert vm.name == "web-1"


async def test_repeated_not_found_slows_the_client_down(web: TestClient[Any, Any]) -> None:
    body = {"old_secret": "guess", "new_secret": "x"}
    for _ in range(3):
        response = await tenant(web, "/tenant/api/migrate", body)
        assert response.status == 404
        assert (await response.json())["error"]["code"] == "NotFound"
    fourth = await tenant(web, "/tenant/api/migrate", body)
    assert fourth.status == 404  # over the allowance: this one still answers, then a block
    blocked = await tenant(web, "/tenant/api/migrate", body)
    assert blocked.status == 429
    assert int(blocked.headers["Retry-After"]) >= 1
    assert "try again" in (await blocked.json())["error"]["message"]


async def test_user_text_is_escaped(web: TestClient[Any, Any], service: Service) -> None:
    await service.client.provision_user("eve", display_name="<script>alert(1)</script>")
    await login(web)
    page = await (await web.get("/users")).text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<script>alert(1)" not in page


def test_failure_limiter_blocks_past_the_allowance_and_decays() -> None:
    now = [0.0]
    limiter = FailureLimiter(allowance=2, base_delay=1.0, decay=10.0, clock=lambda: now[0])
    limiter.failed("a")
    limiter.failed("a")
    assert limiter.retry_after("a") == 0
    limiter.failed("a")
    assert limiter.retry_after("a") == pytest.approx(1.0)
    limiter.failed("a")
    assert limiter.retry_after("a") == pytest.approx(2.0)
    assert limiter.retry_after("b") == 0
    now[0] = 100.0  # the count has decayed: one more failure is free again
    limiter.failed("a")
    assert limiter.retry_after("a") == 0


def test_sessions_expire_when_idle_and_are_bounded() -> None:
    now = [0.0]
    store = SessionStore(idle_timeout=10, max_age=100, capacity=2, clock=lambda: now[0])
    first = store.create()
    assert store.get(first.id) is first
    now[0] = 11
    assert store.get(first.id) is None
    a, b, c = store.create(), store.create(), store.create()
    assert store.get(a.id) is None and store.get(b.id) is b and store.get(c.id) is c
    assert b.check_csrf(b.csrf) and not b.check_csrf(c.csrf) and not b.check_csrf(None)


async def test_audit_filters_by_stream_type_and_time(
    web: TestClient[Any, Any], service: Service
) -> None:
    one = await service.client.deploy_vm(name="audited", secret="s")
    await service.client.deploy_vm(name="other", secret="s")
    await login(web)

    by_stream = await (await web.get(f"/audit?stream=vm:{one.sid}")).text()
    assert f"vm:{one.sid}" in by_stream and "VmDeployRequested" in by_stream
    assert by_stream.count("<tr>") >= 1

    recent = await (await web.get("/audit?within=5m&type=VmDeployRequested")).text()
    assert recent.count("VmDeployRequested</td>") == 2
    assert "recorded in the chosen window" in recent

    bad = await (await web.get("/audit?within=forever")).text()
    assert "Pick a time window from the list." in bad
