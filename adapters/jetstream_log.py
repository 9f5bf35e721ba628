"""The event log's JetStream wire: subjects, event headers, direct gets and atomic batches.

Rules taken from nats-io/nats-server (v2.15): `server/stream.go` (direct get: a batch ends with a
`204 EOB` status carrying `Nats-Num-Pending`; `404` when nothing matches; a batch id is at most
64 characters) and `server/jetstream_batching.go` (`Nats-Expected-Last-Sequence` only on a
batch's first message; `Nats-Expected-Last-Subject-Sequence` only on a subject's first message
in the batch; a batch is at most 1000 messages; errors come back on the commit's reply).
"""

from __future__ import annotations

import asyncio
import json
import re
import string
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, unquote

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api

from adapters.event_chain import GENESIS, ChainReport, link
from core.errors import Unavailable
from core.events import RecordedEvent

STREAM = "HERO_EVENTS"
ROOT = "hero.log"
ALL = f"{ROOT}.>"
MAX_BATCH = 1000  # streamDefaultMaxAtomicBatchSize, server/stream.go

H_TYPE, H_VERSION, H_AT, H_REQUEST = "Hero-Type", "Hero-Version", "Hero-At", "Hero-Request"
H_HASH, H_COMMIT, H_ACTOR = "Hero-Hash", "Hero-Commit", "Hero-Actor"
EXPECTED_LAST_SEQ = "Nats-Expected-Last-Sequence"
EXPECTED_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
MSG_ID = "Nats-Msg-Id"

WRONG_LAST_SEQUENCE = {10071, 10164}  # JSStreamWrongLastSequence(Constant)Err, server/errors.json
DUPLICATE = {10158, 10201}  # duplicate message id in process / in an atomic batch

_SAFE = frozenset(string.ascii_letters + string.digits + "-_")


def token(text: str) -> str:
    """One subject token for `text`, one-to-one: other characters become ~HH (UTF-8), "" is ~."""
    if not text:
        return "~"
    return "".join(c if c in _SAFE else "".join(f"~{b:02x}" for b in c.encode()) for c in text)


def untoken(tok: str) -> str:
    """The text `token` made `tok` from."""
    if tok == "~":
        return ""
    out, i = bytearray(), 0
    while i < len(tok):
        if tok[i] == "~":
            out.append(int(tok[i + 1 : i + 3], 16))
            i += 3
        else:
            out += tok[i].encode()
            i += 1
    return out.decode()


def subject_of(stream: str) -> str:
    """`vm:abc` is `hero.log.vm.abc`; a stream without a colon has no fourth token."""
    kind, colon, ident = stream.partition(":")
    if not colon:
        return f"{ROOT}.{token(kind)}"
    return f"{ROOT}.{token(kind)}.{token(ident)}"


def stream_of(subject: str) -> str:
    parts = subject.split(".")
    if len(parts) == 3:
        return untoken(parts[2])
    return f"{untoken(parts[2])}:{untoken(parts[3])}"


def filter_of(prefix: str) -> str:
    """The narrowest subject filter holding every stream that starts with `prefix`."""
    kind, colon, _ = prefix.partition(":")
    return f"{ROOT}.{token(kind)}.>" if colon else ALL


def event_headers(
    e: RecordedEvent, at: str, chain: bytes, expected_subject: int | None
) -> dict[str, str]:
    headers = {
        H_TYPE: quote(e.type, safe=""),
        H_VERSION: str(e.version),
        H_AT: at,
        H_HASH: chain.hex(),
    }
    if e.request_id:
        headers[H_REQUEST] = quote(e.request_id, safe="")
    if e.actor:
        headers[H_ACTOR] = quote(e.actor, safe="")
    if expected_subject is not None:
        headers[EXPECTED_SUBJECT_SEQ] = str(expected_subject)
    return headers


def recorded(msg: Msg) -> RecordedEvent:
    """An event from a direct get answer (the server adds Nats-Subject and Nats-Sequence)."""
    h = msg.headers or {}
    return RecordedEvent(
        position=int(h["Nats-Sequence"]),
        stream=stream_of(h["Nats-Subject"]),
        version=int(h[H_VERSION]),
        type=unquote(h[H_TYPE]),
        data=msg.data,
        recorded_at=datetime.fromisoformat(h[H_AT]),
        request_id=unquote(h.get(H_REQUEST, "")),
        actor=unquote(h.get(H_ACTOR, "")),
    )


class Refused(Exception):
    """The stream refused a publish: `code` is JetStream's err_code; `last` the sequence a
    "wrong last sequence: N" names (the stream's or the subject's last), else 0."""

    def __init__(self, code: int, description: str) -> None:
        super().__init__(f"{description} ({code})")
        self.code = code
        named = re.search(r"wrong last sequence: (\d+)", description)
        self.last = int(named.group(1)) if named else 0


@dataclass(frozen=True, slots=True)
class Outgoing:
    subject: str
    headers: dict[str, str]
    data: bytes


async def publish_atomic(nc: Client, messages: Sequence[Outgoing], timeout: float) -> int:
    """Publishes `messages` all or nothing; returns the stream sequence of the last one.

    One message is a plain publish; more are one atomic batch (ADR-50): only the commit asks
    for a reply, the server answers it with the batch's ack or the first error.
    """
    if len(messages) > MAX_BATCH:
        raise Refused(10199, f"atomic publish batch is too large: {len(messages)}")
    if len(messages) == 1:
        only = messages[0]
        reply = await nc.request(only.subject, only.data, timeout, headers=only.headers)
        return _ack(reply)
    batch = uuid.uuid4().hex
    for n, m in enumerate(messages[:-1], 1):
        headers = {**m.headers, "Nats-Batch-Id": batch, "Nats-Batch-Sequence": str(n)}
        await nc.publish(m.subject, m.data, headers=headers)
    last = messages[-1]
    headers = {
        **last.headers,
        "Nats-Batch-Id": batch,
        "Nats-Batch-Sequence": str(len(messages)),
        "Nats-Batch-Commit": "1",
    }
    return _ack(await nc.request(last.subject, last.data, timeout, headers=headers))


def _ack(reply: Msg) -> int:
    body: dict[str, Any] = json.loads(reply.data or b"{}")
    if error := body.get("error"):
        raise Refused(int(error.get("err_code", 0)), str(error.get("description", "")))
    if body.get("duplicate"):
        raise Refused(10201, "duplicate message id")
    return int(body["seq"])


async def direct_get(nc: Client, request: dict[str, object], timeout: float) -> Msg | None:
    """One message by `seq` or `last_by_subj`; None when there is none."""
    msg = await nc.request(f"$JS.API.DIRECT.GET.{STREAM}", json.dumps(request).encode(), timeout)
    status = (msg.headers or {}).get("Status")
    if status == "404":
        return None
    if status:
        raise Unavailable(f"the event log answered {status}")
    return msg


async def direct_batch(
    nc: Client, request: dict[str, object], timeout: float
) -> tuple[list[Msg], int]:
    """The messages of one batched direct get and how many more match after them."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    try:
        body = json.dumps(request).encode()
        await nc.publish(f"$JS.API.DIRECT.GET.{STREAM}", body, reply=inbox)
        msgs: list[Msg] = []
        while True:
            msg = await sub.next_msg(timeout)
            headers = msg.headers or {}
            status = headers.get("Status")
            if status == "204":
                return msgs, int(headers.get("Nats-Num-Pending", "0"))
            if status == "404":
                return msgs, 0
            if status:
                raise Unavailable(f"the event log answered {status}")
            msgs.append(msg)
    finally:
        await sub.unsubscribe()


def stream_config(replicas: int) -> api.StreamConfig:
    """The log's stream: file storage, no deletes or purges (positions keep no gaps), atomic
    batches, direct gets, and a duplicate window for `Nats-Msg-Id`."""
    return api.StreamConfig(
        name=STREAM,
        subjects=[ALL],
        storage=api.StorageType.FILE,
        num_replicas=replicas,
        retention=api.RetentionPolicy.LIMITS,
        deny_delete=True,
        deny_purge=True,
        allow_direct=True,
        allow_atomic=True,
        duplicate_window=600.0,
    )


LAG_RETRIES = 40
"""Reads asked again of a replica behind a position known to be in the log (0.05 s apart)."""


async def read_events(
    nc: Client, subject: str, after: int, limit: int, through: int, timeout: float
) -> list[RecordedEvent]:
    """Up to `limit` events on `subject` past `after`, in position order.

    Direct gets are answered by any replica of the stream; one that answers with less than
    `through` (a position known to be in the log) lags behind and is asked again.
    """
    for _ in range(LAG_RETRIES):
        events = await _read_once(nc, subject, after, limit, timeout)
        if len(events) >= limit or (events[-1].position if events else after) >= through:
            return events
        await asyncio.sleep(0.05)
    raise Unavailable("the event log's replica lags behind")


async def message_at(nc: Client, seq: int, timeout: float) -> Msg:
    """The message at `seq`, a position known to be in the log (the stream leader said so).

    A direct get may be answered by a stream peer that has not applied the last writes yet
    (nats-io/nats-architecture-and-design, adr/ADR-31.md, "A note on read-after-write
    coherency"); it answers 404 for them, so it is asked again, as `read_events` does.
    """
    for _ in range(LAG_RETRIES):
        try:
            msg = await direct_get(nc, {"seq": seq}, timeout)
        except nats.errors.Error as error:
            raise Unavailable("the event log cannot be reached") from error
        if msg is not None:
            return msg
        await asyncio.sleep(0.05)
    raise Unavailable(f"position {seq} of the event log cannot be read yet")


async def _read_once(
    nc: Client, subject: str, after: int, limit: int, timeout: float
) -> list[RecordedEvent]:
    events: list[RecordedEvent] = []
    more = 1
    while more and len(events) < limit:
        start = events[-1].position if events else after
        request = {"seq": start + 1, "next_by_subj": subject, "batch": limit - len(events)}
        try:
            msgs, more = await direct_batch(nc, request, timeout)
        except nats.errors.Error as error:
            raise Unavailable("the event log cannot be reached") from error
        if not msgs:
            break
        events.extend(recorded(m) for m in msgs)
    return events


async def scan(
    nc: Client, prefix: str, after: int, upto: int, timeout: float, page: int = 10_000
) -> AsyncIterator[RecordedEvent]:
    """The events of streams starting with `prefix` with `after` < position <= `upto`."""
    subject = filter_of(prefix)
    while after < upto:
        events = await read_events(nc, subject, after, min(page, upto - after), 0, timeout)
        if not events:
            return
        for event in events:
            if event.position > upto:
                return
            if event.stream.startswith(prefix):
                yield event
        after = events[-1].position


async def json_page_between(
    nc: Client, after: int, upto: int, prefix: str, types: Sequence[str], timeout: float
) -> str:
    """The events past `after` up to `upto` of streams starting with `prefix` and of `types`,
    framed as SqliteEventStore.read_json_page frames them."""
    if not types or not prefix:
        return "[]"
    return json_page([e async for e in scan(nc, prefix, after, upto, timeout)], set(types))


async def stream_ends(nc: Client, prefix: str, upto: int, timeout: float) -> list[tuple[int, str]]:
    """The last position up to `upto` of every stream starting with `prefix`, in order."""
    if not prefix:
        return []
    ends: dict[str, int] = {}
    async for event in scan(nc, prefix, 0, upto, timeout):
        ends[event.stream] = event.position
    return sorted((position, stream) for stream, position in ends.items())


def json_page(events: Sequence[RecordedEvent], types: set[str]) -> str:
    """``[[position, stream, {"type": type, ...data}], ...]`` of the events of `types`."""
    parts: list[str] = []
    for event in events:
        if event.type in types:
            data = bytes(event.data).decode()
            body = "," + data[1:] if len(data) > 2 else "}"
            parts.append(
                f'[{event.position},{json.dumps(event.stream)},{{"type":"{event.type}"{body}]'
            )
    return "[" + ",".join(parts) + "]"


async def find_header(
    nc: Client, header: str, value: str, since: float, timeout: float
) -> int | None:
    """The position of the first event from Unix time `since` whose `header` is `value`."""
    start = datetime.fromtimestamp(max(since, 0), UTC).isoformat().replace("+00:00", "Z")
    request: dict[str, object] = {"start_time": start, "next_by_subj": ALL, "batch": 1000}
    while True:
        try:
            msgs, more = await direct_batch(nc, request, timeout)
        except nats.errors.Error as error:
            raise Unavailable("the event log cannot be reached") from error
        for msg in msgs:
            if (msg.headers or {}).get(header) == value:
                return int((msg.headers or {})["Nats-Sequence"])
        if not msgs or not more:
            return None
        last = int((msgs[-1].headers or {})["Nats-Sequence"])
        request = {"seq": last + 1, "next_by_subj": ALL, "batch": 1000}


async def verify_chain(nc: Client, timeout: float, page: int = 10_000) -> ChainReport:
    """Walks the whole log in position order and checks every event's `Hero-Hash` link."""
    previous, expected = GENESIS, 1
    while True:
        request = {"seq": expected, "next_by_subj": ALL, "batch": page}
        try:
            msgs, _ = await direct_batch(nc, request, timeout)
        except nats.errors.Error as error:
            raise Unavailable("the event log cannot be reached") from error
        if not msgs:
            return ChainReport(expected - 1, previous)
        for msg in msgs:
            h = msg.headers or {}
            e = recorded(msg)
            if e.position != expected:
                return ChainReport(
                    expected - 1, previous, expected, f"position {expected} is missing"
                )
            computed = link(previous, e.position, e.stream, e.version, e.type, e.data, h[H_AT])
            if h.get(H_HASH) != computed.hex():
                return ChainReport(
                    expected - 1, previous, e.position, "its hash does not match its contents"
                )
            previous, expected = computed, expected + 1
