"""Every event after a position, in order, each once: `events` pages, then the status stream."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import KW_ONLY, dataclass, field
from typing import Protocol, Self

import msgspec
from nats.aio.client import Client
from nats.aio.subscription import Subscription
from nats.errors import ConnectionClosedError

from core.contract import EventsPage
from core.errors import Unavailable
from core.events import EventOut
from core.retry import RetryPolicy

_event_decoder = msgspec.json.Decoder(EventOut)
# The pauses while a lagging replica's views catch up to a live event: 20 ms doubling to 0.5 s
FILL_RETRY = RetryPolicy(retries=19, base_delay=0.02, max_delay=0.5, jitter=False)


class Pages(Protocol):
    """What a subscription needs of the client: its connection, its prefix and its pages."""

    nc: Client
    prefix: str

    def pages(
        self, *, stream: str | None = None, after: int = 0, page_size: int = 1000
    ) -> AsyncIterator[EventsPage]: ...


@dataclass(eq=False)
class EventSubscription:
    """Catches up through `events`, then follows the status stream; an async iterator.

    Live messages are subscribed to before the catch-up and buffered meanwhile, so nothing falls
    between the two. A live event at or below the last position is a duplicate and skipped. A gap
    (a position, or for one stream a version, that does not follow the last) is filled from
    `events` before the live event is delivered; so is a silence of `poll_interval` seconds,
    which covers a lost tail (after a reconnect, or messages dropped for a slow consumer).
    """

    client: Pages
    _: KW_ONLY
    stream: str | None
    after: int
    page_size: int
    poll_interval: float | None
    pending_limit: int
    position: int = field(init=False)
    """The position of the last event delivered (or `after`): where to resume from."""
    _tail: int = field(init=False)  # the last position delivered or queued
    _tail_version: int | None = field(init=False, default=None)  # one stream's version at _tail
    _ready: deque[EventOut] = field(init=False, default_factory=deque)
    _sub: Subscription | None = field(init=False, default=None)
    _closed: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.position = self._tail = self.after

    @property
    def subject(self) -> str:
        prefix = self.client.prefix
        if self.stream is None:
            return f"{prefix}.events.>"
        kind, _, ident = self.stream.partition(":")
        return f"{prefix}.events.{kind}.{ident}.*"

    async def start(self) -> None:
        """Subscribes to the live subject and catches up; the first `__anext__` does it too."""
        if self._sub is not None or self._closed:
            return
        nc = self.client.nc
        self._sub = await nc.subscribe(self.subject, pending_msgs_limit=self.pending_limit)
        await nc.flush()
        await self._fetch()

    async def aclose(self) -> None:
        self._closed = True
        self._ready.clear()
        if self._sub is not None:
            sub, self._sub = self._sub, None
            if not self.client.nc.is_closed:
                await sub.unsubscribe()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> EventOut:
        await self.start()
        while True:
            if self._closed or self._sub is None:
                raise StopAsyncIteration
            if self._ready:
                event = self._ready.popleft()
                self.position = event.position
                return event
            try:
                # The silence is timed here, not by next_msg: its own timeout uses Python
                # 3.11's wait_for, which can swallow a cancellation of the caller.
                async with asyncio.timeout(self.poll_interval):
                    msg = await self._sub.next_msg(timeout=None)
            except TimeoutError:
                await self._fetch()  # a silence: pick up anything the live stream lost
                continue
            except ConnectionClosedError:
                self._closed = True
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    # nats-py reports a cancellation that meets a closed connection this way
                    raise asyncio.CancelledError from None
                raise StopAsyncIteration from None
            try:
                event = _event_decoder.decode(msg.data)
            except msgspec.MsgspecError:
                continue
            if event.position <= self._tail:
                continue  # already delivered or queued
            if self._is_gap(event):
                await self._fill(event)
            self._push(event)

    def _is_gap(self, event: EventOut) -> bool:
        if self.stream is None:
            return event.position != self._tail + 1
        if self._tail_version is None:
            return event.version != 1
        return event.version != self._tail_version + 1

    def _push(self, event: EventOut) -> None:
        self._ready.append(event)
        self._tail = event.position
        self._tail_version = event.version

    async def _fetch(self, before: int | None = None) -> None:
        """Queues every event after the tail (below `before`, when given) from `events`."""
        pages = self.client.pages(stream=self.stream, after=self._tail, page_size=self.page_size)
        async for page in pages:
            for event in page.events:
                if before is not None and event.position >= before:
                    return
                self._push(event)

    async def _fill(self, live: EventOut) -> None:
        """Fetches what lies between the tail and the live event.

        The service publishes an event only once `events` returns it; the retries cover a
        replica whose views lag behind the one that published.
        """
        for tries in range(1, FILL_RETRY.tries_of() + 1):
            await self._fetch(before=live.position)
            if not self._is_gap(live) or (self.stream is not None and self._tail_version is None):
                return  # no gap left, or a stream resumed mid-way whose version is unknown
            await asyncio.sleep(FILL_RETRY.delay(tries))
        raise Unavailable(f"events before position {live.position} could not be read")
