"""Moves an event log between SQLite and JetStream with its positions, times and hash chain.

The events keep their position, version, recorded_at text (the chain covers it), request id,
actor and hash; the idempotency records and the sealed secrets go along (sealed as they are:
both sides open them with the same master key). The source's chain is checked as it is read,
and nothing of a page that breaks it is written. The target must be empty.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol

import msgspec
from nats.aio.client import Client
from nats.js.errors import NoKeysError
from nats.js.kv import KeyValue

from adapters.event_chain import GENESIS, link
from adapters.eventstore_jetstream import JetStreamEventStore
from adapters.eventstore_sqlite import _Metadata, _metadata_decoder
from adapters.jetstream_idempotency import Stored, decode_stored, encode_stored, hashed
from adapters.jetstream_log import (
    ALL,
    EXPECTED_LAST_SEQ,
    H_AT,
    H_HASH,
    Outgoing,
    direct_batch,
    event_headers,
    publish_atomic,
    recorded,
    subject_of,
)
from adapters.sqlite_events import INSERT_EVENT, INSERT_IDEMPOTENCY, SCHEMA
from adapters.vault_jetstream import owner_kind, vault_bucket, vault_key
from adapters.vault_sqlite import _SCHEMA as VAULT_SCHEMA
from core.events import RecordedEvent

PAGE = 500


@dataclass(frozen=True, slots=True)
class LogRow:
    """One event as stored: what the chain covers, its metadata and its hash."""

    event: RecordedEvent
    at: str
    hash: bytes


Secret = tuple[str, str, bytes]
"""owner, kind, sealed value."""


class LogSide(Protocol):
    """One end of a move."""

    async def is_empty(self) -> bool: ...

    async def rows(self, after: int, limit: int) -> list[LogRow]: ...

    async def write(self, rows: Sequence[LogRow]) -> None: ...

    async def records(self) -> list[tuple[str, str, str, bytes, int]]:
        """Confirmed idempotency records: key, operation, body hash, reply, position."""
        ...

    async def write_records(self, records: Sequence[tuple[str, str, str, bytes, int]]) -> None: ...

    async def secrets(self) -> list[Secret]: ...

    async def write_secrets(self, secrets: Sequence[Secret]) -> None: ...


class ChainBroken(ValueError):
    """The source log does not verify: moving it would hide that."""


@dataclass(frozen=True, slots=True)
class Moved:
    events: int
    head: str
    records: int
    secrets: int


async def transfer(source: LogSide, target: LogSide) -> Moved:
    """Copies the whole log, then the records and secrets; ValueError if the target has events."""
    if not await target.is_empty():
        raise ValueError("the target already holds events: move a log only into an empty one")
    previous, expected = GENESIS, 1
    while rows := await source.rows(expected - 1, PAGE):
        for row in rows:
            e = row.event
            if e.position != expected:
                raise ChainBroken(f"position {expected} is missing from the source")
            previous = link(previous, e.position, e.stream, e.version, e.type, e.data, row.at)
            if previous != row.hash:
                raise ChainBroken(f"the source's chain breaks at position {e.position}")
            expected += 1
        await target.write(rows)
    records = await source.records()
    await target.write_records(records)
    secrets = await source.secrets()
    await target.write_secrets(secrets)
    return Moved(expected - 1, previous.hex(), len(records), len(secrets))


class SqliteSide:
    """DIR/events.db and DIR/vault.db (the service stopped)."""

    def __init__(self, data_dir: Path) -> None:
        self._events = data_dir / "events.db"
        self._vault = data_dir / "vault.db"

    def _connect(self, path: Path) -> sqlite3.Connection:
        path.parent.mkdir(parents=True, exist_ok=True)
        return sqlite3.connect(path, isolation_level=None)

    async def is_empty(self) -> bool:
        if not self._events.exists():
            return True
        with self._connect(self._events) as db:
            db.executescript(SCHEMA)
            return db.execute("SELECT 1 FROM events LIMIT 1").fetchone() is None

    async def rows(self, after: int, limit: int) -> list[LogRow]:
        if not self._events.exists():
            return []
        with self._connect(self._events) as db:
            found = db.execute(
                "SELECT position, stream, version, type, data, metadata, recorded_at, hash"
                " FROM events WHERE position > ? ORDER BY position LIMIT ?",
                (after, limit),
            ).fetchall()
        return [_sqlite_row(*row) for row in found]

    async def write(self, rows: Sequence[LogRow]) -> None:
        with self._connect(self._events) as db:
            db.executescript(SCHEMA)
            db.execute("BEGIN IMMEDIATE")
            db.executemany(INSERT_EVENT, [_sqlite_values(row) for row in rows])
            db.execute("COMMIT")

    async def records(self) -> list[tuple[str, str, str, bytes, int]]:
        if not self._events.exists():
            return []
        with self._connect(self._events) as db:
            db.executescript(SCHEMA)
            return db.execute(
                "SELECT key, operation, body_hash, reply, position FROM idempotency ORDER BY key"
            ).fetchall()

    async def write_records(self, records: Sequence[tuple[str, str, str, bytes, int]]) -> None:
        now = datetime.now().astimezone().isoformat()
        with self._connect(self._events) as db:
            db.executescript(SCHEMA)
            db.executemany(INSERT_IDEMPOTENCY, [(*r, now) for r in records])

    async def secrets(self) -> list[Secret]:
        if not self._vault.exists():
            return []
        with self._connect(self._vault) as db:
            db.executescript(VAULT_SCHEMA)
            return db.execute("SELECT owner, kind, sealed FROM sealed_secrets").fetchall()

    async def write_secrets(self, secrets: Sequence[Secret]) -> None:
        with self._connect(self._vault) as db:
            db.executescript(VAULT_SCHEMA)
            db.executemany(
                "INSERT INTO sealed_secrets (owner, kind, sealed) VALUES (?, ?, ?)", secrets
            )


def _sqlite_row(
    position: int,
    stream: str,
    version: int,
    type_: str,
    data: bytes,
    metadata: bytes,
    at: str,
    chain: bytes,
) -> LogRow:
    meta = _metadata_decoder.decode(metadata)
    event = RecordedEvent(
        position=position,
        stream=stream,
        version=version,
        type=type_,
        data=data if isinstance(data, bytes) else str(data).encode(),  # TEXT: an edit by hand
        recorded_at=datetime.fromisoformat(at),
        request_id=meta.request_id,
        actor=meta.actor,
    )
    return LogRow(event, at, bytes(chain))


def _sqlite_values(row: LogRow) -> tuple[object, ...]:
    e = row.event
    metadata = msgspec.json.encode(_Metadata(request_id=e.request_id, actor=e.actor))
    return (e.position, e.stream, e.version, e.type, e.data, metadata, row.at, row.hash)


class JetStreamSide:
    """The HERO_EVENTS stream and the HERO_IDEMPOTENCY and HERO_VAULT buckets."""

    def __init__(self, nc: Client, *, replicas: int, timeout: float = 10.0) -> None:
        self._nc = nc
        self._replicas = replicas
        self._timeout = timeout
        self._buckets: tuple[KeyValue, KeyValue] | None = None

    async def _open(self) -> tuple[KeyValue, KeyValue]:
        """Makes the stream and buckets the service would make, and returns the buckets."""
        if self._buckets is None:
            async with JetStreamEventStore(self._nc, replicas=self._replicas) as store:
                records = store.keys.kv
            vault = await vault_bucket(self._nc.jetstream(), replicas=self._replicas)
            self._buckets = records, vault
        return self._buckets

    async def is_empty(self) -> bool:
        return not await self.rows(0, 1)

    async def rows(self, after: int, limit: int) -> list[LogRow]:
        await self._open()  # a cluster without the stream holds an empty log
        request = {"seq": after + 1, "next_by_subj": ALL, "batch": limit}
        msgs, _ = await direct_batch(self._nc, request, self._timeout)
        out = []
        for msg in msgs:
            headers = msg.headers or {}
            out.append(LogRow(recorded(msg), headers[H_AT], bytes.fromhex(headers[H_HASH])))
        return out

    async def write(self, rows: Sequence[LogRow]) -> None:
        await self._open()
        messages = [
            Outgoing(
                subject_of(r.event.stream), event_headers(r.event, r.at, r.hash, None), r.event.data
            )
            for r in rows
        ]
        first = messages[0]
        expected = str(rows[0].event.position - 1)  # the log keeps the source's positions
        messages[0] = Outgoing(
            first.subject, {**first.headers, EXPECTED_LAST_SEQ: expected}, first.data
        )
        await publish_atomic(self._nc, messages, self._timeout)

    async def records(self) -> list[tuple[str, str, str, bytes, int]]:
        kv, _ = await self._open()
        out = []
        for key in await _keys(kv):
            entry = await kv.get(key)
            if entry.value:
                stored = decode_stored(entry.value)
                if not stored.token:  # a reservation is no record
                    out.append(
                        (
                            stored.key,
                            stored.operation,
                            stored.body_hash,
                            stored.reply,
                            stored.position,
                        )
                    )
        return out

    async def write_records(self, records: Sequence[tuple[str, str, str, bytes, int]]) -> None:
        kv, _ = await self._open()
        for key, operation, body_hash, reply, position in records:
            stored = Stored(
                key=key, operation=operation, body_hash=body_hash, reply=reply, position=position
            )
            await kv.create(hashed(key), encode_stored(stored))

    async def secrets(self) -> list[Secret]:
        _, vault = await self._open()
        out = []
        for key in await _keys(vault):
            entry = await vault.get(key)
            if entry.value:
                out.append((*owner_kind(key), entry.value))
        return out

    async def write_secrets(self, secrets: Sequence[Secret]) -> None:
        _, vault = await self._open()
        for owner, kind, sealed in secrets:
            await vault.create(vault_key(owner, kind), bytes(sealed))


async def _keys(kv: KeyValue) -> list[str]:
    try:
        return list(await kv.keys())
    except NoKeysError:
        return []
