"""The dashboard: an aiohttp app that is a client of the wire contract over NATS.

Operators log in with the bearer token (exchanged for a server-side session) and see users and
the audit log; tenants manage the VMs of their secret, which travels only in POST bodies and
keeps no state here beyond their open live stream. Every
page is rendered by Jinja2 with autoescaping; live updates are server-sent events fed by one
subscription to the status stream.
"""

from __future__ import annotations

import asyncio
import hmac
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import quote, urlsplit

import jinja2
import msgspec
import structlog
from aiohttp import web

from core.usernames import Username, UserRefName
from core.vm import Name
from hero_deployer.client import (
    DomainError,
    EventOut,
    HeroDeployerClient,
    NotFound,
    UserOut,
)
from hero_deployer.operations import StreamName
from hero_deployer.web.forms import conforms, html_pattern, max_length
from hero_deployer.web.live import EventHub
from hero_deployer.web.middleware import (
    CLIENT_KEY,
    CONFIG_KEY,
    HUB_KEY,
    JINJA_KEY,
    LIVE_AFTER_KEY,
    MIDDLEWARES,
    SECURITY_HEADERS,
    SESSION_KEY,
    WebConfig,
    error_json,
)
from hero_deployer.web.ratelimit import FailureLimiter, TenantLimiter
from hero_deployer.web.sessions import Session
from hero_deployer.web.site import Site, safe_next
from hero_deployer.web.timeline import step_states, timeline

log = structlog.get_logger("hero_deployer.web")

HERE: Final = Path(__file__).parent
TYPE_RE: Final = re.compile(r"\A[A-Za-z]{1,64}\Z")
CATCH_UP_PAGES: Final = 10
HTTP_STATUS: Final[dict[str, int]] = {
    "InvalidInput": 400,
    "Unauthorized": 502,  # the dashboard's own token was refused: a configuration problem
    "NotFound": 404,
    "Conflict": 409,
    "InvalidState": 409,
    "Unavailable": 503,
    "Internal": 500,
}

# Requests ---------------------------------------------------------------------------------


class TenantRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    secret: str


class DeployRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    secret: str
    name: str


class ActionRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    secret: str
    sid: str
    action: Literal["start", "stop", "restart", "delete"]


class MigrateRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    old_secret: str
    new_secret: str

    @property
    def secret(self) -> str:
        """The secret this request tries: the one it proves ownership with."""
        return self.old_secret


# Helpers ----------------------------------------------------------------------------------


def _session(request: web.Request) -> Session:
    return request[SESSION_KEY]


def _client_key(request: web.Request) -> str:
    """The address failures count against: the peer (a proxy in front is one address)."""
    return request.remote or "unknown"


def _safe_url(value: str) -> str:
    """`value` if it is an http(s) URL, else empty: user data never becomes a javascript: link."""
    return value if urlsplit(value).scheme in ("http", "https") else ""


def _iso(value: datetime | None) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z") if value else ""


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 90:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes} min {rest} s"


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["safe_url"] = _safe_url
    env.filters["iso"] = _iso
    env.filters["duration"] = _duration
    env.globals.update(
        username_pattern=html_pattern(Username),
        username_max=max_length(Username),
        vm_name_pattern=html_pattern(Name),
        vm_name_max=max_length(Name),
    )
    return env


def render(
    request: web.Request, template: str, context: dict[str, Any], *, status: int = 200
) -> web.Response:
    """Renders a template with the session's CSRF token and flash message."""
    session = _session(request)
    flash, session.flash = session.flash, ""
    html = (
        request.app[JINJA_KEY]
        .get_template(template)
        .render(
            csrf=session.csrf,
            operator=session.operator,
            flash=flash,
            path=request.path,
            live_after=request.get(LIVE_AFTER_KEY, ""),
            **context,
        )
    )
    return web.Response(text=html, content_type="text/html", charset="utf-8", status=status)


def _json(value: Any) -> web.Response:
    return web.Response(body=msgspec.json.encode(value), content_type="application/json")


def _require_operator(request: web.Request) -> None:
    if not _session(request).operator:
        raise web.HTTPFound(f"/login?next={quote(request.path_qs, safe='/')}")


def _words(error: DomainError) -> str:
    """An error as a sentence for a person."""
    match error.code:
        case "Unavailable":
            return f"The deployer service is not answering right now ({error.message})."
        case "Unauthorized":
            return "The dashboard's token was refused by the service."
        case "Internal":
            return "The service hit an internal error; the operators' logs say more."
    message = error.message[:1].upper() + error.message[1:]
    return message if message.endswith(".") else message + "."


# Operator: login ----------------------------------------------------------------------------


async def index(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound("/users" if _session(request).operator else "/login")


async def login_page(request: web.Request) -> web.StreamResponse:
    if _session(request).operator:
        raise web.HTTPFound(safe_next(request.query.get("next")))
    return render(request, "login.html", {"next": safe_next(request.query.get("next"))})


async def login(request: web.Request) -> web.StreamResponse:
    config = request.app[CONFIG_KEY]
    form = await request.post()
    next_path = safe_next(str(form.get("next", "")))
    key = _client_key(request)
    wait = config.login_limiter.retry_after(key)
    if wait > 0:
        context = {"next": next_path, "error": f"Too many attempts; wait {wait:.0f} s."}
        return render(request, "login.html", context, status=429)
    token = str(form.get("token", ""))
    if not hmac.compare_digest(token.encode(), config.token.encode()):
        config.login_limiter.failed(key)
        context = {"next": next_path, "error": "That token is not right."}
        return render(request, "login.html", context, status=401)
    request[SESSION_KEY] = config.sessions.rotate(_session(request))
    log.info("web.login")
    raise web.HTTPSeeOther(next_path)


async def logout_page(request: web.Request) -> web.StreamResponse:
    return render(request, "logout.html", {})


async def logout(request: web.Request) -> web.StreamResponse:
    config = request.app[CONFIG_KEY]
    request[SESSION_KEY] = config.sessions.end(_session(request))
    raise web.HTTPSeeOther("/login")


# Operator: users ----------------------------------------------------------------------------


async def _users_context(request: web.Request) -> dict[str, Any]:
    client = request.app[CLIENT_KEY]
    try:
        users = await client.list_users()
        error = ""
    except DomainError as failure:
        users, error = [], _words(failure)
    users.sort(key=lambda u: u.created_at, reverse=True)
    return {"users": users, "error": error}


async def users_page(request: web.Request) -> web.StreamResponse:
    _require_operator(request)
    context = await _users_context(request)
    return render(request, "users.html", {**context, "form": {}})


async def users_rows(request: web.Request) -> web.StreamResponse:
    if not _session(request).operator:
        raise web.HTTPUnauthorized()
    return render(request, "_user_rows.html", await _users_context(request))


async def provision(request: web.Request) -> web.StreamResponse:
    _require_operator(request)
    form = await request.post()
    values = {k: str(form.get(k, "")).strip() for k in ("username", "display_name", "email")}
    profile = str(form.get("profile", "")).strip() or "demo"
    client = request.app[CLIENT_KEY]
    try:
        await client.provision_user(
            values["username"],
            display_name=values["display_name"],
            forge_email=values["email"],
            profile=profile,
        )
    except DomainError as error:
        context = await _users_context(request)
        context.update(form={**values, "profile": profile}, form_error=_words(error))
        return render(request, "users.html", context, status=HTTP_STATUS.get(error.code, 500))
    raise web.HTTPSeeOther(f"/users/{quote(values['username'])}")


def _username(request: web.Request) -> str:
    name = request.match_info["name"]
    if not conforms(name, UserRefName):
        raise web.HTTPNotFound(text="No such user.")
    return name


async def _all_events(client: HeroDeployerClient, stream: str) -> list[EventOut]:
    events: list[EventOut] = []
    after = 0
    while True:
        page = await client.events(stream=stream, after=after, limit=1000)
        events.extend(page.events)
        if len(page.events) < 1000:
            return events
        after = page.last


async def _user_context(request: web.Request, name: str) -> dict[str, Any]:
    client = request.app[CLIENT_KEY]
    user: UserOut = await client.get_user(name)
    events = await _all_events(client, f"user:{name}")
    now = datetime.now(UTC)
    return {
        "user": user,
        "timeline": timeline(events, user, now),
        "steps": step_states(user),
        "revealed": None,
        "password_error": "",
    }


async def user_page(request: web.Request) -> web.StreamResponse:
    _require_operator(request)
    name = _username(request)
    try:
        context = await _user_context(request, name)
    except NotFound:
        return render(request, "not_found.html", {"what": f"No user named {name}."}, status=404)
    return render(request, "user.html", context)


async def user_detail(request: web.Request) -> web.StreamResponse:
    if not _session(request).operator:
        raise web.HTTPUnauthorized()
    name = _username(request)
    try:
        context = await _user_context(request, name)
    except NotFound:
        raise web.HTTPNotFound() from None
    return render(request, "_user_detail.html", context)


async def user_action(request: web.Request) -> web.StreamResponse:
    _require_operator(request)
    name = _username(request)
    action = request.match_info["action"]
    client = request.app[CLIENT_KEY]
    session = _session(request)
    try:
        if action == "provision":
            await client.provision_user(name)
            session.flash = f"Provisioning of {name} resumed."
        elif action == "decommission":
            await client.decommission_user(name)
            session.flash = f"Decommissioning {name}."
        else:
            raise web.HTTPNotFound()
    except DomainError as error:
        session.flash = _words(error)
    raise web.HTTPSeeOther(f"/users/{quote(name)}")


async def reveal_password(request: web.Request) -> web.StreamResponse:
    """Shows the initial password in this one answer (never cached); the service forgets it."""
    _require_operator(request)
    name = _username(request)
    client = request.app[CLIENT_KEY]
    revealed: str | None = None
    problem = ""
    try:
        revealed = (await client.reveal_initial_password(name)).initial_password
    except NotFound:
        problem = "The initial password was already revealed, or this service did not create it."
    except DomainError as error:
        problem = _words(error)
    try:
        context = await _user_context(request, name)
    except NotFound:
        return render(request, "not_found.html", {"what": f"No user named {name}."}, status=404)
    context.update(revealed=revealed, password_error=problem)
    return render(request, "user.html", context)


# Operator: audit ----------------------------------------------------------------------------

WINDOW_LABELS: dict[str, tuple[str, timedelta]] = {
    "": ("any time", timedelta(0)),
    "5m": ("last 5 minutes", timedelta(minutes=5)),
    "1h": ("last hour", timedelta(hours=1)),
    "1d": ("last day", timedelta(days=1)),
    "7d": ("last week", timedelta(days=7)),
}
WITHIN = {key: delta for key, (_, delta) in WINDOW_LABELS.items()}


async def audit_page(request: web.Request) -> web.StreamResponse:
    _require_operator(request)
    client = request.app[CLIENT_KEY]
    stream = request.query.get("stream", "").strip()
    kind = request.query.get("type", "").strip()
    problems = []
    if stream and not conforms(stream, StreamName):
        problems.append("A stream looks like vm:vm_… or user:alice.")
        stream = ""
    if kind and not TYPE_RE.fullmatch(kind):
        problems.append("An event type is a word such as VmStarted.")
        kind = ""
    try:
        limit = min(max(int(request.query.get("limit", "50")), 1), 1000)
    except ValueError:
        limit = 50
    within = request.query.get("within", "")
    if within not in WITHIN:
        problems.append("Pick a time window from the list.")
        within = ""
    events: list[EventOut] = []
    last = 0
    after: int | None = None
    head = 0
    try:
        head = (await client.health()).position
        raw_after = request.query.get("after")
        if raw_after is not None and raw_after.isdigit():
            after = int(raw_after)
        elif stream:
            after = 0
        else:
            after = max(0, head - limit)
        page = await client.events(stream=stream or None, after=after, limit=limit)
        events, last = page.events, page.last
    except DomainError as error:
        problems.append(_words(error))
    since = datetime.now(UTC) - WITHIN[within] if within else None
    shown = [
        e
        for e in events
        if (not kind or e.type == kind) and (since is None or e.recorded_at >= since)
    ]
    rows = [
        {
            "position": e.position,
            "stream": e.stream,
            "type": e.type,
            "recorded_at": e.recorded_at,
            "data": bytes(e.data).decode(),
        }
        for e in shown
    ]
    at_head = after is not None and (len(events) < limit or last >= head)
    context = {
        "rows": list(reversed(rows)),
        "stream": stream,
        "type": kind,
        "within": within,
        "windows": [(key, label) for key, (label, _) in WINDOW_LABELS.items()],
        "limit": limit,
        "after": after or 0,
        "earlier": max(0, (after or 0) - limit) if (after or 0) > 0 and not stream else None,
        "later": last if not at_head else None,
        "at_head": at_head,
        "problems": problems,
        "scanned": len(events),
    }
    return render(request, "audit.html", context)


# Live updates -------------------------------------------------------------------------------


async def _sse(
    request: web.Request, select: Callable[[EventOut], bytes | None]
) -> web.StreamResponse:
    """Streams the selected events as server-sent events until the client or the app goes.

    With `?after=P` it first sends the recorded events after P, so a page rendered at P misses
    nothing that happened before its stream opened.
    """
    config = request.app[CONFIG_KEY]
    client = request.app[CLIENT_KEY]
    raw_after = request.headers.get("Last-Event-ID") or request.query.get("after", "")
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-store",
            "X-Accel-Buffering": "no",
            **SECURITY_HEADERS,
        }
    )
    await response.prepare(request)

    async def send(event: EventOut) -> None:
        payload = select(event)
        if payload is not None:
            await response.write(b"id: %d\ndata: %s\n\n" % (event.position, payload))

    try:
        async with request.app[HUB_KEY].listen() as listener:
            await response.write(b"retry: 2000\n: connected\n\n")
            last = 0
            if raw_after.isdigit():
                last = int(raw_after)
                for _ in range(CATCH_UP_PAGES):
                    page = await client.events(after=last, limit=1000)
                    for event in page.events:
                        await send(event)
                    last = page.last
                    if len(page.events) < 1000:
                        break
            while True:
                try:
                    # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation
                    async with asyncio.timeout(config.sse_heartbeat):
                        item = await listener.queue.get()
                except TimeoutError:
                    await response.write(b": keep-alive\n\n")
                    continue
                if item is None:
                    break
                if item.position > last:
                    await send(item)
    except (ConnectionResetError, DomainError):
        pass  # the browser went away, or the service did: EventSource reconnects
    return response


async def operator_live(request: web.Request) -> web.StreamResponse:
    if not _session(request).operator:
        raise web.HTTPUnauthorized()
    return await _sse(request, msgspec.json.encode)


async def tenant_live(request: web.Request) -> web.StreamResponse:
    """Only events of the VMs this browser's tenant page listed, and only their sid and type."""
    with request.app[CONFIG_KEY].watches.watch(_session(request).id) as watched:

        def select(event: EventOut) -> bytes | None:
            kind, _, sid = event.stream.partition(":")
            if kind != "vm" or sid not in watched:
                return None
            body = {"sid": sid, "type": event.type, "position": event.position}
            return msgspec.json.encode(body)

        return await _sse(request, select)


# Tenant -------------------------------------------------------------------------------------


async def tenant_page(request: web.Request) -> web.StreamResponse:
    return render(request, "tenant.html", {})


def _vm_json(vm: Any) -> Any:
    return msgspec.to_builtins(vm)


async def _tenant_call(
    request: web.Request,
    kind: type[msgspec.Struct],
    call: Callable[[Any], Awaitable[web.Response]],
) -> web.Response:
    """Decodes the body, applies the tenant limiter, maps errors to JSON answers."""
    limiter = request.app[CONFIG_KEY].tenant_limiter
    try:
        body = msgspec.json.decode(await request.read(), type=kind)
    except msgspec.ValidationError as error:
        return error_json("InvalidInput", str(error), 400)
    except msgspec.DecodeError:
        return error_json("InvalidInput", "the body is not JSON", 400)
    address, secret = _client_key(request), str(getattr(body, "secret", ""))
    wait = limiter.retry_after(address, secret)
    if wait > 0:
        return error_json(
            "TooManyRequests",
            f"Too many failed attempts; try again in {wait:.0f} s.",
            429,
            **{"Retry-After": str(max(1, round(wait)))},
        )
    try:
        return await call(body)
    except NotFound as error:
        limiter.failed(address, secret)
        return error_json(error.code, _words(error), 404)
    except DomainError as error:
        return error_json(error.code, _words(error), HTTP_STATUS.get(error.code, 500))


async def tenant_vms(request: web.Request) -> web.StreamResponse:
    client = request.app[CLIENT_KEY]
    browser, watches = _session(request).id, request.app[CONFIG_KEY].watches

    async def call(body: TenantRequest) -> web.Response:
        vms = await client.list_vms(body.secret)
        watches.show(browser, (vm.sid for vm in vms))
        return _json({"vms": [_vm_json(vm) for vm in vms]})

    return await _tenant_call(request, TenantRequest, call)


async def tenant_deploy(request: web.Request) -> web.StreamResponse:
    client = request.app[CLIENT_KEY]
    browser, watches = _session(request).id, request.app[CONFIG_KEY].watches

    async def call(body: DeployRequest) -> web.Response:
        vm = await client.deploy_vm(name=body.name, secret=body.secret)
        watches.add(browser, vm.sid)
        return _json(_vm_json(vm))

    return await _tenant_call(request, DeployRequest, call)


async def tenant_action(request: web.Request) -> web.StreamResponse:
    client = request.app[CLIENT_KEY]
    actions = {
        "start": client.start_vm,
        "stop": client.stop_vm,
        "restart": client.restart_vm,
        "delete": client.delete_vm,
    }

    async def call(body: ActionRequest) -> web.Response:
        vm = await actions[body.action](body.sid, body.secret)
        return _json(_vm_json(vm))

    return await _tenant_call(request, ActionRequest, call)


async def tenant_migrate(request: web.Request) -> web.StreamResponse:
    client = request.app[CLIENT_KEY]

    async def call(body: MigrateRequest) -> web.Response:
        result = await client.migrate_secret(body.old_secret, body.new_secret)
        return _json(msgspec.to_builtins(result))

    return await _tenant_call(request, MigrateRequest, call)


# The app ------------------------------------------------------------------------------------


async def _not_found(request: web.Request) -> web.StreamResponse:
    return render(request, "not_found.html", {"what": "There is no such page."}, status=404)


def create_app(
    client: HeroDeployerClient,
    *,
    token: str,
    public_url: str = "",
    tenant_limiter: TenantLimiter | None = None,
    login_limiter: FailureLimiter | None = None,
    sse_heartbeat: float = 15.0,
) -> web.Application:
    """The dashboard app over `client`; `token` is the bearer token operators log in with.

    `public_url` (https://host[:port]) is where browsers reach it through a proxy: only that
    Host is answered and cookies are `Secure` when it is https; without it, loopback only.
    """
    if not token:
        raise ValueError("the dashboard needs the bearer token to check operator logins")
    app = web.Application(middlewares=MIDDLEWARES)
    app[CLIENT_KEY] = client
    app[CONFIG_KEY] = WebConfig(
        token=token,
        site=Site.parse(public_url),
        sse_heartbeat=sse_heartbeat,
        tenant_limiter=tenant_limiter or TenantLimiter(),
        login_limiter=login_limiter or FailureLimiter(),
    )
    app[JINJA_KEY] = _environment()
    hub = EventHub(client)
    app[HUB_KEY] = hub

    async def start_hub(_: web.Application) -> None:
        await hub.start()

    async def stop_hub(_: web.Application) -> None:
        await hub.close()

    app.on_startup.append(start_hub)
    app.on_shutdown.append(stop_hub)
    app.router.add_get("/", index)
    app.router.add_get("/login", login_page)
    app.router.add_post("/login", login)
    app.router.add_get("/logout", logout_page)
    app.router.add_post("/logout", logout)
    app.router.add_get("/users", users_page)
    app.router.add_post("/users", provision)
    app.router.add_get("/users/_rows", users_rows)
    app.router.add_get("/users/{name}", user_page)
    app.router.add_get("/users/{name}/_detail", user_detail)
    app.router.add_post("/users/{name}/reveal", reveal_password)
    app.router.add_post("/users/{name}/{action:provision|decommission}", user_action)
    app.router.add_get("/audit", audit_page)
    app.router.add_get("/live", operator_live)
    app.router.add_get("/tenant", tenant_page)
    app.router.add_get("/tenant/live", tenant_live)
    app.router.add_post("/tenant/api/vms", tenant_vms)
    app.router.add_post("/tenant/api/deploy", tenant_deploy)
    app.router.add_post("/tenant/api/action", tenant_action)
    app.router.add_post("/tenant/api/migrate", tenant_migrate)
    app.router.add_static("/static/", HERE / "static", name="static")
    app.router.add_route("*", "/{tail:.*}", _not_found)
    return app
