"""The VM aggregate's events, each tagged with its class name (`core.events.Event`)."""

from __future__ import annotations

from datetime import datetime

from core.events import Event


class VmDeployRequested(Event, frozen=True, kw_only=True):
    sid: str
    name: str
    owner: str
    image: str
    cpu_count: int
    memory_gb: int
    disk_gb: int
    rootfs_gb: int
    slice_sid: str = ""
    node_id: int | None = None
    at: datetime


class VmDeployed(Event, frozen=True, kw_only=True):
    sid: str
    node_id: int
    mycelium_ip: str
    at: datetime


class VmDeployFailed(Event, frozen=True, kw_only=True):
    sid: str
    error: str
    at: datetime


class VmStarted(Event, frozen=True, kw_only=True):
    sid: str
    at: datetime


class VmStopped(Event, frozen=True, kw_only=True):
    sid: str
    at: datetime


class VmRestarted(Event, frozen=True, kw_only=True):
    sid: str
    at: datetime


class VmDeleteRequested(Event, frozen=True, kw_only=True):
    sid: str
    at: datetime


class VmDeleted(Event, frozen=True, kw_only=True):
    sid: str
    at: datetime


class VmOperationFailed(Event, frozen=True, kw_only=True):
    sid: str
    operation: str
    error: str
    at: datetime


class VmSecretMigrated(Event, frozen=True, kw_only=True):
    sid: str
    owner: str
    at: datetime


VmEvent = (
    VmDeployRequested
    | VmDeployed
    | VmDeployFailed
    | VmStarted
    | VmStopped
    | VmRestarted
    | VmDeleteRequested
    | VmDeleted
    | VmOperationFailed
    | VmSecretMigrated
)

VM_EVENT_TYPES: tuple[type[Event], ...] = (
    VmDeployRequested,
    VmDeployed,
    VmDeployFailed,
    VmStarted,
    VmStopped,
    VmRestarted,
    VmDeleteRequested,
    VmDeleted,
    VmOperationFailed,
    VmSecretMigrated,
)
