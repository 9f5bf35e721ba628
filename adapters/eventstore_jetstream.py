"""The JetStream event store: one replicated stream, a subject per event stream, atomic batches.

The global position is the stream sequence (deletes and purges are denied, so it has no gaps);
a stream's version is the count of its subject's messages and `Nats-Expected-Last-Subject-
Sequence` holds the expected version. Every append also expects the stream's last sequence, so
each event's place in the hash chain (adapters/event_chain.py) is known before it is sent and
travels in its `Hero-Hash` header. Idempotency records live in a KV bucket: reserved before the
append, confirmed after it, released when it fails (see `IdempotencyKeys`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import nats.errors
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.client import JetStreamContext

from adapters.eventstore_base import Appending, EventLogStore
from adapters.jetstream_batch import Pending, stage, take
from adapters.jetstream_follow import head_past, landed, watch
from adapters.jetstream_idempotency import IdempotencyKeys
from adapters.jetstream_log import (
    ALL,
    DUPLICATE,
    EXPECTED_LAST_SEQ,
    H_COMMIT,
    H_HASH,
    H_VERSION,
    MAX_BATCH,
    STREAM,
    WRONG_LAST_SEQUENCE,
    Outgoing,
    Refused,
    direct_get,
    find_header,
    json_page_between,
    publish_atomic,
    read_events,
    stream_config,
    stream_ends,
    stream_of,
    subject_of,
)
from core.errors import ConcurrencyError, Conflict, Unavailable
from core.events import IdempotencyRecord, RecordedEvent

log = structlog.get_logger(__name__)

RETRIES = 20
"""Attempts of one append that keeps losing the log's head to other writers."""
HEAD_POLL = 2.0
"""Seconds between reads of the log's head besides the watcher's news."""


class OutcomeUnknown(Unavailable):
    """The log did not say whether an append landed (a lost reply, a broken connection)."""


class JetStreamEventStore(EventLogStore[Pending]):
    """Appends go through one writer task that sends whatever is waiting as one atomic batch."""

    def __init__(
        self, nc: Client, *, replicas: int = 3, timeout: float = 5.0, max_batch: int = 500
    ) -> None:
        super().__init__()
        self._nc = nc
        self._js: JetStreamContext = nc.jetstream(timeout=timeout)
        self._replicas = replicas
        self._timeout = timeout
        self._max_batch = min(max_batch, MAX_BATCH)
        self.keys = IdempotencyKeys(self._js, replicas=replicas, find=self._find_commit)
        self._poller: asyncio.Task[None] | None = None
        self._watcher: object | None = None
        self._versions: dict[str, tuple[int, int]] = {}  # stream -> (version, its last position)

    async def open(self) -> None:
        """Creates the stream and the key bucket if missing, reads the head, follows new events."""
        try:
            await self._js.stream_info(STREAM)
        except nats.js.errors.NotFoundError:
            await self._js.add_stream(stream_config(self._replicas))
        await self.keys.open()
        await self._refresh_head()
        self._watcher = await watch(self._js, self._head, self._observe)
        self._start_writer("eventstore-jetstream-writer")
        self._poller = asyncio.create_task(self._poll_head(), name="eventstore-jetstream-head")

    async def close(self) -> None:
        """Sends what is waiting, then stops; later appends raise Unavailable."""
        await self._stop_writer()
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
            self._poller = None
        await self.keys.close()
        watcher = self._watcher
        self._watcher = None
        if watcher is not None:
            try:
                await watcher.unsubscribe()  # type: ignore[attr-defined]
            except nats.errors.Error:
                log.warning("eventstore.watch_not_stopped")

    # Writing ---------------------------------------------------------------------------------

    async def _append(self, call: Appending) -> list[RecordedEvent]:
        if not any(a.events for a in call.appends):
            if call.idempotency is not None:
                await self.keys.record(call.idempotency, self._head)
            for a in call.appends:
                if a.expected_version != await self._version(a.stream):
                    raise ConcurrencyError(f"{a.stream} is not at version {a.expected_version}")
            return []
        reservation = await self.keys.reserve(call.idempotency) if call.idempotency else None
        future: asyncio.Future[list[RecordedEvent]] = asyncio.get_running_loop().create_future()
        try:
            events = await self._queued(
                Pending(call.appends, call.request_id, reservation, future, actor=call.actor)
            )
        except (OutcomeUnknown, asyncio.CancelledError):
            if reservation is not None:  # the events may land: the log will tell, later
                self.keys.settle_later(reservation)
            raise
        except BaseException:
            if reservation is not None:
                await self.keys.release(reservation)
            raise
        if reservation is not None:
            await self.keys.confirm(reservation, events[-1].position)
        return events

    def _take(self) -> list[Pending]:
        return take(self._pending, self._max_batch)

    def _failure(self) -> Exception:
        return OutcomeUnknown("the event log failed")

    async def _commit(self, batch: list[Pending]) -> None:
        """Sends the batch; after a refusal (mostly another writer at the head) reads the head
        and the batch's versions again and sends what still holds. An append refused for
        another reason is tried alone, so that only it fails."""
        pending = batch
        refused: Refused | None = None
        for _ in range(RETRIES):
            if refused is not None:
                try:
                    await self._catch_up(refused)
                except Unavailable as error:  # nothing of this batch landed: it was refused
                    for one in pending:
                        one.future.set_exception(error)
                    return
            await self._load_versions(pending, again=refused is not None)
            # the losers are told here
            pending = stage(pending, self._head, self._head_hash, self._versions)
            if not pending:
                return
            try:
                await self._send(pending)
                return
            except Refused as error:
                refused = error
                log.debug("eventstore.batch_refused", code=refused.code, appends=len(pending))
                if refused.code in WRONG_LAST_SEQUENCE:
                    continue
                if len(pending) > 1:
                    for one in pending:
                        await self._commit([one])
                    return
                failure: Exception = Unavailable(f"the event log refused: {refused}")
                if refused.code in DUPLICATE:
                    failure = Conflict("idempotency key already used")
                pending[0].future.set_exception(failure)
                return
        for one in pending:
            one.future.set_exception(ConcurrencyError("the log kept changing; try again"))

    async def _catch_up(self, refused: Refused) -> None:
        """Takes the head the refusal names from the watcher (it is on its way), or from the
        stream when the watcher is slow or the refusal names none."""
        if refused.last > self._head:
            try:
                await asyncio.wait_for(self.wait_for_events_after(refused.last - 1), 0.5)
                return
            except TimeoutError:
                pass
        if refused.last == 0 or refused.last > self._head:
            await self._refresh_head()

    async def _send(self, staged: list[Pending]) -> None:
        """Publishes the staged appends as one batch and resolves their callers."""
        messages = [m for p in staged for m in p.messages]
        first = messages[0]
        messages[0] = Outgoing(
            first.subject, {**first.headers, EXPECTED_LAST_SEQ: str(self._head)}, first.data
        )
        last = staged[-1].recorded[-1]
        try:
            seq = await publish_atomic(self._nc, messages, self._timeout)
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as error:
            if not await landed(self._nc, last.position, staged[-1].chain, self._timeout):
                raise OutcomeUnknown("the event log did not answer; the append may land") from error
            seq = last.position
        if seq != last.position:
            raise Unavailable(f"the log placed the batch at {seq}, not {last.position}")
        self._accepted(staged)

    def _accepted(self, staged: list[Pending]) -> None:
        for pending in staged:
            for event in pending.recorded:
                self._advance(
                    event.position, pending.chain if event is pending.recorded[-1] else None
                )
                self._versions[event.stream] = (event.version, event.position)
            if not pending.future.done():
                pending.future.set_result(list(pending.recorded))

    def _advance(self, position: int, chain: bytes | None) -> None:
        """Moves the head forward (never back) and wakes whoever waits for new events."""
        if position <= self._head:
            return
        self._head = position
        if chain is not None:
            self._head_hash = chain
        self._moved()

    async def _observe(self, msg: object) -> None:
        """Takes note of every event in the log, this store's and other writers'."""
        headers = getattr(msg, "headers", None) or {}
        seq = msg.metadata.sequence.stream  # type: ignore[attr-defined]
        stream = stream_of(msg.subject)  # type: ignore[attr-defined]
        self._know(stream, int(headers.get(H_VERSION, "0")), seq)
        self._advance(seq, bytes.fromhex(headers.get(H_HASH, "")))

    # Versions and the head -------------------------------------------------------------------

    def known_version(self, stream: str) -> int | None:
        """The stream's version as this store last wrote or saw it, if it remembers."""
        known = self._versions.get(stream)
        return known[0] if known is not None else None

    async def _version(self, stream: str) -> int:
        await self._load_versions_of({stream})
        return self._versions.get(stream, (0, 0))[0]

    def _know(self, stream: str, version: int, position: int) -> None:
        """Takes note of a version the log holds; a known one never goes back (the log keeps
        every event, and a stream peer behind the leader may answer with an older one)."""
        if version > self._versions.get(stream, (0, 0))[0]:
            self._versions[stream] = (version, position)

    async def _load_versions(self, batch: list[Pending], *, again: bool = False) -> None:
        """Reads the last version of streams expected past zero that this store does not know
        (`again`: of all of them, after the log refused the batch)."""
        await self._load_versions_of(
            {a.stream for p in batch for a in p.appends if a.expected_version != 0}, again=again
        )

    async def _load_versions_of(self, streams: set[str], *, again: bool = False) -> None:
        asked = [s for s in streams if again or s not in self._versions]
        found = await asyncio.gather(*(self._last_of(s) for s in asked))
        for stream, last in zip(asked, found, strict=True):
            if last is not None:
                self._know(stream, *last)

    async def _last_of(self, stream: str) -> tuple[int, int] | None:
        msg = await self._get({"last_by_subj": subject_of(stream)})
        if msg is None:
            return None
        headers = msg.headers or {}
        return int(headers[H_VERSION]), int(headers["Nats-Sequence"])

    async def _refresh_head(self) -> None:
        """Takes the log's last position and its hash from the server."""
        head = await head_past(self._js, self._nc, self._head, self._timeout)
        if head is not None:
            self._advance(*head)

    async def _poll_head(self) -> None:
        """Reads the head now and then as well, in case the watcher is being made again."""
        while True:
            await asyncio.sleep(HEAD_POLL)
            try:
                await self._refresh_head()
            except Unavailable:
                log.info("eventstore.head_unreadable")

    async def _get(self, request: dict[str, object]) -> Msg | None:
        try:
            return await direct_get(self._nc, request, self._timeout)
        except nats.errors.Error as error:
            raise Unavailable("the event log cannot be reached") from error

    # Reading ---------------------------------------------------------------------------------

    async def last_position(self) -> int:
        """The log's last position, read from the server (the `Hero-Hash` there is the head)."""
        await self._refresh_head()
        return self._head

    async def read_stream(self, stream: str) -> list[RecordedEvent]:
        _, last = self._versions.get(stream, (0, 0))  # a replica must answer at least this
        events = await self._read(subject_of(stream), 0, 2**31, through=last)
        if events:  # what a command decides on is what its append is checked against
            self._know(stream, events[-1].version, events[-1].position)
        return events

    async def read_all(
        self, after: int = 0, limit: int = 1000, stream: str | None = None
    ) -> list[RecordedEvent]:
        if stream is not None:
            return await self._read(subject_of(stream), after, limit, through=0)
        return await self._read(ALL, after, limit, through=min(self._head, after + limit))

    async def _read(
        self, subject: str, after: int, limit: int, *, through: int
    ) -> list[RecordedEvent]:
        return await read_events(self._nc, subject, after, limit, through, self._timeout)

    async def read_json_page(self, after: int, upto: int, prefix: str, types: Sequence[str]) -> str:
        """A stretch of the log for bulk replay, as SqliteEventStore.read_json_page frames it."""
        return await json_page_between(self._nc, after, upto, prefix, types, self._timeout)

    async def stream_ends(self, prefix: str, upto: int) -> list[tuple[int, str]]:
        """The last position up to `upto` of every stream starting with `prefix`, in order."""
        return await stream_ends(self._nc, prefix, upto, self._timeout)

    async def idempotent_reply(self, key: str) -> IdempotencyRecord | None:
        return await self.keys.lookup(key)

    async def _find_commit(self, token: str, since: float) -> int | None:
        """The position of the event carrying a reservation's token, searching from `since`."""
        return await find_header(self._nc, H_COMMIT, token, since, self._timeout)
