"""Staging a batch of appends for one SQLite commit, in memory: versions checked, positions,
hash-chain links, rows and recorded events given."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from adapters.event_staging import Numbering, refusal
from adapters.sqlite_events import Row
from core.events import IdempotencyRecord, RecordedEvent, StreamAppend


@dataclass(slots=True)
class Pending:
    """One caller's append, waiting for the next group commit."""

    appends: Sequence[StreamAppend]
    idempotency: IdempotencyRecord | None
    request_id: str
    future: asyncio.Future[list[RecordedEvent]]
    actor: str = ""
    metadata: bytes = b"{}"
    rows: list[Row] = field(default_factory=list)
    recorded: list[RecordedEvent] = field(default_factory=list)


def stage(
    batch: list[Pending], known: Mapping[str, int], position: int, chain: bytes, now: datetime
) -> list[Pending]:
    """Checks versions and keys in memory, assigns positions; fails the losers at once."""
    numbering = Numbering(position, chain, now)
    versions: dict[str, int] = {}
    keys: set[str] = set()
    accepted: list[Pending] = []

    def current(stream: str) -> int:
        return versions.get(stream, known.get(stream, 0))

    for pending in batch:
        key = pending.idempotency.key if pending.idempotency is not None else None
        error = refusal(pending.appends, current, key, keys)
        if error is not None:
            pending.future.set_exception(error)
            continue
        for a in pending.appends:
            for event in numbering.events(a, a.expected_version, pending.request_id, pending.actor):
                pending.rows.append(
                    (
                        event.position,
                        event.stream,
                        event.version,
                        event.type,
                        event.data,
                        pending.metadata,
                        numbering.at,
                        numbering.chain,
                    )
                )
                pending.recorded.append(event)
            versions[a.stream] = a.expected_version + len(a.events)
        if key is not None:
            keys.add(key)
        accepted.append(pending)
    return accepted


def idempotency_rows(
    accepted: list[Pending], position: int, now: datetime
) -> list[tuple[str, str, str, bytes, int, str]]:
    """The idempotency rows of the accepted appends, each at its last event's position."""
    return [
        (
            p.idempotency.key,
            p.idempotency.operation,
            p.idempotency.body_hash,
            p.idempotency.reply,
            p.rows[-1][0] if p.rows else position,
            now.isoformat(),
        )
        for p in accepted
        if p.idempotency is not None
    ]
