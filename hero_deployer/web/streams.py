"""Live updates as server-sent events: whole events for operators, sid and type for tenants."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Final

import msgspec
from aiohttp import web

from hero_deployer.sdk.client import DomainError, EventOut, HeroDeployerClient
from hero_deployer.web.middleware import CLIENT_KEY, CONFIG_KEY, HUB_KEY, SECURITY_HEADERS
from hero_deployer.web.render import session_of

CATCH_UP_PAGES: Final = 10


async def _catch_up(
    client: HeroDeployerClient, after: int, send: Callable[[EventOut], Awaitable[None]]
) -> int:
    """Sends the recorded events after `after` (at most CATCH_UP_PAGES pages); the last position."""
    last, pages = after, 0
    async for page in client.pages(after=after):
        for event in page.events:
            await send(event)
        last, pages = page.last, pages + 1
        if pages == CATCH_UP_PAGES:
            break
    return last


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
            last = await _catch_up(client, int(raw_after), send) if raw_after.isdigit() else 0
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
    if not session_of(request).operator:
        raise web.HTTPUnauthorized()
    return await _sse(request, msgspec.json.encode)


async def tenant_live(request: web.Request) -> web.StreamResponse:
    """Only events of the VMs this browser's tenant page listed, and only their sid and type."""
    with request.app[CONFIG_KEY].watches.watch(session_of(request).id) as watched:

        def select(event: EventOut) -> bytes | None:
            kind, _, sid = event.stream.partition(":")
            if kind != "vm" or sid not in watched:
                return None
            body = {"sid": sid, "type": event.type, "position": event.position}
            return msgspec.json.encode(body)

        return await _sse(request, select)
