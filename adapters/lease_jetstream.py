"""One active replica for side effects: a lease in a KV bucket, shared checkpoints, a gated log.

The lease is a key in `HERO_LEASES`, a bucket whose entries expire after `ttl` seconds
(`max_age`): the holder creates the key (a KV create, so one replica wins) and updates it
every `ttl / 3` seconds expecting its own last revision; a holder that dies stops updating and
its key expires, after which another replica's create succeeds. A holder that cannot renew for
`2 * ttl / 3` seconds steps down before its key can expire, so two holders never overlap while
their clocks and the server agree on time. The followers that cause side effects (the VM
reactor, the user process manager) read the log through `LeasedSource`, which shows events only
to the holder and starts it from the checkpoint the last holder saved in `HERO_CHECKPOINTS`.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from types import TracebackType
from typing import Self

import nats.errors
import nats.js.errors
import structlog
from nats.js import api
from nats.js.client import JetStreamContext
from nats.js.errors import KeyDeletedError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from core.events import RecordedEvent
from projections.follow import Checkpoints
from projections.runner import EventSource

log = structlog.get_logger(__name__)

LEASES, CHECKPOINTS = "HERO_LEASES", "HERO_CHECKPOINTS"
_NATS_ERRORS = (nats.errors.Error, nats.js.errors.Error)


async def bucket(js: JetStreamContext, name: str, *, replicas: int, ttl: float = 0) -> KeyValue:
    """The KV bucket `name`, made if missing (`ttl` 0: entries never expire)."""
    try:
        return await js.key_value(name)
    except nats.js.errors.BucketNotFoundError:
        config = api.KeyValueConfig(
            bucket=name,
            history=1,
            replicas=replicas,
            storage=api.StorageType.FILE,
            ttl=ttl or None,
        )
        return await js.create_key_value(config)


class KvLease:
    """Holds the lease `name` whenever no other replica does; `held` says whether it does now."""

    def __init__(self, kv: KeyValue, name: str, *, ttl: float) -> None:
        self._kv = kv
        self._name = name
        self._ttl = ttl
        self.holder = uuid.uuid4().hex
        self.held = False
        self.term = 0  # how many times this replica has taken the lease
        self._revision = 0
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._run(), name=f"lease-{self._name}")
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.held:  # hand over at once instead of after the key expires
            with contextlib.suppress(*_NATS_ERRORS):
                await self._kv.delete(self._name, last=self._revision)
            self._set(False)

    async def until_held(self) -> None:
        while not self.held:
            await self._wait_for_change()

    async def until_lost(self) -> None:
        while self.held:
            await self._wait_for_change()

    async def _wait_for_change(self) -> None:
        changed = self._changed
        await changed.wait()

    def _set(self, held: bool) -> None:
        if held != self.held:
            self.held = held
            self.term += held
            log.info("lease.held" if held else "lease.lost", lease=self._name)
            changed, self._changed = self._changed, asyncio.Event()
            changed.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        renewed = 0.0
        while True:
            try:
                if self.held:
                    self._revision = await self._kv.update(
                        self._name, self.holder.encode(), last=self._revision
                    )
                else:
                    self._revision = await self._kv.create(self._name, self.holder.encode())
                renewed = loop.time()
                self._set(True)
            except (KeyWrongLastSequenceError, KeyNotFoundError, KeyDeletedError):
                self._set(False)  # another replica holds it, or took it over
            except _NATS_ERRORS:
                if self.held and loop.time() - renewed > 2 * self._ttl / 3:
                    self._set(False)  # step down before the key can expire elsewhere
            await asyncio.sleep(self._ttl / 3)


class KvCheckpoints(Checkpoints):
    """Checkpoints every replica shares, saved only by the lease's holder."""

    def __init__(self, kv: KeyValue, lease: KvLease) -> None:  # no views connection
        self._kv = kv
        self._lease = lease

    async def load(self, name: str) -> int:
        try:
            entry = await self._kv.get(name)
        except (KeyNotFoundError, KeyDeletedError):
            return 0
        return int(entry.value or b"0")

    async def save(self, name: str, position: int) -> None:
        if self._lease.held:
            await self._kv.put(name, str(position).encode())


class LeasedSource:
    """The log as the side-effect follower `name` sees it: events only while the lease is held,
    and, once per term, from the checkpoint the holder before saved (not from older events)."""

    def __init__(
        self, source: EventSource, lease: KvLease, checkpoints: KvCheckpoints, name: str
    ) -> None:
        self._source = source
        self._lease = lease
        self._checkpoints = checkpoints
        self._name = name
        self._floor = 0
        self._term = 0

    @property
    def position(self) -> int:
        return self._source.position

    async def read_all(
        self, after: int = 0, limit: int = 1000, stream: str | None = None
    ) -> list[RecordedEvent]:
        if not self._lease.held:
            return []
        if self._term != self._lease.term:  # taken over: start where the holder before stopped
            self._floor = await self._checkpoints.load(self._name)
            self._term = self._lease.term
        return await self._source.read_all(
            after=max(after, self._floor), limit=limit, stream=stream
        )

    async def wait_for_events_after(self, position: int) -> None:
        await self._lease.until_held()
        await self._source.wait_for_events_after(position)
