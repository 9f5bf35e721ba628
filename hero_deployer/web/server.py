"""Serving the dashboard: beside the service (`up`) or alone (`web --nats URL`)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from aiohttp import web

from hero_deployer.sdk.client import HeroDeployerClient
from hero_deployer.web.app import create_app

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080


@asynccontextmanager
async def web_server(
    client: HeroDeployerClient,
    *,
    token: str,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    shutdown_timeout: float = 5.0,
    **options: Any,
) -> AsyncIterator[str]:
    """Serves the dashboard on host:port while inside; yields its base URL (port 0 picks one)."""
    app = create_app(client, token=token, **options)
    runner = web.AppRunner(app, shutdown_timeout=shutdown_timeout, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        bound = sockets[0].getsockname()[1] if sockets else port
        yield f"http://{host}:{bound}"
    finally:
        await runner.cleanup()


async def run_web(
    nats_url: str,
    *,
    token: str,
    prefix: str,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    timeout: float = 10.0,
    public_url: str = "",
    nkey: str | Path | None = None,
    creds: str | Path | None = None,
    state_dir: Path | None = None,
) -> None:
    """Runs the dashboard alone against the service on `nats_url` until SIGINT or SIGTERM.

    It connects as the client identity of `nkey` (a seed file) or `creds`, when given;
    `state_dir` keeps the operators' session key and revocations.
    """
    client = await HeroDeployerClient.connect(
        nats_url,
        nkey=nkey,
        creds=creds,
        token=token,
        prefix=prefix,
        timeout=timeout,
        nats_options={"max_reconnect_attempts": -1},
    )
    try:
        async with web_server(
            client, token=token, host=host, port=port, public_url=public_url, state_dir=state_dir
        ) as url:
            print(f"hero-deployer web ready: {url} (nats {nats_url}, prefix {prefix})", flush=True)
            await _wait_for_signal()
    finally:
        await client.close()


async def _wait_for_signal() -> None:
    """Returns when SIGINT or SIGTERM arrives (instead of ending the process)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
