"""Real nats-servers with JetStream for tests: one on its own, or a cluster of three on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
from collections.abc import AsyncIterator, Coroutine, Sequence
from pathlib import Path
from typing import Any, Self, TypeVar

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client

from adapters.eventstore_jetstream import JetStreamEventStore
from adapters.jetstream_idempotency import BUCKET as IDEMPOTENCY
from adapters.jetstream_log import STREAM
from adapters.lease_jetstream import CHECKPOINTS, LEASES
from adapters.vault_jetstream import BUCKET as VAULT
from hero_deployer.app.natsserver import NatsServer, NatsServerError

T = TypeVar("T")


def node_config(
    store_dir: Path, *, cluster_port: int | None = None, routes: Sequence[int] = ()
) -> str:
    """A nats-server configuration: JetStream in `store_dir`, in a cluster if a port is given."""
    text = f'jetstream {{ store_dir: "{store_dir}" }}\n'
    if cluster_port is not None:
        urls = ", ".join(f'"nats-route://127.0.0.1:{p}"' for p in routes)
        text += f"cluster {{ name: hero, listen: 127.0.0.1:{cluster_port}, routes: [{urls}] }}\n"
    return text


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports: held open together, as one `free_port` after another may
    be given the same port again."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def jetstream_server(data_dir: Path, text: str | None = None) -> NatsServer:
    """A nats-server with JetStream under `data_dir` (not started); `text` overrides the config."""
    data_dir.mkdir(parents=True, exist_ok=True)
    config = data_dir / "nats-server.conf"
    config.write_text(text if text is not None else node_config(data_dir / "js"))
    port, monitor = free_ports(2)
    return NatsServer(port=port, data_dir=data_dir, config=config, monitor_port=monitor)


def cluster(base: Path, size: int = 3) -> list[NatsServer]:
    """`size` nodes routed to each other on loopback (not started)."""
    ports = free_ports(3 * size)
    routes = ports[2 * size :]
    nodes = []
    for i in range(size):
        data_dir = base / f"node{i}"
        data_dir.mkdir(parents=True, exist_ok=True)
        config = data_dir / "nats-server.conf"
        config.write_text(node_config(data_dir / "js", cluster_port=routes[i], routes=routes))
        nodes.append(
            NatsServer(
                port=ports[i], data_dir=data_dir, config=config, monitor_port=ports[size + i]
            )
        )
    return nodes


async def jetstream_ready(nc: Client, *, deadline: float = 30.0) -> None:
    """Waits until JetStream answers account info (a cluster has elected its meta leader)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    while True:
        with contextlib.suppress(nats.errors.Error):
            reply = await nc.request("$JS.API.INFO", b"", timeout=1)
            if "error" not in json.loads(reply.data or b"{}"):
                return
        if loop.time() > end:
            raise TimeoutError("JetStream did not become ready")
        # the meta leader's election gives no signal to wait on; ask again shortly
        await asyncio.sleep(0.1)


PORT_TAKEN = ("already in use", "address already in use")
"""How a start fails when another process took a port `free_port` found free (they race)."""


def _port_taken(error: NatsServerError) -> bool:
    return any(words in str(error) for words in PORT_TAKEN)


@contextlib.asynccontextmanager
async def running_server(data_dir: Path, text: str | None = None) -> AsyncIterator[NatsServer]:
    """A started `jetstream_server`, on other ports while another process takes its port."""
    for attempt in range(5):
        server = jetstream_server(data_dir, text)
        try:
            await server.start()
            break
        except NatsServerError as error:
            if not _port_taken(error) or attempt == 4:
                raise
    try:
        yield server
    finally:
        await server.stop()


@contextlib.asynccontextmanager
async def running_cluster(base: Path, size: int = 3) -> AsyncIterator[list[NatsServer]]:
    """`cluster` started (nodes start together and wait for each other), stopped after."""
    for attempt in range(5):
        nodes = cluster(base / f"try{attempt}", size)
        try:
            await asyncio.gather(*(n.start() for n in nodes))
            break
        except NatsServerError as error:
            await asyncio.gather(*(n.stop() for n in nodes), return_exceptions=True)
            if not _port_taken(error) or attempt == 4:
                raise
    try:
        yield nodes
    finally:
        await asyncio.gather(*(n.stop() for n in nodes), return_exceptions=True)


async def connect(urls: Sequence[str]) -> Client:
    return await nats.connect(
        servers=list(urls), max_reconnect_attempts=-1, reconnect_time_wait=0.1
    )


async def stream_created(urls: list[str], deadline: float = 60.0) -> None:
    """Creates the R3 log once the cluster has its three JetStream peers."""
    nc = await connect(urls)
    try:
        await jetstream_ready(nc)
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline
        while True:
            try:
                async with JetStreamEventStore(nc, replicas=3):
                    return
            except nats.js.errors.Error:
                if loop.time() > end:
                    raise
                # peers join the meta group one by one, and tell no one
                await asyncio.sleep(0.2)
    finally:
        await nc.close()


class BackgroundCluster:
    """A `running_cluster` kept by an event loop on its own thread: one for a whole test
    session, while each test runs on its own loop. A context manager; `urls` once entered."""

    def __init__(self, base: Path) -> None:
        self._base = base
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="jetstream-cluster")
        self._running: contextlib.AbstractAsyncContextManager[list[NatsServer]] | None = None
        self.urls: list[str] = []

    def __enter__(self) -> Self:
        self._thread.start()
        try:
            self.urls = self._call(self._start(), 120)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self._running is not None:
            self._call(self._running.__aexit__(None, None, None), 60)
            self._running = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._loop.close()

    def _call(self, work: Coroutine[Any, Any, T], timeout: float) -> T:
        return asyncio.run_coroutine_threadsafe(work, self._loop).result(timeout)

    async def _start(self) -> list[str]:
        self._running = running_cluster(self._base)
        nodes = await self._running.__aenter__()
        urls = [n.url for n in nodes]
        await stream_created(urls)  # the cluster has its three JetStream peers
        return urls


LOG_STREAMS = (STREAM, *(f"KV_{b}" for b in (IDEMPOTENCY, VAULT, LEASES, CHECKPOINTS)))
"""The streams of one log on a cluster: its events and the streams of its four buckets."""


async def delete_log(nc: Client) -> None:
    """Deletes the log's stream and buckets, so the next service starts on an empty cluster."""
    js = nc.jetstream(timeout=10)
    for name in LOG_STREAMS:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_stream(name)
