"""The SQLite event store: the shared contract, then what only SQLite promises."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import msgspec
import pytest

from adapters.event_chain import ChainReport, verify
from adapters.eventstore_sqlite import SqliteEventStore
from core.errors import ConcurrencyError, Conflict, Unavailable
from core.events import Event, NewEvent
from tests.eventstore_contract import EventStoreContract, essence, key, payload, race, to


class TestSqliteEventStore(EventStoreContract):
    async def make_store(self, path: Path) -> SqliteEventStore:
        return await SqliteEventStore(path).__aenter__()


# SQLite only -------------------------------------------------------------------------------


async def pragma(conn: sqlite3.Connection | None, name: str) -> object:
    assert conn is not None
    return conn.execute(f"PRAGMA {name}").fetchone()[0]


async def test_the_writer_is_wal_and_synchronous_full_by_default(tmp_path: Path) -> None:
    async with SqliteEventStore(tmp_path / "events.db") as store:
        assert await pragma(store._writer, "journal_mode") == "wal"
        assert await pragma(store._writer, "synchronous") == 2  # FULL
    with sqlite3.connect(tmp_path / "events.db") as db:  # WAL is a property of the file
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_synchronous_can_be_lowered_explicitly(tmp_path: Path) -> None:
    async with SqliteEventStore(tmp_path / "events.db", synchronous="NORMAL") as store:
        assert await pragma(store._writer, "synchronous") == 1


async def test_the_schema_has_unique_stream_version(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    async with SqliteEventStore(path) as store:
        await store.append([to("vm:a", 0, payload(1))])
    with sqlite3.connect(path) as db:
        unique = [
            [col[2] for col in db.execute(f"PRAGMA index_info('{name}')")]
            for _, name, is_unique, *_ in db.execute("PRAGMA index_list('events')")
            if is_unique
        ]
        assert ["stream", "version"] in unique
        with pytest.raises(sqlite3.IntegrityError):
            db.execute(
                "INSERT INTO events (position, stream, version, type, data, metadata,"
                " recorded_at, hash) VALUES (99, 'vm:a', 1, 'X', x'7b7d', x'7b7d', '', x'00')"
            )


@pytest.fixture
async def two_processes(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Two stores on one file: each stands for a process with its own cached versions."""
    path = tmp_path / "events.db"
    async with SqliteEventStore(path) as first, SqliteEventStore(path) as second:
        yield first, second


async def test_a_stale_append_after_another_writer_is_a_concurrency_error(
    two_processes: tuple[SqliteEventStore, SqliteEventStore],
) -> None:
    first, second = two_processes
    await first.append([to("vm:a", 0, payload(1))])  # first caches vm:a at 1, position 1
    await second.append([to("vm:a", 1, payload(2))], request_id="other-process")

    with pytest.raises(ConcurrencyError):
        await first.append([to("vm:a", 1, payload(3))], request_id="stale")

    stream = await second.read_stream("vm:a")
    assert [(e.position, e.version, e.request_id) for e in stream] == [
        (1, 1, ""),
        (2, 2, "other-process"),
    ]
    # the first store learned the truth: an append at the real version now succeeds
    recorded = await first.append([to("vm:a", 2, payload(4))])
    assert [(e.position, e.version) for e in recorded] == [(3, 3)]


async def test_a_new_stream_another_writer_created_is_a_concurrency_error(
    two_processes: tuple[SqliteEventStore, SqliteEventStore],
) -> None:
    """Nothing is read for an append expecting a new stream: the schema refuses version 1."""
    first, second = two_processes
    await second.append([to("vm:a", 0, payload(1))], request_id="other-process")

    outcomes = await race(
        first.append([to("vm:a", 0, payload(2))], request_id="late"),
        first.append([to("vm:b", 0, payload(3))], request_id="fresh"),
    )

    assert isinstance(outcomes[0], ConcurrencyError)
    assert [(e.position, e.stream, e.version) for e in outcomes[1]] == [(2, "vm:b", 1)]
    log = await first.read_all()
    assert [(e.position, e.stream, e.request_id) for e in log] == [
        (1, "vm:a", "other-process"),
        (2, "vm:b", "fresh"),
    ]


async def test_a_batch_with_stale_and_fresh_appends_keeps_the_fresh_ones(
    two_processes: tuple[SqliteEventStore, SqliteEventStore],
) -> None:
    first, second = two_processes
    await first.append([to("vm:a", 0, payload(1))])
    await second.append([to("vm:a", 1, payload(2))])
    await second.append([to("vm:b", 0, payload(3))])  # positions 2 and 3 unknown to `first`

    outcomes = await race(
        first.append([to("vm:a", 1, payload(4))]),  # stale
        first.append([to("vm:c", 0, payload(5))]),  # fresh, but its cached position is stale
        first.append([to("vm:d", 0, payload(6)), to("vm:a", 1, payload(7))]),  # half stale
    )
    assert isinstance(outcomes[0], ConcurrencyError)
    assert isinstance(outcomes[2], ConcurrencyError)
    assert isinstance(outcomes[1], list)
    assert [(e.position, e.stream, e.version) for e in outcomes[1]] == [(4, "vm:c", 1)]

    log = await second.read_all()
    assert [e.position for e in log] == [1, 2, 3, 4]
    for stream in ("vm:a", "vm:b", "vm:c"):
        versions = [e.version for e in await second.read_stream(stream)]
        assert versions == list(range(1, len(versions) + 1))
    assert await second.read_stream("vm:d") == []


async def test_a_key_taken_by_another_writer_is_a_conflict(
    two_processes: tuple[SqliteEventStore, SqliteEventStore],
) -> None:
    first, second = two_processes
    await first.append([to("vm:a", 0, payload(1))])
    await second.append([to("vm:b", 0, payload(2))], idempotency=key("shared"))
    with pytest.raises(Conflict) as raised:
        await first.append([to("vm:c", 0, payload(3))], idempotency=key("shared", b"other"))
    assert not isinstance(raised.value, ConcurrencyError)
    assert await second.read_stream("vm:c") == []
    assert await first.idempotent_reply("shared") == key("shared")


async def test_after_another_writer_read_all_stays_gap_free(
    two_processes: tuple[SqliteEventStore, SqliteEventStore],
) -> None:
    """A follower reading the first store must not skip what the other process committed."""
    first, second = two_processes
    await first.append([to("vm:a", 0, payload(1))])
    await second.append([to("vm:b", 0, payload(2))])
    await first.append([to("vm:c", 0, payload(3))])  # recovers through the one-by-one path

    assert await first.last_position() == 3
    assert [e.position for e in await first.read_all()] == [1, 2, 3]
    assert [e.position for e in await first.read_all(after=1)] == [2, 3]


async def test_close_commits_every_pending_append(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    store = SqliteEventStore(path, max_batch=8)
    await store.open()
    appends = [store.append([to(f"vm:{i}", 0, payload(i))]) for i in range(200)]
    # the appends are queued first, then close runs while they wait for their commits
    committing = asyncio.gather(*appends)
    await asyncio.gather(committing, store.close())
    results = committing.result()

    assert sorted(r[0].position for r in results) == list(range(1, 201))
    with pytest.raises(Unavailable):
        await store.append([to("vm:late", 0, payload(0))])

    async with SqliteEventStore(path) as reopened:
        log = await reopened.read_all(limit=1000)
        assert [e.position for e in log] == list(range(1, 201))
        assert essence(log) == essence(sorted((r[0] for r in results), key=lambda e: e.position))


async def test_reads_agree_whether_served_from_memory_or_from_the_file(tmp_path: Path) -> None:
    """Recent events may come from an in-memory tail; every page must match the file."""
    path = tmp_path / "events.db"
    async with SqliteEventStore(path, tail_size=4) as store:
        for i in range(30):
            await store.append([to(f"vm:{i % 4}", i // 4, payload(i))], request_id=f"r{i}")
        async with SqliteEventStore(path) as cold:  # a fresh instance reads only the file
            for after in range(32):
                for limit in (1, 3, 100):
                    hot = await store.read_all(after=after, limit=limit)
                    assert essence(hot) == essence(await cold.read_all(after=after, limit=limit))
                    assert [e.position for e in hot] == list(
                        range(after + 1, min(after + limit, 30) + 1)
                    )
                    assert [e.request_id for e in hot] == [f"r{e.position - 1}" for e in hot]


async def test_a_json_page_holds_the_stretch_of_one_kind_of_stream(tmp_path: Path) -> None:
    """Framed by SQLite: every event of the prefix and types in (after, upto], data inlined."""
    async with SqliteEventStore(tmp_path / "events.db") as store:
        odd = 'vm:a"b\\c'  # JSON-special characters in a stream id still frame valid JSON
        await store.append([to("vm:x", 0, payload(1, stream="vm:x"), payload(2, stream="vm:x"))])
        await store.append([to("user:x", 0, payload(3))])
        await store.append([to(odd, 0, NewEvent(type="VmDeleted", data=b"{}", event=Event()))])
        await store.append([to("vm:y", 0, payload(5, stream="vm:y"))])
        await store.append([to("vmz", 0, payload(6))])  # shares the letters, not the prefix

        page = await store.read_json_page(0, 4, "vm:", ["VmStarted", "VmStopped", "VmDeleted"])
        whole = await store.read_json_page(0, 6, "vm:", ["VmStarted", "VmDeleted"])
        empty = await store.read_json_page(5, 6, "user:", ["VmStarted"])

    at = "2025-01-01T00:00:00Z"
    assert sorted(msgspec.json.decode(page)) == [
        [1, "vm:x", {"type": "VmStarted", "sid": "x-1", "at": at}],
        [2, "vm:x", {"type": "VmStopped", "sid": "x-2", "at": at}],
        [4, odd, {"type": "VmDeleted"}],
    ]
    assert sorted(msgspec.json.decode(whole)) == [
        [1, "vm:x", {"type": "VmStarted", "sid": "x-1", "at": at}],
        [4, odd, {"type": "VmDeleted"}],
        [5, "vm:y", {"type": "VmStarted", "sid": "y-5", "at": at}],
    ]
    assert msgspec.json.decode(empty) == []


async def test_stream_ends_are_the_last_positions_of_a_kind_of_stream_in_order(
    tmp_path: Path,
) -> None:
    async with SqliteEventStore(tmp_path / "events.db") as store:
        await store.append([to("vm:x", 0, payload(1, stream="vm:x"), payload(2, stream="vm:x"))])
        await store.append([to("vm:y", 0, payload(3, stream="vm:y"))])
        await store.append([to("user:x", 0, payload(4))])
        await store.append([to("vm:x", 2, payload(5, stream="vm:x"))])
        await store.append([to("vmz", 0, payload(6))])  # shares the letters, not the prefix
        await store.append([to("vm:y", 1, payload(7, stream="vm:y"))])

        assert await store.stream_ends("vm:", 7) == [(5, "vm:x"), (7, "vm:y")]
        assert await store.stream_ends("vm:", 4) == [(2, "vm:x"), (3, "vm:y")]
        assert await store.stream_ends("vm:", 0) == []
        assert await store.stream_ends("user:", 7) == [(4, "user:x")]
        assert await store.stream_ends("node:", 7) == []


# The hash chain (adapters/event_chain.py) ----------------------------------------------------

OLD_SCHEMA = """
CREATE TABLE events (
    position INTEGER PRIMARY KEY, stream TEXT NOT NULL, version INTEGER NOT NULL,
    type TEXT NOT NULL, data BLOB NOT NULL, metadata BLOB NOT NULL, recorded_at TEXT NOT NULL,
    UNIQUE (stream, version)
);
"""


def chain_of(path: Path) -> ChainReport:
    db = sqlite3.connect(path)
    try:
        return verify(db)
    finally:
        db.close()


async def test_a_log_written_before_the_chain_gets_it_once_at_open(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    db = sqlite3.connect(path)
    db.executescript(OLD_SCHEMA)
    db.executemany(
        "INSERT INTO events VALUES (?, ?, ?, ?, ?, x'7b7d', ?)",
        [
            (p, f"vm:{p % 3}", (p + 2) // 3, "VmStarted", b'{"n":%d}' % p, f"t{p}")
            for p in range(1, 31)
        ],
    )
    db.commit()
    db.close()

    async with SqliteEventStore(path) as store:
        migrated = chain_of(path)
        assert (migrated.ok, migrated.events) == (True, 30)
        assert store.head_hash == migrated.head.hex()
        await store.append([to("vm:new", 0, payload(1))])
        head = store.head_hash
    with sqlite3.connect(path) as db:
        hashes = db.execute("SELECT position, hash FROM events ORDER BY position").fetchall()
    async with SqliteEventStore(path) as reopened:  # nothing is hashed again
        assert reopened.head_hash == head
    with sqlite3.connect(path) as db:
        assert (
            db.execute("SELECT position, hash FROM events ORDER BY position").fetchall() == hashes
        )
    assert chain_of(path) == ChainReport(31, bytes.fromhex(head))


async def test_a_failed_chain_migration_leaves_the_old_log_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    db = sqlite3.connect(path)
    db.executescript(OLD_SCHEMA)
    db.execute("INSERT INTO events VALUES (1, 'vm:a', 1, 'VmStarted', x'7b7d', x'7b7d', 't')")
    db.execute("INSERT INTO events VALUES (2, 'vm:a', 2, 'VmStarted', x'7b7d', x'7b7d', x'74')")
    db.commit()  # bytes where text belongs: hashing fails half way through
    db.close()

    with pytest.raises(AttributeError):
        await SqliteEventStore(path).open()
    with sqlite3.connect(path) as db:
        columns = [row[1] for row in db.execute("PRAGMA table_info(events)")]
    assert "hash" not in columns


async def test_two_writers_on_one_file_keep_one_chain(
    two_processes: tuple[SqliteEventStore, SqliteEventStore],
) -> None:
    first, second = two_processes
    for i in range(5):
        await first.append([to(f"vm:f{i}", 0, payload(1))])
        await second.append([to(f"vm:s{i}", 0, payload(2))])
    await asyncio.gather(*(first.append([to(f"vm:g{i}", 0, payload(3))]) for i in range(20)))

    report = chain_of(first.path)
    assert (report.ok, report.events) == (True, 30)
    assert first.head_hash == report.head.hex()


async def test_a_failed_commit_leaves_the_head_where_the_file_has_it(tmp_path: Path) -> None:
    """The writer takes the head back from the file, so the next event links to the real one."""
    path = tmp_path / "events.db"
    async with SqliteEventStore(path) as store:
        await store.append([to("vm:a", 0, payload(1))])
        before = store.head_hash
        with pytest.raises(Unavailable):
            await store.append([to("vm:b", 0, NewEvent(type="X", data=None, event=Event()))])  # type: ignore[arg-type]
        assert (store.position, store.head_hash) == (1, before)
        await store.append([to("vm:c", 0, payload(2))])
    assert chain_of(path).ok and chain_of(path).events == 2
