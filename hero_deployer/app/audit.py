"""`hero-deployer audit verify`, `backup` and `restore`: the log's chain, copies of a data dir."""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
from pathlib import Path
from typing import Any

from adapters.sqlite_backup import EVENTS, BackupError, backup, restore, verify_file
from hero_deployer.app.settings import Settings

EXIT_BROKEN = 1

COMMANDS = ("audit", "backup", "restore")


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Adds the three commands to the CLI's subparsers (`common` gives `--data-dir`)."""
    audit = sub.add_parser("audit", help="check the event log").add_subparsers(
        dest="audit_action", required=True
    )
    audit.add_parser(
        "verify", parents=[common], help="check the log's hash chain; name the first break"
    )
    take = sub.add_parser(
        "backup", parents=[common], help="copy the log, the vault and the keys into FILE (0600)"
    )
    take.add_argument("file", type=Path, help="the backup file to write")
    put = sub.add_parser("restore", parents=[common], help="restore FILE into a new --data-dir")
    put.add_argument("file", type=Path, help="a backup file that `backup` wrote")


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Runs one of the three commands; returns the exit status. BackupError is a ValueError."""
    if args.command == "audit":
        return audit_verify(settings.data_dir / EVENTS)
    if args.command == "backup":
        return take_backup(settings.data_dir, args.file)
    if getattr(args, "data_dir", None) is None:
        raise BackupError("restore needs --data-dir: the new dir to restore into")
    return restore_backup(args.file, settings.data_dir)


def audit_verify(path: Path) -> int:
    """Prints `ok: N events, head H`, or the first position that breaks the chain (status 1)."""
    report = verify_file(path)
    if report.ok:
        print(f"ok: {report.events} events, head {report.head.hex()}")
        return 0
    print(
        f"broken at position {report.broken_at}: {report.reason}"
        f" ({report.events} events before it are intact)"
    )
    return EXIT_BROKEN


def take_backup(data_dir: Path, target: Path) -> int:
    manifest = backup(data_dir, target, read_checkpoints(data_dir / "views.db"))
    print(
        f"backup {target}: {manifest.events} events, head {manifest.head},"
        f" files {', '.join(manifest.files)}"
    )
    if any(name.endswith((".key", ".nk")) or name == "token" for name in manifest.files):
        print("it holds the service's keys: keep it as secret as the data dir")
    return 0


def restore_backup(source: Path, data_dir: Path) -> int:
    manifest = restore(source, data_dir)
    asyncio.run(_write_checkpoints(data_dir / "views.db", manifest.checkpoints))
    (data_dir / "views.db").chmod(0o600)
    print(
        f"restored {manifest.events} events (head {manifest.head}, chain verified) into"
        f" {data_dir}; the service rebuilds its views when it starts"
    )
    return 0


def read_checkpoints(views: Path) -> dict[str, int]:
    """Where each follower (reactor, process manager, publisher) stands; not the views' own.

    Read before the log is copied, so each is at or below the copy's last position.
    """
    from projections.runner import ProjectionRunner

    if not views.is_file():
        return {}
    conn = sqlite3.connect(f"file:{views}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT name, position FROM checkpoints").fetchall()
    except sqlite3.OperationalError:  # no such table: nothing has followed the log yet
        return {}
    finally:
        conn.close()
    return {str(name): int(pos) for name, pos in rows if name != ProjectionRunner.name}


async def _write_checkpoints(views: Path, checkpoints: dict[str, int]) -> None:
    """A views database holding only the followers' checkpoints: no view is built yet."""
    from projections.runner import connect_views, write_checkpoint

    conn = await connect_views(views)
    try:
        for name, position in checkpoints.items():
            await write_checkpoint(conn, name, position)
    finally:
        await conn.close()
