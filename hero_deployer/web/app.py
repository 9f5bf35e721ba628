"""The dashboard: an aiohttp app that is a client of the wire contract over NATS.

Operators log in with the bearer token (exchanged for a signed session) and see users and the
audit log; tenants manage the VMs of their secret, which travels only in POST bodies and keeps
no state here beyond their open live stream. Every page is rendered by Jinja2 with autoescaping;
live updates are server-sent events fed by one subscription to the status stream.
"""

from __future__ import annotations

import hmac
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, get_args
from urllib.parse import quote

import structlog
from aiohttp import web

from core.contract import (
    DecommissionUser,
    GetUser,
    ListUsers,
    ProvisionUser,
    RevealInitialPassword,
    UserStatus,
)
from core.usernames import UserRefName
from hero_deployer.sdk.client import DomainError, EventOut, HeroDeployerClient, NotFound, UserOut
from hero_deployer.web import audit, streams, tenant
from hero_deployer.web.forms import conforms
from hero_deployer.web.live import EventHub
from hero_deployer.web.middleware import (
    CLIENT_KEY,
    CONFIG_KEY,
    HUB_KEY,
    JINJA_KEY,
    MIDDLEWARES,
    SESSION_KEY,
    Handler,
    WebConfig,
)
from hero_deployer.web.ratelimit import FailureLimiter, TenantLimiter
from hero_deployer.web.render import (
    HERE,
    HTTP_STATUS,
    PARTS_KEY,
    PartsCache,
    acting,
    banners,
    client_key,
    environment,
    render,
    require_operator,
    session_of,
    words,
)
from hero_deployer.web.sessions import SessionStore
from hero_deployer.web.site import Site, safe_next
from hero_deployer.web.timeline import step_states, timeline

log = structlog.get_logger("hero_deployer.web")

USER_STATUSES: Final[tuple[str, ...]] = get_args(UserStatus)
GONE: Final = frozenset({"decommissioning", "decommissioned"})  # VM and gateway going or gone

# Operator: login ----------------------------------------------------------------------------


async def index(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound("/users" if session_of(request).operator else "/login")


async def favicon(request: web.Request) -> web.StreamResponse:
    raise web.HTTPMovedPermanently("/static/favicon.svg")


async def login_page(request: web.Request) -> web.StreamResponse:
    if session_of(request).operator:
        raise web.HTTPFound(safe_next(request.query.get("next")))
    return render(request, "login.html", {"next": safe_next(request.query.get("next"))})


async def login(request: web.Request) -> web.StreamResponse:
    config = request.app[CONFIG_KEY]
    form = await request.post()
    next_path = safe_next(str(form.get("next", "")))
    key = client_key(request)
    wait = config.login_limiter.retry_after(key)
    if wait > 0:
        context = {"next": next_path, "error": f"Too many attempts; wait {wait:.0f} s."}
        return render(request, "login.html", context, status=429)
    token = str(form.get("token", ""))
    if not hmac.compare_digest(token.encode(), config.token.encode()):
        config.login_limiter.failed(key)
        context = {"next": next_path, "error": "That token is not right."}
        return render(request, "login.html", context, status=401)
    request[SESSION_KEY] = config.sessions.rotate(session_of(request))
    log.info("web.login", session=request[SESSION_KEY].label)
    raise web.HTTPSeeOther(next_path)


async def logout_page(request: web.Request) -> web.StreamResponse:
    return render(request, "logout.html", {})


async def logout(request: web.Request) -> web.StreamResponse:
    config = request.app[CONFIG_KEY]
    request[SESSION_KEY] = config.sessions.end(session_of(request))
    raise web.HTTPSeeOther("/login")


# Operator: users ----------------------------------------------------------------------------


def _matches(user: UserOut, query: str, status: str) -> bool:
    if status and user.status != status:
        return False
    text = f"{user.username} {user.display_name} {user.forge_email}".casefold()
    return not query or query.casefold() in text


async def _users_context(request: web.Request) -> dict[str, Any]:
    query = request.query.get("q", "").strip()[:64]
    status = request.query.get("status", "")
    status = status if status in USER_STATUSES else ""
    try:
        users = (await acting(request).send(ListUsers())).users
        error = ""
    except DomainError as failure:
        users, error = [], words(failure)
    users.sort(key=lambda u: u.created_at, reverse=True)
    shown = [u for u in users if _matches(u, query, status)]
    return {
        "users": shown,
        "total": len(users),
        "error": error,
        "q": query,
        "status": status,
        "statuses": USER_STATUSES,
        "filtered": bool(query or status),
        "gone": GONE,
    }


async def users_page(request: web.Request) -> web.StreamResponse:
    require_operator(request)
    context = await _users_context(request)
    return render(request, "users.html", {**context, "form": {}, "banners": await banners(request)})


async def users_rows(request: web.Request) -> web.StreamResponse:
    if not session_of(request).operator:
        raise web.HTTPUnauthorized()
    return render(request, "_user_rows.html", await _users_context(request))


async def provision(request: web.Request) -> web.StreamResponse:
    require_operator(request)
    form = await request.post()
    values = {k: str(form.get(k, "")).strip() for k in ("username", "display_name", "email")}
    profile = str(form.get("profile", "")).strip() or "demo"
    try:
        await acting(request).send(
            ProvisionUser(
                username=values["username"],
                display_name=values["display_name"],
                forge_email=values["email"],
                profile=profile,
            )
        )
    except DomainError as error:
        context = await _users_context(request)
        context.update(form={**values, "profile": profile}, form_error=words(error))
        context["banners"] = await banners(request)
        return render(request, "users.html", context, status=HTTP_STATUS.get(error.code, 500))
    raise web.HTTPSeeOther(f"/users/{quote(values['username'])}")


def _username(request: web.Request) -> str:
    name = request.match_info["name"]
    if not conforms(name, UserRefName):
        raise web.HTTPNotFound(text="No such user.")
    return name


async def _all_events(client: HeroDeployerClient, stream: str) -> list[EventOut]:
    return [event async for page in client.pages(stream=stream) for event in page.events]


async def _user_context(request: web.Request, name: str) -> dict[str, Any]:
    client = acting(request)
    user: UserOut = await client.send(GetUser(username=name))
    events = await _all_events(client, f"user:{name}")
    revealed_at = [e for e in events if e.type == "InitialPasswordRevealed"]
    return {
        "user": user,
        "timeline": timeline(events, user, datetime.now(UTC)),
        "steps": step_states(user),
        "gone": user.status in GONE,
        "password_revealed": bool(revealed_at),
        "can_reveal": user.forge_user_created and not revealed_at and user.status not in GONE,
    }


async def user_page(request: web.Request) -> web.StreamResponse:
    """The user's page; a password revealed just before is shown here once, then dropped."""
    require_operator(request)
    name = _username(request)
    revealed = session_of(request).take_revealed(name)
    try:
        context = await _user_context(request, name)
    except NotFound:
        return render(request, "not_found.html", {"what": f"No user named {name}."}, status=404)
    context.update(revealed=revealed, banners=await banners(request))
    return render(request, "user.html", context)


async def user_detail(request: web.Request) -> web.StreamResponse:
    if not session_of(request).operator:
        raise web.HTTPUnauthorized()
    name = _username(request)
    try:
        context = await _user_context(request, name)
    except NotFound:
        raise web.HTTPNotFound() from None
    return render(request, "_user_detail.html", context)


async def user_action(request: web.Request) -> web.StreamResponse:
    require_operator(request)
    name = _username(request)
    action = request.match_info["action"]
    client = acting(request)
    session = session_of(request)
    try:
        if action == "provision":
            await client.send(ProvisionUser(username=name))
            session.flash = f"Provisioning of {name} resumed."
        elif action == "decommission":
            await client.send(DecommissionUser(username=name))
            session.flash = f"Decommissioning {name}."
        else:
            raise web.HTTPNotFound()
    except DomainError as error:
        session.flash = words(error)
    raise web.HTTPSeeOther(f"/users/{quote(name)}")


async def reveal_password(request: web.Request) -> web.StreamResponse:
    """Asks for the password once, keeps it for this operator's next page view, redirects there.

    Post-redirect-get: reloading the page that shows it sends nothing again, and shows it no
    more; the password lives only in this session's one-shot slot until that view.
    """
    require_operator(request)
    name = _username(request)
    session = session_of(request)
    try:
        revealed = await acting(request).send(RevealInitialPassword(username=name))
    except NotFound:
        session.flash = (
            "The initial password was already revealed, or this service did not create it."
        )
    except DomainError as error:
        session.flash = words(error)
    else:
        session.revealed = (name, revealed.initial_password)
    raise web.HTTPSeeOther(f"/users/{quote(name)}")


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
    state_dir: Path | None = None,
) -> web.Application:
    """The dashboard app over `client`; `token` is the bearer token operators log in with.

    `public_url` (https://host[:port]) is where browsers reach it through a proxy: only that
    Host is answered and cookies are `Secure` when it is https; without it, loopback only.
    `state_dir` (the data dir) keeps the session key and revocations, so logins survive a
    restart; without it sessions end with the process.
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
        sessions=SessionStore(state_dir=state_dir),
    )
    app[JINJA_KEY] = environment()
    app[PARTS_KEY] = PartsCache()
    hub = EventHub(client)
    app[HUB_KEY] = hub

    async def start_hub(_: web.Application) -> None:
        await hub.start()

    async def stop_hub(_: web.Application) -> None:
        await hub.close()

    app.on_startup.append(start_hub)
    app.on_shutdown.append(stop_hub)
    _add_routes(app)
    return app


def _add_routes(app: web.Application) -> None:
    """Every page and API of the dashboard, the operator's and the tenant's, in one table."""
    for path, handler in PAGES.items():
        app.router.add_get(path, handler)
    for path, handler in ACTIONS.items():
        app.router.add_post(path, handler)
    app.router.add_static("/static/", HERE / "static", name="static")
    app.router.add_route("*", "/{tail:.*}", _not_found)


# The dashboard's pages (GET), the operator's then the tenant's, by path
PAGES: Final[dict[str, Handler]] = {
    "/": index,
    "/favicon.ico": favicon,
    "/login": login_page,
    "/logout": logout_page,
    "/users": users_page,
    "/users/_rows": users_rows,
    "/users/{name}": user_page,
    "/users/{name}/_detail": user_detail,
    "/audit": audit.audit_page,
    "/audit/_rows": audit.audit_rows,
    "/live": streams.operator_live,
    "/tenant/live": streams.tenant_live,
    "/tenant": tenant.tenant_page,
    "/tenant/vms/{sid}": tenant.tenant_vm_page,
}
# What its forms and scripts send (POST), by path
ACTIONS: Final[dict[str, Handler]] = {
    "/login": login,
    "/logout": logout,
    "/users": provision,
    "/users/{name}/reveal": reveal_password,
    "/users/{name}/{action:provision|decommission}": user_action,
    "/tenant/api/vms": tenant.tenant_vms,
    "/tenant/api/vm": tenant.tenant_vm,
    "/tenant/api/deploy": tenant.tenant_deploy,
    "/tenant/api/action": tenant.tenant_action,
    "/tenant/api/migrate": tenant.tenant_migrate,
}
