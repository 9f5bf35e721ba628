"""The composition root: the one place that builds concrete adapters and wires them."""

from __future__ import annotations

import asyncio
import enum
import os
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog
from nats.aio.client import Client

from adapters.keyfiles import load_or_create_key
from adapters.lease_jetstream import KvCheckpoints, KvLease, LeasedSource
from bus.edge import ServiceEdge
from bus.publisher import StatusPublisher
from core.domain import USERS, VMS
from core.gateway_names import check_prefix
from core.operations import Operation
from core.ports import ComputeBackend, Forge, HealthProbe, NodeDirectory, RemoteShell
from core.retry import RetryPolicy
from core.secrets import Fingerprinter
from hero_deployer import VERSION
from hero_deployer.app import configured, vm_handlers
from hero_deployer.app.aggregates import Aggregates, KeyedLocks
from hero_deployer.app.deps import Deps, ServiceStore
from hero_deployer.app.operations import operations as bound_operations
from hero_deployer.app.parts import setup_parts
from hero_deployer.app.settings import Settings, per_step
from hero_deployer.app.user_manager import (
    ManagerConfig,
    Ports,
    UserManager,
    ssh_keys_for,
    step_policy,
)
from hero_deployer.app.vm_reactor import VmReactor
from projections.follow import Checkpoints, Follower, Handler, stop_tasks
from projections.runner import (
    ConnectionHook,
    EventSource,
    ProjectedEvents,
    ProjectionRunner,
    Replayable,
    connect_views,
    connect_views_reader,
    outdated,
    rebuild,
)
from projections.user_view import UserProjection, UserView
from projections.vm_view import VmProjection, VmView

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class App:
    """A running service: its dependencies and the parts tests and the CLI reach into."""

    settings: Settings
    deps: Deps
    store: ServiceStore
    views: ProjectionRunner
    backend: ComputeBackend
    reactor: VmReactor
    manager: UserManager
    edge: ServiceEdge | None
    operations: list[Operation]
    lease: KvLease | None = None  # beside a jetstream log: whether this replica runs side effects


def PROJECTIONS() -> list[Replayable]:
    """Every projection the views database holds, in the order they are applied."""
    return [VmProjection(), UserProjection()]


class FromSettings(enum.Enum):
    """An override left out: the bootstrap builds the adapter the settings describe."""

    TOKEN = 0


FROM_SETTINGS = FromSettings.TOKEN

Lease = tuple[KvLease, KvCheckpoints] | None
"""Beside a jetstream log: the side-effects lease and the checkpoints every replica shares."""


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True)
class _Views:
    """The views database's runner, its two query views and the followers' checkpoints."""

    runner: ProjectionRunner
    vms: VmView
    users: UserView
    checkpoints: Checkpoints


@asynccontextmanager
async def bootstrap(
    settings: Settings,
    nc: Client | None,
    *,
    compute: ComputeBackend | None = None,
    retry: RetryPolicy | None = None,
    forge: Forge | FromSettings | None = FROM_SETTINGS,
    directory: NodeDirectory | FromSettings | None = FROM_SETTINGS,
    shell: RemoteShell | None = None,
    probe: HealthProbe | None = None,
    on_connect: ConnectionHook | None = None,
) -> AsyncIterator[App]:
    """Builds and starts the service; with `nc` None nothing is served or published.

    `forge=None` or `directory=None` means none at all (the Forge step is skipped, nodes come
    from the backend); left out, they follow `forge_url` and `gridproxy_url`. `on_connect`
    is told of every connection that writes events.db or views.db (see `ConnectionHook`).
    """
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    async with AsyncExitStack() as stack:
        backend = compute if compute is not None else await configured.backend(settings, stack)
        store = await configured.event_store(settings, nc, stack, on_connect)
        settings = _joined(settings, store)
        views = await _views(settings, store, stack, on_connect)
        deps = await _deps(settings, nc, store, views, stack)
        lease = await configured.side_effects_lease(settings, nc, stack)  # jetstream: one replica
        reactor = await _reactor(deps, backend, retry, views.checkpoints, lease, stack)
        ports = await _ports(
            settings,
            stack,
            backend,
            deps,
            shell=shell,
            probe=probe,
            forge=forge,
            directory=directory,
        )
        manager = await _manager(settings, deps, ports, views.checkpoints, lease, stack)
        operations = bound_operations(deps)
        edge = None
        if nc is not None:
            edge = await _edge(settings, nc, deps, operations, views.checkpoints, lease, stack)
        held = lease[0] if lease is not None else None
        yield App(
            settings, deps, store, views.runner, backend, reactor, manager, edge, operations, held
        )


def _joined(settings: Settings, store: ServiceStore) -> Settings:
    """Beside a jetstream log: the shared keys checked (once it has events) and the token read."""
    if settings.store != "jetstream":
        return settings
    if store.position:
        require_shared_keys(settings)
    return settings.with_token()


async def _views(
    settings: Settings,
    store: ServiceStore,
    stack: AsyncExitStack,
    on_connect: ConnectionHook | None,
) -> _Views:
    """DIR/views.db, rebuilt from the log when its tables are outdated, and its runner started."""
    views_db = settings.data_dir / "views.db"
    views_conn = await connect_views(views_db, on_connect=on_connect)
    stack.push_async_callback(views_conn.close)
    query_conn = await connect_views(views_db, on_connect=on_connect)
    stack.push_async_callback(query_conn.close)
    checkpoint_conn = await connect_views(views_db, on_connect=on_connect)
    stack.push_async_callback(checkpoint_conn.close)
    reader = connect_views_reader(views_db)
    stack.callback(reader.close)
    projections = PROJECTIONS()
    if stale := await outdated(views_conn, projections):
        # views written with an older layout of their tables, or none yet: from the log
        if store.position:
            log.info("views.rebuilding", views=stale, events=store.position)
        await rebuild(store, views_conn, projections)
    runner = await stack.enter_async_context(ProjectionRunner(store, views_conn, projections))
    return _Views(runner, VmView(reader), UserView(query_conn), Checkpoints(checkpoint_conn))


async def _deps(
    settings: Settings,
    nc: Client | None,
    store: ServiceStore,
    views: _Views,
    stack: AsyncExitStack,
) -> Deps:
    """What every handler and side effect reads: the store, views, vault, keys and clock."""
    key = load_or_create_key(
        settings.data_dir / "fingerprint.key", os.environ.get("HERO_DEPLOYER_FINGERPRINT_KEY")
    )
    vault = await configured.vault(settings, stack, nc)
    locks = KeyedLocks()  # one per stream, whichever aggregate's
    return Deps(
        store=store,
        views=views.runner,
        vm_view=views.vms,
        vms=Aggregates(store, VMS, locks=locks),
        users=Aggregates(store, USERS, locks=locks),
        user_view=views.users,
        vault=vault,
        fingerprint=Fingerprinter(key),
        clock=utc_now,
        version=VERSION,
        require_secret=settings.require_secret,
    )


async def _reactor(
    deps: Deps,
    backend: ComputeBackend,
    retry: RetryPolicy | None,
    checkpoints: Checkpoints,
    lease: Lease,
    stack: AsyncExitStack,
) -> VmReactor:
    """The VM reactor, following the log and recording each backend call's outcome."""
    recorder = vm_handlers.OutcomeRecorder(deps)
    stack.push_async_callback(recorder.close)
    reactor = VmReactor(
        backend, deps.vms, recorder.record, retry=retry, ssh_keys=ssh_keys_for(deps)
    )
    stack.push_async_callback(reactor.close)
    await stack.enter_async_context(_side_effects(deps.store, checkpoints, lease, reactor))
    return reactor


async def _ports(
    settings: Settings,
    stack: AsyncExitStack,
    backend: ComputeBackend,
    deps: Deps,
    *,
    shell: RemoteShell | None,
    probe: HealthProbe | None,
    forge: Forge | FromSettings | None,
    directory: NodeDirectory | FromSettings | None,
) -> Ports:
    """What the process manager reaches outside: the given ones, or those the settings describe."""
    return Ports(
        backend=backend,
        shell=shell if shell is not None else configured.shell(),
        probe=probe if probe is not None else await configured.probe(stack),
        vault=deps.vault,
        forge=await configured.forge(settings, stack) if forge is FROM_SETTINGS else forge,
        directory=(
            await configured.directory(settings, stack) if directory is FROM_SETTINGS else directory
        ),
    )


async def _manager(
    settings: Settings,
    deps: Deps,
    ports: Ports,
    checkpoints: Checkpoints,
    lease: Lease,
    stack: AsyncExitStack,
) -> UserManager:
    """The user process manager, following the log; beside a jetstream log, once leased."""
    deps.parts = setup_parts(
        settings, forge=ports.forge is not None, grid_proxy=ports.directory is not None
    )
    manager = UserManager(deps, ports, manager_config(settings))
    stack.push_async_callback(manager.close)
    await stack.enter_async_context(_side_effects(deps.store, checkpoints, lease, manager))
    if lease is None:
        manager.start()
    else:
        waiting = asyncio.create_task(_when_held(lease[0], manager.start))
        stack.push_async_callback(stop_tasks, [waiting])
    return manager


async def _edge(
    settings: Settings,
    nc: Client,
    deps: Deps,
    operations: list[Operation],
    checkpoints: Checkpoints,
    lease: Lease,
    stack: AsyncExitStack,
) -> ServiceEdge:
    """The status publisher and the NATS edge that serves `operations`."""
    publisher = StatusPublisher(nc, settings.prefix, deps.set_aside)
    projected = ProjectedEvents(deps.store, deps.views)
    await stack.enter_async_context(_side_effects(projected, checkpoints, lease, publisher))
    edge = ServiceEdge(
        nc,
        operations,
        prefix=settings.prefix,
        token=settings.token,
        exempt=settings.exempt,
        version=VERSION,
    )
    await edge.start()
    stack.push_async_callback(edge.stop, settings.shutdown_timeout)
    return edge


SHARED_KEYS = (
    ("fingerprint.key", "HERO_DEPLOYER_FINGERPRINT_KEY"),
    ("master.key", "HERO_DEPLOYER_MASTER_KEY"),
    ("token", "HERO_DEPLOYER_TOKEN"),
)
"""The keys every replica of one log shares: a file in DIR or a variable."""


class SharedKeyMissing(ValueError):
    """A replica joining a log with events lacks a key the log depends on."""


def require_shared_keys(settings: Settings) -> None:
    """Raises SharedKeyMissing naming each shared key this replica would otherwise generate."""
    missing = [
        (name, variable)
        for name, variable in SHARED_KEYS
        if not (settings.data_dir / name).exists()
        and not os.environ.get(variable)
        and not (name == "token" and settings.token)
    ]
    if missing:
        files = ", ".join(str(settings.data_dir / name) for name, _ in missing)
        variables = ", ".join(variable for _, variable in missing)
        raise SharedKeyMissing(
            f"the event log already has events, and this replica has no {files}: copy them"
            f" from the first replica's data directory (or set {variables})"
        )


def _side_effects(
    store: EventSource,
    checkpoints: Checkpoints,
    lease: Lease,
    handler: Handler,
) -> Follower:
    """The follower of a handler with side effects (the reactor, the process manager, the status
    publisher): beside a jetstream log, on the lease's holder only."""
    if lease is None:
        return Follower(store, checkpoints, handler)
    held, shared = lease
    return Follower(LeasedSource(store, held, shared, handler.name), shared, handler)


async def _when_held(lease: KvLease, start: Callable[[], None]) -> None:
    await lease.until_held()
    start()


def manager_config(settings: Settings) -> ManagerConfig:
    """The process manager's configuration; ValueError names a setting that is wrong."""
    if problem := check_prefix(settings.gateway_prefix):
        raise ValueError(problem)
    policy = step_policy(
        deadline=settings.step_deadline,
        retries=settings.step_retries,
        base_delay=settings.step_base_delay,
        max_delay=settings.step_max_delay,
        deadlines=per_step(settings.step_deadlines, float),
        retries_by_step=per_step(settings.step_retries_by_step, int),
    )
    return ManagerConfig(
        candidate_nodes=settings.candidate_nodes,
        ssh_user=settings.ssh_user,
        gateway_prefix=settings.gateway_prefix,
        setup_command=settings.setup_command,
        forge_email_domain=settings.forge_email_domain,
        policy=policy,
    )
