"""The VM view: one row per VM, indexed by owner fingerprint, for `get_vm` and `list_vms`."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime

import aiosqlite
import msgspec

from core.events import Event, RecordedEvent
from core.vm import VM_EVENT_TYPES, Vm, evolve
from projections.runner import Change, fold_cached, timestamp_text

TABLE = """
CREATE TABLE IF NOT EXISTS vms (
    sid         TEXT    PRIMARY KEY,
    owner       TEXT    NOT NULL,
    name        TEXT    NOT NULL,
    slice_sid   TEXT    NOT NULL,
    image       TEXT    NOT NULL,
    cpu_count   INTEGER NOT NULL,
    memory_gb   INTEGER NOT NULL,
    disk_gb     INTEGER NOT NULL,
    rootfs_gb   INTEGER NOT NULL,
    status      TEXT    NOT NULL,
    node_id     INTEGER,
    mycelium_ip TEXT    NOT NULL,
    error       TEXT    NOT NULL,
    created_at  TEXT    NOT NULL,
    updated_at  TEXT    NOT NULL,
    json        BLOB    NOT NULL
);
"""
INDEX = "CREATE INDEX IF NOT EXISTS vms_by_owner ON vms (owner, created_at, sid)"
# `vms_by_owner` gives one owner's VMs in the order `list_vms` replies with, without a sort;
# the JSON stays in the table (an index carrying it would double the cost of every update).

COLUMNS = (
    "sid, owner, name, slice_sid, image, cpu_count, memory_gb, disk_gb, rootfs_gb,"
    " status, node_id, mycelium_ip, error, created_at, updated_at"
)
UPSERT = (
    f"INSERT OR REPLACE INTO vms ({COLUMNS}, json)"  # noqa: S608
    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
)
SELECT = f"SELECT {COLUMNS} FROM vms"  # noqa: S608

Row = tuple[str, str, str, str, str, int, int, int, int, str, int | None, str, str, str, str]

_encoder = msgspec.json.Encoder()

_decoders: dict[str, Callable[[bytes], Event]] = {
    t.__name__: msgspec.json.Decoder(t).decode for t in VM_EVENT_TYPES
}
"""Event type name → its decoder, looked up once per event."""


class VmProjection:
    """Folds VM events into rows with the core's own `evolve`.

    It keeps the rows it wrote in memory (bounded), so an update needs no read back; the
    runner calls `rolled_back` when a batch fails, and the cache is dropped. During a rebuild
    (`replay`, then `flush`) it folds the whole log in memory and writes each VM's row once.
    """

    name = "vms"
    stream_prefix = "vm:"
    event_types = VM_EVENT_TYPES

    def __init__(self, cache_size: int = 200_000) -> None:
        self._cache: dict[str, Vm] = {}
        self._cache_size = cache_size
        self._unwritten: dict[str, Vm | None] = {}
        self._spilled = False

    def rolled_back(self) -> None:
        self._cache.clear()
        self._unwritten.clear()

    async def create(self, conn: aiosqlite.Connection) -> None:
        await conn.executescript(TABLE)
        await conn.execute(INDEX)

    async def clear(self, conn: aiosqlite.Connection) -> None:
        self._cache.clear()
        self._unwritten.clear()
        self._spilled = False
        await conn.execute("DELETE FROM vms")

    async def apply(self, conn: aiosqlite.Connection, events: Sequence[RecordedEvent]) -> None:
        changes = [
            (e.stream[3:], e.version, decode(e.data))
            for e in events
            if e.stream.startswith("vm:") and (decode := _decoders.get(e.type)) is not None
        ]
        await self._write(conn, await self._fold(conn, changes))

    async def replay(self, conn: aiosqlite.Connection, changes: Sequence[Change]) -> None:
        """Folds a page of a rebuild in memory; rows are written by `flush`, once per VM.

        The view was cleared, so a VM absent from memory does not exist yet, until more VMs
        than the cache holds force rows out to the table; from then on states are read back.
        """
        states = self._unwritten
        if self._spilled or len(states) + len(changes) > self._cache_size:
            await self.flush(conn)
            self._spilled = True
            folded = [(stream[3:], 0, event) for _, stream, event in changes]
            self._unwritten = await self._fold(conn, folded)
            return
        get = states.get
        for _, stream, event in changes:
            sid = stream[3:]
            states[sid] = evolve(get(sid), event)

    async def flush(self, conn: aiosqlite.Connection) -> None:
        """Writes the rows `replay` folded since the last flush."""
        unwritten, self._unwritten = self._unwritten, {}
        await self._write(conn, unwritten)

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
        rows = [
            (*_row(vm), _encoder.encode(vm.public()))
            for _, vm in sorted(states.items())
            if vm is not None
        ]
        if rows:
            await conn.executemany(UPSERT, rows)

    async def _load(self, conn: aiosqlite.Connection, sids: set[str]) -> dict[str, Vm | None]:
        states: dict[str, Vm | None] = {}
        names = list(sids)
        for start in range(0, len(names), 500):
            chunk = names[start : start + 500]
            marks = ",".join("?" * len(chunk))
            async with conn.execute(f"{SELECT} WHERE sid IN ({marks})", chunk) as cursor:
                for row in await cursor.fetchall():
                    vm = _vm(tuple(row))
                    states[vm.sid] = vm
        return states


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
        where = (
            " WHERE owner = ?" if include_deleted else " WHERE owner = ? AND status != 'deleted'"
        )
        rows = self._conn.execute(SELECT + where + " ORDER BY created_at, sid", (owner,))
        return [_vm(tuple(row)) for row in rows.fetchall()]

    async def all_rows(self) -> list[Row]:
        """Every row in sid order, for comparing a live view with a rebuilt one."""
        rows = self._conn.execute(SELECT + " ORDER BY sid").fetchall()
        return [tuple(row) for row in rows]


def _row(vm: Vm) -> Row:
    return (
        vm.sid,
        vm.owner,
        vm.name,
        vm.slice_sid,
        vm.image,
        vm.cpu_count,
        vm.memory_gb,
        vm.disk_gb,
        vm.rootfs_gb,
        vm.status,
        vm.node_id,
        vm.mycelium_ip,
        vm.error,
        timestamp_text(vm.created_at),
        timestamp_text(vm.updated_at),
    )


def _vm(row: Row) -> Vm:
    return Vm(
        sid=row[0],
        owner=row[1],
        name=row[2],
        slice_sid=row[3],
        image=row[4],
        cpu_count=row[5],
        memory_gb=row[6],
        disk_gb=row[7],
        rootfs_gb=row[8],
        status=row[9],  # type: ignore[arg-type]
        node_id=row[10],
        mycelium_ip=row[11],
        error=row[12],
        created_at=datetime.fromisoformat(row[13]),
        updated_at=datetime.fromisoformat(row[14]),
    )


def rows_of(vms: Iterable[Vm]) -> list[Row]:
    return [_row(vm) for vm in vms]
