"""The User aggregate's decisions: operator requests and the process manager's outcomes.

The provisioning process manager drives it: it asks `core.user_actions.next_action` what to do,
performs the side effect through a port, and records the outcome as the event it is (a
`ForgeUserEnsured`, a `SetupCompleted`, ...), which `decide` checks against the user's current
step and stamps with the user's name and the decision's time; a try that failed is recorded
with `RecordStepRetried` or `RecordStepFailed`. Outcomes for a step that is not the current one
are ignored, so a re-delivered outcome records nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Final

from msgspec.structs import replace

from core.contract import (
    DecommissionPart,
    DecommissionUser,
    ProvisionUser,
    RevealInitialPassword,
    Step,
)
from core.errors import USER_NOT_FOUND, InvalidInput, InvalidState, NotFound
from core.manifest import PROFILES
from core.structs import Frozen, from_fields
from core.user_events import (
    DecommissionActionFailed,
    DecommissionRequested,
    ForgeUserEnsured,
    GatewayDeleted,
    GatewayDeployed,
    HealthVerified,
    InitialPasswordRevealed,
    ManifestUploaded,
    NodeSelected,
    ProvisioningCompleted,
    ProvisioningRequested,
    ProvisioningResumed,
    SetupCompleted,
    SshKeyGenerated,
    SshReachable,
    StepFailed,
    StepOutcome,
    StepRetried,
    UserDecommissioned,
    UserEvent,
    UserVmDeleted,
    UserVmDeployed,
    UserVmDeployRequested,
)
from core.user_state import User, pending_decommission

REASON_MAX: Final = 1000
OUTPUT_TAIL_MAX: Final = 4000
PASSWORD_NOT_FOUND: Final = "initial password not found"  # noqa: S105  (a message)


# Commands the process manager sends when a try fails ----------------------------------------


class RecordStepRetried(Frozen):
    """One try of `step` failed and another follows."""

    step: Step
    reason: str


class RecordStepFailed(Frozen):
    """`step` ran out of tries or time: the user becomes `failed`."""

    step: Step
    reason: str


class RecordDecommissionFailed(Frozen):
    """One decommission action failed; the user stays `decommissioning` and it is retried."""

    part: DecommissionPart
    reason: str


OperatorCommand = ProvisionUser | DecommissionUser | RevealInitialPassword
DecommissionOutcome = GatewayDeleted | UserVmDeleted | RecordDecommissionFailed | UserDecommissioned
OutcomeCommand = StepOutcome | RecordStepRetried | RecordStepFailed | DecommissionOutcome
UserCommand = OperatorCommand | OutcomeCommand

OUTCOME_STEP: Final[dict[type[StepOutcome], Step]] = {
    ForgeUserEnsured: Step.FORGE_USER,
    SshKeyGenerated: Step.SSH_KEY,
    NodeSelected: Step.SELECT_NODE,
    UserVmDeployRequested: Step.DEPLOY_VM,
    UserVmDeployed: Step.DEPLOY_VM,
    GatewayDeployed: Step.DEPLOY_GATEWAY,
    SshReachable: Step.WAIT_SSH,
    ManifestUploaded: Step.UPLOAD_MANIFEST,
    SetupCompleted: Step.RUN_SETUP,
    HealthVerified: Step.VERIFY_HEALTH,
}
STEP_EVENTS: Final[dict[str, str]] = {
    t.__name__: step for t, step in OUTCOME_STEP.items() if t is not UserVmDeployRequested
}
"""The type of the event that finishes each provisioning step, and the step."""


@dataclass(frozen=True, slots=True)
class Context:
    """What a decision needs from outside: the clock."""

    now: datetime


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
        case RecordStepRetried() | RecordStepFailed():
            return _decide_failed_try(require(user), command, now)
        case GatewayDeleted() | UserVmDeleted() | RecordDecommissionFailed() | UserDecommissioned():
            return _decide_decommission(require(user), command, now)
        case _:
            user = require(user)
            if not _is_current(user, OUTCOME_STEP[type(command)]):
                return []
            return _decide_step(user, _stamped(command, user, now), now)


def _stamped(event: StepOutcome, user: User, now: datetime) -> StepOutcome:
    """The outcome as this user's event at the decision's time."""
    return replace(event, username=user.username, at=now)


def _decide_provision(user: User | None, command: ProvisionUser, now: datetime) -> list[UserEvent]:
    if command.profile not in PROFILES:
        known = ", ".join(sorted(PROFILES))
        raise InvalidInput(f"unknown profile {command.profile!r} (known: {known}) - at `$.profile`")
    if user is None or user.status == "decommissioned":
        attempt = 1 if user is None else user.attempt + 1
        return [from_fields(ProvisioningRequested, command, attempt=attempt, at=now)]
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


def _decide_failed_try(
    user: User, command: RecordStepRetried | RecordStepFailed, now: datetime
) -> list[UserEvent]:
    if not _is_current(user, command.step):
        return []
    if isinstance(command, RecordStepFailed):
        return [_failed(user, command.reason, now)]
    retried = StepRetried(
        username=user.username,
        step=command.step,
        attempt=user.step_tries + 1,
        reason=_clip(command.reason),
        at=now,
    )
    return [retried]


def _decide_step(user: User, event: StepOutcome, now: datetime) -> list[UserEvent]:
    """The events of the current step's outcome, already stamped for the user."""
    match event:
        case ForgeUserEnsured():
            return [replace(event, skipped_reason=_clip(event.skipped_reason))]
        case UserVmDeployRequested():
            if user.vm_sid == event.vm_sid or event.vm_sid in user.replaced_vm_sids:
                return []
            return [event]
        case UserVmDeployed():
            return [event] if event.vm_sid == user.vm_sid else []
        case SetupCompleted():
            completed = replace(event, output_tail=_tail(event.output_tail))
            if event.exit_status == 0:
                return [completed]
            return [completed, _failed(user, f"setup exited with status {event.exit_status}", now)]
        case HealthVerified():
            if event.status_code != 200:
                return [_failed(user, f"health check answered {event.status_code}", now)]
            return [event, ProvisioningCompleted(username=user.username, at=now)]
        case _:
            return [event]


def _decide_decommission(
    user: User, command: DecommissionOutcome, now: datetime
) -> list[UserEvent]:
    if user.status != "decommissioning":
        return []
    pending = pending_decommission(user)
    match command:
        case GatewayDeleted():
            if DecommissionPart.DELETE_GATEWAY not in pending:
                return []
            return [replace(command, username=user.username, at=now)]
        case UserVmDeleted():
            if command.vm_sid not in user.all_vm_sids or command.vm_sid in user.deleted_vm_sids:
                return []
            return [replace(command, username=user.username, at=now)]
        case RecordDecommissionFailed():
            return [
                DecommissionActionFailed(
                    username=user.username,
                    part=command.part,
                    reason=_clip(command.reason),
                    attempts=user.decommission_failures + 1,
                    at=now,
                )
            ]
        case UserDecommissioned():
            if pending != (DecommissionPart.FINISH,):
                raise InvalidState(f"cannot finish decommissioning: {', '.join(pending)} pending")
            return [replace(command, username=user.username, at=now)]
