"""Given these events, when this command, then these events (or this error): the User aggregate."""

from __future__ import annotations

import re
from typing import Any

import msgspec
import pytest

from core import user_actions, user_events
from core.contract import (
    STEPS,
    DecommissionUser,
    GetUser,
    ListUsers,
    ProvisionUser,
    RevealInitialPassword,
    UserOut,
)
from core.errors import USER_NOT_FOUND, InvalidInput, InvalidState, NotFound
from core.events import Event
from core.gateway_names import gateway_name
from core.user import (
    PASSWORD_NOT_FOUND,
    STEP_EVENTS,
    Context,
    RecordDecommissionFailed,
    RecordStepFailed,
    RecordStepRetried,
    UserCommand,
    decide,
)
from core.user_actions import next_action
from core.user_state import User, evolve, fold
from tests.helpers import at

NAME = "alice"
PUBLIC_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIF alice"
GW_NAME = gateway_name(NAME)
GW_URL = f"https://{GW_NAME}.gw13.grid.test"


NOW = at(1000)
CTX = Context(now=NOW)


def when(given: list[Event], command: UserCommand) -> list[Event]:
    return list(decide(fold(given), command, CTX))


def state(events: list[Event]) -> User:
    user = fold(events)
    assert user is not None
    return user


# Histories ----------------------------------------------------------------------------------

REQUESTED = user_events.ProvisioningRequested(
    username=NAME,
    display_name="Alice",
    forge_email="alice@example.com",
    profile="demo",
    attempt=1,
    at=at(0),
)
TO_DEPLOY_VM: list[Event] = [
    REQUESTED,
    user_events.ForgeUserEnsured(
        username=NAME, created=True, forge_user_id=7, token_name="hero", at=at(1)
    ),
    user_events.SshKeyGenerated(username=NAME, public_key=PUBLIC_KEY, at=at(2)),
    user_events.NodeSelected(username=NAME, node_id=13, gateway_domain="gw13.grid.test", at=at(3)),
]
READY: list[Event] = [
    *TO_DEPLOY_VM,
    user_events.UserVmDeployRequested(username=NAME, vm_sid="vm_1", at=at(4)),
    user_events.UserVmDeployed(
        username=NAME,
        vm_sid="vm_1",
        mycelium_ip="5a1:2::1",
        ssh_host="127.0.0.1",
        ssh_port=2201,
        at=at(5),
    ),
    user_events.GatewayDeployed(
        username=NAME, name=GW_NAME, fqdn=f"{GW_NAME}.gw13.grid.test", url=GW_URL, at=at(6)
    ),
    user_events.SshReachable(username=NAME, at=at(7)),
    user_events.ManifestUploaded(
        username=NAME, path="hero/cfg/cockpit/services.toml", sha256="ab", at=at(8)
    ),
    user_events.SetupCompleted(username=NAME, exit_status=0, output_tail="ok", at=at(9)),
    user_events.HealthVerified(username=NAME, status_code=200, at=at(10)),
    user_events.ProvisioningCompleted(username=NAME, at=at(10)),
]
FAILED_AT_DEPLOY_VM: list[Event] = [
    *TO_DEPLOY_VM,
    user_events.UserVmDeployRequested(username=NAME, vm_sid="vm_1", at=at(4)),
    user_events.StepFailed(
        username=NAME, step="deploy_vm", reason="node down", attempts=3, at=at(5)
    ),
]
FAILED_AT_FORGE: list[Event] = [
    REQUESTED,
    user_events.StepFailed(
        username=NAME, step="forge_user", reason="forge: 503", attempts=1, at=at(1)
    ),
]
DECOMMISSIONING: list[Event] = [*READY, user_events.DecommissionRequested(username=NAME, at=at(20))]
DECOMMISSIONED: list[Event] = [
    *DECOMMISSIONING,
    user_events.GatewayDeleted(username=NAME, name=GW_NAME, at=at(21)),
    user_events.UserVmDeleted(username=NAME, vm_sid="vm_1", at=at(22)),
    user_events.UserDecommissioned(username=NAME, at=at(23)),
]

HISTORIES: dict[str, list[Event]] = {
    "absent": [],
    "provisioning": [REQUESTED],
    "ready": READY,
    "failed": FAILED_AT_DEPLOY_VM,
    "decommissioning": DECOMMISSIONING,
    "decommissioned": DECOMMISSIONED,
}


def test_histories_reach_their_status() -> None:
    for status, events in HISTORIES.items():
        user = fold(events)
        assert (user.status if user else "absent") == status


# Requests ------------------------------------------------------------------------------------


def test_provision_user_defaults() -> None:
    request = msgspec.json.decode(b'{"username": "alice"}', type=ProvisionUser)
    assert request == ProvisionUser(
        username="alice", display_name="", forge_email="", profile="demo"
    )


@pytest.mark.parametrize(
    "body",
    [
        b'{"username": ""}',
        b'{"username": "-alice"}',
        b'{"username": "al.ice"}',
        b'{"username": "' + b"a" * 41 + b'"}',
        b'{"username": "alice", "extra": 1}',
        b'{"username": "alice", "profile": "../etc"}',
        b'{"username": "alice", "forge_email": "not an email"}',
        b'{"username": "alice", "display_name": "' + b"x" * 129 + b'"}',
        b"{}",
    ],
)
def test_provision_user_rejects_bad_bodies(body: bytes) -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(body, type=ProvisionUser)


def test_username_limits_accept_the_edges() -> None:
    for name in ["a", "_a", "a-b_C9", "a" * 40]:
        assert (
            msgspec.json.decode(
                msgspec.json.encode({"username": name}), type=DecommissionUser
            ).username
            == name
        )


@pytest.mark.parametrize("cls", [DecommissionUser, GetUser, RevealInitialPassword])
def test_user_refs_reject_unknown_fields(cls: type[msgspec.Struct]) -> None:
    with pytest.raises(msgspec.ValidationError, match="secret"):
        msgspec.json.decode(b'{"username": "alice", "secret": "x"}', type=cls)


def test_list_users_takes_nothing() -> None:
    assert msgspec.json.decode(b"{}", type=ListUsers) == ListUsers()
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"x": 1}', type=ListUsers)


# provision_user in every state ----------------------------------------------------------------


PROVISION = ProvisionUser(username=NAME, display_name="Alice", forge_email="alice@example.com")


def test_provision_new_user_requests_attempt_1() -> None:
    # REQUESTED: alice, "Alice", alice@example.com, the demo profile, attempt 1
    assert when([], PROVISION) == [msgspec.structs.replace(REQUESTED, at=NOW)]


def test_provision_provisioning_user_records_nothing() -> None:
    assert when([REQUESTED], PROVISION) == []


def test_provision_ready_user_is_invalid_state() -> None:
    with pytest.raises(InvalidState):
        when(READY, PROVISION)


def test_provision_decommissioning_user_is_invalid_state() -> None:
    with pytest.raises(InvalidState):
        when(DECOMMISSIONING, PROVISION)


def test_provision_failed_user_resumes_from_the_failed_step() -> None:
    assert when(FAILED_AT_DEPLOY_VM, PROVISION) == [
        user_events.ProvisioningResumed(username=NAME, from_step="deploy_vm", at=NOW)
    ]


def test_provision_with_an_unknown_profile_is_invalid_input() -> None:
    with pytest.raises(InvalidInput, match="profile"):
        when([], ProvisionUser(username=NAME, profile="nope"))


def test_provision_decommissioned_user_starts_anew() -> None:
    command = ProvisionUser(username=NAME, display_name="Alice B")
    [event] = when(DECOMMISSIONED, command)
    assert event == user_events.ProvisioningRequested(
        username=NAME, display_name="Alice B", forge_email="", profile="demo", attempt=2, at=NOW
    )
    user = state([*DECOMMISSIONED, event])
    assert (user.status, user.step, user.attempt) == ("provisioning", "forge_user", 2)
    assert (user.vm_sid, user.node_id, user.gateway_url, user.ssh_public_key) == ("", None, "", "")
    assert user.created_at == at(0)  # the record is the same user's
    assert user.forge_user_created  # the Forge account was kept, and so is that fact


# decommission_user in every state ------------------------------------------------------------

DECOMMISSION = DecommissionUser(username=NAME)


def test_decommission_absent_user_is_not_found() -> None:
    with pytest.raises(NotFound, match=USER_NOT_FOUND):
        when([], DECOMMISSION)


@pytest.mark.parametrize("status", ["ready", "failed"])
def test_decommission_ready_or_failed_user_is_requested(status: str) -> None:
    assert when(HISTORIES[status], DECOMMISSION) == [
        user_events.DecommissionRequested(username=NAME, at=NOW)
    ]


def test_decommission_provisioning_user_is_invalid_state() -> None:
    with pytest.raises(InvalidState, match="provisioning"):
        when([REQUESTED], DECOMMISSION)


def test_decommission_decommissioning_user_records_nothing() -> None:
    assert when(DECOMMISSIONING, DECOMMISSION) == []


def test_decommission_decommissioned_user_is_invalid_state() -> None:
    with pytest.raises(InvalidState):
        when(DECOMMISSIONED, DECOMMISSION)


# reveal_initial_password ----------------------------------------------------------------------

REVEAL = RevealInitialPassword(username=NAME)


def test_reveal_absent_user_is_not_found() -> None:
    with pytest.raises(NotFound, match=USER_NOT_FOUND):
        when([], REVEAL)


@pytest.mark.parametrize("status", ["ready", "failed", "decommissioning", "decommissioned"])
def test_reveal_created_password_once_in_any_later_state(status: str) -> None:
    given = HISTORIES[status]
    [event] = when(given, REVEAL)
    assert event == user_events.InitialPasswordRevealed(username=NAME, at=NOW)
    assert not msgspec.structs.asdict(event).keys() - {"username", "at"}
    with pytest.raises(NotFound, match=PASSWORD_NOT_FOUND):
        when([*given, event], REVEAL)


def test_reveal_before_the_forge_step_is_not_found() -> None:
    with pytest.raises(NotFound, match=PASSWORD_NOT_FOUND):
        when([REQUESTED], REVEAL)


def test_reveal_for_an_account_found_not_created_is_not_found() -> None:
    given: list[Event] = [
        REQUESTED,
        user_events.ForgeUserEnsured(username=NAME, created=False, forge_user_id=3, at=at(1)),
    ]
    assert not state(given).forge_user_created
    with pytest.raises(NotFound, match=PASSWORD_NOT_FOUND):
        when(given, REVEAL)


def test_reveal_when_forge_was_skipped_is_not_found() -> None:
    given: list[Event] = [
        REQUESTED,
        user_events.ForgeUserEnsured(
            username=NAME, created=False, forge_user_id=None, skipped_reason="no forge", at=at(1)
        ),
    ]
    assert state(given).step == "ssh_key"
    with pytest.raises(NotFound, match=PASSWORD_NOT_FOUND):
        when(given, REVEAL)


# The happy path, driven the way the process manager drives it ---------------------------------


def outcome_for(action: user_actions.UserAction) -> UserCommand:
    """What a successful side effect reports for each action."""
    match action:
        case user_actions.EnsureForgeUser():
            return user_events.ForgeUserEnsured(
                username=NAME, at=NOW, created=True, forge_user_id=7, token_name="hero"
            )
        case user_actions.GenerateSshKey():
            return user_events.SshKeyGenerated(username=NAME, at=NOW, public_key=PUBLIC_KEY)
        case user_actions.SelectNode():
            return user_events.NodeSelected(
                username=NAME, at=NOW, node_id=13, gateway_domain="gw13.grid.test"
            )
        case user_actions.DeployUserVm() if not action.vm_sid:
            return user_events.UserVmDeployRequested(username=NAME, at=NOW, vm_sid="vm_1")
        case user_actions.DeployUserVm():
            return user_events.UserVmDeployed(
                username=NAME,
                at=NOW,
                vm_sid=action.vm_sid,
                mycelium_ip="5a1:2::1",
                ssh_host="127.0.0.1",
                ssh_port=2201,
            )
        case user_actions.DeployGateway():
            fqdn = f"{action.name}.{action.gateway_domain}"
            return user_events.GatewayDeployed(
                username=NAME, at=NOW, name=action.name, fqdn=fqdn, url=f"https://{fqdn}"
            )
        case user_actions.WaitSsh():
            return user_events.SshReachable(username=NAME, at=NOW)
        case user_actions.UploadManifest():
            return user_events.ManifestUploaded(
                username=NAME, at=NOW, path="hero/cfg/cockpit/services.toml", sha256="ab"
            )
        case user_actions.RunSetup():
            return user_events.SetupCompleted(
                username=NAME, at=NOW, exit_status=0, output_tail="ok"
            )
        case user_actions.VerifyHealth():
            return user_events.HealthVerified(username=NAME, at=NOW, status_code=200)
        case user_actions.DeleteGateway():
            return user_events.GatewayDeleted(username=NAME, at=NOW, name=action.name)
        case user_actions.DeleteUserVm():
            return user_events.UserVmDeleted(username=NAME, at=NOW, vm_sid=action.vm_sid)
        case user_actions.FinishDecommission():
            return user_events.UserDecommissioned(username=NAME, at=NOW)
    raise AssertionError(action)


def drive(
    events: list[Event], *, clock: int = 100
) -> tuple[list[Event], list[user_actions.UserAction]]:
    """Runs next_action → outcome → decide until nothing is pending; returns events and actions."""
    events = list(events)
    actions: list[user_actions.UserAction] = []
    while (action := next_action(fold(events))) is not None:
        actions.append(action)
        assert len(actions) < 50
        clock += 1
        new = decide(fold(events), outcome_for(action), Context(now=at(clock)))
        assert new, f"{action} recorded nothing"
        events.extend(new)
    return events, actions


def test_happy_path_step_by_step() -> None:
    events = when([], PROVISION)
    user = state(events)
    seen: list[str] = []
    while (action := next_action(user)) is not None:
        assert isinstance(action, user_actions.StepAction)
        assert action.step == user.step
        assert action.username == NAME and action.attempt == 1 and action.tries == 0
        assert action.started_at == user.step_started_at
        seen.append(action.step)
        new = decide(user, outcome_for(action), CTX)
        for event in new:
            evolved = evolve(user, event)
            assert evolved is not None
            user = evolved
        events.extend(new)

    assert seen == [
        "forge_user",
        "ssh_key",
        "select_node",
        "deploy_vm",  # request the VM
        "deploy_vm",  # then await it
        "deploy_gateway",
        "wait_ssh",
        "upload_manifest",
        "run_setup",
        "verify_health",
    ]
    assert [type(e) for e in events] == [type(e) for e in READY]
    assert user == fold(events)
    assert user.public() == UserOut(
        username=NAME,
        display_name="Alice",
        forge_email="alice@example.com",
        status="ready",
        step="done",
        vm_sid="vm_1",
        node_id=13,
        gateway_url=f"https://{GW_NAME}.gw13.grid.test",
        ssh_public_key=PUBLIC_KEY,
        forge_user_created=True,
        error="",
        created_at=NOW,
        updated_at=NOW,
    )
    assert user.initial_password_available
    assert set(user.step_finished) == set(STEPS[:-1])


def first_try(step: str, started: int) -> dict[str, Any]:
    """The fields a step action carries on its first attempt, before any try."""
    return {"username": NAME, "step": step, "attempt": 1, "tries": 0, "started_at": at(started)}


def test_actions_carry_what_each_step_needs() -> None:
    vm_requested = [
        *TO_DEPLOY_VM,
        user_events.UserVmDeployRequested(username=NAME, vm_sid="vm_1", at=at(4)),
    ]
    deploy_vm = user_actions.DeployUserVm(
        **first_try("deploy_vm", 3),
        vm_sid="",
        vm_name="user-alice",
        node_id=13,
        ssh_public_key=PUBLIC_KEY,
    )
    assert next_action(state(TO_DEPLOY_VM)) == deploy_vm
    assert next_action(state(vm_requested)) == msgspec.structs.replace(deploy_vm, vm_sid="vm_1")
    assert next_action(state(READY[:6])) == user_actions.DeployGateway(
        **first_try("deploy_gateway", 5),
        name=GW_NAME,
        node_id=13,
        gateway_domain="gw13.grid.test",
        vm_sid="vm_1",
        mycelium_ip="5a1:2::1",
        backend_url="http://[5a1:2::1]:9988",
    )
    assert next_action(state(READY[:7])) == user_actions.WaitSsh(
        **first_try("wait_ssh", 6), ssh_host="127.0.0.1", ssh_port=2201
    )
    upload = next_action(state(READY[:8]))
    assert isinstance(upload, user_actions.UploadManifest)
    assert (upload.profile, upload.gateway_url, upload.ssh_port) == ("demo", GW_URL, 2201)
    assert next_action(state(READY[:10])) == user_actions.VerifyHealth(
        **first_try("verify_health", 9), gateway_url=GW_URL
    )


@pytest.mark.parametrize("status", ["absent", "ready", "failed", "decommissioned"])
def test_nothing_pending_when_settled(status: str) -> None:
    assert next_action(fold(HISTORIES[status])) is None


def test_elapsed_time_per_step_is_in_the_state() -> None:
    user = state(READY)
    assert user.step_started["deploy_vm"] == at(3)
    assert user.step_finished["deploy_vm"] == at(5)
    assert user.step_started["verify_health"] == at(9)


# Outcomes that are not for the current step are ignored ----------------------------------------


def test_redelivered_outcome_is_ignored() -> None:
    command = user_events.ForgeUserEnsured(username=NAME, at=NOW, created=True, forge_user_id=7)
    given: list[Event] = [REQUESTED, *when([REQUESTED], command)]
    assert state(given).step == "ssh_key"
    assert when(given, command) == []


def test_outcome_for_a_later_step_is_ignored() -> None:
    assert when([REQUESTED], user_events.SshReachable(username=NAME, at=NOW)) == []
    assert (
        when([REQUESTED], user_events.HealthVerified(username=NAME, at=NOW, status_code=200)) == []
    )


def test_redelivered_vm_request_is_ignored() -> None:
    given = [
        *TO_DEPLOY_VM,
        user_events.UserVmDeployRequested(username=NAME, vm_sid="vm_1", at=at(4)),
    ]
    assert (
        when(given, user_events.UserVmDeployRequested(username=NAME, at=NOW, vm_sid="vm_1")) == []
    )


def test_vm_deployed_for_another_sid_is_ignored() -> None:
    given = [
        *TO_DEPLOY_VM,
        user_events.UserVmDeployRequested(username=NAME, vm_sid="vm_2", at=at(4)),
    ]
    command = user_events.UserVmDeployed(
        username=NAME, at=NOW, vm_sid="vm_1", mycelium_ip="::1", ssh_host="h", ssh_port=22
    )
    assert when(given, command) == []


ALL_OUTCOMES: list[UserCommand] = [
    user_events.ForgeUserEnsured(username=NAME, at=NOW, created=True, forge_user_id=1),
    user_events.SshKeyGenerated(username=NAME, at=NOW, public_key=PUBLIC_KEY),
    user_events.NodeSelected(username=NAME, at=NOW, node_id=1, gateway_domain="d"),
    user_events.UserVmDeployRequested(username=NAME, at=NOW, vm_sid="vm_9"),
    user_events.UserVmDeployed(
        username=NAME, at=NOW, vm_sid="vm_1", mycelium_ip="::1", ssh_host="h", ssh_port=22
    ),
    user_events.GatewayDeployed(username=NAME, at=NOW, name="n", fqdn="n.d", url="https://n.d"),
    user_events.SshReachable(username=NAME, at=NOW),
    user_events.ManifestUploaded(username=NAME, at=NOW, path="p", sha256="s"),
    user_events.SetupCompleted(username=NAME, at=NOW, exit_status=0, output_tail=""),
    user_events.HealthVerified(username=NAME, at=NOW, status_code=200),
    RecordStepRetried(step="deploy_vm", reason="x"),
    RecordStepFailed(step="deploy_vm", reason="x"),
]
DECOMMISSION_OUTCOMES: list[UserCommand] = [
    user_events.GatewayDeleted(username=NAME, at=NOW, name=GW_NAME),
    user_events.UserVmDeleted(username=NAME, at=NOW, vm_sid="vm_1"),
    RecordDecommissionFailed(part="delete_vm", reason="x"),
    user_events.UserDecommissioned(username=NAME, at=NOW),
]


@pytest.mark.parametrize("status", ["ready", "failed", "decommissioning", "decommissioned"])
@pytest.mark.parametrize("command", ALL_OUTCOMES, ids=lambda c: type(c).__name__)
def test_step_outcomes_outside_provisioning_are_ignored(status: str, command: UserCommand) -> None:
    assert when(HISTORIES[status], command) == []


@pytest.mark.parametrize("status", ["provisioning", "ready", "failed", "decommissioned"])
@pytest.mark.parametrize("command", DECOMMISSION_OUTCOMES, ids=lambda c: type(c).__name__)
def test_decommission_outcomes_outside_decommissioning_are_ignored(
    status: str, command: UserCommand
) -> None:
    assert when(HISTORIES[status], command) == []


@pytest.mark.parametrize(
    "command", [*ALL_OUTCOMES, *DECOMMISSION_OUTCOMES], ids=lambda c: type(c).__name__
)
def test_outcomes_for_an_absent_user_are_not_found(command: UserCommand) -> None:
    with pytest.raises(NotFound, match=USER_NOT_FOUND):
        when([], command)


# Retries, failures and resuming -----------------------------------------------------------------


def test_retry_then_fail_counts_tries() -> None:
    given = [*TO_DEPLOY_VM]
    retried = when(given, RecordStepRetried(step="deploy_vm", reason="timeout"))
    assert retried == [
        user_events.StepRetried(
            username=NAME, step="deploy_vm", attempt=1, reason="timeout", at=NOW
        )
    ]
    given += retried
    action = next_action(state(given))
    assert isinstance(action, user_actions.DeployUserVm) and action.tries == 1
    given += when(given, RecordStepRetried(step="deploy_vm", reason="timeout"))
    failed = when(given, RecordStepFailed(step="deploy_vm", reason="node 13 is down"))
    assert failed == [
        user_events.StepFailed(
            username=NAME, step="deploy_vm", reason="node 13 is down", attempts=3, at=NOW
        )
    ]
    user = state([*given, *failed])
    assert (user.status, user.step, user.error) == (
        "failed",
        "deploy_vm",
        "deploy_vm: node 13 is down",
    )
    assert next_action(user) is None


def test_failure_for_another_step_is_ignored() -> None:
    assert when(TO_DEPLOY_VM, RecordStepFailed(step="forge_user", reason="late")) == []
    assert when(TO_DEPLOY_VM, RecordStepRetried(step="ssh_key", reason="late")) == []


def test_long_reasons_are_clipped() -> None:
    [event] = when([REQUESTED], RecordStepFailed(step="forge_user", reason="x" * 5000))
    assert isinstance(event, user_events.StepFailed) and len(event.reason) <= 1000


def test_nonzero_setup_exit_records_the_output_and_fails() -> None:
    given = READY[:9]
    assert state(given).step == "run_setup"
    events = when(
        given,
        user_events.SetupCompleted(
            username=NAME, at=NOW, exit_status=2, output_tail="y" * 10000 + "boom"
        ),
    )
    assert [type(e) for e in events] == [user_events.SetupCompleted, user_events.StepFailed]
    completed, failed = events
    assert isinstance(completed, user_events.SetupCompleted) and completed.output_tail.endswith(
        "boom"
    )
    assert len(completed.output_tail) <= 4000
    assert isinstance(failed, user_events.StepFailed) and failed.step == "run_setup"
    user = state([*given, *events])
    assert (user.status, user.step, user.setup_exit_status) == ("failed", "run_setup", 2)


def test_unhealthy_answer_fails_verify_health() -> None:
    given = READY[:10]
    [event] = when(given, user_events.HealthVerified(username=NAME, at=NOW, status_code=502))
    assert isinstance(event, user_events.StepFailed) and event.step == "verify_health"
    assert "502" in event.reason


def test_resume_continues_from_the_failed_step_with_what_was_done() -> None:
    given = [*FAILED_AT_DEPLOY_VM, *when(FAILED_AT_DEPLOY_VM, PROVISION)]
    user = state(given)
    assert (user.status, user.step, user.error, user.step_tries) == (
        "provisioning",
        "deploy_vm",
        "",
        0,
    )
    assert user.step_started_at == NOW
    action = next_action(user)
    assert isinstance(action, user_actions.DeployUserVm)
    assert (action.vm_sid, action.node_id, action.ssh_public_key) == ("vm_1", 13, PUBLIC_KEY)

    events, actions = drive(given)
    assert [
        a.step
        for a in actions
        if isinstance(a, user_actions.EnsureForgeUser | user_actions.SelectNode)
    ] == []
    assert state(events).status == "ready"


def test_a_failed_vm_can_be_replaced_and_both_are_deleted_on_decommission() -> None:
    given = [
        *FAILED_AT_DEPLOY_VM,
        user_events.ProvisioningResumed(username=NAME, from_step="deploy_vm", at=at(6)),
    ]
    given += when(given, user_events.UserVmDeployRequested(username=NAME, at=NOW, vm_sid="vm_2"))
    user = state(given)
    assert (user.vm_sid, user.replaced_vm_sids) == ("vm_2", ("vm_1",))
    assert (
        when(given, user_events.UserVmDeployRequested(username=NAME, at=NOW, vm_sid="vm_1")) == []
    )  # a stale request

    events, _ = drive(given)
    events += when(events, DECOMMISSION)
    events, actions = drive(events)
    assert [(type(a), getattr(a, "vm_sid", "")) for a in actions] == [
        (user_actions.DeleteGateway, ""),
        (user_actions.DeleteUserVm, "vm_1"),
        (user_actions.DeleteUserVm, "vm_2"),
        (user_actions.FinishDecommission, ""),
    ]
    assert state(events).status == "decommissioned"


def test_resume_from_forge_failure_after_forge_came_back() -> None:
    given = [*FAILED_AT_FORGE, *when(FAILED_AT_FORGE, PROVISION)]
    action = next_action(state(given))
    assert (
        isinstance(action, user_actions.EnsureForgeUser)
        and action.forge_email == "alice@example.com"
    )
    events, _ = drive(given)
    assert state(events).status == "ready"


# Decommissioning ---------------------------------------------------------------------------------


def test_decommission_from_ready_deletes_gateway_then_vm_then_finishes() -> None:
    events, actions = drive(DECOMMISSIONING)
    assert actions == [
        user_actions.DeleteGateway(username=NAME, part="delete_gateway", failures=0, name=GW_NAME),
        user_actions.DeleteUserVm(username=NAME, part="delete_vm", failures=0, vm_sid="vm_1"),
        user_actions.FinishDecommission(username=NAME, part="finish", failures=0),
    ]
    assert [type(e) for e in events[len(DECOMMISSIONING) :]] == [
        user_events.GatewayDeleted,
        user_events.UserVmDeleted,
        user_events.UserDecommissioned,
    ]
    user = state(events)
    assert (user.status, user.step, user.error) == ("decommissioned", "done", "")


def test_decommission_from_failed_before_any_vm_just_finishes() -> None:
    given = [*FAILED_AT_FORGE, *when(FAILED_AT_FORGE, DECOMMISSION)]
    assert next_action(state(given)) == user_actions.FinishDecommission(
        username=NAME, part="finish", failures=0
    )
    events, _ = drive(given)
    assert state(events).status == "decommissioned"


def test_decommission_from_failed_deletes_the_gateway_by_its_deterministic_name() -> None:
    """The gateway may exist unrecorded (a crash mid-step), so it is deleted by name anyway."""
    given = [*FAILED_AT_DEPLOY_VM, *when(FAILED_AT_DEPLOY_VM, DECOMMISSION)]
    events, actions = drive(given)
    assert actions == [
        user_actions.DeleteGateway(username=NAME, part="delete_gateway", failures=0, name=GW_NAME),
        user_actions.DeleteUserVm(username=NAME, part="delete_vm", failures=0, vm_sid="vm_1"),
        user_actions.FinishDecommission(username=NAME, part="finish", failures=0),
    ]
    assert state(events).status == "decommissioned"


def test_decommission_failure_keeps_decommissioning_and_retries_the_part() -> None:
    given = [*DECOMMISSIONING]
    given += when(given, RecordDecommissionFailed(part="delete_gateway", reason="grid down"))
    assert given[-1] == user_events.DecommissionActionFailed(
        username=NAME, part="delete_gateway", reason="grid down", attempts=1, at=NOW
    )
    user = state(given)
    assert (user.status, user.error) == (
        "decommissioning",
        "decommission delete_gateway: grid down",
    )
    assert next_action(user) == user_actions.DeleteGateway(
        username=NAME, part="delete_gateway", failures=1, name=GW_NAME
    )
    events, _ = drive(given)
    assert state(events).status == "decommissioned"


def test_redelivered_decommission_outcomes_are_ignored() -> None:
    given = [*DECOMMISSIONING, user_events.GatewayDeleted(username=NAME, name=GW_NAME, at=at(21))]
    assert when(given, user_events.GatewayDeleted(username=NAME, at=NOW, name=GW_NAME)) == []
    given.append(user_events.UserVmDeleted(username=NAME, vm_sid="vm_1", at=at(22)))
    assert when(given, user_events.UserVmDeleted(username=NAME, at=NOW, vm_sid="vm_1")) == []
    assert when(given, user_events.UserVmDeleted(username=NAME, at=NOW, vm_sid="vm_unknown")) == []


def test_finishing_with_parts_pending_is_invalid_state() -> None:
    with pytest.raises(InvalidState, match="delete_gateway"):
        when(DECOMMISSIONING, user_events.UserDecommissioned(username=NAME, at=NOW))


def test_provision_anew_after_decommissioned_runs_the_whole_flow_again() -> None:
    given = [*DECOMMISSIONED, *when(DECOMMISSIONED, PROVISION)]
    events, actions = drive(given)
    assert isinstance(actions[0], user_actions.EnsureForgeUser)
    user = state(events)
    assert (user.status, user.attempt, user.vm_sid) == ("ready", 2, "vm_1")
    assert user.replaced_vm_sids == ()


# evolve is total ------------------------------------------------------------------------------


def test_evolve_ignores_events_before_a_user_exists() -> None:
    assert evolve(None, user_events.ProvisioningCompleted(username=NAME, at=NOW)) is None
    assert fold([user_events.UserDecommissioned(username=NAME, at=NOW)]) is None


def test_evolve_leaves_the_user_alone_on_foreign_events() -> None:
    user = state(READY)
    assert evolve(user, Event()) is user


# Every event type round-trips through JSON ------------------------------------------------------

SAMPLES: list[Event] = [
    REQUESTED,
    user_events.ProvisioningResumed(username=NAME, from_step="wait_ssh", at=NOW),
    user_events.ForgeUserEnsured(
        username=NAME, created=False, forge_user_id=None, skipped_reason="none", at=NOW
    ),
    user_events.SshKeyGenerated(username=NAME, public_key=PUBLIC_KEY, at=NOW),
    user_events.NodeSelected(username=NAME, node_id=13, gateway_domain="gw.test", at=NOW),
    user_events.UserVmDeployRequested(username=NAME, vm_sid="vm_1", at=NOW),
    user_events.UserVmDeployed(
        username=NAME, vm_sid="vm_1", mycelium_ip="5a1::1", ssh_host="h", ssh_port=22, at=NOW
    ),
    user_events.GatewayDeployed(
        username=NAME, name="alice", fqdn="alice.gw", url="https://alice.gw", at=NOW
    ),
    user_events.SshReachable(username=NAME, at=NOW),
    user_events.ManifestUploaded(username=NAME, path="p", sha256="0" * 64, at=NOW),
    user_events.SetupCompleted(username=NAME, exit_status=0, output_tail="done\n", at=NOW),
    user_events.HealthVerified(username=NAME, status_code=200, at=NOW),
    user_events.ProvisioningCompleted(username=NAME, at=NOW),
    user_events.StepRetried(username=NAME, step="wait_ssh", attempt=2, reason="refused", at=NOW),
    user_events.StepFailed(username=NAME, step="wait_ssh", reason="deadline", attempts=5, at=NOW),
    user_events.DecommissionRequested(username=NAME, at=NOW),
    user_events.GatewayDeleted(username=NAME, name="alice", at=NOW),
    user_events.UserVmDeleted(username=NAME, vm_sid="vm_1", at=NOW),
    user_events.DecommissionActionFailed(
        username=NAME, part="delete_vm", reason="x", attempts=1, at=NOW
    ),
    user_events.UserDecommissioned(username=NAME, at=NOW),
    user_events.InitialPasswordRevealed(username=NAME, at=NOW),
]


def test_samples_cover_every_event_type() -> None:
    assert [type(e) for e in SAMPLES] == list(user_events.USER_EVENT_TYPES)


@pytest.mark.parametrize("event", SAMPLES, ids=lambda e: type(e).__name__)
def test_event_round_trips_through_json(event: Event) -> None:
    data = msgspec.json.encode(event)
    assert msgspec.json.Decoder(type(event)).decode(data) == event
    assert not re.search(rb"password|private|secret", data)


def test_each_provisioning_step_but_done_has_one_event_that_finishes_it() -> None:
    assert sorted(STEP_EVENTS.values()) == sorted(s for s in STEPS if s != "done")
    assert STEP_EVENTS["UserVmDeployed"] == "deploy_vm"
    assert "UserVmDeployRequested" not in STEP_EVENTS  # it starts the step, the CLI shows it apart
