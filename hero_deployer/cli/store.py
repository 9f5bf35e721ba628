"""Moving the event log: `migrate-store --from sqlite:DIR --to jetstream:URL` (and back)."""

from __future__ import annotations

import argparse
from typing import Any

from hero_deployer.app.settings import Settings
from hero_deployer.cli.parsing import Options, command

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
    from hero_deployer.app.runtime import migrate_store

    moved = await migrate_store(
        args.source,
        args.target,
        replicas=args.replicas,
        nkey=args.nats_nkey or "",
        creds=args.nats_creds or "",
    )
    print(
        f"moved {moved.events} events (head {moved.head or '-'}), {moved.records} idempotency"
        f" records, {moved.secrets} sealed secrets"
    )
