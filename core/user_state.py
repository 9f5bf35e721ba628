"""The User aggregate's state and its pure `evolve`: what a user's events made of it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from types import MappingProxyType
from typing import Any, Final

import msgspec
from msgspec.structs import replace

from core.contract import STEPS, DecommissionPart, Step, UserOut, UserStatus
from core.events import Event
from core.structs import Frozen, from_fields
from core.user_events import (
    DecommissionActionFailed,
    ForgeUserEnsured,
    GatewayDeployed,
    HealthVerified,
    ManifestUploaded,
    NodeSelected,
    ProvisioningRequested,
    ProvisioningResumed,
    SetupCompleted,
    SshKeyGenerated,
    StepFailed,
    UserVmDeleted,
    UserVmDeployed,
    UserVmDeployRequested,
)

WEB_PORT: Final = 9988


class User(Frozen):
    """The user as its events made it: the contract's User plus what the process manager needs."""

    username: str
    display_name: str
    forge_email: str
    profile: str
    status: UserStatus
    step: Step
    attempt: int
    error: str = ""
    # forge_user
    forge_user_id: int | None = None
    forge_user_created: bool = False
    forge_skipped_reason: str = ""
    initial_password_available: bool = False
    # ssh_key, select_node and the VM
    ssh_public_key: str = ""
    node_id: int | None = None
    gateway_domain: str = ""
    vm_sid: str = ""
    replaced_vm_sids: tuple[str, ...] = ()
    vm_deployed: bool = False
    mycelium_ip: str = ""
    ssh_host: str = ""
    ssh_port: int = 22
    # deploy_gateway and later
    gateway_name: str = ""
    gateway_fqdn: str = ""
    gateway_url: str = ""
    manifest_path: str = ""
    manifest_sha256: str = ""
    setup_exit_status: int | None = None
    setup_output_tail: str = ""
    health_status: int | None = None
    # the current step's progress
    step_tries: int = 0
    step_started_at: datetime
    step_started: dict[Step, datetime] = msgspec.field(default_factory=dict)
    step_finished: dict[Step, datetime] = msgspec.field(default_factory=dict)
    # decommission progress
    gateway_deleted: bool = False
    deleted_vm_sids: tuple[str, ...] = ()
    decommission_failures: int = 0
    created_at: datetime
    updated_at: datetime

    @property
    def all_vm_sids(self) -> tuple[str, ...]:
        """Every VM requested in this run: the replaced ones first, then the current one."""
        return (*self.replaced_vm_sids, self.vm_sid) if self.vm_sid else self.replaced_vm_sids

    def public(self) -> UserOut:
        return from_fields(UserOut, self)


def next_step(step: Step) -> Step:
    """The step after `step`; `done` stays `done`."""
    index = STEPS.index(step)
    return STEPS[min(index + 1, len(STEPS) - 1)]


def vm_name_for(username: str) -> str:
    """The VM's name for the user, within the VM name rule."""
    return f"user-{username}"


def backend_url_for(mycelium_ip: str) -> str:
    """Where the gateway forwards to: the VM's web service on WEB_PORT."""
    host = f"[{mycelium_ip}]" if ":" in mycelium_ip else mycelium_ip
    return f"http://{host}:{WEB_PORT}"


def pending_decommission(user: User) -> tuple[DecommissionPart, ...]:
    """The parts of taking the user down still to do, in order; `finish` is always last."""
    pending: list[DecommissionPart] = []
    if user.node_id is not None and not user.gateway_deleted:
        pending.append(DecommissionPart.DELETE_GATEWAY)
    if any(sid not in user.deleted_vm_sids for sid in user.all_vm_sids):
        pending.append(DecommissionPart.DELETE_VM)
    pending.append(DecommissionPart.FINISH)
    return tuple(pending)


# evolve -------------------------------------------------------------------------------------


def evolve(user: User | None, event: Event) -> User | None:
    """Folds one event into the state. Pure, total, never raises.

    Dispatched on the event's name (its tag) through a read-only table; events of other
    kinds leave the user as it is.
    """
    if isinstance(event, ProvisioningRequested):
        return _requested(user, event)
    if user is None:
        return None
    step = _STEPS.get(type(event).__name__)
    if step is None:
        return user
    at: datetime = getattr(event, "at", user.updated_at)
    return step(user, event, at)


def _resumed(user: User, event: ProvisioningResumed, at: datetime) -> User:
    return _enter(
        replace(user, status="provisioning", error="", updated_at=at), event.from_step, at
    )


def _forge_user(user: User, event: ForgeUserEnsured, at: datetime) -> User:
    user = replace(
        user,
        forge_user_id=event.forge_user_id,
        forge_user_created=user.forge_user_created or event.created,
        forge_skipped_reason=event.skipped_reason,
        initial_password_available=user.initial_password_available or event.created,
    )
    return _advance(user, Step.FORGE_USER, at)


def _ssh_key(user: User, event: SshKeyGenerated, at: datetime) -> User:
    return _advance(replace(user, ssh_public_key=event.public_key), Step.SSH_KEY, at)


def _node(user: User, event: NodeSelected, at: datetime) -> User:
    user = replace(user, node_id=event.node_id, gateway_domain=event.gateway_domain)
    return _advance(user, Step.SELECT_NODE, at)


def _vm_requested(user: User, event: UserVmDeployRequested, at: datetime) -> User:
    replaced = user.replaced_vm_sids
    if user.vm_sid and user.vm_sid != event.vm_sid and user.vm_sid not in replaced:
        replaced = (*replaced, user.vm_sid)
    return replace(user, vm_sid=event.vm_sid, replaced_vm_sids=replaced, updated_at=at)


def _vm_deployed(user: User, event: UserVmDeployed, at: datetime) -> User:
    user = replace(
        user,
        vm_sid=event.vm_sid,
        vm_deployed=True,
        mycelium_ip=event.mycelium_ip,
        ssh_host=event.ssh_host,
        ssh_port=event.ssh_port,
    )
    return _advance(user, Step.DEPLOY_VM, at)


def _gateway(user: User, event: GatewayDeployed, at: datetime) -> User:
    user = replace(user, gateway_name=event.name, gateway_fqdn=event.fqdn, gateway_url=event.url)
    return _advance(user, Step.DEPLOY_GATEWAY, at)


def _manifest(user: User, event: ManifestUploaded, at: datetime) -> User:
    user = replace(user, manifest_path=event.path, manifest_sha256=event.sha256)
    return _advance(user, Step.UPLOAD_MANIFEST, at)


def _setup(user: User, event: SetupCompleted, at: datetime) -> User:
    user = replace(user, setup_exit_status=event.exit_status, setup_output_tail=event.output_tail)
    if event.exit_status != 0:
        return replace(user, updated_at=at)
    return _advance(user, Step.RUN_SETUP, at)


def _health(user: User, event: HealthVerified, at: datetime) -> User:
    return _advance(replace(user, health_status=event.status_code), Step.VERIFY_HEALTH, at)


def _step_failed(user: User, event: StepFailed, at: datetime) -> User:
    return replace(
        user,
        status="failed",
        step=event.step,
        error=f"{event.step}: {event.reason}",
        step_tries=event.attempts,
        updated_at=at,
    )


def _decommission_requested(user: User, event: Event, at: datetime) -> User:
    return replace(
        user,
        status="decommissioning",
        error="",
        gateway_deleted=False,
        deleted_vm_sids=(),
        decommission_failures=0,
        updated_at=at,
    )


def _vm_deleted(user: User, event: UserVmDeleted, at: datetime) -> User:
    deleted = user.deleted_vm_sids
    if event.vm_sid not in deleted:
        deleted = (*deleted, event.vm_sid)
    return replace(user, deleted_vm_sids=deleted, updated_at=at)


def _decommission_failed(user: User, event: DecommissionActionFailed, at: datetime) -> User:
    error = f"decommission {event.part}: {event.reason}"
    return replace(user, decommission_failures=event.attempts, error=error, updated_at=at)


_Step = Callable[[User, Any, datetime], User]

_STEPS: Final[Mapping[str, _Step]] = MappingProxyType(
    {
        "ProvisioningResumed": _resumed,
        "ForgeUserEnsured": _forge_user,
        "SshKeyGenerated": _ssh_key,
        "NodeSelected": _node,
        "UserVmDeployRequested": _vm_requested,
        "UserVmDeployed": _vm_deployed,
        "GatewayDeployed": _gateway,
        "SshReachable": lambda user, event, at: _advance(user, Step.WAIT_SSH, at),
        "ManifestUploaded": _manifest,
        "SetupCompleted": _setup,
        "HealthVerified": _health,
        "ProvisioningCompleted": lambda user, event, at: replace(
            user, status="ready", step=Step.DONE, error="", updated_at=at
        ),
        "StepRetried": lambda user, event, at: replace(
            user, step_tries=event.attempt, updated_at=at
        ),
        "StepFailed": _step_failed,
        "DecommissionRequested": _decommission_requested,
        "GatewayDeleted": lambda user, event, at: replace(
            user, gateway_deleted=True, updated_at=at
        ),
        "UserVmDeleted": _vm_deleted,
        "DecommissionActionFailed": _decommission_failed,
        "UserDecommissioned": lambda user, event, at: replace(
            user, status="decommissioned", error="", updated_at=at
        ),
        "InitialPasswordRevealed": lambda user, event, at: replace(
            user, initial_password_available=False, updated_at=at
        ),
    }
)
"""Event name → its step (ProvisioningRequested aside); read only."""


def _requested(user: User | None, event: ProvisioningRequested) -> User:
    """A fresh run; a decommissioned user keeps its creation time and its Forge facts."""
    at = event.at
    return from_fields(
        User,
        event,
        status="provisioning",
        step=Step.FORGE_USER,
        forge_user_id=user.forge_user_id if user else None,
        forge_user_created=user.forge_user_created if user else False,
        initial_password_available=user.initial_password_available if user else False,
        step_started_at=at,
        step_started={Step.FORGE_USER: at},
        created_at=user.created_at if user else at,
        updated_at=at,
    )


def _enter(user: User, step: Step, at: datetime) -> User:
    """Makes `step` the current one, started at `at`, with no failed tries."""
    return msgspec.structs.replace(
        user,
        step=step,
        step_tries=0,
        step_started_at=at,
        step_started={**user.step_started, step: at},
        updated_at=at,
    )


def _advance(user: User, done: Step, at: datetime) -> User:
    """Marks `done` finished and enters the step after it, if `done` is the current step."""
    if user.step != done:
        return msgspec.structs.replace(user, updated_at=at)
    finished = msgspec.structs.replace(user, step_finished={**user.step_finished, done: at})
    return _enter(finished, next_step(done), at)


def fold(events: list[Event]) -> User | None:
    """The state after all of `events`, in order."""
    user: User | None = None
    for event in events:
        user = evolve(user, event)
    return user
