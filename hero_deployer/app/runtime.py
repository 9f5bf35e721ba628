"""Running the service in this process: serve until a signal, rebuild the views, move the log.

The CLI's `up`, `serve`, `rebuild` and `migrate-store` call these; the adapters they need are
imported inside each function, so a client command loads none of them.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hero_deployer.app import context
from hero_deployer.app.settings import Settings

if TYPE_CHECKING:
    from adapters.log_transfer import LogSide

SERVICE_INBOX = "_INBOX_hero_service"
"""The service's reply subjects beside a JetStream log (docs/scale-out.md, permissions)."""


Dashboard = Callable[[Settings], AbstractAsyncContextManager[str]]
"""Serves the dashboard beside the service (given by the CLI); yields its URL."""


def prepare_process() -> None:
    """Turns SQLite's memory statistics off, before any database is opened (see its docstring)."""
    from adapters.sqlite_runtime import disable_memory_statistics

    disable_memory_statistics()


def _stop_signal() -> asyncio.Event:
    """An event that SIGINT or SIGTERM sets from now on (instead of ending the process)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def serve(
    settings: Settings, *, embedded_nats: bool, dashboard: Dashboard | None = None
) -> None:
    """Runs until SIGINT/SIGTERM, then stops accepting, finishes in-flight work and closes.

    With `embedded_nats` (`up`) it first starts its own nats-server; with `dashboard`, the
    dashboard is served beside it.
    """
    import os

    import structlog

    from adapters.keyfiles import restrict_to_owner
    from hero_deployer.app.bootstrap import bootstrap
    from hero_deployer.app.logs import configure

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
        if dashboard is not None:
            web = ", web " + await stack.enter_async_context(dashboard(settings))
        _tune_gc()  # the GIL's switch interval stays Python's 5 ms: see _tune_gc
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
    from hero_deployer.app.natsserver import NatsServer, render_config

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

    from hero_deployer.app.natsserver import SERVICE_SEED
    from hero_deployer.sdk.client import nats_credentials

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
    """Moves start-up objects out of the collector's sight; keeps each collection short.

    A pass over the youngest generation costs up to half a microsecond per object it holds,
    and under load most of them are alive: the reactor's chain of each VM still deploying.
    The threshold counts allocations less frees (of old objects too), so a pass holds several
    times as many objects: at 1,000 a pass took 0.1 ms (p99 2 ms) in 20,000 deploys in `up`,
    at 5,000 1 ms (p99 10-15 ms), at 50,000 15-30 ms, which every request in flight waited
    for. In `up` the passes' CPU is the same at 1,000 and 3,000 (pass p99 1.4-1.8 vs 4.8 ms);
    in `bench.run --only service` 1,000 costs ~5 µs per request more than 50,000 (0.2 s of
    1,200 passes per run). The older generations are collected rarely: the service makes
    almost no cyclic garbage (about 1,500 objects in 20,000 deploys), and a pass over them
    visits every object still alive.

    The switch interval is left alone: at 0.5 ms instead of 5 the event store's commit thread
    got the GIL sooner (commits p90 7.5 -> 6.3 ms in `up`), but the service spent ~5% more CPU
    per deploy (`bench.run --only service`, higher in 9 of 10 alternated pairs) and the
    requests' p99 did not move.
    """
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(1_000, 5_000, 100)


async def rebuild_views(settings: Settings) -> int:
    from adapters.eventstore_sqlite import SqliteEventStore
    from hero_deployer.app.bootstrap import PROJECTIONS
    from projections.runner import connect_views, rebuild

    async with SqliteEventStore(settings.data_dir / "events.db") as store:
        conn = await connect_views(settings.data_dir / "views.db")
        try:
            return await rebuild(store, conn, PROJECTIONS())
        finally:
            await conn.close()


async def migrate_store(source: str, target: str, *, replicas: int, nkey: str, creds: str) -> Any:
    """Moves the event log from `source` to `target` (`sqlite:DIR` or `jetstream:URL[,URL...]`)."""
    from adapters.log_transfer import transfer

    async with AsyncExitStack() as stack:
        origin = await _side(source, stack, replicas, nkey, creds, source=True)
        destination = await _side(target, stack, replicas, nkey, creds, source=False)
        return await transfer(origin, destination)


async def _side(
    where: str, stack: AsyncExitStack, replicas: int, nkey: str, creds: str, *, source: bool
) -> LogSide:
    """`sqlite:DIR` or `jetstream:URL[,URL...]`; ValueError for anything else."""
    from adapters.log_transfer import JetStreamSide, SqliteSide

    kind, _, rest = where.partition(":")
    if kind == "sqlite" and rest:
        return SqliteSide(_sqlite_dir(rest, source=source))
    if kind == "jetstream" and rest:
        import nats

        from hero_deployer.sdk.client import nats_credentials

        urls = [url.strip() for url in rest.split(",") if url.strip()]
        identity = nats_credentials(nkey=nkey or None, creds=creds or None)
        nc = await nats.connect(urls, max_reconnect_attempts=3, **identity)
        stack.push_async_callback(nc.drain)
        return JetStreamSide(nc, replicas=replicas)
    raise ValueError(f"{where!r}: expected sqlite:DIR or jetstream:URL[,URL...]")


def _sqlite_dir(text: str, *, source: bool) -> Path:
    """The data dir of a SQLite log; a source must hold `events.db`."""
    data_dir = Path(text).expanduser().absolute()
    if source and not (data_dir / "events.db").is_file():
        raise ValueError(f"no event log at {data_dir / 'events.db'}")
    return data_dir
