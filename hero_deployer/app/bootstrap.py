"""The composition root: the one place that builds concrete adapters and wires them."""

from __future__ import annotations

import asyncio
import enum
import os
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import cast

import aiosqlite
import structlog
from nats.aio.client import Client

from adapters.eventstore_sqlite import SqliteEventStore
from adapters.keyfiles import load_or_create_key
from adapters.lease_jetstream import (
    CHECKPOINTS,
    LEASES,
    KvCheckpoints,
    KvLease,
    LeasedSource,
    bucket,
)
from adapters.sealing import AesGcmSealer
from adapters.sqlite_events import Synchronous
from adapters.vault_sqlite import SqliteSecretVault
from bus.edge import ServiceEdge
from bus.publisher import StatusPublisher
from core.domain import USERS, VMS
from core.gateway_names import check_prefix
from core.operations import Operation
from core.ports import (
    BackendError,
    ComputeBackend,
    Forge,
    HealthProbe,
    NodeDirectory,
    RemoteShell,
    SecretVault,
)
from core.secrets import Fingerprinter
from hero_deployer import VERSION
from hero_deployer.app import vm_handlers
from hero_deployer.app.aggregates import Aggregates, KeyedLocks
from hero_deployer.app.backends import build_backend, gridproxy_url
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
from hero_deployer.app.vm_reactor import RetryPolicy, VmReactor
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


def utc_now() -> datetime:
    return datetime.now(UTC)


async def _configured_backend(settings: Settings, stack: AsyncExitStack) -> ComputeBackend:
    """The configured backend; a real one must pass its check before the service starts."""
    backend = await build_backend(settings, stack)
    check = getattr(backend, "check", None)
    if settings.backend != "local" and check is not None:
        problems: list[str] = await check()
        if problems:
            raise BackendError(f"backend {settings.backend} is not usable: " + "; ".join(problems))
    return backend


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
    data_dir = settings.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    async with AsyncExitStack() as stack:
        backend = compute if compute is not None else await _configured_backend(settings, stack)
        store = await _event_store(settings, nc, stack, on_connect)
        if settings.store == "jetstream":
            if store.position:
                require_shared_keys(settings)
            settings = settings.with_token()
        views_db = data_dir / "views.db"
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
        key = load_or_create_key(
            data_dir / "fingerprint.key", os.environ.get("HERO_DEPLOYER_FINGERPRINT_KEY")
        )
        vault = await _vault(settings, stack, nc)
        locks = KeyedLocks()  # one per stream, whichever aggregate's
        deps = Deps(
            store=store,
            views=runner,
            vm_view=VmView(reader),
            vms=Aggregates(store, VMS, locks=locks),
            users=Aggregates(store, USERS, locks=locks),
            user_view=UserView(query_conn),
            vault=vault,
            fingerprint=Fingerprinter(key),
            clock=utc_now,
            version=VERSION,
            require_secret=settings.require_secret,
        )

        recorder = vm_handlers.OutcomeRecorder(deps)
        stack.push_async_callback(recorder.close)
        reactor = VmReactor(
            backend, deps.vms, recorder.record, retry=retry, ssh_keys=ssh_keys_for(deps)
        )
        checkpoints = Checkpoints(checkpoint_conn)
        stack.push_async_callback(reactor.close)
        lease = await _lease(settings, nc, stack)  # jetstream: one replica runs side effects
        await stack.enter_async_context(_side_effects(store, checkpoints, lease, reactor))

        ports = Ports(
            backend=backend,
            shell=shell if shell is not None else _shell(),
            probe=probe if probe is not None else await _probe(stack),
            vault=vault,
            forge=await _forge(settings, stack) if forge is FROM_SETTINGS else forge,
            directory=(
                await _directory(settings, stack) if directory is FROM_SETTINGS else directory
            ),
        )
        deps.parts = setup_parts(
            settings, forge=ports.forge is not None, grid_proxy=ports.directory is not None
        )
        manager = UserManager(deps, ports, manager_config(settings))
        stack.push_async_callback(manager.close)
        await stack.enter_async_context(_side_effects(store, checkpoints, lease, manager))
        if lease is None:
            manager.start()
        else:
            waiting = asyncio.create_task(_when_held(lease[0], manager.start))
            stack.push_async_callback(stop_tasks, [waiting])

        operations = bound_operations(deps)
        edge: ServiceEdge | None = None
        if nc is not None:
            await stack.enter_async_context(
                _side_effects(
                    ProjectedEvents(store, runner),
                    checkpoints,
                    lease,
                    StatusPublisher(nc, settings.prefix, deps.set_aside),
                )
            )
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
        yield App(
            settings=settings,
            deps=deps,
            store=store,
            views=runner,
            backend=backend,
            reactor=reactor,
            manager=manager,
            edge=edge,
            operations=operations,
            lease=lease[0] if lease is not None else None,
        )


async def _event_store(
    settings: Settings, nc: Client | None, stack: AsyncExitStack, on_connect: ConnectionHook | None
) -> ServiceStore:
    """DIR/events.db, or the JetStream stream on the cluster `nc` is connected to."""
    if settings.store == "sqlite":
        return await stack.enter_async_context(
            SqliteEventStore(
                settings.data_dir / "events.db",
                synchronous=cast(Synchronous, settings.synchronous),
                on_connect=on_connect,
            )
        )
    if settings.store != "jetstream":
        raise ValueError(f"unknown store {settings.store!r}: sqlite or jetstream")
    if nc is None:
        raise ValueError("the jetstream store needs a NATS connection")
    from adapters.eventstore_jetstream import JetStreamEventStore

    store = JetStreamEventStore(nc, replicas=settings.replicas)
    store.keys.stale_after = settings.reservation_stale_after
    return await stack.enter_async_context(store)


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


async def _lease(
    settings: Settings, nc: Client | None, stack: AsyncExitStack
) -> tuple[KvLease, KvCheckpoints] | None:
    """Beside a jetstream log: the lease that makes one replica at a time run side effects, and
    the checkpoints all replicas share (docs/scale-out.md)."""
    if settings.store != "jetstream" or nc is None:
        return None
    js = nc.jetstream()
    leases = await bucket(js, LEASES, replicas=settings.replicas, ttl=settings.lease_ttl)
    lease = await stack.enter_async_context(KvLease(leases, "side-effects", ttl=settings.lease_ttl))
    shared = await bucket(js, CHECKPOINTS, replicas=settings.replicas)
    return lease, KvCheckpoints(shared, lease)


def _side_effects(
    store: EventSource,
    checkpoints: Checkpoints,
    lease: tuple[KvLease, KvCheckpoints] | None,
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


async def _vault(settings: Settings, stack: AsyncExitStack, nc: Client | None) -> SecretVault:
    """Sealed secrets in `DIR/vault.db` (beside a jetstream log: in its cluster's HERO_VAULT
    bucket, which every replica shares), under the master key."""
    master = load_or_create_key(
        settings.data_dir / "master.key", os.environ.get("HERO_DEPLOYER_MASTER_KEY")
    )
    if settings.store == "jetstream" and nc is not None:
        from adapters.vault_jetstream import JetStreamSecretVault

        return await JetStreamSecretVault.open(
            nc.jetstream(), AesGcmSealer(master), replicas=settings.replicas
        )
    conn = await aiosqlite.connect(settings.data_dir / "vault.db")
    stack.push_async_callback(conn.close)
    await conn.execute("PRAGMA busy_timeout=5000")
    return SqliteSecretVault(conn, AesGcmSealer(master))


def _shell() -> RemoteShell:
    from adapters.ssh_asyncssh import AsyncsshShell

    return AsyncsshShell()


async def _probe(stack: AsyncExitStack) -> HealthProbe:
    from adapters.health_http import HttpxHealthProbe

    return await stack.enter_async_context(HttpxHealthProbe())


async def _forge(settings: Settings, stack: AsyncExitStack) -> Forge | None:
    if not settings.forge_url:
        return None
    from adapters.forge_http import ForgejoClient

    client = ForgejoClient(
        settings.forge_url,
        admin_user=settings.forge_admin_user,
        admin_password=settings.forge_admin_password or None,
        admin_token=settings.forge_admin_token or None,
    )
    return await stack.enter_async_context(client)


async def _directory(settings: Settings, stack: AsyncExitStack) -> NodeDirectory | None:
    """The grid proxy: configured, or the OpenTofu network's; none for the other backends."""
    url = gridproxy_url(settings)
    if not url:
        return None
    from adapters.gridproxy_http import GridProxyDirectory

    return await stack.enter_async_context(GridProxyDirectory(url))
