"""The VM aggregate: its commands, events, state, and the pure decide/evolve pair."""

from __future__ import annotations

import hmac
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType
from typing import Any, Final

from msgspec.structs import replace

from core.contract import (
    DeleteVm,
    DeployVm,
    RestartVm,
    StartVm,
    StopVm,
    VmFields,
    VmOut,
    VmStatus,
)
from core.errors import VM_NOT_FOUND, InvalidState, NotFound
from core.events import Event
from core.ports import VmSpec
from core.structs import Frozen, from_fields
from core.vm_events import (
    VmDeleted,
    VmDeleteRequested,
    VmDeployed,
    VmDeployFailed,
    VmDeployRequested,
    VmEvent,
    VmOperationFailed,
    VmRestarted,
    VmSecretMigrated,
    VmStarted,
    VmStopped,
)

# Commands beside the tenant's: a migration's share of one VM, and side effects' outcomes ------


class RekeyVm(Frozen):
    """One VM's share of a secret migration: moves it from the caller's owner to a new one."""

    sid: str
    new_owner: str


TenantCommand = DeployVm | StartVm | StopVm | RestartVm | DeleteVm
OutcomeCommand = VmDeployed | VmDeployFailed | VmDeleted | VmOperationFailed
"""A side effect's outcome, recorded as the event it is; `decide` stamps it with its time."""
VmCommand = TenantCommand | OutcomeCommand | RekeyVm


# State --------------------------------------------------------------------------------------


class Vm(VmFields, gc=False):
    """The VM as its events made it; `owner` is the keyed fingerprint of its secret."""

    owner: str

    def public(self) -> VmOut:
        return from_fields(VmOut, self)


@dataclass(frozen=True, slots=True)
class Context:
    """What a decision needs from outside: the clock, the caller's owner, a fresh sid."""

    now: datetime
    owner: str = ""
    new_sid: str = ""


def owns(vm: Vm, owner: str) -> bool:
    """Compares owner fingerprints in constant time."""
    return hmac.compare_digest(vm.owner, owner)


def decide(vm: Vm | None, command: VmCommand, ctx: Context) -> list[VmEvent]:
    """Returns the events a command causes, or raises a DomainError."""
    now = ctx.now
    match command:
        case DeployVm():
            if vm is not None:
                raise InvalidState("vm already exists")
            # the request's name and sizes; never its secret (the event has no such field)
            fresh = {"sid": ctx.new_sid, "owner": ctx.owner, "at": now}
            return [from_fields(VmDeployRequested, command, **fresh)]
        case StartVm() | StopVm() | RestartVm() | DeleteVm():
            vm = _owned(vm, ctx.owner)
            if isinstance(command, DeleteVm) and vm.status == "deleting" and not vm.error:
                return []  # already on its way; after a failed attempt it is requested again
            return [_decide_tenant_action(vm, command, now)]
        case RekeyVm():
            vm = _owned(vm, ctx.owner)
            if vm.status == "deleted":
                raise InvalidState("cannot migrate a deleted vm")
            return [VmSecretMigrated(sid=vm.sid, owner=command.new_owner, at=now)]
        case _:
            return _decide_outcome(_existing(vm), command, now)


def _decide_outcome(vm: Vm, outcome: OutcomeCommand, now: datetime) -> list[VmEvent]:
    """The outcome at the decision's time; a late or repeated outcome records nothing."""
    match outcome:
        case VmDeployed() | VmDeployFailed():
            current = vm.status == "deploying"
        case VmDeleted():
            current = vm.status == "deleting"
        case VmOperationFailed():
            current = vm.status != "deleted"  # deleted is final
    return [replace(outcome, sid=vm.sid, at=now)] if current else []


def _decide_tenant_action(
    vm: Vm, command: StartVm | StopVm | RestartVm | DeleteVm, now: datetime
) -> VmEvent:
    status = vm.status
    match command:
        case StartVm():
            if status != "stopped":
                raise InvalidState(f"cannot start a {status} vm")
            return VmStarted(sid=vm.sid, at=now)
        case StopVm():
            if status != "running":
                raise InvalidState(f"cannot stop a {status} vm")
            return VmStopped(sid=vm.sid, at=now)
        case RestartVm():
            if status != "running":
                raise InvalidState(f"cannot restart a {status} vm")
            return VmRestarted(sid=vm.sid, at=now)
        case DeleteVm():
            if status == "deleted":
                raise InvalidState("cannot delete a deleted vm")
            return VmDeleteRequested(sid=vm.sid, at=now)


def _owned(vm: Vm | None, owner: str) -> Vm:
    """The VM if the owner matches; NotFound otherwise, the same as for a VM that is absent."""
    if vm is None or not owns(vm, owner):
        raise NotFound(VM_NOT_FOUND)
    return vm


def _existing(vm: Vm | None) -> Vm:
    if vm is None:
        raise NotFound(VM_NOT_FOUND)
    return vm


def evolve(vm: Vm | None, event: Event) -> Vm | None:
    """Folds one event into the state. Pure, total, never raises.

    Dispatched on the event's name (its tag, the log's `type`) through a read-only table
    rather than `match`: every class pattern is an `isinstance` check, and this is the inner
    loop of a rebuild (a million events). Events of other kinds change nothing.
    """
    return _STEPS.get(type(event).__name__, _unchanged)(vm, event)


def _deploy_requested(vm: Vm | None, event: VmDeployRequested) -> Vm | None:
    return from_fields(
        Vm,
        event,
        status="deploying",
        mycelium_ip="",
        error="",
        created_at=event.at,
        updated_at=event.at,
    )


def _deployed(vm: Vm | None, event: VmDeployed) -> Vm | None:
    if vm is None:
        return None
    status: VmStatus = "running" if vm.status == "deploying" else vm.status
    return replace(
        vm,
        status=status,
        node_id=event.node_id,
        mycelium_ip=event.mycelium_ip,
        error="",
        updated_at=event.at,
    )


def _deploy_failed(vm: Vm | None, event: VmDeployFailed) -> Vm | None:
    if vm is None:
        return None
    status: VmStatus = "failed" if vm.status == "deploying" else vm.status
    return replace(vm, status=status, error=event.error, updated_at=event.at)


def _running(vm: Vm | None, event: VmStarted | VmRestarted) -> Vm | None:
    if vm is None:
        return None
    return replace(vm, status="running", error="", updated_at=event.at)


def _stopped(vm: Vm | None, event: VmStopped) -> Vm | None:
    if vm is None:
        return None
    return replace(vm, status="stopped", error="", updated_at=event.at)


def _delete_requested(vm: Vm | None, event: VmDeleteRequested) -> Vm | None:
    if vm is None:
        return None
    return replace(vm, status="deleting", updated_at=event.at)


def _deleted(vm: Vm | None, event: VmDeleted) -> Vm | None:
    if vm is None:
        return None
    return replace(vm, status="deleted", updated_at=event.at)


def _operation_failed(vm: Vm | None, event: VmOperationFailed) -> Vm | None:
    if vm is None:
        return None
    return replace(vm, error=event.error, updated_at=event.at)


def _secret_migrated(vm: Vm | None, event: VmSecretMigrated) -> Vm | None:
    if vm is None:
        return None
    return replace(vm, owner=event.owner, updated_at=event.at)


def _unchanged(vm: Vm | None, event: Event) -> Vm | None:
    return vm


_Step = Callable[[Vm | None, Any], Vm | None]

_STEPS: Final[Mapping[str, _Step]] = MappingProxyType(
    {
        VmDeployRequested.__name__: _deploy_requested,
        VmDeployed.__name__: _deployed,
        VmDeployFailed.__name__: _deploy_failed,
        VmStarted.__name__: _running,
        VmRestarted.__name__: _running,
        VmStopped.__name__: _stopped,
        VmDeleteRequested.__name__: _delete_requested,
        VmDeleted.__name__: _deleted,
        VmOperationFailed.__name__: _operation_failed,
        VmSecretMigrated.__name__: _secret_migrated,
    }
)
"""Event name → its step; read only (`evolve` writes nothing)."""


def fold(events: list[Event]) -> Vm | None:
    """The state after all of `events`, in order."""
    vm: Vm | None = None
    for event in events:
        vm = evolve(vm, event)
    return vm


def vm_spec(vm: Vm | VmDeployRequested, ssh_keys: tuple[str, ...] = ()) -> VmSpec:
    """What to ask the backend for: the VM (or its deploy request) named by its sid."""
    return from_fields(VmSpec, vm, name=vm.sid, ssh_keys=ssh_keys)
