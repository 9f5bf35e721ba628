"""The composition root: the one place that builds concrete adapters and wires them."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import cast

from nats.aio.client import Client

from adapters.eventstore_sqlite import SqliteEventStore, Synchronous
from adapters.keyfiles import load_or_create_key
from bus.edge import ServiceEdge
from bus.publisher import StatusPublisher
from core.events import EventRegistry, vm_stream
from core.operations import Operation
from core.ports import ComputeBackend
from core.secrets import Fingerprinter
from core.vm import VM_EVENT_TYPES, OutcomeCommand, Vm, evolve
from hero_deployer import vm_handlers
from hero_deployer.aggregates import Aggregates
from hero_deployer.deps import Deps
from hero_deployer.operations import vm_operations
from hero_deployer.settings import VERSION, Settings
from hero_deployer.vm_reactor import RetryPolicy, VmReactor
from projections.follow import Checkpoints, Follower
from projections.runner import Projection, ProjectedEvents, ProjectionRunner, connect_views
from projections.vm_view import VmProjection, VmView


@dataclass(slots=True)
class App:
    """A running service: its dependencies and the parts tests and the CLI reach into."""

    settings: Settings
    deps: Deps
    store: SqliteEventStore
    views: ProjectionRunner
    backend: ComputeBackend
    reactor: VmReactor
    edge: ServiceEdge | None
    operations: list[Operation]


def PROJECTIONS() -> list[Projection]:
    """Every projection the views database holds, in the order they are applied."""
    return [VmProjection()]


def utc_now() -> datetime:
    return datetime.now(UTC)


async def _local_grid(settings: Settings, stack: AsyncExitStack) -> ComputeBackend:
    from adapters.localgrid import LocalGrid

    grid = LocalGrid(
        data_dir=settings.data_dir,
        deploy_delay=settings.local_deploy_delay,
        action_delay=settings.local_action_delay,
        ssh=settings.local_ssh,
    )
    return cast(ComputeBackend, await stack.enter_async_context(grid))


@asynccontextmanager
async def bootstrap(
    settings: Settings,
    nc: Client | None,
    *,
    compute: ComputeBackend | None = None,
    retry: RetryPolicy | None = None,
) -> AsyncIterator[App]:
    """Builds and starts the service; with `nc` None nothing is served or published."""
    data_dir = settings.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    async with AsyncExitStack() as stack:
        backend = compute if compute is not None else await _local_grid(settings, stack)
        store = await stack.enter_async_context(
            SqliteEventStore(
                data_dir / "events.db", synchronous=cast(Synchronous, settings.synchronous)
            )
        )
        views_db = data_dir / "views.db"
        views_conn = await connect_views(views_db)
        stack.push_async_callback(views_conn.close)
        query_conn = await connect_views(views_db)
        stack.push_async_callback(query_conn.close)
        checkpoint_conn = await connect_views(views_db)
        stack.push_async_callback(checkpoint_conn.close)

        runner = await stack.enter_async_context(ProjectionRunner(store, views_conn, PROJECTIONS()))
        key = load_or_create_key(
            data_dir / "fingerprint.key", os.environ.get("HERO_DEPLOYER_FINGERPRINT_KEY")
        )
        deps = Deps(
            store=store,
            views=runner,
            vm_view=VmView(query_conn),
            vms=Aggregates[Vm](store, EventRegistry(VM_EVENT_TYPES), evolve),
            fingerprint=Fingerprinter(key),
            clock=utc_now,
            version=VERSION,
            require_secret=settings.require_secret,
        )

        async def load_vm(sid: str) -> Vm | None:
            vm, _ = await deps.vms.load(vm_stream(sid))
            return vm

        async def record(command: OutcomeCommand, request_id: str) -> None:
            await vm_handlers.record_outcome(deps, command, request_id)

        reactor = VmReactor(backend, load_vm, record, retry=retry)
        checkpoints = Checkpoints(checkpoint_conn)
        stack.push_async_callback(reactor.close)
        await stack.enter_async_context(Follower(store, checkpoints, reactor))

        operations = vm_operations(deps)
        edge: ServiceEdge | None = None
        if nc is not None:
            await stack.enter_async_context(
                Follower(
                    ProjectedEvents(store, runner),
                    checkpoints,
                    StatusPublisher(nc, settings.prefix),
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
            edge=edge,
            operations=operations,
        )
