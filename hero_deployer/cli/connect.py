"""The CLI's connection to a running service: found fast, or one line saying why not."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator, Iterable
from typing import Any

import msgspec

from core.registry import OPERATIONS
from hero_deployer.app.context import SERVER_NAME_FILE, expected_server_name
from hero_deployer.app.settings import Settings
from hero_deployer.cli.errors import NoService, NoToken
from hero_deployer.cli.run import client_credentials


async def _quiet(error: Exception) -> None:
    """Swallows nats-py's asynchronous error reports: the CLI reports one line itself."""


# The CLI fails fast. nats-py's `connect` tries a server until it has failed more than
# `max_reconnect_attempts` times (0 means forever), `reconnect_time_wait` apart, each try bounded
# by `connect_timeout`: so two tries 0.1 s apart, at most ~2.1 s with nothing listening. No
# reconnect once connected (a lost connection ends the command with one line), and nats-py's
# default error callback, which logs a traceback per try, is replaced by `_quiet`.
CLI_NATS_OPTIONS: dict[str, Any] = {
    "connect_timeout": 1.0,
    "max_reconnect_attempts": 1,
    "reconnect_time_wait": 0.1,
    "allow_reconnect": False,
    "error_cb": _quiet,
}


async def connect(args: argparse.Namespace, settings: Settings) -> Any:
    """The CLI's one connection to the service that the settings point at."""
    import nats.errors

    from hero_deployer.sdk.client import HeroDeployerClient, local_actor

    url = settings.nats_url
    token = _token(settings)
    try:
        client = await HeroDeployerClient.connect(
            url,
            nats_options=CLI_NATS_OPTIONS,
            token=token,
            prefix=settings.prefix,
            timeout=args.timeout,
            actor=local_actor("cli"),
            **client_credentials(settings),
        )
    except (OSError, TimeoutError, nats.errors.NoServersError):
        raise NoService(f'no hero-deployer at {url} (is "hero-deployer up" running?)') from None
    except nats.errors.Error as error:
        raise NoService(f"cannot connect to {url}: {error}") from None
    await _refuse_a_stranger(client, settings)
    if not token:
        await client.close()
        where = settings.data_dir / "token"
        raise NoToken(f"no token at {where}: set HERO_DEPLOYER_TOKEN or --data-dir")
    return client


@contextlib.asynccontextmanager
async def connected(args: argparse.Namespace, settings: Settings) -> AsyncIterator[Any]:
    """A connection for the length of the block, closed after it."""
    client = await connect(args, settings)
    try:
        yield client
    finally:
        await client.close()


async def _refuse_a_stranger(client: Any, settings: Settings) -> None:
    """Closes and raises NoService when the server is not the one `up` recorded for this URL.

    Runs before any request: the bearer token and tenant secrets travel in requests, so a foreign
    server on the port of a stopped `up` gets nothing. No name recorded for the URL (an
    operator's own NATS): no check.
    """
    expected = expected_server_name(settings.data_dir, settings.nats_url)
    # nats-py keeps the server's INFO in `_server_info` and has no public accessor for it
    found = client.nc._server_info.get("server_name")
    if expected is None or found == expected:
        return
    await client.nc.close()
    record = settings.data_dir / SERVER_NAME_FILE
    raise NoService(
        f"the NATS server at {settings.nats_url} is not the one hero-deployer up started"
        f" (it names itself {str(found)[:64]!r}, {record} says {expected!r}); nothing was sent"
    )


def _token(settings: Settings) -> str:
    """The bearer token: configured, else `DIR/token` when it exists (the CLI creates no file)."""
    if settings.token:
        return settings.token
    try:
        return (settings.data_dir / "token").read_text().strip()
    except FileNotFoundError:
        return ""


async def call(args: argparse.Namespace, settings: Settings, operation: str, body: Any) -> Any:
    """One request on a connection of its own; its result as plain JSON values."""
    async with connected(args, settings) as client:
        return await client.call(operation, body)


async def send_given(
    client: Any,
    request: type[msgspec.Struct],
    args: argparse.Namespace,
    fields: Iterable[str],
    **body: Any,
) -> Any:
    """Sends `request` with `body` and each of `fields` the command line gave (the service's
    defaults stand for the others); returns the result as plain JSON values."""
    body.update({f: getattr(args, f) for f in fields if getattr(args, f) is not None})
    return await client.call(OPERATIONS.row(request).name, body)


async def send(client: Any, request: msgspec.Struct) -> Any:
    """Sends `request` and returns its result as the plain JSON values the output prints."""
    return msgspec.to_builtins(await client.send(request))
