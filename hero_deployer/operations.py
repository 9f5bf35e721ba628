"""The contract's operations, each bound to its request type and handler."""

from __future__ import annotations

from typing import Any

import msgspec

from core.contract import (
    AuditEvent,
    AuditPage,
    DecommissionUser,
    DeleteVm,
    DeployVm,
    Empty,
    EventsPage,
    EventsRequest,
    GetUser,
    GetVm,
    Health,
    ListUsers,
    ListVms,
    MigrateSecret,
    ProvisionUser,
    RestartVm,
    RevealInitialPassword,
    StartVm,
    StopVm,
)
from core.events import RecordedEvent
from core.operations import Operation, RequestMeta
from hero_deployer import user_handlers, vm_handlers
from hero_deployer.commands import consistent_views
from hero_deployer.deps import Deps
from hero_deployer.settings import VERSION

_encoder = msgspec.json.Encoder()


async def _page(request: EventsRequest, deps: Deps) -> tuple[list[RecordedEvent], int]:
    """Events the views already reflect, so a reader can query what it has just seen."""
    await consistent_views(deps)
    ceiling = deps.views.position
    recorded: list[RecordedEvent] = []
    if request.after < ceiling:
        recorded = await deps.store.read_all(
            after=request.after, limit=request.limit, stream=request.stream
        )
        recorded = [r for r in recorded if r.position <= ceiling]
    return recorded, recorded[-1].position if recorded else request.after


async def events(request: EventsRequest, meta: RequestMeta, deps: Deps) -> bytes:
    """A page of the contract's events."""
    recorded, last = await _page(request, deps)
    return _encoder.encode(EventsPage(events=[r.wire() for r in recorded], last=last))


async def audit_events(request: EventsRequest, meta: RequestMeta, deps: Deps) -> bytes:
    """A page of events with the request id and the actor of the command behind each."""
    recorded, last = await _page(request, deps)
    rows = [
        AuditEvent(
            position=r.position,
            stream=r.stream,
            version=r.version,
            type=r.type,
            data=msgspec.Raw(r.data),
            recorded_at=r.recorded_at,
            request_id=r.request_id,
            actor=r.actor,
        )
        for r in recorded
    ]
    return _encoder.encode(AuditPage(events=rows, last=last))


async def health(request: Empty, meta: RequestMeta, deps: Deps) -> bytes:
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


def _bind(deps: Deps) -> Any:
    def op(name: str, request: type[msgspec.Struct], handler: Any, mutates: bool) -> Operation:
        async def bound(command: Any, meta: RequestMeta) -> bytes:
            result: bytes = await handler(command, meta, deps)
            return result

        return Operation(name=name, request=request, handler=bound, mutates=mutates)

    return op


def vm_operations(deps: Deps) -> list[Operation]:
    """The tenant VM API plus `events` and `health`."""
    op = _bind(deps)
    return [
        op("deploy_vm", DeployVm, vm_handlers.deploy_vm, True),
        op("list_vms", ListVms, vm_handlers.list_vms, False),
        op("get_vm", GetVm, vm_handlers.get_vm, False),
        op("start_vm", StartVm, vm_handlers.vm_action, True),
        op("stop_vm", StopVm, vm_handlers.vm_action, True),
        op("restart_vm", RestartVm, vm_handlers.vm_action, True),
        op("delete_vm", DeleteVm, vm_handlers.vm_action, True),
        op("migrate_secret", MigrateSecret, vm_handlers.migrate_secret, True),
        op("events", EventsRequest, events, False),
        op("audit_events", EventsRequest, audit_events, False),
        op("health", Empty, health, False),
    ]


def user_operations(deps: Deps) -> list[Operation]:
    """The operator user API.

    `reveal_initial_password` changes state but takes no Idempotency-Key: a stored reply would
    keep the password, and a repeat is NotFound by design.
    """
    op = _bind(deps)
    return [
        op("provision_user", ProvisionUser, user_handlers.provision_user, True),
        op("decommission_user", DecommissionUser, user_handlers.decommission_user, True),
        op("get_user", GetUser, user_handlers.get_user, False),
        op("list_users", ListUsers, user_handlers.list_users, False),
        op(
            "reveal_initial_password",
            RevealInitialPassword,
            user_handlers.reveal_initial_password,
            False,
        ),
    ]
