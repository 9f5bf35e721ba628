"""Real nats-servers with JetStream for tests: one on its own, or a cluster of three on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import nats
import nats.errors
from nats.aio.client import Client

from hero_deployer.natsserver import NatsServer, free_port


def node_config(
    store_dir: Path, *, cluster_port: int | None = None, routes: Sequence[int] = ()
) -> str:
    """A nats-server configuration: JetStream in `store_dir`, in a cluster if a port is given."""
    text = f'jetstream {{ store_dir: "{store_dir}" }}\n'
    if cluster_port is not None:
        urls = ", ".join(f'"nats-route://127.0.0.1:{p}"' for p in routes)
        text += f"cluster {{ name: hero, listen: 127.0.0.1:{cluster_port}, routes: [{urls}] }}\n"
    return text


def jetstream_server(data_dir: Path, text: str | None = None) -> NatsServer:
    """A nats-server with JetStream under `data_dir` (not started); `text` overrides the config."""
    data_dir.mkdir(parents=True, exist_ok=True)
    config = data_dir / "nats-server.conf"
    config.write_text(text if text is not None else node_config(data_dir / "js"))
    return NatsServer(port=free_port(), data_dir=data_dir, config=config)


def cluster(base: Path, size: int = 3) -> list[NatsServer]:
    """`size` nodes routed to each other on loopback (not started)."""
    cluster_ports = [free_port() for _ in range(size)]
    return [
        jetstream_server(
            base / f"node{i}",
            node_config(base / f"node{i}" / "js", cluster_port=port, routes=cluster_ports),
        )
        for i, port in enumerate(cluster_ports)
    ]


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


@contextlib.asynccontextmanager
async def started(servers: Sequence[NatsServer]) -> AsyncIterator[list[NatsServer]]:
    """Starts the servers together (cluster nodes wait for each other) and stops them after."""
    try:
        await asyncio.gather(*(s.start() for s in servers))
        yield list(servers)
    finally:
        await asyncio.gather(*(s.stop() for s in servers), return_exceptions=True)


async def connect(urls: Sequence[str]) -> Client:
    return await nats.connect(
        servers=list(urls), max_reconnect_attempts=-1, reconnect_time_wait=0.1
    )
