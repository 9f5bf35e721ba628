"""Backups of a data dir: SQLite's online backup of the databases, the key files, one tar file.

The tar holds `manifest.json`, a copy of `events.db` and of `vault.db` taken with SQLite's online
backup API (each a consistent snapshot, taken while writers go on: the log is in WAL mode), and
the key files a restored service needs to use the data. It holds the keys, so it is written
mode 0600 and is as secret as the data dir.
"""

from __future__ import annotations

import io
import os
import shutil
import sqlite3
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

import msgspec

from adapters.event_chain import ChainReport, verify

EVENTS = "events.db"
DATABASES = (EVENTS, "vault.db")
"""Copied with the online backup API, the log first."""
KEY_FILES = ("fingerprint.key", "master.key", "token", "service.nk", "client.nk")
"""Copied when present: without them the log's fingerprints and sealed secrets are unusable."""
REFUSED = ("views.db",)
"""A restore refuses a dir holding these too: views of another log would not be rebuilt."""
MANIFEST = "manifest.json"
FORMAT = 1


class Manifest(msgspec.Struct, frozen=True, kw_only=True):
    """What a backup holds: its log's size and head, the files, and the followers' checkpoints."""

    format: int = FORMAT
    created_at: str
    events: int
    head: str
    files: list[str]
    checkpoints: dict[str, int] = {}


class BackupError(ValueError):
    """A backup cannot be taken or restored; the message says why."""


def backup(data_dir: Path, target: Path, checkpoints: dict[str, int]) -> Manifest:
    """Writes a backup of `data_dir` to `target` (a new file, mode 0600); safe beside a writer.

    `checkpoints` are read by the caller before this is called, so each is at or below the
    snapshot of the log.
    """
    if not (data_dir / EVENTS).is_file():
        raise BackupError(f"no event log at {data_dir / EVENTS}")
    if target.exists():
        raise BackupError(f"{target} exists; a backup never overwrites a file")
    target.parent.mkdir(parents=True, exist_ok=True)
    with _scratch(target.parent) as scratch:
        files = [name for name in DATABASES if (data_dir / name).is_file()]
        for name in files:
            snapshot(data_dir / name, scratch / name)
        report = _verified(scratch / EVENTS)
        keys = [name for name in KEY_FILES if (data_dir / name).is_file()]
        for name in keys:
            shutil.copyfile(data_dir / name, scratch / name)
        manifest = Manifest(
            created_at=datetime.now(UTC).isoformat(),
            events=report.events,
            head=report.head.hex(),
            files=files + keys,
            checkpoints=checkpoints,
        )
        _write_tar(scratch, manifest, target)
    return manifest


def snapshot(source: Path, copy: Path) -> None:
    """Copies a live database with SQLite's backup API in one step: one consistent snapshot."""
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    try:
        dst = sqlite3.connect(copy)
        try:
            src.backup(dst)  # pages=-1: the whole file in one step, under one read transaction
            dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file, no -wal
        finally:
            dst.close()
    finally:
        src.close()
    os.chmod(copy, 0o600)


def restore(source: Path, data_dir: Path) -> Manifest:
    """Restores a backup into `data_dir`, which must hold no log, views or key of its own yet.

    The copy of the log is verified (its chain, its size and head as the manifest says) before
    any file is moved into place.
    """
    try:
        return _restore(source, data_dir)
    except tarfile.TarError as error:
        raise BackupError(f"{source} is not a readable backup: {error}") from None


def _restore(source: Path, data_dir: Path) -> Manifest:
    with tarfile.open(source, "r:") as tar:
        manifest = _read_manifest(tar)
        taken = [n for n in (*manifest.files, *REFUSED) if (data_dir / n).exists()]
        taken += [n + "-wal" for n in DATABASES if (data_dir / (n + "-wal")).exists()]
        if taken:
            raise BackupError(
                f"{data_dir} already holds {', '.join(taken)}; restore into a new dir"
            )
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with _scratch(data_dir) as scratch:
            for name in manifest.files:
                _extract(tar, name, scratch / name)
            report = _verified(scratch / EVENTS)
            if (report.events, report.head.hex()) != (manifest.events, manifest.head):
                raise BackupError(
                    f"the backup's log has {report.events} events (head {report.head.hex()}),"
                    f" its manifest says {manifest.events} (head {manifest.head})"
                )
            for name in sorted(manifest.files, key=lambda n: n == EVENTS):  # the log last
                os.replace(scratch / name, data_dir / name)
    return manifest


def verify_file(path: Path) -> ChainReport:
    """Verifies the chain of the log at `path`, read-only (safe beside a running service)."""
    if not path.is_file():
        raise BackupError(f"no event log at {path}")
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return verify(conn)
    except sqlite3.DatabaseError as error:
        raise BackupError(f"cannot read the log at {path}: {error}") from None
    finally:
        conn.close()


def _verified(path: Path) -> ChainReport:
    report = verify_file(path)
    if not report.ok:
        raise BackupError(f"the log's chain breaks at position {report.broken_at}: {report.reason}")
    return report


@contextmanager
def _scratch(parent: Path) -> Iterator[Path]:
    """A private (0700) directory beside the target, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix=".hero-backup-", dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _write_tar(scratch: Path, manifest: Manifest, target: Path) -> None:
    """Writes the tar under a temporary name (0600), syncs it, then renames it into place."""
    partial = target.with_name(target.name + ".partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            with tarfile.open(fileobj=out, mode="w:") as tar:
                _add(tar, MANIFEST, io.BytesIO(msgspec.json.encode(manifest)))
                for name in manifest.files:
                    with (scratch / name).open("rb") as f:
                        _add(tar, name, f)
            out.flush()
            os.fsync(out.fileno())
        os.rename(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _add(tar: tarfile.TarFile, name: str, f: IO[bytes]) -> None:
    info = tarfile.TarInfo(name)
    info.size = f.seek(0, io.SEEK_END)
    f.seek(0)
    info.mode, info.mtime = 0o600, int(time.time())
    tar.addfile(info, f)


def _read_manifest(tar: tarfile.TarFile) -> Manifest:
    try:
        manifest = msgspec.json.decode(_member(tar, MANIFEST).read(), type=Manifest)
    except msgspec.ValidationError as error:
        raise BackupError(f"not a hero-deployer backup: {error}") from None
    if manifest.format != FORMAT:
        raise BackupError(f"backup format {manifest.format} is not {FORMAT}")
    unknown = set(manifest.files) - {*DATABASES, *KEY_FILES}
    if unknown or EVENTS not in manifest.files:
        raise BackupError(f"not a hero-deployer backup: files {sorted(manifest.files)}")
    return manifest


def _member(tar: tarfile.TarFile, name: str) -> IO[bytes]:
    try:
        info = tar.getmember(name)
    except KeyError:
        raise BackupError(f"not a hero-deployer backup: no {name}") from None
    f = tar.extractfile(info) if info.isfile() else None
    if f is None:
        raise BackupError(f"not a hero-deployer backup: {name} is not a file")
    return f


def _extract(tar: tarfile.TarFile, name: str, path: Path) -> None:
    """Writes one member (a plain file named in the manifest) to `path`, mode 0600."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out, _member(tar, name) as f:
        shutil.copyfileobj(f, out)
        out.flush()
        os.fsync(out.fileno())
