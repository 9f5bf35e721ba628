"""Staging a batch of appends for one SQLite commit, in memory: versions checked, positions,
hash-chain links, rows and recorded events given."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from adapters.event_chain import link
from adapters.sqlite_events import Row
from core.errors import ConcurrencyError, Conflict
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
    recorded_at = now.isoformat()
    versions: dict[str, int] = {}
    keys: set[str] = set()
    accepted: list[Pending] = []
    for pending in batch:
        error = check(pending, versions, known, keys)
        if error is not None:
            pending.future.set_exception(error)
            continue
        for stream_append in pending.appends:
            version = stream_append.expected_version
            for new in stream_append.events:
                position += 1
                version += 1
                stream = stream_append.stream
                chain = link(chain, position, stream, version, new.type, new.data, recorded_at)
                pending.rows.append(
                    (
                        position,
                        stream,
                        version,
                        new.type,
                        new.data,
                        pending.metadata,
                        recorded_at,
                        chain,
                    )
                )
                pending.recorded.append(
                    RecordedEvent(
                        position=position,
                        stream=stream_append.stream,
                        version=version,
                        type=new.type,
                        data=new.data,
                        recorded_at=now,
                        request_id=pending.request_id,
                        actor=pending.actor,
                    )
                )
            versions[stream_append.stream] = version
        if pending.idempotency is not None:
            keys.add(pending.idempotency.key)
        accepted.append(pending)
    return accepted


def check(
    pending: Pending, versions: dict[str, int], known: Mapping[str, int], keys: set[str]
) -> Exception | None:
    """Why `pending` cannot be appended after the batch so far, if it cannot."""
    for stream_append in pending.appends:
        current = versions.get(stream_append.stream)
        if current is None:
            current = known.get(stream_append.stream, 0)
        if current != stream_append.expected_version:
            return ConcurrencyError(
                f"{stream_append.stream} is at version {current},"
                f" not {stream_append.expected_version}"
            )
    if pending.idempotency is not None and pending.idempotency.key in keys:
        return Conflict("idempotency key is in use by a concurrent request")
    return None


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
