"""What every page handler shares: templates, the session, the acting client, errors in words."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote, urlsplit

import jinja2
import msgspec
from aiohttp import web

from core.contract import Name, Part
from core.usernames import Username
from hero_deployer.sdk.client import DomainError, HeroDeployerClient
from hero_deployer.web.forms import html_pattern, max_length
from hero_deployer.web.middleware import (
    CLIENT_KEY,
    JINJA_KEY,
    LIVE_AFTER_KEY,
    SESSION_KEY,
)
from hero_deployer.web.sessions import Session

HERE: Final = Path(__file__).parent
HTTP_STATUS: Final[dict[str, int]] = {
    "InvalidInput": 400,
    "Unauthorized": 502,  # the dashboard's own token was refused: a configuration problem
    "NotFound": 404,
    "Conflict": 409,
    "InvalidState": 409,
    "Unavailable": 503,
    "Internal": 500,
}
PARTS_TTL: Final = 30.0  # seconds a health answer's parts are reused for the banners


def session_of(request: web.Request) -> Session:
    return request[SESSION_KEY]


def client_key(request: web.Request) -> str:
    """The address failures count against: the peer (a proxy in front is one address)."""
    return request.remote or "unknown"


def acting(request: web.Request) -> HeroDeployerClient:
    """The client, sending this browser's opaque label as the actor of what it asks for."""
    session = session_of(request)
    who = f"op-{session.label}" if session.operator else f"tenant-{session.label}"
    return request.app[CLIENT_KEY].with_actor(f"dashboard {who}")


def safe_url(value: str) -> str:
    """`value` if it is an http(s) URL, else empty: user data never becomes a javascript: link."""
    return value if urlsplit(value).scheme in ("http", "https") else ""


def iso(value: datetime | None) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z") if value else ""


def duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 90:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes} min {rest} s"


def environment() -> jinja2.Environment:
    """The templates, autoescaped, with the filters and the form rules from core."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["safe_url"] = safe_url
    env.filters["iso"] = iso
    env.filters["duration"] = duration
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
    """Renders a template with the session's CSRF token and flash message.

    The page's name (`<body data-page>`, what operator.js keys on) is the template's: "tenant-vm"
    for tenant_vm.html.
    """
    session = session_of(request)
    flash, session.flash = session.flash, ""
    html = (
        request.app[JINJA_KEY]
        .get_template(template)
        .render(
            csrf=session.csrf,
            operator=session.operator,
            flash=flash,
            path=request.path,
            page=template.removesuffix(".html").replace("_", "-"),
            live_after=request.get(LIVE_AFTER_KEY, ""),
            banners=context.pop("banners", []),
            **context,
        )
    )
    return web.Response(text=html, content_type="text/html", charset="utf-8", status=status)


def json_response(value: Any) -> web.Response:
    return web.Response(body=msgspec.json.encode(value), content_type="application/json")


def require_operator(request: web.Request) -> None:
    if not session_of(request).operator:
        raise web.HTTPFound(f"/login?next={quote(request.path_qs, safe='/')}")


def words(error: DomainError) -> str:
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


@dataclass(slots=True)
class PartsCache:
    """The service's setup parts (from `health`), asked for at most every PARTS_TTL seconds."""

    parts: list[Part] = field(default_factory=list)
    fetched: float = -PARTS_TTL

    async def missing(self, client: HeroDeployerClient) -> list[Part]:
        """The parts the service found missing at its start; none when it cannot be asked."""
        now = time.monotonic()
        if now - self.fetched >= PARTS_TTL:
            try:
                self.parts = list((await client.health()).parts)
            except DomainError:
                return []
            self.fetched = now
        return [p for p in self.parts if p.state == "missing"]


PARTS_KEY: Final = web.AppKey("parts", PartsCache)


async def banners(request: web.Request) -> list[Part]:
    """A banner for each part of the setup the service found missing (operators only)."""
    if not session_of(request).operator:
        return []
    return await request.app[PARTS_KEY].missing(request.app[CLIENT_KEY])
