"""Asking a running service about itself: `status`, `health`, `events`; and `backend check`."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from core.contract import Empty, EventsRequest
from hero_deployer.app.settings import Settings
from hero_deployer.cli.connect import call, connected
from hero_deployer.cli.errors import EXIT_ERROR, NoService
from hero_deployer.cli.output import colour_on, paint, print_events, print_json, status
from hero_deployer.cli.parsing import Options, command, row
from hero_deployer.cli.run import BACKENDS
from hero_deployer.cli.validation import bounds, field_type
from hero_deployer.sdk.wire import event_dict

HEALTH, EVENTS = row(Empty).name, row(EventsRequest).name  # commands named as their operations

EVENTS_EPILOG = """\
examples:
  hero-deployer events                              # the first 100 events
  hero-deployer events --stream user:alice --json   # one user's, as JSON lines
  hero-deployer events --after 1200 --follow        # then live, until Ctrl-C"""

CHECK_EPILOG = """\
Exit status 1 when something makes the setup unusable; notes do not.

examples:
  hero-deployer backend check
  HERO_DEPLOYER_TOFU_NETWORK=test hero-deployer backend check --backend opentofu --json"""

STATUS_EPILOG = """\
The parts (backend, Forge, grid proxy) are the service's own view when it reports them in
`health`; otherwise `backend check` runs here, with this CLI's settings.

examples:
  hero-deployer status
  hero-deployer status --nats nats://10.0.0.5:4222 --json"""


def add_commands(sub: Any, opts: Options) -> None:
    """Adds `status`, `health`, `events` and `backend check`."""
    command(
        sub,
        "status",
        "which service the CLI talks to, what it runs and what it lacks",
        parents=opts.client,
        epilog=STATUS_EPILOG,
    ).set_defaults(handler=_status)
    health = command(sub, HEALTH, "liveness, version, position and head hash", parents=opts.client)
    health.set_defaults(handler=_health)
    events = command(
        sub, EVENTS, "the event log, for audits", parents=opts.client, epilog=EVENTS_EPILOG
    )
    events.add_argument(
        "--stream", metavar="STREAM", help="only this stream: vm:<sid> or user:<name>"
    )
    after = "start after this global position"
    events.add_argument("--after", type=int, default=0, metavar="POSITION", help=after)
    events.add_argument("--limit", type=int, default=100, metavar="N", help=limit_help())
    events.add_argument("--follow", action="store_true", help="then follow live events")
    events.set_defaults(handler=_events)

    backend = command(sub, "backend", "the compute backend").add_subparsers(
        dest="backend_action", required=True, metavar="COMMAND"
    )
    check = command(
        backend,
        "check",
        "say whether the backend and the Forge are reachable and usable",
        parents=[opts.data_dir, opts.json],
        epilog=CHECK_EPILOG,
    )
    check.add_argument("--backend", choices=BACKENDS, help="the backend to check (default: local)")
    check.set_defaults(handler=_backend_check)


def limit_help() -> str:
    """`--limit`'s help, with the bounds of the request type's field."""
    return f"at most N events, {bounds(field_type(EventsRequest, 'limit')[0])}"


async def _events(args: argparse.Namespace, settings: Settings) -> None:
    if args.follow:
        async with connected(args, settings) as client:
            async for event in client.follow(after=args.after, stream=args.stream):
                print_events(args, [event])
        # Following ends only when the connection does (the CLI does not reconnect).
        raise NoService(f"lost the connection to {settings.nats_url}")
    request = EventsRequest(stream=args.stream or None, after=args.after, limit=args.limit)
    async with connected(args, settings) as client:
        page = await client.send(request)
    print_events(args, [event_dict(event) for event in page.events])


async def _health(args: argparse.Namespace, settings: Settings) -> None:
    result = await call(args, settings, HEALTH, {})
    if args.json:
        print_json(result)
    else:
        print(
            f"{result['status']}  version {result['version']}  position {result['position']}"
            f"  head {result.get('head_hash', '')}"
        )


async def _backend_check(args: argparse.Namespace, settings: Settings) -> int:
    from hero_deployer.app.backends import check_backend

    report = await check_backend(settings)
    problems, notes = report.problems, report.notes
    if args.json:
        usable = not problems
        print_json(
            {"backend": settings.backend, "usable": usable, "problems": problems, "notes": notes}
        )
    else:
        print(f"backend {settings.backend}: {'not usable' if problems else 'ok'}")
        for problem in problems:
            print(f"  - {problem}")
        for note in notes:
            print(f"  note: {note}")
    return EXIT_ERROR if problems else 0


async def _status(args: argparse.Namespace, settings: Settings) -> None:
    health = await call(args, settings, HEALTH, {})
    parts: list[dict[str, Any]] = list(health.get("parts") or [])
    checked_by = "service"
    if not parts:
        parts, checked_by = await _local_parts(settings), "cli"
    result = {
        "url": settings.nats_url,
        "prefix": settings.prefix,
        "data_dir": str(settings.data_dir),
        "status": health["status"],
        "version": health["version"],
        "position": health["position"],
        "head_hash": health.get("head_hash", ""),
        "backend": settings.backend if checked_by == "cli" else _backend_of(parts),
        "checked_by": checked_by,
        "parts": parts,
    }
    if args.json:
        print_json(result)
    else:
        _print_status(result)


async def _local_parts(settings: Settings) -> list[dict[str, Any]]:
    """`backend check`'s findings as parts: the backend's problems and notes, and the Forge's."""
    from hero_deployer.app.backends import check_backend

    report = await check_backend(settings)
    usable = f"The {settings.backend} backend is usable."
    state = "missing" if report.problems else "ok"
    parts = [{"name": "check", "state": state, "message": "; ".join(report.problems) or usable}]
    parts += [{"name": "note", "state": "ok", "message": note} for note in report.notes]
    if not settings.forge_url:
        unset = "No Forge is configured (HERO_DEPLOYER_FORGE_URL) in this CLI's settings."
        parts.append({"name": "forge", "state": "missing", "message": unset})
    return parts


def _backend_of(parts: list[dict[str, Any]]) -> str:
    """The backend's name as the service describes it ("The opentofu backend." → opentofu)."""
    message = next((p["message"] for p in parts if p.get("name") == "backend"), "")
    return next((name for name in BACKENDS if name in message), "local")


def _print_status(result: dict[str, Any]) -> None:
    on = colour_on(sys.stdout)
    rows = [
        ("server", f"{result['url']}  (prefix {result['prefix']}, data {result['data_dir']})"),
        ("status", status(str(result["status"]), on=on)),
        ("version", result["version"]),
        ("position", f"{result['position']}  head {result['head_hash'] or '-'}"),
    ]
    parts = {part["name"]: part for part in result["parts"]}
    backend = parts.pop("backend", None)
    said = f"  {status(backend['state'], on=on)}  {backend['message']}" if backend else ""
    rows.append(("backend", f"{result['backend']}{said}"))
    for part in parts.values():
        rows.append((part["name"], f"{status(part['state'], on=on)}  {part['message']}"))
    where = "the service" if result["checked_by"] == "service" else "here (backend check)"
    rows.append(("checked", where))
    for key, value in rows:
        print(f"{paint(f'{key:<10}', 'bold', on=on)}{value}")
