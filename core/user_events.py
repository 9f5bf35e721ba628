"""The User aggregate's events: public facts only, never a password, a secret or a private key.

Each is tagged with its class name (`core.events.Event`); the process manager records the
outcome of a step as the event itself, which `core.user.decide` checks against the user.
"""

from __future__ import annotations

from datetime import datetime
from typing import get_args

from core.contract import DecommissionPart, Step
from core.events import Event


class UserEventBase(Event):
    """Base of every user event: the user's name, first in the stored JSON as base fields are."""

    username: str


class ProvisioningRequested(UserEventBase):
    display_name: str
    forge_email: str
    profile: str
    attempt: int
    at: datetime


class ProvisioningResumed(UserEventBase):
    from_step: Step
    at: datetime


class ForgeUserEnsured(UserEventBase):
    created: bool
    forge_user_id: int | None
    skipped_reason: str = ""
    token_name: str = ""
    at: datetime


class SshKeyGenerated(UserEventBase):
    public_key: str
    at: datetime


class NodeSelected(UserEventBase):
    node_id: int
    gateway_domain: str
    at: datetime


class UserVmDeployRequested(UserEventBase):
    vm_sid: str
    at: datetime


class UserVmDeployed(UserEventBase):
    vm_sid: str
    mycelium_ip: str
    ssh_host: str
    ssh_port: int
    at: datetime


class GatewayDeployed(UserEventBase):
    name: str
    fqdn: str
    url: str
    at: datetime


class SshReachable(UserEventBase):
    at: datetime


class ManifestUploaded(UserEventBase):
    path: str
    sha256: str
    at: datetime


class SetupCompleted(UserEventBase):
    exit_status: int
    output_tail: str
    at: datetime


class HealthVerified(UserEventBase):
    status_code: int
    at: datetime


class ProvisioningCompleted(UserEventBase):
    at: datetime


class StepRetried(UserEventBase):
    step: Step
    attempt: int
    reason: str
    at: datetime


class StepFailed(UserEventBase):
    step: Step
    reason: str
    attempts: int
    at: datetime


class DecommissionRequested(UserEventBase):
    at: datetime


class GatewayDeleted(UserEventBase):
    name: str
    at: datetime


class UserVmDeleted(UserEventBase):
    vm_sid: str
    at: datetime


class DecommissionActionFailed(UserEventBase):
    part: DecommissionPart
    reason: str
    attempts: int
    at: datetime


class UserDecommissioned(UserEventBase):
    at: datetime


class InitialPasswordRevealed(UserEventBase):
    """The initial Forge password was handed out once; the event never holds it."""

    at: datetime


StepOutcome = (
    ForgeUserEnsured
    | SshKeyGenerated
    | NodeSelected
    | UserVmDeployRequested
    | UserVmDeployed
    | GatewayDeployed
    | SshReachable
    | ManifestUploaded
    | SetupCompleted
    | HealthVerified
)
"""What a provisioning step's side effect records (`core.user.decide` checks it first)."""

UserEvent = (
    ProvisioningRequested
    | ProvisioningResumed
    | StepOutcome
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

USER_EVENT_TYPES: tuple[type[Event], ...] = get_args(UserEvent)  # the members, in the union's order
