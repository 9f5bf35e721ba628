"""The `hero-deployer` command: run the service, and talk to a running one."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from adapters.sqlite_runtime import disable_memory_statistics
from core.errors import DomainError
from core.ports import BackendError
from hero_deployer import audit, context
from hero_deployer.secret_input import (
    NEW_SECRET,
    OLD_SECRET,
    SECRET,
    UsageError,
    add_secret_arguments,
    resolve_secret,
)
from hero_deployer.settings import Settings, explicit_values

if TYPE_CHECKING:
    from hero_deployer.client import NatsIdentity

EXIT_ERROR = 1
EXIT_USAGE = 2


def _runner() -> asyncio.Runner:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported platform
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


# Running the service ----------------------------------------------------------------------


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
            client, token=settings.token, port=port, public_url=settings.public_url
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


# Talking to a running service ---------------------------------------------------------------


class NoService(Exception):
    """Nothing answers as NATS at the resolved URL; the message says where and what to run."""


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


async def _connect(args: argparse.Namespace, settings: Settings) -> Any:
    """The CLI's one connection to the service that the settings point at."""
    import nats.errors

    from hero_deployer.client import HeroDeployerClient, local_actor

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
    if not token:
        await client.close()
        where = settings.data_dir / "token"
        raise NoService(f"no token at {where}: set HERO_DEPLOYER_TOKEN or --data-dir")
    return client


def _token(settings: Settings) -> str:
    """The bearer token: configured, else `DIR/token` when it exists (the CLI creates no file)."""
    if settings.token:
        return settings.token
    try:
        return (settings.data_dir / "token").read_text().strip()
    except FileNotFoundError:
        return ""


async def _call(args: argparse.Namespace, settings: Settings, operation: str, body: Any) -> Any:
    client = await _connect(args, settings)
    try:
        return await client.call(operation, body)
    finally:
        await client.close()


async def _follow(args: argparse.Namespace, settings: Settings) -> None:
    client = await _connect(args, settings)
    try:
        async for event in client.follow(after=args.after, stream=args.stream):
            _print_events(args, [event])
    finally:
        await client.close()
    # Following ends only when the connection does (the CLI does not reconnect).
    raise NoService(f"lost the connection to {settings.nats_url}")


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


async def _vms(args: argparse.Namespace, settings: Settings) -> None:
    action = args.vm_action
    secret = resolve_secret(args, SECRET, what=f"vms {action}")
    if action == "deploy":
        body: dict[str, Any] = {"name": args.name, "secret": secret}
        for field in ("image", "cpu_count", "memory_gb", "disk_gb", "rootfs_gb", "node_id"):
            if getattr(args, field) is not None:
                body[field] = getattr(args, field)
        vm = await _call(args, settings, "deploy_vm", body)
        args.many = False
        _print_vms(args, [vm])
    elif action == "list":
        result = await _call(args, settings, "list_vms", {"secret": secret})
        args.many = True
        _print_vms(args, result["vms"])
    else:
        operation = {"get": "get_vm"}.get(action, f"{action}_vm")
        vm = await _call(args, settings, operation, {"sid": args.sid, "secret": secret})
        args.many = False
        _print_vms(args, [vm])


async def _migrate(args: argparse.Namespace, settings: Settings) -> None:
    old = resolve_secret(args, OLD_SECRET, what="migrate-secret")
    new = resolve_secret(args, NEW_SECRET, what="migrate-secret")
    body = {"old_secret": old, "new_secret": new}
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


USER_COLUMNS = ("username", "status", "step", "node_id", "vm_sid", "gateway_url", "error")

# The event that finishes each provisioning step, and what to say about it.
STEP_EVENTS: dict[str, str] = {
    "ForgeUserEnsured": "forge_user",
    "SshKeyGenerated": "ssh_key",
    "NodeSelected": "select_node",
    "UserVmDeployed": "deploy_vm",
    "GatewayDeployed": "deploy_gateway",
    "SshReachable": "wait_ssh",
    "ManifestUploaded": "upload_manifest",
    "SetupCompleted": "run_setup",
    "HealthVerified": "verify_health",
}


class CommandFailed(Exception):
    """The command ran, but what it waited for failed; the message says what (exit status 1)."""


def _print_users(args: argparse.Namespace, users: list[dict[str, Any]], many: bool) -> None:
    if args.json:
        _print_json(users if many else users[0])
    elif not users:
        print("no users")
    elif many:
        print(_table(users, USER_COLUMNS))
    else:
        for key, value in users[0].items():
            print(f"{key:<20}{'' if value is None else value}")


def _at(event: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(str(event["data"].get("at") or event["recorded_at"]))


def _step_detail(event: dict[str, Any]) -> str:
    data = event["data"]
    match event["type"]:
        case "ForgeUserEnsured":
            if data.get("skipped_reason"):
                return f"skipped: {data['skipped_reason']}"
            return "account created" if data.get("created") else "account exists"
        case "NodeSelected":
            return f"node {data['node_id']} ({data['gateway_domain']})"
        case "UserVmDeployed":
            return f"{data['vm_sid']} at {data['mycelium_ip']}"
        case "GatewayDeployed":
            return str(data["url"])
        case "ManifestUploaded":
            return f"{data['path']} sha256 {str(data['sha256'])[:12]}"
        case "SetupCompleted":
            return f"exit status {data['exit_status']}"
        case "HealthVerified":
            return f"answered {data['status_code']}"
    return ""


async def _follow_user(
    args: argparse.Namespace, client: Any, username: str, after: int, since: datetime, until: str
) -> dict[str, Any] | None:
    """Shows the user's events after `after` until `until` or a StepFailed; returns the latter."""
    step_began = since
    failure: dict[str, Any] | None = None
    async with asyncio.timeout(args.wait_timeout):
        async for event in client.follow(after=after, stream=f"user:{username}"):
            kind = event["type"]
            at = _at(event)
            if args.json:
                _print_json(event)
            elif kind in ("ProvisioningRequested", "ProvisioningResumed", "DecommissionRequested"):
                step_began = at
                print(f"{kind}", flush=True)
            elif kind in STEP_EVENTS:
                elapsed = (at - step_began).total_seconds()
                step_began = at
                print(
                    f"  {STEP_EVENTS[kind]:<16} done   {elapsed:6.1f}s  {_step_detail(event)}",
                    flush=True,
                )
            elif kind == "UserVmDeployRequested":
                print(f"  {'deploy_vm':<16} ...            vm {event['data']['vm_sid']} requested")
            elif kind == "StepRetried":
                data = event["data"]
                print(f"  {data['step']:<16} retry  #{data['attempt']:<5}  {data['reason']}")
            elif kind == "StepFailed":
                data = event["data"]
                elapsed = (at - step_began).total_seconds()
                print(f"  {data['step']:<16} FAILED {elapsed:6.1f}s  {data['reason']}", flush=True)
            elif kind in ("GatewayDeleted", "UserVmDeleted", "DecommissionActionFailed"):
                data = event["data"]
                what = data.get("name") or data.get("vm_sid") or data.get("reason", "")
                print(f"  {kind:<24} {what}", flush=True)
            if kind == "StepFailed":
                failure = dict(event)
                break
            if kind == until:
                break
    return failure


async def _users(args: argparse.Namespace, settings: Settings) -> None:
    client = await _connect(args, settings)
    try:
        action = args.user_action
        if action == "list":
            result = await client.call("list_users", {})
            _print_users(args, result["users"], many=True)
        elif action == "get":
            _print_users(args, [await client.call("get_user", {"username": args.username})], False)
        elif action == "reveal-password":
            body = {"username": args.username}
            result = await client.call("reveal_initial_password", body)
            if args.json:
                _print_json(result)
            else:
                print(result["initial_password"])
        elif action == "decommission":
            await _decommission(args, client)
        else:
            await _provision(args, client)
    finally:
        await client.close()


async def _provision(args: argparse.Namespace, client: Any) -> None:
    name = args.username
    body: dict[str, Any] = {"username": name}
    for field in ("display_name", "forge_email", "profile"):
        if getattr(args, field) is not None:
            body[field] = getattr(args, field)
    before = (await client.call("health", {}))["position"]
    user = await client.call("provision_user", body)
    if args.no_wait or user["status"] != "provisioning":
        _print_users(args, [user], many=False)
        return
    if not args.json:
        print(f"provisioning {name} (step {user['step']}), following its events", flush=True)
    began = datetime.fromisoformat(user["updated_at"])
    failure = await _follow_user(args, client, name, before, began, "ProvisioningCompleted")
    user = await client.call("get_user", {"username": name})
    if args.json:
        _print_json(user)
    elif failure is None:
        total = (datetime.fromisoformat(user["updated_at"]) - began).total_seconds()
        print(f"{name} is ready after {total:.1f}s: {user['gateway_url']}")
    if failure is not None:
        data = failure["data"]
        raise CommandFailed(f"{name} failed at {data['step']}: {data['reason']}")


async def _decommission(args: argparse.Namespace, client: Any) -> None:
    name = args.username
    before = (await client.call("health", {}))["position"]
    user = await client.call("decommission_user", {"username": name})
    if not args.wait or user["status"] != "decommissioning":
        _print_users(args, [user], many=False)
        return
    began = datetime.fromisoformat(user["updated_at"])
    await _follow_user(args, client, name, before, began, "UserDecommissioned")
    user = await client.call("get_user", {"username": name})
    if args.json:
        _print_json(user)
    else:
        print(f"{name} is {user['status']}")


async def _health(args: argparse.Namespace, settings: Settings) -> None:
    result = await _call(args, settings, "health", {})
    if args.json:
        _print_json(result)
    else:
        print(
            f"{result['status']}  version {result['version']}  position {result['position']}"
            f"  head {result.get('head_hash', '')}"
        )


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
    up.add_argument(
        "--web-port", type=int, default=8080, help="dashboard port on 127.0.0.1 (0: none)"
    )
    web_p = sub.add_parser("web", parents=[common], help="run the dashboard alone")
    web_p.add_argument("--web-port", type=int, default=8080, help="port on 127.0.0.1")
    for parser_ in (up, web_p):
        parser_.add_argument(
            "--public-url",
            help="https://host[:port] browsers use (via a proxy): only that Host, Secure cookies",
        )
    serve_p = sub.add_parser("serve", parents=[common], help="run the service on an existing NATS")
    serve_p.add_argument("--backend", choices=["local", "hero-compute", "opentofu"])
    serve_p.add_argument("--nkey", dest="nats_nkey", help="the service's NKey seed file")
    serve_p.add_argument("--creds", dest="nats_creds", help="the service's NATS creds file")
    serve_p.add_argument(
        "--store", choices=["sqlite", "jetstream"], help="where the event log lives"
    )
    serve_p.add_argument("--replicas", type=int, help="copies of a jetstream log (default 3)")
    sub.add_parser("rebuild", parents=[common], help="rebuild every view from the event log")

    vms = sub.add_parser("vms", help="tenant VMs").add_subparsers(dest="vm_action", required=True)
    deploy = vms.add_parser("deploy", parents=[common])
    deploy.add_argument("name")
    add_secret_arguments(deploy, SECRET)
    deploy.add_argument("--image")
    deploy.add_argument("--cpu", dest="cpu_count", type=int)
    deploy.add_argument("--memory", dest="memory_gb", type=int)
    deploy.add_argument("--disk", dest="disk_gb", type=int)
    deploy.add_argument("--rootfs", dest="rootfs_gb", type=int)
    deploy.add_argument("--node", dest="node_id", type=int)
    add_secret_arguments(vms.add_parser("list", parents=[common]), SECRET)
    for action in ("get", "start", "stop", "restart", "delete"):
        p = vms.add_parser(action, parents=[common])
        p.add_argument("sid")
        add_secret_arguments(p, SECRET)

    migrate = sub.add_parser("migrate-secret", parents=[common], help="re-key all of your VMs")
    add_secret_arguments(migrate, OLD_SECRET)
    add_secret_arguments(migrate, NEW_SECRET)

    events = sub.add_parser("events", parents=[common], help="the event log, for audits")
    events.add_argument("--stream")
    events.add_argument("--after", type=int, default=0)
    events.add_argument("--limit", type=int, default=100)
    events.add_argument("--follow", action="store_true", help="then follow live events")
    sub.add_parser("health", parents=[common])

    spec = sub.add_parser("api-spec", help="print the AsyncAPI 3 document of the contract")
    spec.add_argument("--prefix", default="hero.v1")
    backend = sub.add_parser("backend", help="the compute backend").add_subparsers(
        dest="backend_action", required=True
    )
    check = backend.add_parser(
        "check", parents=[common], help="say whether the backend is reachable and usable"
    )
    check.add_argument("--backend", choices=["local", "hero-compute", "opentofu"])

    users = sub.add_parser("users", help="provision and decommission users (operator)")
    user_sub = users.add_subparsers(dest="user_action", required=True)
    provision = user_sub.add_parser(
        "provision", parents=[common], help="provision a user and show its progress"
    )
    provision.add_argument("username")
    provision.add_argument("--display-name")
    provision.add_argument("--email", dest="forge_email")
    provision.add_argument("--profile")
    provision.add_argument("--no-wait", action="store_true", help="do not follow the progress")
    provision.add_argument("--wait-timeout", type=float, default=3600.0)
    user_sub.add_parser("list", parents=[common])
    user_sub.add_parser("get", parents=[common]).add_argument("username")
    decommission = user_sub.add_parser("decommission", parents=[common])
    decommission.add_argument("username")
    decommission.add_argument("--wait", action="store_true", help="follow until decommissioned")
    decommission.add_argument("--wait-timeout", type=float, default=3600.0)
    user_sub.add_parser(
        "reveal-password", parents=[common], help="the initial Forge password, once"
    ).add_argument("username")
    audit.add_commands(sub, common)
    return parser


async def _backend_check(args: argparse.Namespace, settings: Settings) -> int:
    from hero_deployer.backends import check_backend

    report = await check_backend(settings)
    problems, notes = report.problems, report.notes
    if args.json:
        usable = not problems
        _print_json(
            {"backend": settings.backend, "usable": usable, "problems": problems, "notes": notes}
        )
    else:
        print(f"backend {settings.backend}: {'not usable' if problems else 'ok'}")
        for problem in problems:
            print(f"  - {problem}")
        for note in notes:
            print(f"  note: {note}")
    return EXIT_ERROR if problems else 0


COMMANDS: dict[str, Callable[[argparse.Namespace, Settings], Coroutine[Any, Any, None]]] = {
    "vms": _vms,
    "migrate-secret": _migrate,
    "events": _events,
    "health": _health,
    "users": _users,
    "web": _web,
}


def _settings(command: str, overrides: dict[str, Any]) -> Settings:
    """Flags, then `HERO_DEPLOYER_*` variables, then the `up` running here, then the defaults.

    The running `up` (its context file) counts for the commands that talk to a service, not for
    the ones that run one; a URL given by flag or variable picks the context at that URL.
    """
    settings = Settings.load(overrides)
    if command in ("up", "serve"):
        return settings
    given = explicit_values(overrides)
    url_given = "nats_url" in given or "nats_port" in given
    found = context.find(settings.nats_url if url_given else None)
    return Settings.load(overrides, found=found.settings()) if found else settings


def main(argv: Sequence[str] | None = None) -> int:
    disable_memory_statistics()  # before any database is opened; see its docstring
    args = _parser().parse_args(argv)
    overrides: dict[str, Any] = {"data_dir": getattr(args, "data_dir", None)}
    if getattr(args, "nats_port", None) is not None:
        overrides["nats_port"] = args.nats_port
    if getattr(args, "backend", None) is not None:
        overrides["backend"] = args.backend
    if getattr(args, "public_url", None) is not None:  # `up`/`web --public-url`
        overrides["public_url"] = args.public_url
    for name in ("store", "replicas"):  # `serve --store jetstream --replicas N`
        overrides[name] = getattr(args, name, None)
    for identity in ("nats_nkey", "nats_creds"):  # `serve --nkey/--creds`
        overrides[identity] = getattr(args, identity, None)
    if args.command != "up" and getattr(args, "nats", None):
        overrides["nats_url"] = args.nats
    if args.command == "api-spec":
        from hero_deployer.asyncapi import print_spec

        print_spec(args.prefix)
        return 0
    try:
        settings = _settings(args.command, overrides)
        if args.command in audit.COMMANDS:
            return audit.run(args, settings)
        with _runner() as runner:
            if args.command == "backend":
                return runner.run(_backend_check(args, settings))
            if args.command in ("up", "serve"):
                web_port = args.web_port if args.command == "up" else 0
                runner.run(serve(settings, embedded_nats=args.command == "up", web_port=web_port))
            elif args.command == "rebuild":
                count = runner.run(rebuild_views(settings))
                print(f"rebuilt views from {count} events")
            else:
                runner.run(COMMANDS[args.command](args, settings))
    except DomainError as error:
        print(f"error: {error.code}: {error.message}", file=sys.stderr)
        return EXIT_ERROR
    except (CommandFailed, NoService, NatsRefused) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except BackendError as error:
        print(f"error: {error.message}", file=sys.stderr)
        return EXIT_ERROR
    except TimeoutError:
        print("error: gave up waiting (--wait-timeout)", file=sys.stderr)
        return EXIT_ERROR
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
