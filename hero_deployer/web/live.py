"""One subscription to the status stream, fanned out to every server-sent-events listener."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Final

import structlog

from hero_deployer.sdk.client import EventOut, HeroDeployerClient

log = structlog.get_logger("hero_deployer.web")

CLOSED: Final = None


class Listener:
    """A bounded queue of events for one SSE response; None means the stream is over."""

    def __init__(self, size: int) -> None:
        self.queue: asyncio.Queue[EventOut | None] = asyncio.Queue(size)

    def offer(self, event: EventOut | None) -> bool:
        """Queues `event`; False when the listener is too slow and must be dropped."""
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            return False
        return True


class EventHub:
    """Follows `client.subscribe()` while anyone listens and hands each event to listeners.

    A listener that falls `queue_size` events behind is closed; the browser's EventSource
    reconnects and the page reloads what it shows, so nothing is lost for the viewer. With no
    listener the hub leaves the stream at its next event (following it cost `up` 3-5% of its
    time under load with no browser open); the next listener starts it from the position then.
    """

    def __init__(
        self, client: HeroDeployerClient, *, queue_size: int = 1000, retry_delay: float = 1.0
    ) -> None:
        self._client = client
        self._queue_size = queue_size
        self._retry_delay = retry_delay
        self._listeners: set[Listener] = set()
        self._task: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()
        self._wanted = asyncio.Event()  # set while anyone listens
        self._following = asyncio.Event()  # set while `position` says where the hub follows from
        self.position: int | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="web-event-hub")

    async def close(self) -> None:
        """Stops following and ends every listener's stream.

        nats-py turns a cancellation that meets a closed connection into ConnectionClosedError,
        which the loop would take for an outage; so the loop also checks `_closing`, and the
        task is cancelled until it is really done.
        """
        self._closing.set()
        self._following.set()  # a listener waiting for the hub gets its end instead
        task, self._task = self._task, None
        while task is not None and not task.done():  # 3.11's wait_for can swallow a cancel
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)
        for listener in list(self._listeners):
            listener.offer(CLOSED)
        self._listeners.clear()

    @contextlib.asynccontextmanager
    async def listen(self) -> AsyncIterator[Listener]:
        """A listener that gets every event after the moment it is handed out."""
        listener = Listener(self._queue_size)
        self._listeners.add(listener)
        self._wanted.set()
        try:
            await self._following.wait()
            yield listener
        finally:
            self._listeners.discard(listener)
            if not self._listeners:
                self._wanted.clear()

    def _publish(self, event: EventOut) -> None:
        for listener in list(self._listeners):
            if not listener.offer(event):
                self._listeners.discard(listener)
                listener.queue = asyncio.Queue(1)
                listener.offer(CLOSED)

    async def _run(self) -> None:
        while not self._closing.is_set():
            await self._wanted.wait()
            try:
                if self.position is None:
                    self.position = await self._client.position()
                    self._following.set()
                if await self._follow(self.position):
                    continue  # nobody listens: wait for the next listener
            except asyncio.CancelledError:
                raise
            except Exception as error:  # the service or NATS is away: try again shortly
                if self._closing.is_set():
                    return
                log.warning("web.live.retry", error=str(error))
            await asyncio.sleep(self._retry_delay)

    async def _follow(self, after: int) -> bool:
        """Hands on each event after `after`; True at the first one nobody listens to."""
        async with self._client.subscribe(after=after) as events:
            async for event in events:
                if not self._listeners:
                    self.position = None
                    self._following.clear()
                    return True
                self.position = event.position
                self._publish(event)
        return False


class TenantWatches:
    """The VM sids each open tenant stream may forward, keyed by the browser's cookie.

    A set exists only while its stream is open (state the open connection holds anyway), so a
    listing without an open stream stores nothing; the tenant page opens its stream first and
    lists its VMs when the stream is connected.
    """

    def __init__(self) -> None:
        self._open: dict[str, list[set[str]]] = {}

    @contextlib.contextmanager
    def watch(self, browser: str) -> Iterator[set[str]]:
        """The set of sids one stream of `browser` forwards, while the stream is open."""
        watched: set[str] = set()
        self._open.setdefault(browser, []).append(watched)
        try:
            yield watched
        finally:
            sets = self._open.get(browser, [])
            sets.remove(watched)
            if not sets:
                self._open.pop(browser, None)

    def show(self, browser: str, sids: Iterable[str]) -> None:
        """The browser's page lists exactly `sids` now: its open streams forward those."""
        shown = set(sids)
        for watched in self._open.get(browser, []):
            watched.clear()
            watched.update(shown)

    def add(self, browser: str, sid: str) -> None:
        """The browser's page shows `sid` too (it just deployed it)."""
        for watched in self._open.get(browser, []):
            watched.add(sid)

    def __len__(self) -> int:
        return sum(len(sets) for sets in self._open.values())
