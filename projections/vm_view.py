"""The VM view: one row per VM, indexed by owner fingerprint, for reading one VM or an owner's."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterable, Sequence

import aiosqlite
import msgspec

from core.contract import VmOut
from core.domain import VMS
from core.events import Event, RecordedEvent, stream_parts
from core.vm import Vm, evolve
from projections.replay import Change
from projections.runner import fold_cached, timestamp_text

TABLE = """
CREATE TABLE IF NOT EXISTS vms (
    sid        TEXT PRIMARY KEY,
    owner      TEXT NOT NULL,
    status     TEXT NOT NULL,
    created_at TEXT NOT NULL,
    json       BLOB NOT NULL
)
"""
INDEX = "CREATE INDEX IF NOT EXISTS vms_by_owner ON vms (owner, created_at, sid)"
# A row is what the queries select and order by, and the Vm resource as JSON: a reply is the
# stored JSON as is, and the few columns are cheap to write. `vms_by_owner` gives one owner's VMs
# in the order an owner's listing replies with, without a sort.

VERSION = 2
"""The layout of the table above; a view written with another is rebuilt (1: a column a field)."""

UPSERT = "INSERT OR REPLACE INTO vms (sid, owner, status, created_at, json) VALUES (?,?,?,?,?)"
INSERT_JSON = (
    "INSERT INTO vms (sid, owner, status, created_at, json)"
    " SELECT value->>0, value->>1, value->>2, value->>3, CAST(value->>4 AS BLOB)"
    " FROM json_each(?)"
)
"""Rows given as one JSON array of `[sid, owner, status, created_at, json]`: SQLite reads them
in one step, without the GIL, while the rebuild folds on."""
UPSERT_JSON = INSERT_JSON.replace("INSERT", "INSERT OR REPLACE", 1)
"""The same, for a rebuild whose rows spilled to the table and may be written again."""
SELECT = "SELECT sid, owner, status, created_at, json FROM vms"
BY_OWNER = "SELECT owner, json FROM vms WHERE owner = ? ORDER BY created_at, sid"
BY_OWNER_LIVE = (
    "SELECT owner, json FROM vms WHERE owner = ? AND status != 'deleted' ORDER BY created_at, sid"
)

Row = tuple[str, str, str, str, bytes]

_encoder = msgspec.json.Encoder()
_vm_out = msgspec.json.Decoder(VmOut)


REBUILD_CHUNK = 5000
"""Rows a rebuild hands SQLite at a time."""


class VmProjection:
    """Folds VM events into rows with the core's own `evolve`.

    It keeps the rows it wrote in memory (bounded), so an update needs no read back; the
    runner calls `rolled_back` when a batch fails, and the cache is dropped. During a rebuild
    (`replay`, `complete`, then `flush`) it folds the log in memory and writes each VM's row
    once, as soon as the VM's stream has no events left, in chunks SQLite inserts on its own
    thread while the next pages are folded.
    """

    name = "vms"
    version = VERSION
    stream_prefix = "vm:"
    event_types = VMS.types

    def __init__(self, cache_size: int = 200_000, chunk: int = REBUILD_CHUNK) -> None:
        self._cache: dict[str, Vm] = {}
        self._cache_size = cache_size
        self._chunk = chunk
        self._unwritten: dict[str, Vm | None] = {}
        self._spilled = False
        self._ready: list[tuple[str, str, str, str, str]] = []
        self._inserting: asyncio.Future[aiosqlite.Cursor] | None = None

    def rolled_back(self) -> None:
        self._cache.clear()
        self._unwritten.clear()
        self._ready.clear()
        self._inserting = None

    async def create(self, conn: aiosqlite.Connection) -> None:
        # statement by statement: `executescript` would commit a rebuild's transaction
        await conn.execute(TABLE)
        await conn.execute(INDEX)

    async def drop(self, conn: aiosqlite.Connection) -> None:
        self.rolled_back()
        self._spilled = False
        await conn.execute("DROP TABLE IF EXISTS vms")

    async def apply(self, conn: aiosqlite.Connection, events: Sequence[RecordedEvent]) -> None:
        id_of, decode, known = VMS.id_of, VMS.registry.decode, VMS.registry
        changes = [
            (sid, e.version, decode(e.type, e.data))
            for e in events
            if (sid := id_of(e.stream)) is not None and e.type in known
        ]
        await self._write(conn, await self._fold(conn, changes))

    async def replay(self, conn: aiosqlite.Connection, changes: Sequence[Change]) -> None:
        """Folds a page of a rebuild in memory; rows are written by `complete` and `flush`.

        The view was cleared, so a VM absent from memory does not exist yet, until more VMs
        than the cache holds force rows out to the table; from then on states are read back.
        """
        states = self._unwritten
        if self._spilled or len(states) + len(changes) > self._cache_size:
            await self.flush(conn)
            self._spilled = True
            folded = [(_sid(stream), 0, event) for _, stream, event in changes]
            self._unwritten = await self._fold(conn, folded)
            return
        get = states.get
        for _, stream, event in changes:
            sid = _sid(stream)
            states[sid] = evolve(get(sid), event)

    async def complete(self, conn: aiosqlite.Connection, streams: Sequence[str]) -> None:
        """Writes the rows of VMs whose streams have no events left to replay."""
        pop = self._unwritten.pop
        ready = self._ready
        for stream in streams:
            vm = pop(_sid(stream), None)
            if vm is not None:
                ready.append(_json_row(vm))
        if len(ready) >= self._chunk:
            await self._insert_ready(conn)

    async def flush(self, conn: aiosqlite.Connection) -> None:
        """Writes every row `replay` folded and has not written yet."""
        unwritten, self._unwritten = self._unwritten, {}
        self._ready.extend(_json_row(vm) for vm in unwritten.values() if vm is not None)
        await self._insert_ready(conn)
        if self._inserting is not None:
            inserting, self._inserting = self._inserting, None
            await inserting

    async def _insert_ready(self, conn: aiosqlite.Connection) -> None:
        """Hands the ready rows to SQLite, once the previous chunk is in."""
        if self._inserting is not None:
            inserting, self._inserting = self._inserting, None
            await inserting
        if self._ready:
            document = _encoder.encode(self._ready).decode()
            self._ready = []
            insert = UPSERT_JSON if self._spilled else INSERT_JSON
            inserting = asyncio.ensure_future(conn.execute(insert, (document,)))
            inserting.add_done_callback(_retrieve)
            self._inserting = inserting

    async def _fold(
        self, conn: aiosqlite.Connection, changes: Sequence[tuple[str, int, Event]]
    ) -> dict[str, Vm | None]:
        """The new state of every VM `(sid, version or 0 if unknown, event)` touches."""

        async def load(sids: set[str]) -> dict[str, Vm | None]:
            return await self._load(conn, sids)

        return await fold_cached(changes, self._cache, self._cache_size, evolve, load)

    @staticmethod
    async def _write(conn: aiosqlite.Connection, states: dict[str, Vm | None]) -> None:
        """Upserts the rows, in sid order.

        Encoded first, then written in one go: a database thread binding rows while this one
        encodes would fight it for the GIL at every row.
        """
        rows = [_row(vm) for _, vm in sorted(states.items()) if vm is not None]
        if rows:
            await conn.executemany(UPSERT, rows)

    async def _load(self, conn: aiosqlite.Connection, sids: set[str]) -> dict[str, Vm | None]:
        states: dict[str, Vm | None] = {}
        names = list(sids)
        for start in range(0, len(names), 500):
            chunk = names[start : start + 500]
            marks = ",".join("?" * len(chunk))
            async with conn.execute(
                f"SELECT owner, json FROM vms WHERE sid IN ({marks})",  # noqa: S608
                chunk,
            ) as cursor:
                for owner, json in await cursor.fetchall():
                    vm = _vm(owner, json)
                    states[vm.sid] = vm
        return states


def _sid(stream: str) -> str:
    """The sid of a stream a rebuild hands this projection (all of them VM streams)."""
    return stream_parts(stream)[1]


def _retrieve(inserting: asyncio.Future[aiosqlite.Cursor]) -> None:
    """Marks a failed insert's error as seen: whoever awaits it raises it, or the rebuild failed
    before that and rolled back."""
    if not inserting.cancelled():
        inserting.exception()


class VmView:
    """Queries the VM view; never touches the event log.

    Each row keeps its Vm resource as encoded JSON, so answering a query decodes nothing.
    Queries are indexed lookups of a few microseconds on a read-only connection, run in the
    event loop: cheaper than the two or three hops to a database thread they would cost.
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    async def get_json(self, sid: str) -> tuple[str, bytes] | None:
        """The VM's owner and its Vm resource as JSON."""
        row = self._conn.execute("SELECT owner, json FROM vms WHERE sid = ?", (sid,)).fetchone()
        return (row[0], row[1]) if row else None

    async def list_json(self, owner: str) -> list[bytes]:
        """The Vm resources of one owner, deleted ones left out, oldest first."""
        cursor = self._conn.execute(
            "SELECT json FROM vms WHERE owner = ? AND status != 'deleted' ORDER BY created_at, sid",
            (owner,),
        )
        return [row[0] for row in cursor.fetchall()]

    async def by_owner(self, owner: str, *, include_deleted: bool = False) -> list[Vm]:
        query = BY_OWNER if include_deleted else BY_OWNER_LIVE
        return [_vm(row[0], row[1]) for row in self._conn.execute(query, (owner,)).fetchall()]

    async def all_rows(self) -> list[Row]:
        """Every row in sid order, for comparing a live view with a rebuilt one."""
        rows = self._conn.execute(SELECT + " ORDER BY sid").fetchall()
        return [tuple(row) for row in rows]


def _row(vm: Vm) -> Row:
    return (
        vm.sid,
        vm.owner,
        vm.status,
        timestamp_text(vm.created_at),
        _encoder.encode(vm.public()),
    )


def _json_row(vm: Vm) -> tuple[str, str, str, str, str]:
    """The row as `INSERT_JSON` reads it: the resource's JSON travels as a JSON string."""
    sid, owner, status, created_at, json = _row(vm)
    return sid, owner, status, created_at, json.decode()


def _vm(owner: str, json: bytes) -> Vm:
    out = _vm_out.decode(json)
    return Vm(owner=owner, **msgspec.structs.asdict(out))


def rows_of(vms: Iterable[Vm]) -> list[Row]:
    return [_row(vm) for vm in vms]
