"""The VM aggregate's events, each tagged with its class name (`core.events.Event`)."""

from __future__ import annotations

from datetime import datetime
from typing import get_args

from core.events import Event


class VmEventBase(Event):
    """Base of every VM event: the VM's sid, first in the stored JSON as base fields are."""

    sid: str


class VmDeployRequested(VmEventBase):
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


class VmDeployed(VmEventBase):
    node_id: int
    mycelium_ip: str
    at: datetime


class VmDeployFailed(VmEventBase):
    error: str
    at: datetime


class VmStarted(VmEventBase):
    at: datetime


class VmStopped(VmEventBase):
    at: datetime


class VmRestarted(VmEventBase):
    at: datetime


class VmDeleteRequested(VmEventBase):
    at: datetime


class VmDeleted(VmEventBase):
    at: datetime


class VmOperationFailed(VmEventBase):
    operation: str
    error: str
    at: datetime


class VmSecretMigrated(VmEventBase):
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

VM_EVENT_TYPES: tuple[type[Event], ...] = get_args(VmEvent)  # the members, in the union's order
