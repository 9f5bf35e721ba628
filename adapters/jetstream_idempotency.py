"""Idempotency records of the JetStream event store, in a KV bucket beside the log.

A keyed append first reserves its key (a KV create, so exactly one writer gets it), then
commits its events with the reservation's token in the last event's `Hero-Commit` header and
`Nats-Msg-Id` set from the key, then confirms the record with the position; a failed append
releases the key. A reservation left behind by a writer that died is settled by whoever meets
it once it is older than any append can take: confirmed if the log holds its token, else freed.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
import nats.errors
import structlog
from nats.js import api
from nats.js.client import JetStreamContext
from nats.js.errors import KeyDeletedError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from core.errors import Conflict, Unavailable
from core.events import IdempotencyRecord
from core.retry import RetryPolicy

log = structlog.get_logger(__name__)

T = TypeVar("T")

BUCKET = "HERO_IDEMPOTENCY"
STALE_AFTER = 60.0
"""Seconds after which a reservation is settled by others: an append gives up well before
(the server drops an unfinished batch after 10 s, nats-server server/stream.go)."""
SETTLE_DELAY = 15.0
"""Seconds after an append of unknown outcome when it can no longer land: the server drops an
unfinished batch after 10 s, and a commit's reply is waited for 5 s."""
SKEW = 60.0
"""Seconds of clock difference between writers and servers allowed when searching the log."""
HELD_WAIT = 10.0
"""Seconds a lookup waits for a key held by another replica's append (one commit takes at most
the store's 5 s timeout, and a few more when it retries at a moving head)."""

BACKGROUND_TRIES = 8
"""Tries of a confirmation, release or settlement left to the background; then others settle it."""

WRONG_LAST_SEQUENCE = 10071  # JSStreamWrongLastSequenceErr, nats-server server/errors.json

FindCommit = Callable[[str, float], Awaitable[int | None]]
"""The position of the event carrying a reservation token, searching from a Unix time."""


class Stored(msgspec.Struct, frozen=True, kw_only=True):
    """An idempotency record as the bucket holds it; a reservation has a token."""

    key: str
    operation: str
    body_hash: str
    reply: bytes
    position: int = 0
    token: str = ""  # set while reserved, cleared once confirmed
    created: float = 0.0

    @classmethod
    def of(cls, record: IdempotencyRecord, *, position: int = 0, token: str = "") -> Stored:
        """The bucket's form of `record`, created now."""
        return cls(
            key=record.key,
            operation=record.operation,
            body_hash=record.body_hash,
            reply=record.reply,
            position=position,
            token=token,
            created=time.time(),
        )

    def record(self) -> IdempotencyRecord:
        return IdempotencyRecord(self.key, self.operation, self.body_hash, self.reply)


encode_stored = msgspec.json.Encoder().encode
decode_stored = msgspec.json.Decoder(Stored).decode


@dataclass(frozen=True, slots=True)
class Reservation:
    """A key this writer holds while its append is in flight."""

    hashed: str
    token: str
    revision: int
    stored: Stored


BACKGROUND_RETRY = RetryPolicy(base_delay=0.25, max_delay=5.0, jitter=False)
"""The pause before a background try: 0.25 s, doubling, up to 5 s."""

HELD_POLL = RetryPolicy(base_delay=0.01, max_delay=0.2, jitter=False)
"""The pause between looks at a key another writer holds: 10 ms, doubling, up to 0.2 s."""


def background_pause(attempt: int) -> float:
    """The pause before background try `attempt` (from 0)."""
    return BACKGROUND_RETRY.delay(attempt + 1)


def hashed(key: str) -> str:
    """The KV key for an idempotency key (KV keys allow few characters; keys are not logged)."""
    return hashlib.sha256(key.encode()).hexdigest()


class IdempotencyKeys:
    """The bucket of idempotency records."""

    def __init__(self, js: JetStreamContext, *, replicas: int, find: FindCommit) -> None:
        self._js = js
        self._replicas = replicas
        self._find = find
        self._kv: KeyValue | None = None
        self._mine: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.stale_after = STALE_AFTER
        self.held_wait = HELD_WAIT

    async def open(self) -> None:
        config = api.KeyValueConfig(
            bucket=BUCKET, history=1, replicas=self._replicas, storage=api.StorageType.FILE
        )
        try:
            self._kv = await self._js.key_value(BUCKET)
        except nats.js.errors.BucketNotFoundError:
            self._kv = await self._js.create_key_value(config)

    @property
    def kv(self) -> KeyValue:
        assert self._kv is not None, "open() first"
        return self._kv

    async def reserve(self, record: IdempotencyRecord) -> Reservation:
        """Holds the key for one append; Conflict if it is taken or held."""
        name = hashed(record.key)
        token = uuid.uuid4().hex
        stored = Stored.of(record, token=token)
        for _ in range(3):
            try:
                revision = await self._create(name, stored)
            except KeyWrongLastSequenceError:
                found = await self._get(name)
                if found is None:
                    continue
                existing, rev = found
                if not existing.token:
                    raise Conflict("idempotency key already used") from None
                if not await self._settle(name, existing, rev):
                    raise Conflict("idempotency key is in use by a concurrent request") from None
                continue
            self._mine.add(token)
            return Reservation(name, token, revision, stored)
        raise Conflict("idempotency key is in use by a concurrent request")

    async def confirm(self, held: Reservation, position: int) -> None:
        """Turns the reservation into the record; tries again in the background if the bucket
        does not answer (its settlement from the log is the last resort)."""
        self._mine.discard(held.token)
        final = msgspec.structs.replace(held.stored, position=position, token="")
        try:
            await self.kv.update(held.hashed, encode_stored(final), last=held.revision)
        except (nats.errors.Error, nats.js.errors.Error):
            log.info("idempotency.confirm_deferred", position=position)
            self._background(self._confirm_retrying(held, final), f"confirm-{held.token}")

    async def _confirm_retrying(self, held: Reservation, final: Stored) -> None:
        for attempt in range(BACKGROUND_TRIES):
            await asyncio.sleep(background_pause(attempt))
            try:
                await self.kv.update(held.hashed, encode_stored(final), last=held.revision)
                return
            except KeyWrongLastSequenceError:
                return  # settled from the log by another writer
            except (nats.errors.Error, nats.js.errors.Error):
                continue
        log.warning("idempotency.confirm_deferred_to_settlement")

    async def release(self, held: Reservation) -> None:
        """Frees the key of an append that failed; tries again in the background if the bucket
        does not answer (during a leader election), so the key is not held until stale."""
        try:
            await self.kv.delete(held.hashed, last=held.revision)
        except KeyWrongLastSequenceError:
            pass  # settled by another writer meanwhile
        except (nats.errors.Error, nats.js.errors.Error):
            log.info("idempotency.release_deferred")
            self._background(self._release_retrying(held), f"release-{held.token}")
            return
        self._mine.discard(held.token)

    async def _release_retrying(self, held: Reservation) -> None:
        for attempt in range(BACKGROUND_TRIES):
            await asyncio.sleep(background_pause(attempt))
            try:
                await self.kv.delete(held.hashed, last=held.revision)
                break
            except KeyWrongLastSequenceError:
                break
            except (nats.errors.Error, nats.js.errors.Error):
                continue
        self._mine.discard(held.token)

    def settle_later(self, held: Reservation) -> None:
        """After an append whose outcome is unknown: once it can no longer land, confirms the
        record if the log holds its token, else frees the key."""
        self._background(self._settle_own(held), f"settle-{held.token}")

    async def _settle_own(self, held: Reservation) -> None:
        await asyncio.sleep(SETTLE_DELAY)
        self._mine.discard(held.token)
        for attempt in range(BACKGROUND_TRIES):
            try:
                await self._settle(held.hashed, held.stored, held.revision, own=True)
                return
            except (Unavailable, nats.errors.Error, nats.js.errors.Error):
                await asyncio.sleep(background_pause(attempt))
        log.warning("idempotency.settle_deferred")  # others settle it once it is stale

    def _background(self, work: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(work, name=f"idempotency-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Stops the background releases and settlements (others settle what is left)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def record(self, record: IdempotencyRecord, position: int) -> None:
        """Stores the record of a keyed request that appended nothing; Conflict if taken."""
        stored = Stored.of(record, position=position)
        name = hashed(record.key)
        try:
            await self._create(name, stored)
        except KeyWrongLastSequenceError:
            found = await self._get(name)
            if found is not None and found[0].token and await self._settle(name, *found):
                return await self.record(record, position)
            raise Conflict("idempotency key already used") from None

    async def lookup(self, key: str) -> IdempotencyRecord | None:
        """The confirmed record of `key`; None while it is free. A key another request holds
        (on another replica) is waited for up to `held_wait` seconds: confirmed, it is the
        record; released or still held, None."""
        name = hashed(key)
        loop = asyncio.get_running_loop()
        deadline, looks = loop.time() + self.held_wait, 0
        while (found := await self._get(name)) is not None:
            stored, revision = found
            if not stored.token:
                return stored.record()
            if await self._settle(name, stored, revision):
                continue  # its writer was gone: confirmed or freed now
            if stored.token in self._mine or loop.time() > deadline:
                return None
            # the KV bucket tells nothing when an entry changes short of a watch per lookup
            looks += 1
            await asyncio.sleep(HELD_POLL.delay(looks))
        return None

    async def _settle(self, name: str, stored: Stored, revision: int, *, own: bool = False) -> bool:
        """Confirms or frees a reservation whose writer is gone; False while it may be alive."""
        young = time.time() - stored.created < self.stale_after
        if not own and (stored.token in self._mine or young):
            return False
        position = await self._find(stored.token, stored.created - SKEW)
        try:
            if position is None:
                await self._call(self.kv.delete(name, last=revision))
            else:
                final = msgspec.structs.replace(stored, position=position, token="")
                await self._call(self.kv.update(name, encode_stored(final), last=revision))
        except KeyWrongLastSequenceError:
            pass  # another writer settled it first
        log.info("idempotency.settled", committed=position is not None)
        return True

    async def _create(self, name: str, stored: Stored) -> int:
        """Creates the key's record; KeyWrongLastSequenceError if the key exists.

        nats-py's KeyValue.create (nats/js/kv.py) reads the key back when the stream refuses the
        create with a wrong last sequence; a read that does not see the other writer's record
        yet raises KeyNotFoundError, which then means the same: the key exists.
        """
        try:
            return await self._call(self.kv.create(name, encode_stored(stored)))
        except KeyNotFoundError:
            raise KeyWrongLastSequenceError(description="the key exists") from None

    async def _get(self, name: str) -> tuple[Stored, int] | None:
        try:
            entry = await self._call(self.kv.get(name))
        except (KeyNotFoundError, KeyDeletedError):
            return None
        if entry.value is None:
            return None
        return decode_stored(entry.value), int(entry.revision or 0)

    async def _call(self, call: Awaitable[T]) -> T:
        try:
            return await call
        except (KeyWrongLastSequenceError, KeyNotFoundError, KeyDeletedError):
            raise
        except nats.js.errors.BadRequestError as error:
            # nats-py's kv.delete(last=...) passes the stream's refusal through as it is
            if error.err_code != WRONG_LAST_SEQUENCE:
                raise Unavailable("the idempotency records refused a change") from error
            raise KeyWrongLastSequenceError(description=error.description) from error
        except (nats.errors.Error, nats.js.errors.Error) as error:
            raise Unavailable("the idempotency records cannot be reached") from error
