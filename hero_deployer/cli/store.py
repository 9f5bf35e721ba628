"""Moving the event log: `migrate-store --from sqlite:DIR --to jetstream:URL` (and back)."""

from __future__ import annotations

import argparse
from contextlib import AsyncExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hero_deployer.cli.parsing import Options, command
from hero_deployer.settings import Settings

if TYPE_CHECKING:
    from adapters.log_transfer import LogSide

EPILOG = """\
examples:
  hero-deployer migrate-store --from sqlite:/srv/hero --to jetstream:nats://n1:4222,nats://n2:4222
  hero-deployer migrate-store --from jetstream:nats://n1:4222 --to sqlite:/srv/hero-copy

Stop the service first. The target must hold no events; the source's hash chain is checked
while it is read. See docs/scale-out.md."""


def add_commands(sub: Any, opts: Options) -> None:
    """Adds `migrate-store`."""
    move = command(
        sub, "migrate-store", "move the event log between SQLite and JetStream", epilog=EPILOG
    )
    where = "sqlite:DIR or jetstream:URL[,URL...]"
    move.add_argument("--from", dest="source", required=True, metavar="WHERE", help=where)
    move.add_argument("--to", dest="target", required=True, metavar="WHERE", help=where)
    replicas = "copies of a new jetstream log (default: 3)"
    move.add_argument("--replicas", type=int, default=3, metavar="N", help=replicas)
    move.add_argument("--nkey", dest="nats_nkey", metavar="FILE", help="an NKey seed for NATS")
    move.add_argument("--creds", dest="nats_creds", metavar="FILE", help="a NATS creds file")
    move.set_defaults(handler=_migrate_store)


async def _migrate_store(args: argparse.Namespace, settings: Settings) -> None:
    from adapters.log_transfer import transfer

    async with AsyncExitStack() as stack:
        source = await _side(args.source, args, stack, source=True)
        target = await _side(args.target, args, stack, source=False)
        moved = await transfer(source, target)
    print(
        f"moved {moved.events} events (head {moved.head or '-'}), {moved.records} idempotency"
        f" records, {moved.secrets} sealed secrets"
    )


async def _side(
    where: str, args: argparse.Namespace, stack: AsyncExitStack, *, source: bool
) -> LogSide:
    """`sqlite:DIR` or `jetstream:URL[,URL...]`; ValueError for anything else."""
    from adapters.log_transfer import JetStreamSide, SqliteSide

    kind, _, rest = where.partition(":")
    if kind == "sqlite" and rest:
        return SqliteSide(_sqlite_dir(rest, source=source))
    if kind == "jetstream" and rest:
        import nats

        from hero_deployer.client import nats_credentials

        urls = [url.strip() for url in rest.split(",") if url.strip()]
        identity = nats_credentials(nkey=args.nats_nkey, creds=args.nats_creds)
        nc = await nats.connect(urls, max_reconnect_attempts=3, **identity)
        stack.push_async_callback(nc.drain)
        return JetStreamSide(nc, replicas=args.replicas)
    raise ValueError(f"{where!r}: expected sqlite:DIR or jetstream:URL[,URL...]")


def _sqlite_dir(text: str, *, source: bool) -> Path:
    """The data dir of a SQLite log; a source must hold `events.db`."""
    data_dir = Path(text).expanduser().absolute()
    if source and not (data_dir / "events.db").is_file():
        raise ValueError(f"no event log at {data_dir / 'events.db'}")
    return data_dir
