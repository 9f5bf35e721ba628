"""The audit page: a page of events at a time, who sent each command, data as key/value pairs."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import msgspec
from aiohttp import web

from core.contract import AuditEvent, AuditEventsRequest, StreamName
from hero_deployer.sdk.client import AuditPage, DomainError
from hero_deployer.web.forms import conforms
from hero_deployer.web.render import (
    acting,
    banners,
    render,
    require_operator,
    session_of,
    words,
)

TYPE_RE: Final = re.compile(r"\A[A-Za-z]{1,64}\Z")
DEFAULT_LIMIT: Final = 25
WINDOW_LABELS: Final[dict[str, tuple[str, timedelta]]] = {
    "": ("any time", timedelta(0)),
    "5m": ("last 5 minutes", timedelta(minutes=5)),
    "1h": ("last hour", timedelta(hours=1)),
    "1d": ("last day", timedelta(days=1)),
    "7d": ("last week", timedelta(days=7)),
}
WITHIN: Final = {key: delta for key, (_, delta) in WINDOW_LABELS.items()}
SERVICE_ACTOR: Final = "hero-deployer"  # what the service records on its own (outcomes)


@dataclass(frozen=True, slots=True)
class Filters:
    """The audit page's query, checked: bad values are dropped and named in `problems`."""

    stream: str
    type: str
    within: str
    limit: int
    after: int | None
    problems: tuple[str, ...]

    @classmethod
    def parse(cls, query: Any) -> Filters:
        stream = query.get("stream", "").strip()
        kind = query.get("type", "").strip()
        within = query.get("within", "")
        problems = []
        if stream and not conforms(stream, StreamName):
            problems.append("A stream looks like vm:vm_… or user:alice.")
            stream = ""
        if kind and not TYPE_RE.fullmatch(kind):
            problems.append("An event type is a word such as VmStarted.")
            kind = ""
        if within not in WITHIN:
            problems.append("Pick a time window from the list.")
            within = ""
        raw_limit = query.get("limit", "")
        limit = min(max(int(raw_limit), 1), 1000) if raw_limit.isdigit() else DEFAULT_LIMIT
        raw_after = query.get("after", "")
        after = int(raw_after) if raw_after.isdigit() else None
        return cls(stream, kind, within, limit, after, tuple(problems))


def _value(value: Any) -> str:
    if isinstance(value, str):
        return value
    return msgspec.json.encode(value).decode()


def pairs(data: bytes) -> list[tuple[str, str]]:
    """An event's data as (key, value) pairs, nested values as compact JSON."""
    decoded = msgspec.json.decode(data)
    if not isinstance(decoded, dict):
        return [("value", _value(decoded))]
    return [(str(key), _value(value)) for key, value in decoded.items()]


def row(event: AuditEvent) -> dict[str, Any]:
    return {
        "position": event.position,
        "stream": event.stream,
        "type": event.type,
        "recorded_at": event.recorded_at,
        "actor": event.actor or SERVICE_ACTOR,
        "request_id": event.request_id,
        "data": pairs(bytes(event.data)),
    }


async def _read(request: web.Request, filters: Filters) -> dict[str, Any]:
    """One page of events (the newest by default) and where the pages before and after start."""
    client = acting(request)
    head = await client.position()
    if filters.after is not None:
        after = filters.after
    elif filters.stream:
        after = 0
    else:
        after = max(0, head - filters.limit)
    page: AuditPage = await client.send(
        AuditEventsRequest(stream=filters.stream or None, after=after, limit=filters.limit)
    )
    since = datetime.now(UTC) - WITHIN[filters.within] if filters.within else None
    shown = [
        e
        for e in page.events
        if (not filters.type or e.type == filters.type)
        and (since is None or e.recorded_at >= since)
    ]
    at_head = len(page.events) < filters.limit or page.last >= head
    return {
        "rows": [row(e) for e in reversed(shown)],
        "after": after,
        "earlier": max(0, after - filters.limit) if after > 0 and not filters.stream else None,
        "later": page.last if not at_head else None,
        "at_head": at_head,
        "scanned": len(page.events),
    }


async def _context(request: web.Request) -> dict[str, Any]:
    filters = Filters.parse(request.query)
    problems = list(filters.problems)
    try:
        found = await _read(request, filters)
    except DomainError as error:
        problems.append(words(error))
        found = {"rows": [], "after": 0, "earlier": None, "later": None, "at_head": False}
        found["scanned"] = 0
    return {
        **found,
        "stream": filters.stream,
        "type": filters.type,
        "within": filters.within,
        "limit": filters.limit,
        "windows": [(key, label) for key, (label, _) in WINDOW_LABELS.items()],
        "problems": problems,
    }


async def audit_page(request: web.Request) -> web.StreamResponse:
    require_operator(request)
    context = await _context(request)
    return render(request, "audit.html", {**context, "banners": await banners(request)})


async def audit_rows(request: web.Request) -> web.StreamResponse:
    """The rows of the newest page for the live tail, rendered like the page's."""
    if not session_of(request).operator:
        raise web.HTTPUnauthorized()
    return render(request, "_audit_rows.html", await _context(request))
