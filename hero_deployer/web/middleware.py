"""The dashboard's middlewares and what they share: config, app keys, headers, sessions, CSRF."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final

import jinja2
import msgspec
from aiohttp import web

from hero_deployer.sdk.client import HeroDeployerClient
from hero_deployer.web.live import EventHub, TenantWatches
from hero_deployer.web.ratelimit import FailureLimiter, TenantLimiter
from hero_deployer.web.sessions import COOKIE_NAME, Session, SessionStore
from hero_deployer.web.site import Site

CSRF_FIELD: Final = "csrf"
CSRF_HEADER: Final = "X-CSRF-Token"
SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})
CSP: Final = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
SECURITY_HEADERS: Final[dict[str, str]] = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), interest-cohort=()",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(slots=True)
class WebConfig:
    """What the app needs besides the client; tests shorten the limits."""

    token: str
    site: Site = field(default_factory=Site)
    sse_heartbeat: float = 15.0
    tenant_limiter: TenantLimiter = field(default_factory=TenantLimiter)
    login_limiter: FailureLimiter = field(default_factory=FailureLimiter)
    sessions: SessionStore = field(default_factory=SessionStore)
    watches: TenantWatches = field(default_factory=TenantWatches)


CLIENT_KEY: Final = web.AppKey("client", HeroDeployerClient)
CONFIG_KEY: Final = web.AppKey("config", WebConfig)
HUB_KEY: Final = web.AppKey("hub", EventHub)
JINJA_KEY: Final = web.AppKey("jinja", jinja2.Environment)
SESSION_KEY: Final = web.RequestKey("session", Session)
LIVE_AFTER_KEY: Final = web.RequestKey("live_after", str)


def error_json(code: str, message: str, status: int, **headers: str) -> web.Response:
    """The contract's error shape as an HTTP answer."""
    body = msgspec.json.encode({"error": {"code": code, "message": message}})
    return web.Response(body=body, status=status, content_type="application/json", headers=headers)


@web.middleware
async def security_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Security headers on every answer; no caching of anything but static files."""
    try:
        response = await handler(request)
    except web.HTTPException as error:
        response = error
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    if not request.path.startswith("/static/"):
        response.headers["Cache-Control"] = "no-store"
        response.headers["Pragma"] = "no-cache"
    if isinstance(response, web.HTTPException):
        raise response
    return response


@web.middleware
async def trusted_host(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answers only requests whose `Host` names this site: 400 malformed, 421 another host."""
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    local_port = sockname[1] if isinstance(sockname, tuple) and len(sockname) >= 2 else None
    status = request.app[CONFIG_KEY].site.host_status(request.headers.get("Host"), local_port)
    if status:
        reason = "malformed Host header" if status == 400 else "this site is not that host"
        return web.Response(text=f"{reason}\n", status=status)
    return await handler(request)


@web.middleware
async def sessions(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Finds the operator's session or takes the browser as anonymous; sets a new cookie."""
    if request.path.startswith("/static/"):
        return await handler(request)
    config = request.app[CONFIG_KEY]
    cookie = request.cookies.get(COOKIE_NAME)
    request[SESSION_KEY] = config.sessions.get(cookie) or config.sessions.anonymous(cookie)
    position = request.app[HUB_KEY].position  # before any data is read: live updates go on here
    request[LIVE_AFTER_KEY] = "" if position is None else str(position)
    try:
        response = await handler(request)
    except web.HTTPException as error:
        _set_cookie(request, error, config)
        raise
    _set_cookie(request, response, config)
    return response


def _set_cookie(request: web.Request, response: web.StreamResponse, config: WebConfig) -> None:
    session = request[SESSION_KEY]
    if response.prepared:  # a stream: its headers are gone
        return
    if request.cookies.get(COOKIE_NAME) != session.id:
        response.set_cookie(
            COOKIE_NAME,
            session.id,
            path="/",
            httponly=True,
            samesite="Strict",
            secure=config.site.secure,
        )


@web.middleware
async def csrf(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuses a state-changing request without the session's CSRF token or from elsewhere."""
    if request.method in SAFE_METHODS:
        return await handler(request)
    origin = request.headers.get("Origin")
    site = request.app[CONFIG_KEY].site
    if origin is not None and not site.same_origin(origin, request.host):
        return _forbidden(request, "cross-origin request refused")
    token = request.headers.get(CSRF_HEADER)
    if token is None and request.content_type in (
        "application/x-www-form-urlencoded",
        "multipart/form-data",
    ):
        form = await request.post()
        value = form.get(CSRF_FIELD)
        token = value if isinstance(value, str) else None
    if not request[SESSION_KEY].check_csrf(token):
        return _forbidden(request, "missing or wrong CSRF token; reload the page and try again")
    return await handler(request)


def _forbidden(request: web.Request, message: str) -> web.Response:
    if request.path.startswith("/tenant/api/"):
        return error_json("Forbidden", message, 403)
    return web.Response(text=f"Forbidden: {message}\n", status=403)


MIDDLEWARES: Final = (security_headers, trusted_host, sessions, csrf)
