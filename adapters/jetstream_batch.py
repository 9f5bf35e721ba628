"""An atomic batch before it is sent: versions checked, positions and chain links given."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from adapters.event_chain import GENESIS
from adapters.event_staging import Numbering, refusal
from adapters.jetstream_idempotency import Reservation
from adapters.jetstream_log import H_COMMIT, MSG_ID, Outgoing, event_headers, subject_of
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
    numbering = Numbering(head, head_hash, datetime.now(UTC))
    overlay: dict[str, tuple[int, int]] = {}
    keys: set[str] = set()
    staged: list[Pending] = []

    def current(stream: str) -> tuple[int, int]:
        return overlay.get(stream) or versions.get(stream, (0, 0))

    for pending in batch:
        pending.messages.clear()
        pending.recorded.clear()
        key = pending.reservation.hashed if pending.reservation is not None else None
        error = refusal(pending.appends, lambda stream: current(stream)[0], key, keys)
        if error is not None:
            pending.future.set_exception(error)
            continue
        for a in pending.appends:
            version, last = current(a.stream)
            expect: int | None = None if a.stream in overlay else last
            subject = subject_of(a.stream)
            for event in numbering.events(a, version, pending.request_id, pending.actor):
                headers = event_headers(event, numbering.at, numbering.chain, expect)
                expect = None
                pending.recorded.append(event)
                pending.messages.append(Outgoing(subject, headers, event.data))
            overlay[a.stream] = (version + len(a.events), numbering.position)
        if pending.reservation is not None:
            keys.add(pending.reservation.hashed)
            tail = pending.messages[-1]
            tail.headers[MSG_ID] = "idem-" + pending.reservation.hashed
            tail.headers[H_COMMIT] = pending.reservation.token
        pending.chain = numbering.chain
        staged.append(pending)
    return staged


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
