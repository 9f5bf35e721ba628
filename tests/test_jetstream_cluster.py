"""The service on a JetStream log: `serve --store jetstream`, replicas, and a cluster of three.

Every nats-server is the venv's, on loopback ports of its own; the stores, views and vaults are
real. The cluster configurations are generated (tests/jetstream_cluster.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client

from adapters.eventstore_jetstream import JetStreamEventStore
from adapters.jetstream_log import STREAM, verify_chain
from adapters.keyfiles import load_or_create_nkey
from adapters.localgrid import LocalGrid
from core.retry import RetryPolicy
from hero_deployer.app.bootstrap import SHARED_KEYS, App, SharedKeyMissing, bootstrap
from hero_deployer.app.natsserver import NatsServer
from hero_deployer.app.settings import Settings
from hero_deployer.sdk.client import Conflict, HeroDeployerClient, Unavailable
from tests.conftest import TOKEN, copy_shared_keys, make_settings
from tests.helpers import deploy_running
from tests.jetstream_cluster import (
    connect,
    jetstream_ready,
    node_config,
    running_cluster,
    running_server,
    stream_created,
)

SECRET = "a-tenant-secret-long-enough"


@pytest.fixture
async def log_server(tmp_path: Path) -> AsyncIterator[NatsServer]:
    async with running_server(tmp_path / "nats") as server:
        yield server


@pytest.fixture
async def nc(log_server: NatsServer) -> AsyncIterator[Client]:
    client = await connect([log_server.url])
    await jetstream_ready(client)
    yield client
    await client.close()


def replica(data_dir: Path, prefix: str, **overrides: object) -> Settings:
    """A replica's settings: its own DIR, the shared prefix, the log in JetStream (R1 here)."""
    values: dict[str, object] = {"store": "jetstream", "replicas": 1, "prefix": prefix}
    return make_settings(data_dir, **{**values, **overrides})


@contextlib.asynccontextmanager
async def serving(
    settings: Settings, nc: Client, grid: LocalGrid
) -> AsyncIterator[tuple[App, HeroDeployerClient]]:
    """A replica bootstrapped on `nc` and `grid`, with a client on its prefix."""
    async with bootstrap(settings, nc, compute=grid, retry=RetryPolicy(base_delay=0.01)) as app:
        yield app, HeroDeployerClient(nc, token=TOKEN, prefix=settings.prefix)


async def test_the_service_keeps_its_log_in_jetstream(
    tmp_path: Path, nc: Client, grid: LocalGrid
) -> None:
    async with serving(replica(tmp_path / "first", "js1.v1"), nc, grid) as (_, client):
        sid = await deploy_running(client, SECRET)
        health = await client.call("health", {})

    assert not (tmp_path / "first" / "events.db").exists()
    assert not (tmp_path / "first" / "vault.db").exists()
    async with JetStreamEventStore(nc, replicas=1) as log:
        types = [e.type for e in await log.read_stream(f"vm:{sid}")]
        assert types[0] == "VmDeployRequested"
        assert "VmDeployed" in types
        assert health["position"] <= await log.last_position()
    report = await verify_chain(nc, 5)
    assert report.ok
    assert report.events >= len(types)


async def test_a_replica_without_the_shared_keys_refuses_to_start(
    tmp_path: Path, nc: Client, grid: LocalGrid
) -> None:
    """It would otherwise make new keys, and the log's fingerprints and secrets would not open."""
    first = replica(tmp_path / "first", "js2.v1")
    async with serving(first, nc, grid) as (_, client):
        await deploy_running(client, SECRET)

    second_dir = tmp_path / "second"
    second = replica(second_dir, first.prefix, token="")
    with pytest.raises(SharedKeyMissing) as refused:
        async with bootstrap(second, nc, compute=grid):
            pass
    for name, variable in SHARED_KEYS:
        assert str(second_dir / name) in str(refused.value)
        assert variable in str(refused.value)
        assert not (second_dir / name).exists(), "a replica generated a key"


async def test_a_replica_with_the_copied_keys_answers_from_the_log(
    tmp_path: Path, nc: Client, grid: LocalGrid
) -> None:
    """The second replica's views come from the shared log; its fingerprints match the first's."""
    first = replica(tmp_path / "first", "js3.v1")
    async with serving(first, nc, grid) as (_, client):
        sid = await deploy_running(client, SECRET)
        before = await client.call("get_vm", {"sid": sid, "secret": SECRET})

    copy_shared_keys(tmp_path / "first", tmp_path / "second")
    second = replica(tmp_path / "second", first.prefix)  # the token given, as HERO_DEPLOYER_TOKEN
    async with serving(second, nc, grid):
        after = await client.call("get_vm", {"sid": sid, "secret": SECRET})
        listed = await client.call("list_vms", {"secret": SECRET})
    assert after == before
    assert [vm["sid"] for vm in listed["vms"]] == [sid]


# A cluster of three, two service replicas ---------------------------------------------------

PREFIX = "hero.v1"
DEPLOYS = 40
IN_FLIGHT = 8
KILL_AFTER = 12  # acknowledged deploys before the stream leader's node is killed


def serve(data_dir: Path, urls: list[str]) -> subprocess.Popen[bytes]:
    """`hero-deployer serve --store jetstream --replicas 3` on the cluster, as its own process."""
    env = {
        **os.environ,
        "HERO_DEPLOYER_TOKEN": TOKEN,
        "HERO_DEPLOYER_PREFIX": PREFIX,
        "HERO_DEPLOYER_LOCAL_DEPLOY_DELAY": "0",
        "HERO_DEPLOYER_LOCAL_ACTION_DELAY": "0",
        "HERO_DEPLOYER_LOCAL_SSH": "false",
        "HERO_DEPLOYER_LOG_LEVEL": "warning",
        "HERO_DEPLOYER_LEASE_TTL": "2",  # a killed holder's side effects move within 2 s
        "HERO_DEPLOYER_RESERVATION_STALE_AFTER": "5",  # and its keys are settled after 5 s
    }
    command = [sys.executable, "-m", "hero_deployer", "serve", "--nats", ",".join(urls)]
    command += ["--store", "jetstream", "--replicas", "3", "--data-dir", str(data_dir)]
    return subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=data_dir.with_suffix(".log").open("wb")
    )


async def ready(process: subprocess.Popen[bytes], deadline: float = 60.0) -> None:
    """Waits for serve's ready line (or its exit) on its stdout."""
    assert process.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), deadline)
    assert line.startswith(b"hero-deployer ready"), (line, process.poll())


@pytest.mark.slow
async def test_killing_a_node_under_load_loses_and_doubles_no_deploy(tmp_path: Path) -> None:
    async with running_cluster(tmp_path / "cluster") as nodes:
        urls = [n.url for n in nodes]
        await stream_created(urls)
        first, second = tmp_path / "replica1", tmp_path / "replica2"
        replicas = [serve(first, urls)]
        try:
            await ready(replicas[0])
            copy_shared_keys(first, second)
            replicas.append(serve(second, urls))
            await ready(replicas[1])
            acknowledged, killed = await deploy_under_a_node_kill(urls, nodes, replicas[0])
            survivors = [n.url for n in nodes if n is not killed]
            await all_deployed(survivors, acknowledged)
        finally:
            for process in replicas:
                process.terminate()
            for process in replicas:
                await asyncio.to_thread(process.wait, 30)
        found, doubled, positions = await audit(survivors, acknowledged)

    print(
        f"\nacknowledged {len(acknowledged)}/{DEPLOYS}, found {found}, doubled {doubled},"
        f" log positions 1..{positions}"
    )
    assert len(acknowledged) == DEPLOYS, "every request is answered"
    assert found == len(acknowledged)
    assert doubled == 0


async def deploy_under_a_node_kill(
    urls: list[str], nodes: list[NatsServer], replica: subprocess.Popen[bytes]
) -> tuple[dict[str, str], NatsServer]:
    """Deploys DEPLOYS VMs, IN_FLIGHT at a time, and midway kills (-9) the stream leader's node
    and `replica` (the first one started, the side effects' lease holder).

    A request that fails as Unavailable or times out is sent again with its Idempotency-Key,
    as a client of the contract does; returns each name's sid as acknowledged.
    """
    nc = await connect(urls)
    client = HeroDeployerClient(nc, token=TOKEN, prefix=PREFIX, timeout=5, retries=3)
    acknowledged: dict[str, str] = {}
    failed_attempts: list[str] = []
    enough = asyncio.Event()
    gate = asyncio.Semaphore(IN_FLIGHT)

    async def deploy(n: int) -> None:
        key = f"deploy-{n}"
        async with gate:
            async with asyncio.timeout(90):
                while True:
                    try:
                        vm = await client.call(
                            "deploy_vm", {"name": f"w{n}", "secret": SECRET}, idempotency_key=key
                        )
                        break
                    except (Unavailable, Conflict) as error:
                        failed_attempts.append(type(error).__name__)
                        await asyncio.sleep(0.2)  # a client's back-off before its next attempt
        acknowledged[f"w{n}"] = vm["sid"]
        if len(acknowledged) >= KILL_AFTER:
            enough.set()

    async def kill_the_leader() -> NatsServer:
        await enough.wait()
        info = await nc.jetstream().stream_info(STREAM)
        leader = next(n for n in nodes if n._name == info.cluster.leader)
        assert leader.pid is not None
        os.kill(leader.pid, signal.SIGKILL)
        replica.kill()
        print(
            f"\nkilled the stream leader's node and a replica with {len(acknowledged)} deploys"
            " acknowledged"
        )
        return leader

    try:
        killer = asyncio.create_task(kill_the_leader())
        await asyncio.gather(*(deploy(n) for n in range(DEPLOYS)))
        print(f"\nattempts answered with an error and sent again: {len(failed_attempts)}")
        return acknowledged, await killer
    finally:
        await nc.close()


async def all_deployed(urls: list[str], acknowledged: dict[str, str]) -> None:
    """Follows the status stream until each acknowledged VM's deploy is recorded: the surviving
    replica runs the side effects once the killed holder's lease expires (lease_ttl)."""
    nc = await connect(urls)
    client = HeroDeployerClient(nc, token=TOKEN, prefix=PREFIX, timeout=5, retries=3)
    waiting = {f"vm:{sid}" for sid in acknowledged.values()}
    try:
        async with asyncio.timeout(60):
            async for event in client.follow():
                if event["type"] == "VmDeployed":
                    waiting.discard(event["stream"])
                if not waiting:
                    return
    except TimeoutError:
        raise AssertionError(f"never deployed: {sorted(waiting)}") from None
    finally:
        await nc.close()


async def audit(urls: list[str], acknowledged: dict[str, str]) -> tuple[int, int, int]:
    """Reads the log from the surviving nodes: found, doubled, and its last gap-free position."""
    nc = await connect(urls)
    try:
        await jetstream_ready(nc)  # the meta leader may have been on the killed node
        async with JetStreamEventStore(nc, replicas=3) as log:
            events = []
            while page := await log.read_all(after=events[-1].position if events else 0):
                events.extend(page)
            last = await log.last_position()
            assert [e.position for e in events] == list(range(1, last + 1)), "a gap in the log"
            report = await verify_chain(nc, 5)
            assert report.ok, report
            requested = [e for e in events if e.type == "VmDeployRequested"]
            streams = [e.stream for e in requested]
            found = sum(f"vm:{sid}" in streams for sid in acknowledged.values())
            doubled = len(streams) - len(set(streams))
            names = [msgspec.json.decode(e.data)["name"] for e in requested]
            doubled += len(names) - len(set(names))
            outcomes = [e.stream for e in events if e.type == "VmDeployed"]
            assert sorted(outcomes) == sorted(set(streams)), "each deploy's outcome recorded once"
            return found, doubled, last
    finally:
        await nc.close()


# Moving a log with the CLI, and the documented permissions ----------------------------------


def hero_deployer(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HERO_DEPLOYER_")}
    return subprocess.Popen(
        [sys.executable, "-m", "hero_deployer", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**clean, **(env or {})},
    )


async def test_migrate_store_moves_a_served_log_into_jetstream(
    tmp_path: Path, log_server: NatsServer, nc: Client, grid: LocalGrid
) -> None:
    """A log written by `serve` on SQLite, moved by the CLI, then served from JetStream."""
    data_dir = tmp_path / "data"
    settings = make_settings(data_dir, prefix="mv.v1")
    async with serving(settings, nc, grid) as (app, client):
        sid = await deploy_running(client, SECRET)
        head, count = app.store.head_hash, app.store.position

    process = hero_deployer(
        "migrate-store", "--from", f"sqlite:{data_dir}", "--to", f"jetstream:{log_server.url}",
        "--replicas", "1",
    )  # fmt: skip
    stdout, stderr = await asyncio.to_thread(process.communicate, None, 60)
    assert process.returncode == 0, stderr
    assert stdout.startswith(f"moved {count} events (head {head}), 1 idempotency records")

    moved = replica(data_dir, settings.prefix)  # the same keys, the log now in JetStream
    async with serving(moved, nc, grid) as (app, client):
        assert (app.store.position, app.store.head_hash) == (count, head)
        vm = await client.call("get_vm", {"sid": sid, "secret": SECRET})
        assert vm["sid"] == sid

    again = hero_deployer(
        "migrate-store", "--from", f"sqlite:{data_dir}", "--to", f"jetstream:{log_server.url}"
    )
    _, stderr = await asyncio.to_thread(again.communicate, None, 60)
    assert again.returncode != 0
    assert "already holds events" in stderr


def documented_authorization(service: str, client: str) -> str:
    """The authorization block docs/scale-out.md gives, for these two public keys."""
    docs = (Path(__file__).resolve().parents[1] / "docs" / "scale-out.md").read_text()
    block = next(b for b in docs.split("```conf\n")[1:] if b.startswith("authorization"))
    block = block.split("```")[0]
    return block.replace("USERVICE_PUBLIC_NKEY", service).replace("UCLIENT_PUBLIC_NKEY", client)


async def test_the_documented_permissions_serve_a_jetstream_log_and_keep_clients_out(
    tmp_path: Path,
) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    service = load_or_create_nkey(keys / "service.nk")
    client_key = load_or_create_nkey(keys / "client.nk")
    text = node_config(tmp_path / "nats" / "js") + documented_authorization(service, client_key)
    async with running_server(tmp_path / "nats", text) as server:
        process = hero_deployer(
            "serve", "--nats", server.url, "--store", "jetstream", "--replicas", "1",
            "--nkey", str(keys / "service.nk"), "--data-dir", str(tmp_path / "serve"),
            env={"HERO_DEPLOYER_TOKEN": TOKEN, "HERO_DEPLOYER_LOCAL_SSH": "0",
                 "HERO_DEPLOYER_LOCAL_DEPLOY_DELAY": "0"},
        )  # fmt: skip
        try:
            assert process.stdout is not None
            line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), 60)
            assert "ready" in line, process.stderr.read() if process.stderr else ""
            errors: asyncio.Queue[str] = asyncio.Queue()

            async def on_error(error: Exception) -> None:
                errors.put_nowait(str(error))

            client = await HeroDeployerClient.connect(
                server.url,
                nkey=keys / "client.nk",
                token=TOKEN,
                prefix="hero.v1",
                nats_options={"error_cb": on_error},
            )
            try:
                sid = await deploy_running(client, SECRET)
                assert (await client.get_vm(sid, SECRET)).sid == sid
                await client.nc.subscribe("hero.log.>")  # the log itself
                await client.nc.subscribe("_INBOX_hero_service.>")  # the service's replies
                inbox = client.nc.new_inbox()
                await client.nc.publish("$JS.API.DIRECT.GET.HERO_EVENTS", b'{"seq":1}', reply=inbox)
                for _ in range(3):
                    error = await asyncio.wait_for(errors.get(), 10)
                    assert "permissions violation" in error.lower(), error
            finally:
                await client.close()
        finally:
            process.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(process.wait, 30) == 0


async def test_a_replica_answers_with_what_another_replica_just_wrote(
    tmp_path: Path, nc: Client, grid: LocalGrid
) -> None:
    """Read your writes across replicas: each query waits for its views to reach the log's head."""
    first = replica(tmp_path / "first", "ryw-a.v1")
    async with serving(first, nc, grid) as (_, writer):
        copy_shared_keys(tmp_path / "first", tmp_path / "second")
        second = replica(tmp_path / "second", "ryw-b.v1")  # its own subjects: it alone answers
        async with serving(second, nc, grid) as (_, reader):
            for n in range(30):
                vm = await writer.call("deploy_vm", {"name": f"r{n}", "secret": SECRET})
                seen = await reader.call("get_vm", {"sid": vm["sid"], "secret": SECRET})
                assert seen["sid"] == vm["sid"]
                listed = await reader.call("list_vms", {"secret": SECRET})
                assert len(listed["vms"]) == n + 1


async def test_side_effects_run_on_one_replica_and_move_with_the_lease(
    tmp_path: Path, nc: Client
) -> None:
    """Two replicas, each with a grid of its own: the lease's holder alone deploys and publishes;
    when it stops, the other takes over from the checkpoint it left, redoing nothing."""
    grids = [
        LocalGrid(data_dir=tmp_path / f"grid{i}", deploy_delay=0, action_delay=0, ssh=False)
        for i in range(2)
    ]
    first = replica(tmp_path / "first", "lease.v1", lease_ttl=1.0)
    published: list[tuple[str, int]] = []

    async def record(msg: Any) -> None:
        event = msgspec.json.decode(msg.data)
        published.append((event["stream"], event["position"]))

    await nc.subscribe("lease.v1.events.>", cb=record)
    client = HeroDeployerClient(nc, token=TOKEN, prefix="lease.v1")
    async with grids[0], grids[1], contextlib.AsyncExitStack() as stack:
        retry = RetryPolicy(base_delay=0.01)
        await stack.enter_async_context(bootstrap(first, nc, compute=grids[0], retry=retry))
        second_dir = tmp_path / "second"
        second_dir.mkdir(mode=0o700)
        for name in ("fingerprint.key", "master.key"):
            shutil.copy2(tmp_path / "first" / name, second_dir / name)
        second = replica(second_dir, "lease.v1", lease_ttl=1.0)
        async with bootstrap(second, nc, compute=grids[1], retry=retry):
            before = [await deploy_running(client, SECRET, f"a{n}") for n in range(8)]
            await stack.aclose()  # the first replica, holding the lease, stops
            after = [await deploy_running(client, SECRET, f"b{n}") for n in range(4)]
            await nc.flush()

    deployed = [[name for op, name in grid.calls if op == "deploy_vm"] for grid in grids]
    assert sorted(deployed[0]) == sorted(before), "the holder deployed each VM once, the other none"
    assert sorted(deployed[1]) == sorted(after), "the new holder deployed only what came after"
    assert len(published) == len(set(published)), "an event was published twice"
