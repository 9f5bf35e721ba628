"""Backups: taken with SQLite's online backup while the service works, restored into a new dir."""

from __future__ import annotations

import asyncio
import io
import sqlite3
import stat
import tarfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client

from adapters.localgrid import LocalGrid
from adapters.sqlite_backup import Manifest
from core.retry import RetryPolicy
from hero_deployer.app.bootstrap import bootstrap
from hero_deployer.sdk.client import HeroDeployerClient
from tests.conftest import TOKEN, Service, make_settings
from tests.helpers import arun_cli, wait_for_event

EVENT_COLUMNS = "position, stream, version, type, data, metadata, recorded_at, hash"


async def cli(*args: str) -> tuple[int, str, str]:
    """Runs `hero-deployer` in its own process, as an operator would beside the service."""
    return await arun_cli(*args, timeout=120)


def saved_checkpoints(views: Path) -> dict[str, int]:
    if not views.exists():
        return {}
    return dict(rows(views, "SELECT name, position FROM checkpoints"))


async def until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    """Returns once `condition()` holds, checking every 20 ms; fails after `timeout`."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.02)


def rows(db_path: Path, sql: str, *params: object) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        return db.execute(sql, params).fetchall()
    finally:
        db.close()


def manifest_of(backup: Path) -> Manifest:
    with tarfile.open(backup) as tar:
        member = tar.extractfile("manifest.json")
        assert member is not None
        return msgspec.json.decode(member.read(), type=Manifest)


@asynccontextmanager
async def service_on(data_dir: Path, grid_dir: Path, nc: Client) -> AsyncIterator[Service]:
    """A service started on `data_dir` (as `serve --data-dir` would), on a prefix of its own."""
    settings = make_settings(data_dir)
    async with (
        LocalGrid(data_dir=grid_dir, deploy_delay=0, action_delay=0, ssh=False) as grid,
        bootstrap(settings, nc, compute=grid, retry=RetryPolicy(base_delay=0.01)) as app,
    ):
        client = HeroDeployerClient(nc, token=TOKEN, prefix=settings.prefix)
        yield Service(app=app, client=client, settings=settings, grid=grid, nc=nc)


class DeployLoad:
    """Workers deploying VMs back to back; remembers each acknowledged VM and its secret."""

    def __init__(self, client: HeroDeployerClient, workers: int = 8) -> None:
        self.client = client
        self.acked: list[tuple[str, str]] = []
        self.stop = asyncio.Event()
        self._enough = asyncio.Event()
        self._tasks = [asyncio.create_task(self._work(w)) for w in range(workers)]

    async def _work(self, worker: int) -> None:
        secret, i = f"tenant-{worker}", 0
        while not self.stop.is_set():
            vm = await self.client.call("deploy_vm", {"name": f"w{worker}-{i}", "secret": secret})
            self.acked.append((vm["sid"], secret))
            i += 1
            if len(self.acked) >= 40:
                self._enough.set()

    async def running(self, views: Path) -> None:
        """Returns once 40 deploys are acknowledged and the reactor has saved a checkpoint."""
        await asyncio.wait_for(self._enough.wait(), 60)
        await until(lambda: saved_checkpoints(views).get("vm-reactor", 0) > 0)

    async def finish(self) -> None:
        self.stop.set()
        await asyncio.gather(*self._tasks)


async def test_a_backup_under_load_restores_verified_with_every_acknowledged_vm(
    service: Service, nc: Client, tmp_path: Path
) -> None:
    live = service.settings.data_dir
    load = DeployLoad(service.client)
    await load.running(live / "views.db")
    before = list(load.acked)
    backup = tmp_path / "backups" / "hero.tar"
    code, out, err = await cli("backup", str(backup), "--data-dir", str(live))
    during = len(load.acked) - len(before)
    await load.finish()
    for sid, _ in load.acked:  # the live service settles: every VM deployed, views caught up
        await wait_for_event(service.client, f"vm:{sid}", "VmDeployed")
    await service.app.views.wait_for(service.app.store.position)

    assert code == 0, err
    assert during > 0  # deploys were acknowledged while the backup ran
    manifest = manifest_of(backup)
    assert out.startswith(f"backup {backup}: {manifest.events} events, head {manifest.head}")
    assert "keep it as secret as the data dir" in out
    assert {"events.db", "vault.db", "fingerprint.key", "master.key"} <= set(manifest.files)
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600

    restored = tmp_path / "restored"
    code, out, err = await cli("restore", str(backup), "--data-dir", str(restored))
    assert code == 0, err
    assert f"restored {manifest.events} events (head {manifest.head}, chain verified)" in out
    code, out, _ = await cli("audit", "verify", "--data-dir", str(restored))
    assert (code, out) == (0, f"ok: {manifest.events} events, head {manifest.head}\n")
    assert stat.S_IMODE(restored.stat().st_mode) == 0o700
    assert {p.name for p in restored.iterdir()} == {*manifest.files, "views.db"}
    for path in restored.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path

    # the copy is the live log up to its head, byte for byte, hashes included
    copied = rows(restored / "events.db", f"SELECT {EVENT_COLUMNS} FROM events ORDER BY 1")
    prefix = rows(
        live / "events.db",
        f"SELECT {EVENT_COLUMNS} FROM events WHERE position <= ? ORDER BY 1",
        manifest.events,
    )
    assert copied == prefix and len(copied) == manifest.events
    streams = {stream for _, stream, *_ in copied}
    assert all(f"vm:{sid}" in streams for sid, _ in before)
    # the followers go on from where they stood, at or below the copy's head; views rebuild
    assert 0 < manifest.checkpoints["vm-reactor"] <= manifest.events
    assert all(0 < p <= manifest.events for p in manifest.checkpoints.values())
    assert "views" not in manifest.checkpoints
    assert saved_checkpoints(restored / "views.db") == manifest.checkpoints

    async with service_on(restored, tmp_path / "grid2", nc) as again:
        ours = {sid for sid, _ in before}
        for sid, secret in before:  # the keys came along: each secret still reaches its VM
            vm = await again.client.call("get_vm", {"sid": sid, "secret": secret})
            assert vm["sid"] == sid
        for secret in {secret for _, secret in before}:
            listed = await again.client.call("list_vms", {"secret": secret})
            assert {v["sid"] for v in listed["vms"]} >= {s for s, t in before if t == secret}
        # VMs whose last event is in the copy have the very row the live views hold
        untouched = untouched_since(live, manifest.events)
        assert untouched & ours
        assert vm_rows(restored, untouched) == vm_rows(live, untouched)
        # and every VM deploying at the copy's head is deployed by the restored service
        for sid, _ in before:
            await wait_for_event(again.client, f"vm:{sid}", "VmDeployed")


def untouched_since(data_dir: Path, position: int) -> set[str]:
    """Sids of the VMs whose stream has no event after `position` in `data_dir`'s log."""
    ends = rows(
        data_dir / "events.db",
        "SELECT stream, MAX(position) FROM events WHERE stream LIKE 'vm:%' GROUP BY stream",
    )
    return {stream[3:] for stream, last in ends if last <= position}


def vm_rows(data_dir: Path, sids: set[str]) -> list[tuple[Any, ...]]:
    marks = ",".join("?" * len(sids))
    return rows(
        data_dir / "views.db",
        f"SELECT * FROM vms WHERE sid IN ({marks}) ORDER BY sid",
        *sorted(sids),
    )


async def test_a_quiet_backup_rebuilds_views_equal_to_the_live_ones(
    service: Service, nc: Client, tmp_path: Path
) -> None:
    sids = []
    for i in range(12):
        vm = await service.client.call("deploy_vm", {"name": f"q{i}", "secret": f"t{i % 3}"})
        sids.append(vm["sid"])
    for sid in sids:
        await wait_for_event(service.client, f"vm:{sid}", "VmDeployed")
    await service.client.call("delete_vm", {"sid": sids[1], "secret": "t1"})
    await wait_for_event(service.client, f"vm:{sids[1]}", "VmDeleted")
    await service.app.views.wait_for(service.app.store.position)
    live_tables = view_tables(service.settings.data_dir)

    backup = tmp_path / "quiet.tar"
    assert (await cli("backup", str(backup), "--data-dir", str(service.settings.data_dir)))[0] == 0
    restored = tmp_path / "restored"
    assert (await cli("restore", str(backup), "--data-dir", str(restored)))[0] == 0
    async with service_on(restored, tmp_path / "grid2", nc) as again:
        assert again.app.store.position == service.app.store.position
        await again.app.views.wait_for(again.app.store.position)
        assert view_tables(restored) == live_tables
        for i, sid in enumerate(sids):
            body = {"sid": sid, "secret": f"t{i % 3}"}
            assert await again.client.call("get_vm", body) == await service.client.call(
                "get_vm", body
            )


def view_tables(data_dir: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every view table (not the checkpoints or layouts)."""
    names = [
        n
        for (n,) in rows(data_dir / "views.db", "SELECT name FROM sqlite_master WHERE type='table'")
        if n not in ("checkpoints", "layouts")
    ]
    return {n: rows(data_dir / "views.db", f"SELECT * FROM {n} ORDER BY 1") for n in names}


async def quiet_backup(service: Service, tmp_path: Path) -> Path:
    await service.client.call("deploy_vm", {"name": "one", "secret": "s"})
    backup = tmp_path / "b.tar"
    assert (await cli("backup", str(backup), "--data-dir", str(service.settings.data_dir)))[0] == 0
    return backup


async def test_backup_never_overwrites_and_restore_refuses_a_dir_in_use(
    service: Service, tmp_path: Path
) -> None:
    backup = await quiet_backup(service, tmp_path)
    first = backup.read_bytes()
    code, _, err = await cli("backup", str(backup), "--data-dir", str(service.settings.data_dir))
    assert code == 1 and err.startswith(f"error: {backup} exists")
    assert backup.read_bytes() == first

    code, _, err = await cli("restore", str(backup), "--data-dir", str(service.settings.data_dir))
    assert code == 1 and "already holds events.db" in err
    code, _, err = await cli("restore", str(backup))
    assert code == 1 and "restore needs --data-dir" in err


def retar(backup: Path, edit: str, out: Path) -> None:
    """The same backup with one SQL statement run on its copy of the log."""
    scratch = out.with_suffix(".db")
    with tarfile.open(backup) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    scratch.write_bytes(members["events.db"])
    db = sqlite3.connect(scratch)
    db.execute(edit)
    db.commit()
    db.close()
    members["events.db"] = scratch.read_bytes()
    with tarfile.open(out, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        ("UPDATE events SET data = x'7b7d' WHERE position = 1", "chain breaks at position 1"),
        ("DELETE FROM events WHERE position = (SELECT MAX(position) FROM events)", "manifest"),
    ],
    ids=["edited", "truncated"],
)
async def test_restore_refuses_a_backup_whose_log_does_not_verify(
    service: Service, tmp_path: Path, edit: str, says: str
) -> None:
    backup = await quiet_backup(service, tmp_path)
    bad = tmp_path / "bad.tar"
    retar(backup, edit, bad)
    target = tmp_path / "target"
    code, _, err = await cli("restore", str(bad), "--data-dir", str(target))
    assert code == 1 and says in err
    assert not (target / "events.db").exists()
    assert not (target / "fingerprint.key").exists()


async def test_restore_of_something_else_is_an_error_line(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar file at all" * 100)
    code, out, err = await cli("restore", str(junk), "--data-dir", str(tmp_path / "d"))
    assert (code, out) == (1, "")
    assert err.startswith("error: ") and "not a readable backup" in err
