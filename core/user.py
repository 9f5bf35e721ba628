"""The User aggregate: its requests, events, state, the pure decide/evolve pair and next_action.

The provisioning process manager drives it: it asks `next_action` what to do, performs the side
effect through a port, and records the outcome with one of the `Record…` commands. Every finished
step is an event, so after a restart `next_action` names exactly the work still to do. Outcomes for
a step that is not the current one are ignored, so a re-delivered outcome records nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Final, Literal, TypedDict

import msgspec

from core.contract import (
    STEPS,
    DecommissionUser,
    ProvisionUser,
    RevealInitialPassword,
    Step,
    UserOut,
    UserStatus,
)
from core.errors import USER_NOT_FOUND, InvalidInput, InvalidState, NotFound
from core.events import Event
from core.gateway_names import gateway_name
from core.manifest import PROFILES

DecommissionPart = Literal["delete_gateway", "delete_vm", "finish"]

WEB_PORT: Final = 9988
REASON_MAX: Final = 1000
OUTPUT_TAIL_MAX: Final = 4000
PASSWORD_NOT_FOUND: Final = "initial password not found"  # noqa: S105  (a message)


# Commands the process manager sends when a side effect finishes ------------------------------


class RecordForgeUserEnsured(msgspec.Struct, frozen=True, kw_only=True):
    """The Forge account exists (or the step was skipped, with a reason)."""

    created: bool
    forge_user_id: int | None
    skipped_reason: str = ""
    token_name: str = ""


class RecordSshKeyGenerated(msgspec.Struct, frozen=True, kw_only=True):
    public_key: str


class RecordNodeSelected(msgspec.Struct, frozen=True, kw_only=True):
    node_id: int
    gateway_domain: str


class RecordUserVmDeployRequested(msgspec.Struct, frozen=True, kw_only=True):
    """The VM `vm_sid` was requested for the user; a different sid replaces a failed one."""

    vm_sid: str


class RecordUserVmDeployed(msgspec.Struct, frozen=True, kw_only=True):
    vm_sid: str
    mycelium_ip: str
    ssh_host: str
    ssh_port: int


class RecordGatewayDeployed(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    fqdn: str
    url: str


class RecordSshReachable(msgspec.Struct, frozen=True, kw_only=True):
    pass


class RecordManifestUploaded(msgspec.Struct, frozen=True, kw_only=True):
    path: str
    sha256: str


class RecordSetupCompleted(msgspec.Struct, frozen=True, kw_only=True):
    """The setup script ran; a nonzero exit status fails the step."""

    exit_status: int
    output_tail: str


class RecordHealthVerified(msgspec.Struct, frozen=True, kw_only=True):
    """The gateway's `/health` answered; anything but 200 fails the step."""

    status_code: int


class RecordStepRetried(msgspec.Struct, frozen=True, kw_only=True):
    """One try of `step` failed and another follows."""

    step: Step
    reason: str


class RecordStepFailed(msgspec.Struct, frozen=True, kw_only=True):
    """`step` ran out of tries or time: the user becomes `failed`."""

    step: Step
    reason: str


class RecordGatewayDeleted(msgspec.Struct, frozen=True, kw_only=True):
    name: str


class RecordUserVmDeleted(msgspec.Struct, frozen=True, kw_only=True):
    vm_sid: str


class RecordDecommissionFailed(msgspec.Struct, frozen=True, kw_only=True):
    """One decommission action failed; the user stays `decommissioning` and it is retried."""

    part: DecommissionPart
    reason: str


class RecordDecommissioned(msgspec.Struct, frozen=True, kw_only=True):
    pass


OperatorCommand = ProvisionUser | DecommissionUser | RevealInitialPassword
StepOutcome = (
    RecordForgeUserEnsured
    | RecordSshKeyGenerated
    | RecordNodeSelected
    | RecordUserVmDeployRequested
    | RecordUserVmDeployed
    | RecordGatewayDeployed
    | RecordSshReachable
    | RecordManifestUploaded
    | RecordSetupCompleted
    | RecordHealthVerified
)
DecommissionOutcome = (
    RecordGatewayDeleted | RecordUserVmDeleted | RecordDecommissionFailed | RecordDecommissioned
)
OutcomeCommand = StepOutcome | RecordStepRetried | RecordStepFailed | DecommissionOutcome
UserCommand = OperatorCommand | OutcomeCommand

OUTCOME_STEP: Final[dict[type[StepOutcome], Step]] = {
    RecordForgeUserEnsured: "forge_user",
    RecordSshKeyGenerated: "ssh_key",
    RecordNodeSelected: "select_node",
    RecordUserVmDeployRequested: "deploy_vm",
    RecordUserVmDeployed: "deploy_vm",
    RecordGatewayDeployed: "deploy_gateway",
    RecordSshReachable: "wait_ssh",
    RecordManifestUploaded: "upload_manifest",
    RecordSetupCompleted: "run_setup",
    RecordHealthVerified: "verify_health",
}


# Events: public facts only, never a password, a secret or a private key ----------------------


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

USER_EVENT_TYPES: tuple[type[Event], ...] = (
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


# State --------------------------------------------------------------------------------------


class User(msgspec.Struct, frozen=True, kw_only=True):
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
    # ssh_key, select_node, deploy_vm
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
        return UserOut(
            username=self.username,
            display_name=self.display_name,
            forge_email=self.forge_email,
            status=self.status,
            step=self.step,
            vm_sid=self.vm_sid,
            node_id=self.node_id,
            gateway_url=self.gateway_url,
            ssh_public_key=self.ssh_public_key,
            forge_user_created=self.forge_user_created,
            error=self.error,
            created_at=self.created_at,
            updated_at=self.updated_at,
        )


@dataclass(frozen=True, slots=True)
class Context:
    """What a decision needs from outside: the clock."""

    now: datetime


# Pure helpers -------------------------------------------------------------------------------


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


def _clip(text: str, limit: int = REASON_MAX) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _tail(text: str, limit: int = OUTPUT_TAIL_MAX) -> str:
    return text if len(text) <= limit else "…" + text[-(limit - 1) :]


# decide -------------------------------------------------------------------------------------


def require(user: User | None) -> User:
    """The user, or NotFound."""
    if user is None:
        raise NotFound(USER_NOT_FOUND)
    return user


def decide(user: User | None, command: UserCommand, ctx: Context) -> list[UserEvent]:
    """Returns the events a command causes, or raises a DomainError."""
    now = ctx.now
    match command:
        case ProvisionUser():
            return _decide_provision(user, command, now)
        case DecommissionUser():
            user = require(user)
            match user.status:
                case "ready" | "failed":
                    return [DecommissionRequested(username=user.username, at=now)]
                case "decommissioning":
                    return []
                case _:
                    raise InvalidState(f"cannot decommission a {user.status} user")
        case RevealInitialPassword():
            user = require(user)
            if not user.initial_password_available:
                raise NotFound(PASSWORD_NOT_FOUND)
            return [InitialPasswordRevealed(username=user.username, at=now)]
        case RecordStepRetried():
            user = require(user)
            if not _is_current(user, command.step):
                return []
            return [
                StepRetried(
                    username=user.username,
                    step=command.step,
                    attempt=user.step_tries + 1,
                    reason=_clip(command.reason),
                    at=now,
                )
            ]
        case RecordStepFailed():
            user = require(user)
            if not _is_current(user, command.step):
                return []
            return [_failed(user, command.reason, now)]
        case (
            RecordGatewayDeleted()
            | RecordUserVmDeleted()
            | RecordDecommissionFailed()
            | RecordDecommissioned()
        ):
            return _decide_decommission(require(user), command, now)
        case _:
            user = require(user)
            if not _is_current(user, OUTCOME_STEP[type(command)]):
                return []
            return _decide_step(user, command, now)


def _decide_provision(user: User | None, command: ProvisionUser, now: datetime) -> list[UserEvent]:
    if command.profile not in PROFILES:
        known = ", ".join(sorted(PROFILES))
        raise InvalidInput(f"unknown profile {command.profile!r} (known: {known}) - at `$.profile`")
    if user is None or user.status == "decommissioned":
        return [
            ProvisioningRequested(
                username=command.username,
                display_name=command.display_name,
                forge_email=command.forge_email,
                profile=command.profile,
                attempt=1 if user is None else user.attempt + 1,
                at=now,
            )
        ]
    match user.status:
        case "failed":
            return [ProvisioningResumed(username=user.username, from_step=user.step, at=now)]
        case "provisioning":
            return []
        case _:
            raise InvalidState(f"cannot provision a {user.status} user")


def _is_current(user: User, step: Step) -> bool:
    return user.status == "provisioning" and user.step == step


def _failed(user: User, reason: str, now: datetime) -> StepFailed:
    return StepFailed(
        username=user.username,
        step=user.step,
        reason=_clip(reason),
        attempts=user.step_tries + 1,
        at=now,
    )


def _decide_step(user: User, command: StepOutcome, now: datetime) -> list[UserEvent]:
    name = user.username
    match command:
        case RecordForgeUserEnsured():
            return [
                ForgeUserEnsured(
                    username=name,
                    created=command.created,
                    forge_user_id=command.forge_user_id,
                    skipped_reason=_clip(command.skipped_reason),
                    token_name=command.token_name,
                    at=now,
                )
            ]
        case RecordSshKeyGenerated():
            return [SshKeyGenerated(username=name, public_key=command.public_key, at=now)]
        case RecordNodeSelected():
            return [
                NodeSelected(
                    username=name,
                    node_id=command.node_id,
                    gateway_domain=command.gateway_domain,
                    at=now,
                )
            ]
        case RecordUserVmDeployRequested():
            if user.vm_sid == command.vm_sid or command.vm_sid in user.replaced_vm_sids:
                return []
            return [UserVmDeployRequested(username=name, vm_sid=command.vm_sid, at=now)]
        case RecordUserVmDeployed():
            if command.vm_sid != user.vm_sid:
                return []
            return [
                UserVmDeployed(
                    username=name,
                    vm_sid=command.vm_sid,
                    mycelium_ip=command.mycelium_ip,
                    ssh_host=command.ssh_host,
                    ssh_port=command.ssh_port,
                    at=now,
                )
            ]
        case RecordGatewayDeployed():
            return [
                GatewayDeployed(
                    username=name, name=command.name, fqdn=command.fqdn, url=command.url, at=now
                )
            ]
        case RecordSshReachable():
            return [SshReachable(username=name, at=now)]
        case RecordManifestUploaded():
            return [
                ManifestUploaded(username=name, path=command.path, sha256=command.sha256, at=now)
            ]
        case RecordSetupCompleted():
            completed = SetupCompleted(
                username=name,
                exit_status=command.exit_status,
                output_tail=_tail(command.output_tail),
                at=now,
            )
            if command.exit_status == 0:
                return [completed]
            reason = f"setup exited with status {command.exit_status}"
            return [completed, _failed(user, reason, now)]
        case RecordHealthVerified():
            if command.status_code != 200:
                return [_failed(user, f"health check answered {command.status_code}", now)]
            return [
                HealthVerified(username=name, status_code=command.status_code, at=now),
                ProvisioningCompleted(username=name, at=now),
            ]


def _decide_decommission(
    user: User, command: DecommissionOutcome, now: datetime
) -> list[UserEvent]:
    if user.status != "decommissioning":
        return []
    name = user.username
    pending = _pending_decommission(user)
    match command:
        case RecordGatewayDeleted():
            if "delete_gateway" not in pending:
                return []
            return [GatewayDeleted(username=name, name=command.name, at=now)]
        case RecordUserVmDeleted():
            if command.vm_sid not in user.all_vm_sids or command.vm_sid in user.deleted_vm_sids:
                return []
            return [UserVmDeleted(username=name, vm_sid=command.vm_sid, at=now)]
        case RecordDecommissionFailed():
            return [
                DecommissionActionFailed(
                    username=name,
                    part=command.part,
                    reason=_clip(command.reason),
                    attempts=user.decommission_failures + 1,
                    at=now,
                )
            ]
        case RecordDecommissioned():
            if pending != ("finish",):
                raise InvalidState(f"cannot finish decommissioning: {', '.join(pending)} pending")
            return [UserDecommissioned(username=name, at=now)]


def _pending_decommission(user: User) -> tuple[DecommissionPart, ...]:
    pending: list[DecommissionPart] = []
    if user.node_id is not None and not user.gateway_deleted:
        pending.append("delete_gateway")
    if any(sid not in user.deleted_vm_sids for sid in user.all_vm_sids):
        pending.append("delete_vm")
    pending.append("finish")
    return tuple(pending)


# next_action --------------------------------------------------------------------------------


class Action(msgspec.Struct, frozen=True, kw_only=True):
    """Work the process manager must do now for one user."""

    username: str


class StepAction(Action, frozen=True, kw_only=True):
    """Run one provisioning step; `tries` failed already, the step began at `started_at`."""

    step: Step
    attempt: int
    tries: int
    started_at: datetime


class EnsureForgeUser(StepAction, frozen=True, kw_only=True):
    """Find or create the Forge account, then its access token; seal a new password first."""

    display_name: str
    forge_email: str


class GenerateSshKey(StepAction, frozen=True, kw_only=True):
    """Make an ED25519 key pair, seal the private key, record the public one."""


class SelectNode(StepAction, frozen=True, kw_only=True):
    """Pick the candidate node with the most headroom that is up and gateway-capable."""


class DeployUserVm(StepAction, frozen=True, kw_only=True):
    """Request the VM (`vm_sid` empty: pick a sid, record it with the VM's deploy) or await it."""

    vm_sid: str
    vm_name: str
    node_id: int
    ssh_public_key: str


class DeployGateway(StepAction, frozen=True, kw_only=True):
    """Deploy the gateway `name` on the node, forwarding to `backend_url`."""

    name: str
    node_id: int
    gateway_domain: str
    vm_sid: str
    mycelium_ip: str
    backend_url: str


class WaitSsh(StepAction, frozen=True, kw_only=True):
    """Poll until the VM accepts SSH with the user's key."""

    ssh_host: str
    ssh_port: int


class UploadManifest(StepAction, frozen=True, kw_only=True):
    """Render the profile's services.toml and upload it over SFTP."""

    profile: str
    gateway_url: str
    ssh_host: str
    ssh_port: int


class RunSetup(StepAction, frozen=True, kw_only=True):
    """Run the setup script over SSH."""

    ssh_host: str
    ssh_port: int


class VerifyHealth(StepAction, frozen=True, kw_only=True):
    """GET `<gateway_url>/health` until it answers 200."""

    gateway_url: str


class DecommissionAction(Action, frozen=True, kw_only=True):
    """One part of taking the user down; `failures` counts failed decommission actions so far."""

    part: DecommissionPart
    failures: int


class DeleteGateway(DecommissionAction, frozen=True, kw_only=True):
    """Delete the gateway `name`; one already gone counts as deleted."""

    name: str


class DeleteUserVm(DecommissionAction, frozen=True, kw_only=True):
    """Delete the VM `vm_sid` through the VM commands; one already gone counts as deleted."""

    vm_sid: str


class FinishDecommission(DecommissionAction, frozen=True, kw_only=True):
    """Destroy the user's sealed key and VM secret, then record RecordDecommissioned."""


ProvisioningAction = (
    EnsureForgeUser
    | GenerateSshKey
    | SelectNode
    | DeployUserVm
    | DeployGateway
    | WaitSsh
    | UploadManifest
    | RunSetup
    | VerifyHealth
)
DecommissioningAction = DeleteGateway | DeleteUserVm | FinishDecommission
UserAction = ProvisioningAction | DecommissioningAction


def next_action(user: User | None) -> UserAction | None:
    """What the process manager must do now, or None when nothing is pending."""
    if user is None:
        return None
    match user.status:
        case "provisioning":
            return _step_action(user)
        case "decommissioning":
            return _decommission_action(user)
        case _:
            return None


class _StepFields(TypedDict):
    username: str
    step: Step
    attempt: int
    tries: int
    started_at: datetime


class _SshFields(TypedDict):
    ssh_host: str
    ssh_port: int


def _step_action(user: User) -> ProvisioningAction | None:
    base = _StepFields(
        username=user.username,
        step=user.step,
        attempt=user.attempt,
        tries=user.step_tries,
        started_at=user.step_started_at,
    )
    ssh = _SshFields(ssh_host=user.ssh_host, ssh_port=user.ssh_port)
    match user.step:
        case "forge_user":
            return EnsureForgeUser(
                **base, display_name=user.display_name, forge_email=user.forge_email
            )
        case "ssh_key":
            return GenerateSshKey(**base)
        case "select_node":
            return SelectNode(**base)
        case "deploy_vm":
            return DeployUserVm(
                **base,
                vm_sid=user.vm_sid,
                vm_name=vm_name_for(user.username),
                node_id=user.node_id or 0,
                ssh_public_key=user.ssh_public_key,
            )
        case "deploy_gateway":
            return DeployGateway(
                **base,
                name=gateway_name(user.username),
                node_id=user.node_id or 0,
                gateway_domain=user.gateway_domain,
                vm_sid=user.vm_sid,
                mycelium_ip=user.mycelium_ip,
                backend_url=backend_url_for(user.mycelium_ip),
            )
        case "wait_ssh":
            return WaitSsh(**base, **ssh)
        case "upload_manifest":
            return UploadManifest(**base, **ssh, profile=user.profile, gateway_url=user.gateway_url)
        case "run_setup":
            return RunSetup(**base, **ssh)
        case "verify_health":
            return VerifyHealth(**base, gateway_url=user.gateway_url)
        case "done":
            return None


def _decommission_action(user: User) -> DecommissioningAction:
    name, failures = user.username, user.decommission_failures
    match _pending_decommission(user)[0]:
        case "delete_gateway":
            return DeleteGateway(
                username=name,
                part="delete_gateway",
                failures=failures,
                name=user.gateway_name or gateway_name(name),
            )
        case "delete_vm":
            sid = next(s for s in user.all_vm_sids if s not in user.deleted_vm_sids)
            return DeleteUserVm(username=name, part="delete_vm", failures=failures, vm_sid=sid)
        case "finish":
            return FinishDecommission(username=name, part="finish", failures=failures)


# evolve -------------------------------------------------------------------------------------


def evolve(user: User | None, event: Event) -> User | None:
    """Folds one event into the state. Pure, total, never raises."""
    if isinstance(event, ProvisioningRequested):
        return _requested(user, event)
    if user is None:
        return None
    replace = msgspec.structs.replace
    at: datetime = getattr(event, "at", user.updated_at)
    match event:
        case ProvisioningResumed():
            return _enter(
                replace(user, status="provisioning", error="", updated_at=at), event.from_step, at
            )
        case ForgeUserEnsured():
            user = replace(
                user,
                forge_user_id=event.forge_user_id,
                forge_user_created=user.forge_user_created or event.created,
                forge_skipped_reason=event.skipped_reason,
                initial_password_available=user.initial_password_available or event.created,
            )
            return _advance(user, "forge_user", at)
        case SshKeyGenerated():
            return _advance(replace(user, ssh_public_key=event.public_key), "ssh_key", at)
        case NodeSelected():
            user = replace(user, node_id=event.node_id, gateway_domain=event.gateway_domain)
            return _advance(user, "select_node", at)
        case UserVmDeployRequested():
            replaced = user.replaced_vm_sids
            if user.vm_sid and user.vm_sid != event.vm_sid and user.vm_sid not in replaced:
                replaced = (*replaced, user.vm_sid)
            return replace(user, vm_sid=event.vm_sid, replaced_vm_sids=replaced, updated_at=at)
        case UserVmDeployed():
            user = replace(
                user,
                vm_sid=event.vm_sid,
                vm_deployed=True,
                mycelium_ip=event.mycelium_ip,
                ssh_host=event.ssh_host,
                ssh_port=event.ssh_port,
            )
            return _advance(user, "deploy_vm", at)
        case GatewayDeployed():
            user = replace(
                user, gateway_name=event.name, gateway_fqdn=event.fqdn, gateway_url=event.url
            )
            return _advance(user, "deploy_gateway", at)
        case SshReachable():
            return _advance(user, "wait_ssh", at)
        case ManifestUploaded():
            user = replace(user, manifest_path=event.path, manifest_sha256=event.sha256)
            return _advance(user, "upload_manifest", at)
        case SetupCompleted():
            user = replace(
                user, setup_exit_status=event.exit_status, setup_output_tail=event.output_tail
            )
            if event.exit_status != 0:
                return replace(user, updated_at=at)
            return _advance(user, "run_setup", at)
        case HealthVerified():
            return _advance(replace(user, health_status=event.status_code), "verify_health", at)
        case ProvisioningCompleted():
            return replace(user, status="ready", step="done", error="", updated_at=at)
        case StepRetried():
            return replace(user, step_tries=event.attempt, updated_at=at)
        case StepFailed():
            return replace(
                user,
                status="failed",
                step=event.step,
                error=f"{event.step}: {event.reason}",
                step_tries=event.attempts,
                updated_at=at,
            )
        case DecommissionRequested():
            return replace(
                user,
                status="decommissioning",
                error="",
                gateway_deleted=False,
                deleted_vm_sids=(),
                decommission_failures=0,
                updated_at=at,
            )
        case GatewayDeleted():
            return replace(user, gateway_deleted=True, updated_at=at)
        case UserVmDeleted():
            deleted = user.deleted_vm_sids
            if event.vm_sid not in deleted:
                deleted = (*deleted, event.vm_sid)
            return replace(user, deleted_vm_sids=deleted, updated_at=at)
        case DecommissionActionFailed():
            return replace(
                user,
                decommission_failures=event.attempts,
                error=f"decommission {event.part}: {event.reason}",
                updated_at=at,
            )
        case UserDecommissioned():
            return replace(user, status="decommissioned", error="", updated_at=at)
        case InitialPasswordRevealed():
            return replace(user, initial_password_available=False, updated_at=at)
    return user


def _requested(user: User | None, event: ProvisioningRequested) -> User:
    """A fresh run; a decommissioned user keeps its creation time and its Forge facts."""
    at = event.at
    return User(
        username=event.username,
        display_name=event.display_name,
        forge_email=event.forge_email,
        profile=event.profile,
        status="provisioning",
        step="forge_user",
        attempt=event.attempt,
        forge_user_id=user.forge_user_id if user else None,
        forge_user_created=user.forge_user_created if user else False,
        initial_password_available=user.initial_password_available if user else False,
        step_started_at=at,
        step_started={"forge_user": at},
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
