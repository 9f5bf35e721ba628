"""The server side of the registry: each request type's handler, bound to the service's deps."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Final

import msgspec

from core import contract as c
from core.contract import AuditEvent, AuditPage, Empty, EventsPage, EventsRequest, Health
from core.events import RecordedEvent
from core.operations import Operation, RequestMeta
from core.registry import OPERATIONS, Op
from core.structs import from_fields
from hero_deployer import VERSION
from hero_deployer.app import user_handlers, vm_handlers
from hero_deployer.app.commands import consistent_views
from hero_deployer.app.deps import Deps
from projections.runner import ProjectedEvents

_encoder = msgspec.json.Encoder()


async def _page(request: EventsRequest, deps: Deps) -> tuple[list[RecordedEvent], int]:
    """Events the views already reflect, so a reader can query what it has just seen."""
    await consistent_views(deps)
    projected = ProjectedEvents(deps.store, deps.views)
    recorded = await projected.read_all(request.after, request.limit, request.stream)
    return recorded, recorded[-1].position if recorded else request.after


async def event_page(request: EventsRequest, meta: RequestMeta, deps: Deps) -> bytes:
    """A page of the contract's events."""
    recorded, last = await _page(request, deps)
    return _encoder.encode(EventsPage(events=[r.wire() for r in recorded], last=last))


async def audit_page(request: EventsRequest, meta: RequestMeta, deps: Deps) -> bytes:
    """A page of events with the request id and the actor of the command behind each."""
    recorded, last = await _page(request, deps)
    rows = [from_fields(AuditEvent, r, data=msgspec.Raw(r.data)) for r in recorded]
    return _encoder.encode(AuditPage(events=rows, last=last))


async def service_health(request: Empty, meta: RequestMeta, deps: Deps) -> bytes:
    """The contract's fields, and the events the publisher set aside since this process started."""
    return _encoder.encode(
        Health(
            status="ok",
            version=VERSION,
            position=deps.store.position,
            head_hash=deps.store.head_hash,
            events_set_aside=deps.set_aside.count,
            last_set_aside_position=deps.set_aside.last_position,
            parts=list(deps.parts),
        )
    )


# Each request type's handler; the registry gives its name and nature
HANDLERS: Final[
    dict[type[msgspec.Struct], Callable[[Any, RequestMeta, Deps], Awaitable[bytes]]]
] = {
    c.DeployVm: vm_handlers.deploy,
    c.ListVms: vm_handlers.owned_vms,
    c.GetVm: vm_handlers.one_vm,
    c.StartVm: vm_handlers.vm_action,
    c.StopVm: vm_handlers.vm_action,
    c.RestartVm: vm_handlers.vm_action,
    c.DeleteVm: vm_handlers.vm_action,
    c.MigrateSecret: vm_handlers.migrate,
    c.ProvisionUser: user_handlers.user_command,
    c.DecommissionUser: user_handlers.user_command,
    c.GetUser: user_handlers.one_user,
    c.ListUsers: user_handlers.all_users,
    c.RevealInitialPassword: user_handlers.reveal_password,
    c.EventsRequest: event_page,
    c.AuditEventsRequest: audit_page,
    c.Empty: service_health,
}


def operations(deps: Deps) -> list[Operation]:
    """Every operation of the registry, bound to its handler and `deps`.

    Revealing the initial password changes state but takes no Idempotency-Key: a stored reply
    would keep the password, and a repeat is NotFound by design.
    """
    return [_bound(op, deps) for op in OPERATIONS]


def _bound(op: Op, deps: Deps) -> Operation:
    handler = HANDLERS[op.request]

    async def bound(command: Any, meta: RequestMeta) -> bytes:
        return await handler(command, meta, deps)

    return Operation(name=op.name, request=op.request, handler=bound, mutates=op.mutates)
