"""`hero-deployer serve` in a process of its own, for the benchmarks that measure or kill it."""

from __future__ import annotations

import asyncio
import sys
import tempfile
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import nats
from nats.aio.client import Client

from hero_deployer.app.natsserver import NatsServer, free_port

ROOT = Path(__file__).resolve().parents[1]


async def start_serve(
    url: str, data: Path, env: Mapping[str, str], *, timeout: float = 60.0
) -> asyncio.subprocess.Process:
    """`serve` on `url` with `data`, its log in `data`'s parent; returns once it prints `ready`."""
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "hero_deployer", "serve", "--nats", url, "--data-dir", str(data)),
        env=dict(env),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=(data.parent / "service.log").open("ab"),
    )
    assert process.stdout is not None
    async with asyncio.timeout(timeout):
        while b"ready" not in await process.stdout.readline():
            if process.returncode is not None:
                raise SystemExit(f"serve exited with {process.returncode}: see service.log")
    return process


@asynccontextmanager
async def served(**env: str) -> AsyncIterator[Client]:
    """A nats-server and `serve` (with `env`) in a temporary dir, and a client connected to it."""
    from bench.run import ServiceProcess

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        async with NatsServer(port=free_port(), data_dir=root, config=None) as server:
            with ServiceProcess(server.url, root / "data", **env):
                nc = await nats.connect(server.url)
                try:
                    yield nc
                finally:
                    await nc.drain()
