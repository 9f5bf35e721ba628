"""The bus keeps everyone else out: issue 12's attacks against `up`'s real nats-server config.

The server is the venv's nats-server started with the configuration `up` renders
(`render_config`: nats.conf plus the authorization of DIR/service.nk and DIR/client.nk); the
service runs on it as the service identity. Each attack runs as the client identity and
anonymously; nats-py reports a permissions violation through its error callback, with the
connection kept open (nats-io/nats-server `server/client.go`, canSubscribe / pubAllowed).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import nats
import nats.errors
import pytest
import pytest_asyncio
from nats.aio.client import Client

from adapters.localgrid import LocalGrid
from core.retry import RetryPolicy
from hero_deployer.app.bootstrap import bootstrap
from hero_deployer.app.natsserver import (
    CLIENT_SEED,
    SERVICE_SEED,
    NatsServer,
    authorization,
    free_port,
    render_config,
)
from hero_deployer.sdk.client import HeroDeployerClient
from tests.conftest import TOKEN, make_settings

PREFIX = "hero.v1"
DEADLINE = 10.0


@dataclass
class Bus:
    """`up`'s nats-server with the service running on it as the service identity."""

    url: str
    data_dir: Path

    async def connect(self, identity: str | None, errors: asyncio.Queue[str]) -> Client:
        """A connection as `identity` (a seed file name in DIR) or anonymous; errors queue up."""

        async def on_error(error: Exception) -> None:
            errors.put_nowait(str(error))

        seed = {"nkeys_seed": str(self.data_dir / identity)} if identity else {}
        return await nats.connect(
            self.url, allow_reconnect=False, error_cb=on_error, connect_timeout=5, **seed
        )

    async def client(self) -> HeroDeployerClient:
        return await HeroDeployerClient.connect(
            self.url, nkey=self.data_dir / CLIENT_SEED, token=TOKEN, prefix=PREFIX
        )


@pytest_asyncio.fixture
async def secured(tmp_path: Path) -> AsyncIterator[NatsServer]:
    """`up`'s nats-server alone: nats.conf plus the authorization of DIR's two NKeys."""
    data_dir = tmp_path / "var"
    data_dir.mkdir()
    config = render_config(data_dir, PREFIX)
    async with NatsServer(port=free_port(), data_dir=data_dir, config=config) as server:
        yield server


@pytest_asyncio.fixture
async def bus(tmp_path: Path, secured: NatsServer) -> AsyncIterator[Bus]:
    server, data_dir = secured, tmp_path / "var"
    settings = make_settings(data_dir, prefix=PREFIX)
    service_nc = await nats.connect(server.url, nkeys_seed=str(data_dir / SERVICE_SEED))
    grid = LocalGrid(data_dir=tmp_path / "grid", deploy_delay=0, action_delay=0, ssh=False)
    try:
        async with (
            grid,
            bootstrap(settings, service_nc, compute=grid, retry=RetryPolicy(base_delay=0.01)),
        ):
            yield Bus(url=server.url, data_dir=data_dir)
    finally:
        await service_nc.drain()


async def _next_error(errors: asyncio.Queue[str]) -> str:
    return await asyncio.wait_for(errors.get(), DEADLINE)


ATTACKS: dict[str, Callable[[Client], Awaitable[object]]] = {
    # read every request (bearer token in the headers, tenant secrets in the bodies)
    "subscribe to >": lambda nc: nc.subscribe(">"),
    "subscribe to a request subject": lambda nc: nc.subscribe(f"{PREFIX}.list_vms"),
    # answer requests in the service's place
    "join the service's queue group": lambda nc: nc.subscribe(
        f"{PREFIX}.list_vms", queue="hero-deployer"
    ),
    # forge a status event
    "publish a status event": lambda nc: nc.publish(
        f"{PREFIX}.events.vm.vm_x.VmDeleted", b'{"position": 1}'
    ),
    # store every request with its token on disk
    "create a JetStream stream": lambda nc: nc.publish(
        "$JS.API.STREAM.CREATE.x", json.dumps({"name": "x", "subjects": [f"{PREFIX}.>"]}).encode()
    ),
}
SUBSCRIPTION = "permissions violation for subscription to"
PUBLISH = "permissions violation for publish to"
VIOLATIONS = {
    "subscribe to >": f'{SUBSCRIPTION} ">"',
    "subscribe to a request subject": f'{SUBSCRIPTION} "{PREFIX}.list_vms"',
    "join the service's queue group": (
        f'{SUBSCRIPTION} "{PREFIX}.list_vms" using queue "hero-deployer"'
    ),
    "publish a status event": f'{PUBLISH} "{PREFIX}.events.vm.vm_x.VmDeleted"',
    "create a JetStream stream": f'{PUBLISH} "$JS.API.STREAM.CREATE.x"',
}


@pytest.mark.parametrize("attack", list(ATTACKS))
async def test_an_anonymous_connection_is_refused_before_any_attack(bus: Bus, attack: str) -> None:
    errors: asyncio.Queue[str] = asyncio.Queue()
    with pytest.raises(nats.errors.Error, match=r"(?i)authorization violation"):
        nc = await bus.connect(None, errors)
        await ATTACKS[attack](nc)  # never reached: the server refuses the connection itself


@pytest.mark.parametrize("attack", list(ATTACKS))
async def test_the_client_identity_gets_a_permissions_violation(bus: Bus, attack: str) -> None:
    errors: asyncio.Queue[str] = asyncio.Queue()
    nc = await bus.connect(CLIENT_SEED, errors)
    try:
        await ATTACKS[attack](nc)
        await nc.flush()
        assert (await _next_error(errors)).lower() == f"nats: {VIOLATIONS[attack]}".lower()
        assert nc.is_connected, "a violation is refused, the connection stays"
    finally:
        await nc.close()


async def test_a_client_reads_no_request_and_answers_none(bus: Bus) -> None:
    errors: asyncio.Queue[str] = asyncio.Queue()
    spy = await bus.connect(CLIENT_SEED, errors)
    seen: list[str] = []

    async def record(msg: object) -> None:
        seen.append(getattr(msg, "subject", ""))

    try:
        await spy.subscribe(">", cb=record)
        await spy.subscribe(f"{PREFIX}.list_vms", queue="hero-deployer", cb=record)
        await spy.flush()
        assert "violation" in await _next_error(errors)
        assert "violation" in await _next_error(errors)
        client = await bus.client()
        try:
            deployed = await client.deploy_vm(name="web-1", secret="s3cret")
            for _ in range(40):  # issue 12: a foreign member of the group answered 16 of 40
                assert [vm.sid for vm in await client.list_vms("s3cret")] == [deployed.sid]
            await spy.flush()  # everything the server had for the spy has arrived by now
        finally:
            await client.close()
        assert seen == []
    finally:
        await spy.close()


async def test_a_forged_status_event_reaches_no_subscriber(bus: Bus) -> None:
    errors: asyncio.Queue[str] = asyncio.Queue()
    forger = await bus.connect(CLIENT_SEED, errors)
    client = await bus.client()
    try:
        events = await client.nc.subscribe(f"{PREFIX}.events.>")
        await client.nc.flush()
        await forger.publish(f"{PREFIX}.events.vm.vm_x.VmDeleted", b'{"position": 1}')
        await forger.flush()
        assert "violation" in await _next_error(errors)
        deployed = await client.deploy_vm(name="web-1", secret="s3cret")
        first = await events.next_msg(timeout=DEADLINE)
        assert first.subject == f"{PREFIX}.events.vm.{deployed.sid}.VmDeployRequested"
        assert json.loads(first.data)["position"] == 1
    finally:
        await client.close()
        await forger.close()


async def test_the_client_identity_is_served(bus: Bus) -> None:
    client = await bus.client()
    try:
        assert (await client.health()).status == "ok"
        async with client.subscribe() as events:
            deployed = await client.deploy_vm(name="web-1", secret="s3cret")
            async with asyncio.timeout(DEADLINE):
                async for event in events:
                    if event.type == "VmDeployed":
                        assert event.stream == f"vm:{deployed.sid}"
                        break
        ping = await client.nc.request("$SRV.PING.hero-deployer", b"", timeout=DEADLINE)
        assert json.loads(ping.data)["name"] == "hero-deployer"
    finally:
        await client.close()


async def test_the_service_identity_answers_only_in_its_queue_group(bus: Bus) -> None:
    errors: asyncio.Queue[str] = asyncio.Queue()
    nc = await bus.connect(SERVICE_SEED, errors)
    try:
        await nc.subscribe(f"{PREFIX}.list_vms")  # outside the group it would see every request
        await nc.flush()
        expected = f'nats: permissions violation for subscription to "{PREFIX}.list_vms"'
        assert (await _next_error(errors)).lower() == expected.lower()
    finally:
        await nc.close()


def test_the_docs_show_the_permissions_up_grants() -> None:
    docs = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    block = authorization(PREFIX, service="USERVICE_PUBLIC_NKEY", client="UCLIENT_PUBLIC_NKEY")
    assert block in docs


def _serve(url: str, tmp_path: Path, *identity: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERO_DEPLOYER_")}
    env["HERO_DEPLOYER_LOCAL_SSH"] = "0"
    command = [sys.executable, "-m", "hero_deployer", "serve", "--nats", url]
    command += ["--data-dir", str(tmp_path / "serve"), *identity]
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


async def test_serve_with_the_service_nkey_answers_clients(
    tmp_path: Path, secured: NatsServer
) -> None:
    data_dir = tmp_path / "var"
    process = _serve(secured.url, tmp_path, "--nkey", str(data_dir / SERVICE_SEED))
    try:
        assert process.stdout is not None
        ready = await asyncio.to_thread(process.stdout.readline)
        assert "ready" in ready
        client = await HeroDeployerClient.connect(
            secured.url, nkey=data_dir / CLIENT_SEED, token="unused", prefix=PREFIX
        )
        try:
            assert (await client.health()).status == "ok"
        finally:
            await client.close()
    finally:
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 30) == 0


@pytest.mark.parametrize(
    ("identity", "refusal"),
    [
        ((), "refused the service's identity"),
        (("--nkey", CLIENT_SEED), "refused the service (nats: permissions violation for subscr"),
    ],
)
async def test_serve_without_the_service_identity_stops_with_one_line(
    tmp_path: Path, secured: NatsServer, identity: tuple[str, ...], refusal: str
) -> None:
    if identity:
        identity = (identity[0], str(tmp_path / "var" / identity[1]))
    process = _serve(secured.url, tmp_path, *identity)
    stdout, stderr = await asyncio.to_thread(process.communicate, None, 60)
    assert process.returncode == 1
    assert "ready" not in stdout
    assert len(stderr.splitlines()) == 1 and refusal in stderr, stderr
