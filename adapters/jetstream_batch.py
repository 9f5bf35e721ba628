"""An atomic batch before it is sent: versions checked, positions and chain links given."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from adapters.event_chain import GENESIS, link
from adapters.jetstream_idempotency import Reservation
from adapters.jetstream_log import H_COMMIT, MSG_ID, Outgoing, event_headers, subject_of
from core.errors import ConcurrencyError, Conflict
from core.events import RecordedEvent, StreamAppend


@dataclass(slots=True)
class Pending:
    """One caller's append, waiting for the next batch."""

    appends: Sequence[StreamAppend]
    request_id: str
    reservation: Reservation | None
    future: asyncio.Future[list[RecordedEvent]]
    messages: list[Outgoing] = field(default_factory=list)
    recorded: list[RecordedEvent] = field(default_factory=list)
    chain: bytes = GENESIS
    actor: str = ""


def stage(
    batch: list[Pending], head: int, head_hash: bytes, versions: Mapping[str, tuple[int, int]]
) -> list[Pending]:
    """Checks versions in memory (`versions`: stream -> version and last position) and numbers
    the events from the head; fails the losers' futures and returns the others."""
    now = datetime.now(UTC)
    at = now.isoformat()
    overlay: dict[str, tuple[int, int]] = {}
    keys: set[str] = set()
    position, chain = head, head_hash
    staged: list[Pending] = []
    for pending in batch:
        pending.messages.clear()
        pending.recorded.clear()
        error = _check(pending, overlay, keys, versions)
        if error is not None:
            pending.future.set_exception(error)
            continue
        for a in pending.appends:
            version, last = overlay.get(a.stream) or versions.get(a.stream, (0, 0))
            expect: int | None = None if a.stream in overlay else last
            subject = subject_of(a.stream)
            for new in a.events:
                position += 1
                version += 1
                chain = link(chain, position, a.stream, version, new.type, new.data, at)
                event = RecordedEvent(
                    position=position,
                    stream=a.stream,
                    version=version,
                    type=new.type,
                    data=new.data,
                    recorded_at=now,
                    request_id=pending.request_id,
                    actor=pending.actor,
                )
                headers = event_headers(event, at, chain, expect)
                expect = None
                pending.recorded.append(event)
                pending.messages.append(Outgoing(subject, headers, new.data))
            overlay[a.stream] = (version, position)
        if pending.reservation is not None:
            keys.add(pending.reservation.hashed)
            tail = pending.messages[-1]
            tail.headers[MSG_ID] = "idem-" + pending.reservation.hashed
            tail.headers[H_COMMIT] = pending.reservation.token
        pending.chain = chain
        staged.append(pending)
    return staged


def _check(
    pending: Pending,
    overlay: dict[str, tuple[int, int]],
    keys: set[str],
    versions: Mapping[str, tuple[int, int]],
) -> Exception | None:
    for a in pending.appends:
        current = (overlay.get(a.stream) or versions.get(a.stream, (0, 0)))[0]
        if current != a.expected_version:
            return ConcurrencyError(f"{a.stream} is at version {current}, not {a.expected_version}")
    if pending.reservation is not None and pending.reservation.hashed in keys:
        return Conflict("idempotency key is in use by a concurrent request")
    return None


def take(pending: list[Pending], max_batch: int) -> list[Pending]:
    """Takes the next batch off `pending`: appends in order while their events fit in
    `max_batch`, and always the first."""
    batch: list[Pending] = []
    size = 0
    while pending and (not batch or size + _size(pending[0]) <= max_batch):
        size += _size(pending[0])
        batch.append(pending.pop(0))
    return batch


def _size(pending: Pending) -> int:
    return sum(len(a.events) for a in pending.appends)
