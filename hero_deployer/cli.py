"""The `hero-deployer` command: run the service, and talk to a running one."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import msgspec

from core.errors import DomainError
from hero_deployer.settings import Settings

EXIT_ERROR = 1
EXIT_USAGE = 2


def _runner() -> asyncio.Runner:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported platform
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


# Running the service ----------------------------------------------------------------------


async def _wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def serve(settings: Settings, *, embedded_nats: bool) -> None:
    """Runs until SIGINT/SIGTERM, then stops accepting, finishes in-flight work and closes."""
    import nats
    import structlog

    from hero_deployer.bootstrap import bootstrap
    from hero_deployer.logs import configure
    from hero_deployer.natsserver import NatsServer

    configure(settings.log_level, settings.log_format)
    log = structlog.get_logger("hero_deployer")
    settings = settings.with_token()
    server = NatsServer(port=settings.nats_port, data_dir=settings.data_dir)
    if embedded_nats:
        await server.start()
    try:
        nc = await nats.connect(settings.nats_url, max_reconnect_attempts=-1)
        try:
            async with bootstrap(settings, nc):
                print(
                    f"hero-deployer ready: nats {settings.nats_url}, prefix {settings.prefix},"
                    f" data {settings.data_dir}, backend {settings.backend}",
                    flush=True,
                )
                await _wait_for_signal()
                log.info("shutdown.started")
        finally:
            await nc.drain()
    finally:
        await server.stop()
    log.info("shutdown.done")


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


# Talking to a running service ---------------------------------------------------------------


async def _call(args: argparse.Namespace, settings: Settings, operation: str, body: Any) -> Any:
    from hero_deployer.client import HeroDeployerClient

    client = await HeroDeployerClient.connect(
        args.nats or settings.nats_url,
        token=settings.with_token().token,
        prefix=settings.prefix,
        timeout=args.timeout,
    )
    try:
        return await client.call(operation, body)
    finally:
        await client.close()


async def _follow(args: argparse.Namespace, settings: Settings) -> None:
    from hero_deployer.client import HeroDeployerClient

    client = await HeroDeployerClient.connect(
        args.nats or settings.nats_url,
        token=settings.with_token().token,
        prefix=settings.prefix,
        timeout=args.timeout,
    )
    try:
        async for event in client.follow(after=args.after, stream=args.stream):
            _print_events(args, [event])
    finally:
        await client.close()


VM_COLUMNS = ("sid", "name", "status", "node_id", "mycelium_ip", "cpu_count", "memory_gb", "error")


def _table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    cells = [
        [str(row.get(c, "") if row.get(c) is not None else "") for c in columns] for row in rows
    ]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(line.rstrip() for line in lines)


def _print_json(value: Any) -> None:
    sys.stdout.write(msgspec.json.encode(value).decode() + "\n")


def _print_vms(args: argparse.Namespace, vms: list[dict[str, Any]]) -> None:
    if args.json:
        _print_json(vms if args.many else vms[0])
    elif not vms:
        print("no vms")
    else:
        print(_table(vms, VM_COLUMNS))


def _print_events(args: argparse.Namespace, events: list[dict[str, Any]]) -> None:
    for event in events:
        if args.json:
            _print_json(event)
        else:
            data = msgspec.json.encode(event["data"]).decode()
            print(
                f"{event['position']:>8}  {event['recorded_at']}  {event['stream']}"
                f"  v{event['version']}  {event['type']}  {data}",
                flush=True,
            )


def _secret(args: argparse.Namespace, name: str = "secret") -> str:
    value = getattr(args, name, None)
    if value is None:
        value = os.environ.get("HERO_SECRET", "")
    return str(value)


async def _vms(args: argparse.Namespace, settings: Settings) -> None:
    action = args.vm_action
    if action == "deploy":
        body: dict[str, Any] = {"name": args.name, "secret": _secret(args)}
        for field in ("image", "cpu_count", "memory_gb", "disk_gb", "rootfs_gb", "node_id"):
            if getattr(args, field) is not None:
                body[field] = getattr(args, field)
        vm = await _call(args, settings, "deploy_vm", body)
        args.many = False
        _print_vms(args, [vm])
    elif action == "list":
        result = await _call(args, settings, "list_vms", {"secret": _secret(args)})
        args.many = True
        _print_vms(args, result["vms"])
    else:
        operation = {"get": "get_vm"}.get(action, f"{action}_vm")
        vm = await _call(args, settings, operation, {"sid": args.sid, "secret": _secret(args)})
        args.many = False
        _print_vms(args, [vm])


async def _migrate(args: argparse.Namespace, settings: Settings) -> None:
    body = {"old_secret": args.old_secret, "new_secret": args.new_secret}
    result = await _call(args, settings, "migrate_secret", body)
    if args.json:
        _print_json(result)
    else:
        print(f"migrated {result['migrated_count']} vms")


async def _events(args: argparse.Namespace, settings: Settings) -> None:
    if args.follow:
        await _follow(args, settings)
        return
    body: dict[str, Any] = {"after": args.after, "limit": args.limit}
    if args.stream:
        body["stream"] = args.stream
    page = await _call(args, settings, "events", body)
    _print_events(args, page["events"])


async def _health(args: argparse.Namespace, settings: Settings) -> None:
    result = await _call(args, settings, "health", {})
    if args.json:
        _print_json(result)
    else:
        print(f"{result['status']}  version {result['version']}  position {result['position']}")


# Argument parsing -------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hero-deployer", description=__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", type=Path, help="where the token and the database live")
    common.add_argument("--nats", help="NATS URL of a running service (default from settings)")
    common.add_argument("--json", action="store_true", help="print JSON for scripts")
    common.add_argument("--timeout", type=float, default=10.0, help="request timeout, seconds")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", parents=[common], help="run everything with embedded defaults")
    up.add_argument("--nats-port", type=int)
    up.add_argument("--backend", choices=["local", "hero-compute", "opentofu"])
    serve_p = sub.add_parser("serve", parents=[common], help="run the service on an existing NATS")
    serve_p.add_argument("--backend", choices=["local", "hero-compute", "opentofu"])
    sub.add_parser("rebuild", parents=[common], help="rebuild every view from the event log")

    vms = sub.add_parser("vms", help="tenant VMs").add_subparsers(dest="vm_action", required=True)
    deploy = vms.add_parser("deploy", parents=[common])
    deploy.add_argument("name")
    deploy.add_argument("--secret")
    deploy.add_argument("--image")
    deploy.add_argument("--cpu", dest="cpu_count", type=int)
    deploy.add_argument("--memory", dest="memory_gb", type=int)
    deploy.add_argument("--disk", dest="disk_gb", type=int)
    deploy.add_argument("--rootfs", dest="rootfs_gb", type=int)
    deploy.add_argument("--node", dest="node_id", type=int)
    vms.add_parser("list", parents=[common]).add_argument("--secret")
    for action in ("get", "start", "stop", "restart", "delete"):
        p = vms.add_parser(action, parents=[common])
        p.add_argument("sid")
        p.add_argument("--secret")

    migrate = sub.add_parser("migrate-secret", parents=[common], help="re-key all of your VMs")
    migrate.add_argument("--old-secret", required=True)
    migrate.add_argument("--new-secret", required=True)

    events = sub.add_parser("events", parents=[common], help="the event log, for audits")
    events.add_argument("--stream")
    events.add_argument("--after", type=int, default=0)
    events.add_argument("--limit", type=int, default=100)
    events.add_argument("--follow", action="store_true", help="then follow live events")
    sub.add_parser("health", parents=[common])
    return parser


COMMANDS: dict[str, Callable[[argparse.Namespace, Settings], Coroutine[Any, Any, None]]] = {
    "vms": _vms,
    "migrate-secret": _migrate,
    "events": _events,
    "health": _health,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides: dict[str, Any] = {"data_dir": args.data_dir}
    if getattr(args, "nats_port", None) is not None:
        overrides["nats_port"] = args.nats_port
    if getattr(args, "backend", None) is not None:
        overrides["backend"] = args.backend
    if args.command == "serve" and args.nats:
        overrides["nats_url"] = args.nats
    try:
        settings = Settings.load(overrides)
        with _runner() as runner:
            if args.command in ("up", "serve"):
                runner.run(serve(settings, embedded_nats=args.command == "up"))
            elif args.command == "rebuild":
                count = runner.run(rebuild_views(settings))
                print(f"rebuilt views from {count} events")
            else:
                runner.run(COMMANDS[args.command](args, settings))
    except DomainError as error:
        print(f"error: {error.code}: {error.message}", file=sys.stderr)
        return EXIT_ERROR
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
