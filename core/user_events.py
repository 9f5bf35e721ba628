"""The User aggregate's events: public facts only, never a password, a secret or a private key.

Each is tagged with its class name (`core.events.Event`); the process manager records the
outcome of a step as the event itself, which `core.user.decide` checks against the user.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from core.contract import Step
from core.events import Event

DecommissionPart = Literal["delete_gateway", "delete_vm", "finish"]


class ProvisioningRequested(Event, frozen=True, kw_only=True):
    username: str
    display_name: str
    forge_email: str
    profile: str
    attempt: int
    at: datetime


class ProvisioningResumed(Event, frozen=True, kw_only=True):
    username: str
    from_step: Step
    at: datetime


class ForgeUserEnsured(Event, frozen=True, kw_only=True):
    username: str
    created: bool
    forge_user_id: int | None
    skipped_reason: str = ""
    token_name: str = ""
    at: datetime


class SshKeyGenerated(Event, frozen=True, kw_only=True):
    username: str
    public_key: str
    at: datetime


class NodeSelected(Event, frozen=True, kw_only=True):
    username: str
    node_id: int
    gateway_domain: str
    at: datetime


class UserVmDeployRequested(Event, frozen=True, kw_only=True):
    username: str
    vm_sid: str
    at: datetime


class UserVmDeployed(Event, frozen=True, kw_only=True):
    username: str
    vm_sid: str
    mycelium_ip: str
    ssh_host: str
    ssh_port: int
    at: datetime


class GatewayDeployed(Event, frozen=True, kw_only=True):
    username: str
    name: str
    fqdn: str
    url: str
    at: datetime


class SshReachable(Event, frozen=True, kw_only=True):
    username: str
    at: datetime


class ManifestUploaded(Event, frozen=True, kw_only=True):
    username: str
    path: str
    sha256: str
    at: datetime


class SetupCompleted(Event, frozen=True, kw_only=True):
    username: str
    exit_status: int
    output_tail: str
    at: datetime


class HealthVerified(Event, frozen=True, kw_only=True):
    username: str
    status_code: int
    at: datetime


class ProvisioningCompleted(Event, frozen=True, kw_only=True):
    username: str
    at: datetime


class StepRetried(Event, frozen=True, kw_only=True):
    username: str
    step: Step
    attempt: int
    reason: str
    at: datetime


class StepFailed(Event, frozen=True, kw_only=True):
    username: str
    step: Step
    reason: str
    attempts: int
    at: datetime


class DecommissionRequested(Event, frozen=True, kw_only=True):
    username: str
    at: datetime


class GatewayDeleted(Event, frozen=True, kw_only=True):
    username: str
    name: str
    at: datetime


class UserVmDeleted(Event, frozen=True, kw_only=True):
    username: str
    vm_sid: str
    at: datetime


class DecommissionActionFailed(Event, frozen=True, kw_only=True):
    username: str
    part: DecommissionPart
    reason: str
    attempts: int
    at: datetime


class UserDecommissioned(Event, frozen=True, kw_only=True):
    username: str
    at: datetime


class InitialPasswordRevealed(Event, frozen=True, kw_only=True):
    """The initial Forge password was handed out once; the event never holds it."""

    username: str
    at: datetime


UserEvent = (
    ProvisioningRequested
    | ProvisioningResumed
    | ForgeUserEnsured
    | SshKeyGenerated
    | NodeSelected
    | UserVmDeployRequested
    | UserVmDeployed
    | GatewayDeployed
    | SshReachable
    | ManifestUploaded
    | SetupCompleted
    | HealthVerified
    | ProvisioningCompleted
    | StepRetried
    | StepFailed
    | DecommissionRequested
    | GatewayDeleted
    | UserVmDeleted
    | DecommissionActionFailed
    | UserDecommissioned
    | InitialPasswordRevealed
)

USER_EVENT_TYPES: tuple[type[Event], ...] = (  # the union's members, in its order
    ProvisioningRequested,
    ProvisioningResumed,
    ForgeUserEnsured,
    SshKeyGenerated,
    NodeSelected,
    UserVmDeployRequested,
    UserVmDeployed,
    GatewayDeployed,
    SshReachable,
    ManifestUploaded,
    SetupCompleted,
    HealthVerified,
    ProvisioningCompleted,
    StepRetried,
    StepFailed,
    DecommissionRequested,
    GatewayDeleted,
    UserVmDeleted,
    DecommissionActionFailed,
    UserDecommissioned,
    InitialPasswordRevealed,
)
