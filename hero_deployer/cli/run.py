"""Running the service: `up` (all embedded), `serve` (on an existing NATS), `web`, `rebuild`."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hero_deployer.app.settings import Settings
from hero_deployer.cli.parsing import Options, command

if TYPE_CHECKING:
    from hero_deployer.sdk.client import NatsIdentity

# What a command runs, with its parsed arguments and the settings they make
Handler = Callable[[argparse.Namespace, Settings], Awaitable[None]]

BACKENDS = ["local", "hero-compute", "opentofu"]
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
    summary = "run everything here: its own NATS, the service, the dashboard"
    up = _data_dir_command(sub, opts, "up", summary, _up, epilog=UP_EPILOG)
    up.add_argument("--nats-port", type=int, metavar="PORT", help=_of("nats_port", "its NATS port"))
    _backend(up)
    _web_port(up, "dashboard port on 127.0.0.1, 0 for none")
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
    _data_dir_command(
        sub, opts, "rebuild", "rebuild every view from the event log (service stopped)", _rebuild
    )


def _add_serve(sub: Any, opts: Options) -> None:
    summary = "run the service alone on an existing NATS"
    serve_p = _data_dir_command(sub, opts, "serve", summary, _serve, epilog=SERVE_EPILOG)
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


def _data_dir_command(
    sub: Any, opts: Options, name: str, summary: str, handler: Handler, *, epilog: str | None = None
) -> argparse.ArgumentParser:
    """A command that works on the data dir of this machine, run by `handler`."""
    parser = command(sub, name, summary, parents=[opts.data_dir], epilog=epilog)
    parser.set_defaults(handler=handler)
    return parser


def _of(setting: str, text: str) -> str:
    """A flag's help ending with the setting's default (flags default to None: not given)."""
    return f"{text} (default: {getattr(Settings(), setting)})"


def _backend(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=BACKENDS, help=_of("backend", "compute backend"))


def _web_port(parser: argparse.ArgumentParser, text: str) -> None:
    parser.add_argument("--web-port", type=int, default=8080, metavar="PORT", help=text)


async def _up(args: argparse.Namespace, settings: Settings) -> None:
    from hero_deployer.app.runtime import serve

    port = args.web_port
    await serve(
        settings, embedded_nats=True, dashboard=(lambda s: _dashboard(s, port)) if port else None
    )


async def _serve(args: argparse.Namespace, settings: Settings) -> None:
    from hero_deployer.app.runtime import serve

    await serve(settings, embedded_nats=False)


async def _rebuild(args: argparse.Namespace, settings: Settings) -> None:
    from hero_deployer.app.runtime import rebuild_views

    count = await rebuild_views(settings)
    print(f"rebuilt views from {count} events")


@contextlib.asynccontextmanager
async def _dashboard(settings: Settings, port: int) -> AsyncIterator[str]:
    """The dashboard's server, connected as a client identity; yields its URL."""
    from hero_deployer.sdk.client import HeroDeployerClient
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
    from hero_deployer.app.natsserver import CLIENT_SEED

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
