"""Running the service: `up` (all embedded), `serve` (on an existing NATS), `web`, `rebuild`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hero_deployer import context
from hero_deployer.cli.parsing import Options, command
from hero_deployer.settings import Settings

if TYPE_CHECKING:
    from hero_deployer.client import NatsIdentity

BACKENDS = ["local", "hero-compute", "opentofu"]
SERVICE_INBOX = "_INBOX_hero_service"
"""The service's reply subjects beside a JetStream log (docs/scale-out.md, permissions)."""

UP_EPILOG = """\
examples:
  hero-deployer up                              # nats on 127.0.0.1:4222, data in ./var
  hero-deployer up --data-dir /srv/hero --nats-port 4333 --web-port 0
  hero-deployer up --backend opentofu           # see docs/backends.md"""

SERVE_EPILOG = """\
examples:
  hero-deployer serve --nats nats://nats-1:4222 --nkey service.nk --data-dir /srv/hero
  hero-deployer serve --nats nats://a:4222,nats://b:4222 --store jetstream --replicas 3"""


def add_commands(sub: Any, opts: Options) -> None:
    """Adds `up`, `serve`, `web` and `rebuild`."""
    up = command(
        sub,
        "up",
        "run everything here: its own NATS, the service, the dashboard",
        parents=[opts.data_dir],
        epilog=UP_EPILOG,
    )
    up.add_argument("--nats-port", type=int, metavar="PORT", help=_of("nats_port", "its NATS port"))
    _backend(up)
    _web_port(up, "dashboard port on 127.0.0.1, 0 for none")
    up.set_defaults(handler=_up)
    _add_serve(sub, opts)
    web = command(
        sub,
        "web",
        "run the dashboard alone, as a client of a running service",
        parents=[opts.data_dir, opts.nats, opts.timeout],
    )
    _web_port(web, "port on 127.0.0.1")
    web.set_defaults(handler=_web)
    for parser in (up, web):
        parser.add_argument(
            "--public-url",
            metavar="URL",
            help="https://host[:port] browsers use (via a proxy): only that Host, Secure cookies",
        )
    rebuild = command(
        sub,
        "rebuild",
        "rebuild every view from the event log (service stopped)",
        parents=[opts.data_dir],
    )
    rebuild.set_defaults(handler=_rebuild)


def _add_serve(sub: Any, opts: Options) -> None:
    serve_p = command(
        sub,
        "serve",
        "run the service alone on an existing NATS",
        parents=[opts.data_dir],
        epilog=SERVE_EPILOG,
    )
    urls = _of("nats_url", "the NATS server's URL, or a cluster's URLs with commas between")
    serve_p.add_argument("--nats", metavar="URL", help=urls)
    _backend(serve_p)
    serve_p.add_argument("--nkey", dest="nats_nkey", metavar="FILE", help="the service's NKey seed")
    serve_p.add_argument(
        "--creds", dest="nats_creds", metavar="FILE", help="the service's NATS creds file"
    )
    store = _of("store", "where the event log lives")
    serve_p.add_argument("--store", choices=["sqlite", "jetstream"], help=store)
    replicas = _of("replicas", "copies of a jetstream log")
    serve_p.add_argument("--replicas", type=int, metavar="N", help=replicas)
    serve_p.set_defaults(handler=_serve)


def _of(setting: str, text: str) -> str:
    """A flag's help ending with the setting's default (flags default to None: not given)."""
    return f"{text} (default: {getattr(Settings(), setting)})"


def _backend(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=BACKENDS, help=_of("backend", "compute backend"))


def _web_port(parser: argparse.ArgumentParser, text: str) -> None:
    parser.add_argument("--web-port", type=int, default=8080, metavar="PORT", help=text)


async def _up(args: argparse.Namespace, settings: Settings) -> None:
    await serve(settings, embedded_nats=True, web_port=args.web_port)


async def _serve(args: argparse.Namespace, settings: Settings) -> None:
    await serve(settings, embedded_nats=False)


async def _rebuild(args: argparse.Namespace, settings: Settings) -> None:
    count = await rebuild_views(settings)
    print(f"rebuilt views from {count} events")


def _stop_signal() -> asyncio.Event:
    """An event that SIGINT or SIGTERM sets from now on (instead of ending the process)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def _wait_for_signal() -> None:
    await _stop_signal().wait()


async def serve(settings: Settings, *, embedded_nats: bool, web_port: int = 0) -> None:
    """Runs until SIGINT/SIGTERM, then stops accepting, finishes in-flight work and closes.

    With `embedded_nats` (`up`) it first starts its own nats-server; with `web_port` (not 0)
    the dashboard is served on 127.0.0.1:`web_port` beside it.
    """
    import os
    from contextlib import AsyncExitStack

    import structlog

    from adapters.keyfiles import restrict_to_owner
    from hero_deployer.bootstrap import bootstrap
    from hero_deployer.logs import configure

    stop = _stop_signal()  # a signal during the start stops cleanly too: nothing is left behind
    configure(settings.log_level, settings.log_format)
    log = structlog.get_logger("hero_deployer")
    os.umask(0o077)  # every file the service creates is its owner's only: keys, token, databases
    restrict_to_owner(settings.data_dir)  # and those an earlier version left readable
    if settings.store != "jetstream":  # a replica of a log takes its keys from the first one
        settings = settings.with_token()
    async with AsyncExitStack() as stack:
        if embedded_nats:
            await stack.enter_async_context(_embedded_nats(settings))
        guard = _StartGuard(settings.nats_url)
        nc = await _service_connection(settings, guard, embedded_nats)
        stack.push_async_callback(nc.drain)
        app = await stack.enter_async_context(bootstrap(settings, nc))
        settings = app.settings
        guard.started()
        web = ""
        if web_port:
            web = ", web " + await stack.enter_async_context(_dashboard(settings, web_port))
        _tune_gc()
        if embedded_nats:  # the CLI finds this `up` from any directory (context.py)
            stack.enter_context(context.recorded(context.current(settings)))
        print(
            f"hero-deployer ready: nats {settings.nats_url}, prefix {settings.prefix},"
            f" data {settings.data_dir}, backend {settings.backend}{web}",
            flush=True,
        )
        await stop.wait()
        log.info("shutdown.started")
    log.info("shutdown.done")


def _embedded_nats(settings: Settings) -> Any:
    """`up`'s own nats-server on 127.0.0.1:`nats_port`, with DIR's two NATS identities."""
    from hero_deployer.natsserver import NatsServer, render_config

    config = render_config(settings.data_dir, settings.prefix)
    return NatsServer(port=settings.nats_port, data_dir=settings.data_dir, config=config)


class NatsRefused(Exception):
    """The NATS server refused the service's identity or its permissions (exit status 1)."""


class _StartGuard:
    """Fails the service's start on what the NATS server refuses; afterwards only logs it.

    A refused identity fails the connect; a permissions violation (a client's NKey given as the
    service's) arrives before the PONG of the edge's flush, so `started()` sees it.
    """

    def __init__(self, url: str) -> None:
        self._url = url
        self._refused: list[str] = []
        self._starting = True

    async def on_error(self, error: Exception) -> None:
        import structlog

        message = str(error) or type(error).__name__
        if self._starting and "authorization violation" in message.lower():
            raise NatsRefused(f"NATS at {self._url} refused the service's identity")
        if (self._starting or self._refused) and "permissions violation" in message.lower():
            self._refused.append(message)  # the start fails on the first; the rest say the same
            return
        structlog.get_logger("hero_deployer").warning("nats.error", error=message)

    def started(self) -> None:
        """Raises NatsRefused if the server refused anything during the start."""
        self._starting = False
        if self._refused:
            raise NatsRefused(
                f"NATS at {self._url} refused the service ({self._refused[0]}):"
                " is --nkey/--creds the service's identity?"
            )


async def _service_connection(settings: Settings, guard: _StartGuard, embedded: bool) -> Any:
    """The service's NATS connection: as DIR/service.nk under `up`, else as `--nkey`/`--creds`."""
    import nats

    from hero_deployer.client import nats_credentials
    from hero_deployer.natsserver import SERVICE_SEED

    if embedded:
        credentials = nats_credentials(nkey=settings.data_dir / SERVICE_SEED)
    else:
        credentials = nats_credentials(
            nkey=settings.nats_nkey or None, creds=settings.nats_creds or None
        )
    urls = [url.strip() for url in settings.nats_url.split(",") if url.strip()]  # a cluster's
    if settings.store == "jetstream":  # JetStream's replies carry the log: not in clients' _INBOX
        credentials["inbox_prefix"] = SERVICE_INBOX
    return await nats.connect(
        urls, max_reconnect_attempts=-1, error_cb=guard.on_error, **credentials
    )


def _tune_gc() -> None:
    """Moves start-up objects out of the collector's sight and collects young objects less often.

    The service allocates many short-lived objects per request; with the default threshold the
    cyclic collector runs every few requests and its full passes show up as tail latency.
    """
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


@contextlib.asynccontextmanager
async def _dashboard(settings: Settings, port: int) -> AsyncIterator[str]:
    """The dashboard's server, connected as a client identity; yields its URL."""
    from hero_deployer.client import HeroDeployerClient
    from hero_deployer.web import web_server

    client = await HeroDeployerClient.connect(
        settings.nats_url,
        token=settings.token,
        prefix=settings.prefix,
        nats_options={"max_reconnect_attempts": -1},
        **client_credentials(settings),
    )
    try:
        async with web_server(
            client,
            token=settings.token,
            port=port,
            public_url=settings.public_url,
            state_dir=settings.data_dir,  # the operators' session key: logins survive restarts
        ) as url:
            yield url
    finally:
        await client.close()


def client_credentials(settings: Settings) -> NatsIdentity:
    """The NATS identity of the CLI's clients: `nats_creds`, `nats_nkey`, else DIR/client.nk."""
    from hero_deployer.natsserver import CLIENT_SEED

    if settings.nats_creds:
        return {"creds": Path(settings.nats_creds)}
    if settings.nats_nkey:
        return {"nkey": Path(settings.nats_nkey)}
    seed = settings.data_dir / CLIENT_SEED
    return {"nkey": seed} if seed.exists() else {}


async def _web(args: argparse.Namespace, settings: Settings) -> None:
    from hero_deployer.web import run_web

    settings = settings.with_token()
    await run_web(
        args.nats or settings.nats_url,
        token=settings.token,
        prefix=settings.prefix,
        port=args.web_port,
        timeout=args.timeout,
        public_url=settings.public_url,
        state_dir=settings.data_dir,
        **client_credentials(settings),
    )


async def rebuild_views(settings: Settings) -> int:
    from adapters.eventstore_sqlite import SqliteEventStore
    from hero_deployer.bootstrap import PROJECTIONS
    from projections.runner import connect_views, rebuild

    async with SqliteEventStore(settings.data_dir / "events.db") as store:
        conn = await connect_views(settings.data_dir / "views.db")
        try:
            return await rebuild(store, conn, PROJECTIONS())
        finally:
            await conn.close()
