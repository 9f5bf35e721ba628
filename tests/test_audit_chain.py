"""The log proves itself: every tampering with plain sqlite3 is named at its first position."""

from __future__ import annotations

import asyncio
import re
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from adapters.event_chain import GENESIS, link, verify
from adapters.eventstore_sqlite import SqliteEventStore
from adapters.sqlite_backup import verify_file
from hero_deployer.cli import main
from tests.conftest import TOKEN, Service
from tests.eventstore_contract import payload, to
from tests.helpers import run_cli

EVENTS = 12


@pytest.fixture
async def log(tmp_path: Path) -> Path:
    """A real log of 12 events over 4 streams, written by the store and closed."""
    data = tmp_path / "data"
    async with SqliteEventStore(data / "events.db") as store:
        for i in range(EVENTS // 3):
            await store.append([to(f"vm:s{i}", 0, payload(1), payload(2), payload(3))])
    return data


def run_sql(data: Path, *statements: str) -> None:
    """Runs statements on the log with plain sqlite3, as someone with the file could."""
    db = sqlite3.connect(data / "events.db")
    try:
        for statement in statements:
            db.execute(statement)
        db.commit()
    finally:
        db.close()


def edit_data(data: Path) -> None:
    run_sql(data, """UPDATE events SET data = x'7b7d' WHERE position = 5""")


def edit_data_as_text(data: Path) -> None:
    """The same bytes stored as TEXT are the same event; one more byte is not."""
    run_sql(data, "UPDATE events SET data = CAST(data AS TEXT) || ' ' WHERE position = 5")


def delete_row(data: Path) -> None:
    run_sql(data, "DELETE FROM events WHERE position = 5")


def swap_rows(data: Path) -> None:
    run_sql(
        data,
        "UPDATE events SET position = -1 WHERE position = 5",
        "UPDATE events SET position = 5 WHERE position = 9",
        "UPDATE events SET position = 9 WHERE position = -1",
    )


def move_row_to_the_end(data: Path) -> None:
    run_sql(data, f"UPDATE events SET position = {EVENTS + 1} WHERE position = 5")


def edit_hash(data: Path) -> None:
    run_sql(data, "UPDATE events SET hash = randomblob(32) WHERE position = 5")


def edit_recorded_at(data: Path) -> None:
    run_sql(data, "UPDATE events SET recorded_at = '2020-01-01T00:00:00+00:00' WHERE position = 5")


def edit_type(data: Path) -> None:
    run_sql(data, "UPDATE events SET type = 'VmDeleted' WHERE position = 5")


def edit_version(data: Path) -> None:
    run_sql(data, "UPDATE events SET version = 7 WHERE position = 5")


def re_hash_one_row(data: Path) -> None:
    """Row 5 edited and given the hash its new contents would have: row 6 no longer follows."""
    db = sqlite3.connect(data / "events.db")
    try:
        db.execute("UPDATE events SET data = x'7b7d' WHERE position = 5")
        (previous,) = db.execute("SELECT hash FROM events WHERE position = 4").fetchone()
        row = db.execute(
            "SELECT position, stream, version, type, data, recorded_at FROM events"
            " WHERE position = 5"
        ).fetchone()
        db.execute("UPDATE events SET hash = ? WHERE position = 5", (link(previous, *row),))
        db.commit()
    finally:
        db.close()


TAMPERING: dict[str, tuple[Callable[[Path], None], int]] = {
    "edited data": (edit_data, 5),
    "data stored as edited text": (edit_data_as_text, 5),
    "deleted row": (delete_row, 5),
    "swapped rows": (swap_rows, 5),
    "row moved to the end": (move_row_to_the_end, 5),
    "edited hash": (edit_hash, 5),
    "edited recorded_at": (edit_recorded_at, 5),
    "edited type": (edit_type, 5),
    "edited version": (edit_version, 5),
    "edited row with its hash recomputed": (re_hash_one_row, 6),
}


def test_an_intact_log_verifies_with_its_head(
    log: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = verify_file(log / "events.db")
    assert report.ok and report.events == EVENTS

    assert main(["audit", "verify", "--data-dir", str(log)]) == 0
    assert capsys.readouterr().out == f"ok: {EVENTS} events, head {report.head.hex()}\n"


async def test_the_head_is_the_store_head_and_every_hash_links_to_the_one_before(
    log: Path,
) -> None:
    async with SqliteEventStore(log / "events.db") as store:
        head = store.head_hash
    db = sqlite3.connect(log / "events.db")
    rows = db.execute(
        "SELECT position, stream, version, type, data, recorded_at, hash FROM events"
        " ORDER BY position"
    ).fetchall()
    db.close()
    previous = GENESIS
    for *fields, stored in rows:
        assert stored == link(previous, *fields)
        previous = stored
    assert previous.hex() == head == verify_file(log / "events.db").head.hex()


@pytest.mark.parametrize("tamper", TAMPERING.values(), ids=list(TAMPERING))
def test_verify_names_the_first_broken_position(
    log: Path, tamper: tuple[Callable[[Path], None], int], capsys: pytest.CaptureFixture[str]
) -> None:
    change, first_broken = tamper
    change(log)

    report = verify_file(log / "events.db")
    assert report.broken_at == first_broken
    assert report.events == first_broken - 1

    assert main(["audit", "verify", "--data-dir", str(log)]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"broken at position {first_broken}: ")
    assert out.count("\n") == 1


def test_the_command_exits_non_zero_on_a_broken_log(log: Path) -> None:
    edit_data(log)
    ran = run_cli("audit", "verify", "--data-dir", str(log))
    assert ran.returncode == 1
    assert ran.stdout.startswith("broken at position 5: its hash does not match its contents")


def test_an_empty_log_verifies_with_the_genesis_head(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "events.db")
    db.execute(
        "CREATE TABLE events (position INTEGER PRIMARY KEY, stream TEXT, version INTEGER,"
        " type TEXT, data BLOB, recorded_at TEXT, hash BLOB)"
    )
    report = verify(db)
    db.close()
    assert (report.ok, report.events, report.head) == (True, 0, GENESIS)


def test_verify_of_a_missing_log_is_an_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["audit", "verify", "--data-dir", str(tmp_path / "none")]) == 1
    assert capsys.readouterr().err.startswith("error: no event log at ")


async def test_health_shows_the_head_hash(service: Service) -> None:
    await service.client.call("deploy_vm", {"name": "web-1", "secret": "s1"})
    health = await service.client.health()
    assert health.position > 0
    db = sqlite3.connect(service.settings.data_dir / "events.db")
    (stored,) = db.execute("SELECT hash FROM events WHERE position = ?", (health.position,))
    db.close()
    assert health.head_hash == stored[0].hex()
    assert verify_file(service.settings.data_dir / "events.db").ok


def test_a_field_of_the_wrong_type_is_a_break_not_a_crash(log: Path) -> None:
    run_sql(log, "UPDATE events SET stream = x'00' WHERE position = 4")
    report = verify_file(log / "events.db")
    assert (report.broken_at, report.reason) == (4, "a field has the wrong type")


async def test_the_health_command_prints_the_head(
    service: Service,
    nats_url: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await service.client.call("deploy_vm", {"name": "web-1", "secret": "s1"})
    monkeypatch.setenv("HERO_DEPLOYER_TOKEN", TOKEN)
    monkeypatch.setenv("HERO_DEPLOYER_PREFIX", service.settings.prefix)
    argv = ["health", "--nats", nats_url, "--data-dir", str(tmp_path / "cli")]
    assert await asyncio.to_thread(main, argv) == 0
    line = capsys.readouterr().out
    match = re.fullmatch(r"ok  version \S+  position (\d+)  head ([0-9a-f]{64})\n", line)
    assert match is not None, line
    db = sqlite3.connect(service.settings.data_dir / "events.db")
    (stored,) = db.execute("SELECT hash FROM events WHERE position = ?", (int(match[1]),))
    db.close()
    assert match[2] == stored[0].hex()
