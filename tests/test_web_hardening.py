"""The dashboard under attack: open redirects, session flooding, foreign Hosts, shared addresses.

A real service on a real nats-server behind it (the `service` fixture); aiohttp's test client
and raw sockets send what a hostile browser or script would.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urljoin, urlsplit

import aiohttp
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

from core.contract import StreamName
from core.usernames import UserRefName
from hero_deployer.web import create_app
from hero_deployer.web.forms import conforms
from hero_deployer.web.middleware import CONFIG_KEY
from hero_deployer.web.ratelimit import FailureLimiter, TenantLimiter
from hero_deployer.web.sessions import COOKIE_NAME
from hero_deployer.web.site import Site, safe_next
from tests.conftest import TOKEN, Service
from tests.test_web_app import csrf_of, login, tenant

Web = TestClient[Any, Any]

# Hostile `next` values: the first ones answered `Location: //evil.example` (issue 12, point 4);
# browsers' URL parsers strip TAB/LF/CR and read "\" as "/", so near misses lead off-site too.
HOSTILE_NEXT = [
    "/\t/evil.example",
    "/\n/evil.example",
    "/\r\n/evil.example",
    "//evil.example",
    "/\\evil.example",
    "\\\\evil.example",
    "\\/evil.example",
    "/%09/evil.example",
    "/%2F/evil.example",
    "/%5Cevil.example",
    "%2F%2Fevil.example",
    "javascript:alert(1)",
    "JaVaScRiPt:alert(1)",
    "https://evil.example",
    "http:evil.example",
    " //evil.example",
    "/\x00/evil.example",
    "/users/\n/evil.example",
    "/users//evil.example",
    "/audit?\r\nSet-Cookie: x=1",
    "/users@evil.example",
]


def on_site(location: str) -> bool:
    """Whether a Location resolves to this site, even after browser-style cleaning of it."""
    cleaned = re.sub(r"[\t\n\r]", "", location).replace("\\", "/")
    return urlsplit(urljoin("http://127.0.0.1:1/", cleaned)).netloc == "127.0.0.1:1"


@pytest_asyncio.fixture
async def web(service: Service) -> AsyncIterator[Web]:
    limiter = TenantLimiter(
        per_secret=FailureLimiter(allowance=3, base_delay=30.0),
        per_address=FailureLimiter(allowance=8, base_delay=30.0),
    )
    app = create_app(service.client, token=TOKEN, tenant_limiter=limiter)
    async with TestClient(TestServer(app)) as client:
        yield client


# Open redirect ------------------------------------------------------------------------------


@pytest.mark.parametrize("target", HOSTILE_NEXT)
async def test_no_next_leads_off_site(web: Web, target: str) -> None:
    anonymous = await (await web.get(f"/login?next={quote(target, safe='')}")).text()
    assert 'name="next" value="/users"' in anonymous, "the form carries the safe default"

    csrf = await csrf_of(web)
    posted = await web.post(
        "/login", data={"token": TOKEN, "csrf": csrf, "next": target}, allow_redirects=False
    )
    assert posted.status == 303
    assert posted.headers["Location"] == "/users"

    logged_in = await web.get(f"/login?next={quote(target, safe='')}", allow_redirects=False)
    assert logged_in.status == 302
    assert logged_in.headers["Location"] == "/users"


async def test_the_reported_raw_query_is_answered_on_site(web: Web) -> None:
    await login(web)
    for raw in ("/%09/evil.example", "/%0A/evil.example", "/%0D%0A/evil.example", "%2F%2Fevil"):
        response = await web.get(f"/login?next={raw}", allow_redirects=False)
        assert response.headers["Location"] == "/users", raw
        assert on_site(response.headers["Location"])


async def test_own_pages_survive_the_login_round_trip(web: Web) -> None:
    response = await web.get("/audit?stream=vm%3Avm_1&type=VmStarted", allow_redirects=False)
    login_url = urlsplit(response.headers["Location"])
    assert login_url.path == "/login"
    target = parse_qs(login_url.query)["next"][0]
    assert target == "/audit?stream=vm:vm_1&type=VmStarted"
    csrf = await csrf_of(web)
    posted = await web.post(
        "/login", data={"token": TOKEN, "csrf": csrf, "next": target}, allow_redirects=False
    )
    assert posted.headers["Location"] == target
    for page in ("/users", "/users/alice", "/tenant", "/audit"):
        assert safe_next(page) == page
    assert all(on_site(safe_next(target)) for target in HOSTILE_NEXT)


# Sessions -----------------------------------------------------------------------------------


async def test_anonymous_requests_store_nothing_and_cannot_evict_an_operator(web: Web) -> None:
    await login(web)
    store = web.app[CONFIG_KEY].sessions
    assert len(store) == 1
    connector = aiohttp.TCPConnector(limit=16)
    async with aiohttp.ClientSession(
        connector=connector, cookie_jar=aiohttp.DummyCookieJar()
    ) as stranger:
        url = str(web.make_url("/login"))
        gate = asyncio.Semaphore(16)

        async def one() -> int:
            async with gate, stranger.get(url) as response:
                await response.read()
                return response.status

        statuses = await asyncio.gather(*(one() for _ in range(10_050)))
    assert set(statuses) == {200}
    assert len(store) == 1, "anonymous requests left state behind"
    page = await web.get("/users", allow_redirects=False)
    assert page.status == 200, "the operator's session survived the flood"


async def test_anonymous_csrf_is_bound_to_the_browser_cookie(web: Web, service: Service) -> None:
    mine = await csrf_of(web)
    cookie = web.session.cookie_jar.filter_cookies(web.make_url("/"))[COOKIE_NAME].value
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as other:
        url = str(web.make_url("/tenant/api/deploy"))
        body = {"secret": "s", "name": "forged"}
        # Another browser's cookie with my token: the token is an HMAC of the cookie's nonce.
        forged = await other.post(
            url,
            json=body,
            headers={"X-CSRF-Token": mine, "Cookie": f"{COOKIE_NAME}={'A' * 43}"},
        )
        assert forged.status == 403
        honest = await other.post(
            url, json=body, headers={"X-CSRF-Token": mine, "Cookie": f"{COOKIE_NAME}={cookie}"}
        )
        assert honest.status == 200
    assert [vm.name for vm in await service.client.list_vms("s")] == ["forged"]


async def test_logout_forgets_the_session(web: Web) -> None:
    await login(web)
    store = web.app[CONFIG_KEY].sessions
    csrf = await csrf_of(web, "/users")
    assert (await web.post("/logout", data={"csrf": csrf}, allow_redirects=False)).status == 303
    assert len(store) == 0
    assert (await web.get("/users", allow_redirects=False)).status == 302


# Hosts and the public URL -------------------------------------------------------------------


async def test_only_loopback_hosts_on_the_bound_port_are_served(web: Web) -> None:
    port = web.server.port
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}", f"[::1]:{port}"):
        assert (await web.get("/login", headers={"Host": host})).status == 200, host
    for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1:{port + 1}", "127.0.0.1"):
        response = await web.get("/login", headers={"Host": host})
        assert response.status == 421, host
        assert COOKIE_NAME not in response.cookies
    for host in ("a b", "x/y", "evil.example@127.0.0.1", f"127.0.0.1:{port}:1"):
        assert (await web.get("/login", headers={"Host": host})).status == 400, host
    assert (await web.get("/static/app.css", headers={"Host": "evil.example"})).status == 421


async def test_a_request_without_host_is_refused(web: Web) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", web.server.port)
    writer.write(b"GET /login HTTP/1.0\r\n\r\n")
    await writer.drain()
    status = await reader.readline()
    writer.close()
    await writer.wait_closed()
    assert status.split()[1] == b"400"


@pytest_asyncio.fixture
async def public(service: Service) -> AsyncIterator[Web]:
    app = create_app(service.client, token=TOKEN, public_url="https://dash.example")
    async with TestClient(TestServer(app)) as client:
        yield client


async def test_an_https_public_url_sets_secure_cookies_and_the_only_host(public: Web) -> None:
    served = await public.get("/login", headers={"Host": "dash.example"})
    assert served.status == 200
    cookie = served.headers["Set-Cookie"]
    assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    port = public.server.port
    for host in (f"127.0.0.1:{port}", "dash.example:8443", "evil.example"):
        assert (await public.get("/login", headers={"Host": host})).status == 421, host
    assert (await public.get("/login", headers={"Host": "dash.example:443"})).status == 200

    nonce = re.search(r"hd_session=([^;]+)", cookie)
    assert nonce
    csrf = re.search(r'name="csrf-token" content="([^"]+)"', await served.text())
    assert csrf
    headers = {"Host": "dash.example", "Cookie": f"{COOKIE_NAME}={nonce.group(1)}"}
    form = {"token": TOKEN, "csrf": csrf.group(1), "next": "/audit"}
    for origin in ("http://dash.example", "https://dash.example:8443", "https://evil.example"):
        refused = await public.post(
            "/login", data=form, headers={**headers, "Origin": origin}, allow_redirects=False
        )
        assert refused.status == 403, origin
    accepted = await public.post(
        "/login",
        data=form,
        headers={**headers, "Origin": "https://dash.example"},
        allow_redirects=False,
    )
    assert accepted.status == 303 and accepted.headers["Location"] == "/audit"
    assert "Secure" in accepted.headers["Set-Cookie"]


async def test_an_http_public_url_keeps_cookies_plain(service: Service) -> None:
    app = create_app(service.client, token=TOKEN, public_url="http://dash.example:8080")
    async with TestClient(TestServer(app)) as client:
        served = await client.get("/login", headers={"Host": "dash.example:8080"})
        assert served.status == 200 and "Secure" not in served.headers["Set-Cookie"]
        assert (await client.get("/login", headers={"Host": "dash.example"})).status == 421


@pytest.mark.parametrize(
    "url",
    [
        "ftp://dash.example",
        "https://",
        "https://dash.example/prefix",
        "https://u@dash.example",
        "https://dash.example?x=1",
        "https://dash.example:99999",
        "dash.example",
    ],
)
def test_a_public_url_the_dashboard_cannot_be_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="public-url"):
        Site.parse(url)


async def test_the_web_command_takes_public_url(tmp_path: Path, nats_url: str) -> None:
    """`hero-deployer web --public-url https://…`: that Host only, and Secure cookies."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("HERO_DEPLOYER_")},
        "HOME": str(tmp_path),
        "XDG_STATE_HOME": str(tmp_path / "state"),
        "HERO_DEPLOYER_TOKEN": TOKEN,
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "hero_deployer", "web", "--nats", nats_url,
        "--data-dir", str(tmp_path / "data"), "--web-port", "0",
        "--public-url", "https://dash.example",
        env=env, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        async with asyncio.timeout(60):
            line = (await process.stdout.readline()).decode()  # "ready", or EOF at an exit
        found = re.search(r"ready: (http://\S+)", line)
        assert found, f"no ready line: {line!r}, exit {process.returncode}"
        base = found.group(1)
        local = urlsplit(base).netloc
        async with aiohttp.ClientSession() as http:
            for host, status, secure in (("dash.example", 200, True), (local, 421, False)):
                async with http.get(base + "/login", headers={"Host": host}) as response:
                    assert response.status == status, host
                    assert ("Secure" in response.headers.get("Set-Cookie", "")) is secure
    finally:
        if process.returncode is None:
            process.terminate()
        async with asyncio.timeout(30):
            assert await process.wait() == 0


# Tenant rate limits -------------------------------------------------------------------------


async def test_one_tenants_failures_do_not_lock_out_another(web: Web, service: Service) -> None:
    theirs = await service.client.deploy_vm(name="b-vm", secret="tenant-b")
    wrong = {"old_secret": "tenant-a-typo", "new_secret": "x"}
    statuses = [(await tenant(web, "/tenant/api/migrate", wrong)).status for _ in range(5)]
    assert statuses == [404, 404, 404, 404, 429], "tenant A's repeated wrong secret is blocked"

    listed = await tenant(web, "/tenant/api/vms", {"secret": "tenant-b"})
    assert listed.status == 200, "tenant B, behind the same address, still gets its VMs"
    assert [vm["sid"] for vm in (await listed.json())["vms"]] == [theirs.sid]
    action = {"secret": "tenant-b", "sid": theirs.sid, "action": "stop"}
    assert (await tenant(web, "/tenant/api/action", action)).status in (200, 409)


async def test_many_different_wrong_secrets_hit_the_address_ceiling(
    web: Web, service: Service
) -> None:
    await service.client.deploy_vm(name="c-vm", secret="tenant-c")
    for guess in range(9):  # the ninth is still answered, then the address waits
        body = {"old_secret": f"guess-{guess}", "new_secret": "x"}
        assert (await tenant(web, "/tenant/api/migrate", body)).status == 404
    body = {"old_secret": "guess-new", "new_secret": "x"}
    blocked = await tenant(web, "/tenant/api/migrate", body)
    assert blocked.status == 429, "guessing many secrets from one address is slowed down"
    assert int(blocked.headers["Retry-After"]) >= 1


async def test_a_secret_that_worked_passes_the_address_ceiling_a_new_one_waits(
    web: Web, service: Service
) -> None:
    theirs = await service.client.deploy_vm(name="d-vm", secret="tenant-d")
    newcomer = await service.client.deploy_vm(name="e-vm", secret="tenant-e")
    assert (await tenant(web, "/tenant/api/vms", {"secret": "tenant-d"})).status == 200
    for guess in range(9):  # another tenant behind the same address guesses, then waits
        body = {"secret": f"guess-{guess}", "sid": theirs.sid}
        assert (await tenant(web, "/tenant/api/vm", body)).status == 404
    guessed = await tenant(web, "/tenant/api/vm", {"secret": "guess-new", "sid": theirs.sid})
    assert guessed.status == 429

    known = await tenant(web, "/tenant/api/vm", {"secret": "tenant-d", "sid": theirs.sid})
    assert known.status == 200, "a secret that has worked from this address is not locked out"
    assert (await known.json())["sid"] == theirs.sid
    first = await tenant(web, "/tenant/api/vm", {"secret": "tenant-e", "sid": newcomer.sid})
    assert first.status == 429, "a secret new to this address still waits past the ceiling"


async def test_guessing_through_the_list_is_counted_reloading_is_not(web: Web) -> None:
    for _ in range(12):  # a new tenant reloading its empty list is counted once per window
        reloaded = await tenant(web, "/tenant/api/vms", {"secret": "new-tenant"})
        assert reloaded.status == 200 and (await reloaded.json())["vms"] == []
    for guess in range(8):  # with that one, the ninth empty listing reaches the ceiling
        listed = await tenant(web, "/tenant/api/vms", {"secret": f"guess-{guess}"})
        assert listed.status == 200 and (await listed.json())["vms"] == []
    blocked = await tenant(web, "/tenant/api/vms", {"secret": "guess-next"})
    assert blocked.status == 429, "guessing secrets through the listing is slowed down"


def test_an_empty_listing_counts_again_after_the_window_and_good_pairs_are_bounded() -> None:
    now = [0.0]
    per_secret = FailureLimiter(allowance=1, base_delay=30.0, decay=1000.0, clock=lambda: now[0])
    per_address = FailureLimiter(allowance=0, base_delay=30.0, clock=lambda: now[0])
    limiter = TenantLimiter(
        per_secret=per_secret, per_address=per_address, remember=2, clock=lambda: now[0]
    )
    limiter.found_nothing("a", "s")
    now[0] = 30.0
    limiter.found_nothing("a", "s")
    assert per_secret.retry_after(limiter._pair("a", "s")) == 0, "counted once in the window"
    now[0] = 61.0
    limiter.found_nothing("a", "s")
    assert limiter.retry_after("a", "s") > 0, "counted again once the window has passed"

    for secret in ("x", "y", "z"):  # remembers the last two that worked
        limiter.succeeded("a", secret)
    assert limiter.retry_after("a", "y") == limiter.retry_after("a", "z") == 0
    assert limiter.retry_after("a", "x") > 0, "the oldest good secret is forgotten"


# Whole-value rules --------------------------------------------------------------------------


async def test_names_and_streams_with_a_trailing_newline_are_refused(
    web: Web, service: Service
) -> None:
    await service.client.provision_user("alice")
    await login(web)
    assert (await web.get("/users/alice")).status == 200
    page = await web.get("/users/alice%0A")
    assert page.status == 404 and "No such user." in await page.text()
    # The audit filters trim their fields, so a newline can only sit inside a value there.
    audit = await (await web.get("/audit?stream=user%3Aal%0Aice")).text()
    assert "A stream looks like" in audit
    kind = await (await web.get("/audit?type=UserProvisioning%0ARequested")).text()
    assert "An event type is a word" in kind
    trimmed = await (await web.get("/audit?stream=user%3Aalice%0A")).text()
    assert "A stream looks like" not in trimmed and "user:alice" in trimmed


def test_the_web_rules_are_the_core_types_over_the_whole_value() -> None:
    assert conforms("alice", UserRefName) and not conforms("alice\n", UserRefName)
    assert not conforms("al ice", UserRefName) and not conforms("a" * 41, UserRefName)
    assert conforms("vm:vm_1", StreamName) and not conforms("vm:vm_1\n", StreamName)
    assert not conforms("vm:vm_1\r", StreamName) and not conforms("vm:\tx", StreamName)
