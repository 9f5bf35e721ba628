"""Given these events, when this command, then these events (or this error): the VM aggregate."""

from __future__ import annotations

import msgspec
import pytest

from core import vm_events
from core.contract import DeleteVm, DeployVm, RestartVm, StartVm, StopVm, VmStatus
from core.errors import VM_NOT_FOUND, InvalidState, NotFound
from core.events import Event
from core.vm import Context, RekeyVm, Vm, VmCommand, decide, evolve, fold
from tests.helpers import T0, at, fields_but

SID = "vm_0123456789abcdef"
OWNER = "fp-owner"
OTHER = "fp-somebody-else"
NEW_OWNER = "fp-new-owner"
NOW = at(1000)
CTX = Context(now=NOW, owner=OWNER, new_sid="vm_fresh")
WRONG_OWNER = Context(now=NOW, owner=OTHER, new_sid="vm_fresh")


# Histories: one per status, each the way the service would really get there ------------------

REQUESTED = vm_events.VmDeployRequested(
    sid=SID,
    name="web",
    owner=OWNER,
    image="ubuntu-24.04",
    cpu_count=2,
    memory_gb=4,
    disk_gb=50,
    rootfs_gb=8,
    slice_sid="slice-1",
    node_id=None,
    at=at(0),
)
DEPLOYED = vm_events.VmDeployed(sid=SID, node_id=13, mycelium_ip="5a1:2::1", at=at(1))

HISTORIES: dict[str, list[Event]] = {
    "absent": [],
    "deploying": [REQUESTED],
    "running": [REQUESTED, DEPLOYED],
    "failed": [REQUESTED, vm_events.VmDeployFailed(sid=SID, error="node 13 is full", at=at(1))],
    "stopped": [REQUESTED, DEPLOYED, vm_events.VmStopped(sid=SID, at=at(2))],
    "deleting": [REQUESTED, DEPLOYED, vm_events.VmDeleteRequested(sid=SID, at=at(3))],
    "deleted": [
        REQUESTED,
        DEPLOYED,
        vm_events.VmDeleteRequested(sid=SID, at=at(3)),
        vm_events.VmDeleted(sid=SID, at=at(4)),
    ],
}
STATUSES: list[VmStatus] = ["deploying", "running", "failed", "stopped", "deleting", "deleted"]
EXISTING = [s for s in HISTORIES if s != "absent"]


def when(given: list[Event], command: VmCommand, ctx: Context = CTX) -> list[Event]:
    return list(decide(fold(given), command, ctx))


def state(events: list[Event]) -> Vm:
    vm = fold(events)
    assert vm is not None
    return vm


def test_histories_reach_their_status() -> None:
    for status, events in HISTORIES.items():
        vm = fold(events)
        assert (vm.status if vm else "absent") == status
    assert set(EXISTING) == set(STATUSES)


# Tenant commands: every command in every status --------------------------------------------

DEPLOY = DeployVm(
    name="web",
    secret="ignored-by-decide",
    image="debian-12",
    cpu_count=4,
    memory_gb=16,
    disk_gb=100,
    rootfs_gb=20,
    slice_sid="slice-9",
    node_id=7,
)
START = StartVm(sid=SID, secret="s")
STOP = StopVm(sid=SID, secret="s")
RESTART = RestartVm(sid=SID, secret="s")
DELETE = DeleteVm(sid=SID, secret="s")

# command -> (the command, the events it records in each status that allows it); every other
# status refuses it with `refusal`
DELETE_REQUESTED: list[Event] = [vm_events.VmDeleteRequested(sid=SID, at=NOW)]
ALLOWED: dict[str, tuple[VmCommand, dict[str, list[Event]]]] = {
    # start: only a stopped VM starts
    "start": (START, {"stopped": [vm_events.VmStarted(sid=SID, at=NOW)]}),
    # stop: only a running VM stops
    "stop": (STOP, {"running": [vm_events.VmStopped(sid=SID, at=NOW)]}),
    # restart: running -> running
    "restart": (RESTART, {"running": [vm_events.VmRestarted(sid=SID, at=NOW)]}),
    # delete: any but deleted -> deleting; deleting again records nothing new
    "delete": (
        DELETE,
        {
            "deploying": DELETE_REQUESTED,
            "running": DELETE_REQUESTED,
            "failed": DELETE_REQUESTED,
            "stopped": DELETE_REQUESTED,
            "deleting": [],
        },
    ),
    # deploy: only where there is no VM yet
    "deploy": (DEPLOY, {}),
}


def refusal(name: str, status: str) -> str:
    """The InvalidState message a command refused in `status` raises."""
    return "vm already exists" if name == "deploy" else f"cannot {name} a {status} vm"


# (command, status) -> the events it records, or the InvalidState message it raises
TENANT_SPEC: list[tuple[str, VmCommand, str, list[Event] | str]] = [
    (name, command, s, allowed.get(s, refusal(name, s)))
    for name, (command, allowed) in ALLOWED.items()
    for s in STATUSES
]


@pytest.mark.parametrize(
    ("command", "status", "then"),
    [pytest.param(c, s, t, id=f"{name}-{s}") for name, c, s, t in TENANT_SPEC],
)
def test_tenant_command_in_every_status(
    command: VmCommand, status: str, then: list[Event] | str
) -> None:
    if isinstance(then, str):
        with pytest.raises(InvalidState) as raised:
            when(HISTORIES[status], command)
        assert raised.value.message == then
        assert str(raised.value) == then
    else:
        assert when(HISTORIES[status], command) == then


def test_delete_is_requested_again_after_the_backend_failed_to_delete() -> None:
    failed_delete = [
        *HISTORIES["deleting"],
        vm_events.VmOperationFailed(
            sid=SID, operation="delete", error="node unreachable", at=at(4)
        ),
    ]
    assert when(failed_delete, DELETE) == [vm_events.VmDeleteRequested(sid=SID, at=NOW)]


def test_the_tenant_table_covers_every_command_in_every_status() -> None:
    covered = {(name, s) for name, _, s, _ in TENANT_SPEC}
    names = {"start", "stop", "restart", "delete", "deploy"}
    assert covered == {(n, s) for n in names for s in STATUSES}


def test_deploy_on_nothing_records_the_request_with_every_field() -> None:
    asked = fields_but(DEPLOY, "secret")  # name, image, sizes, slice and node: none a default
    assert when([], DEPLOY) == [
        vm_events.VmDeployRequested(sid="vm_fresh", owner=OWNER, at=NOW, **asked)
    ]


def test_deploy_defaults_reach_the_event() -> None:
    (event,) = when([], DeployVm(name="a", secret=""))
    assert isinstance(event, vm_events.VmDeployRequested)
    assert (event.image, event.cpu_count, event.memory_gb, event.disk_gb, event.rootfs_gb) == (
        "ubuntu-24.04",
        16,
        8,
        200,
        16,
    )
    assert (event.slice_sid, event.node_id) == ("", None)


def test_deploy_records_the_owner_fingerprint_never_the_secret() -> None:
    (event,) = when([], DeployVm(name="a", secret="plain-secret-value"))
    assert b"plain-secret-value" not in msgspec.json.encode(event)
    assert event.owner == OWNER  # type: ignore[attr-defined]


# Ownership comes before state ----------------------------------------------------------------

OWNED_COMMANDS: list[tuple[str, VmCommand]] = [
    ("start", START),
    ("stop", STOP),
    ("restart", RESTART),
    ("delete", DELETE),
    ("rekey", RekeyVm(sid=SID, new_owner=NEW_OWNER)),
]


@pytest.mark.parametrize(
    ("command", "status"),
    [pytest.param(c, s, id=f"{n}-{s}") for n, c in OWNED_COMMANDS for s in HISTORIES],
)
def test_a_wrong_owner_is_not_found_in_every_status(command: VmCommand, status: str) -> None:
    """Even where the state would refuse (a deleted VM), the wrong owner learns nothing more."""
    with pytest.raises(NotFound) as raised:
        when(HISTORIES[status], command, WRONG_OWNER)
    assert type(raised.value) is NotFound
    assert raised.value.message == VM_NOT_FOUND


@pytest.mark.parametrize(("name", "command"), OWNED_COMMANDS)
def test_wrong_owner_and_absent_vm_raise_the_same_error(name: str, command: VmCommand) -> None:
    with pytest.raises(NotFound) as absent:
        when([], command, CTX)
    with pytest.raises(NotFound) as wrong:
        when(HISTORIES["running"], command, WRONG_OWNER)
    assert (type(absent.value), absent.value.args, absent.value.message) == (
        type(wrong.value),
        wrong.value.args,
        wrong.value.message,
    )
    assert (absent.value.code, absent.value.number) == ("NotFound", 404)


def test_wrong_secret_on_a_deleted_vm_is_not_found_not_invalid_state() -> None:
    with pytest.raises(NotFound):
        when(HISTORIES["deleted"], DELETE, WRONG_OWNER)
    with pytest.raises(InvalidState):
        when(HISTORIES["deleted"], DELETE, CTX)


def test_the_empty_owner_is_an_owner_like_any_other() -> None:
    open_vm = [msgspec.structs.replace(REQUESTED, owner=""), DEPLOYED]
    assert when(open_vm, STOP, Context(now=NOW, owner="")) == [vm_events.VmStopped(sid=SID, at=NOW)]
    with pytest.raises(NotFound):
        when(open_vm, STOP, CTX)
    with pytest.raises(NotFound):
        when(HISTORIES["running"], STOP, Context(now=NOW, owner=""))


# RekeyVm (one VM's share of migrate_secret) -------------------------------------------------

REKEY = RekeyVm(sid=SID, new_owner=NEW_OWNER)


@pytest.mark.parametrize("status", [s for s in STATUSES if s != "deleted"])
def test_rekey_moves_a_live_vm_to_the_new_owner(status: str) -> None:
    then = when(HISTORIES[status], REKEY)
    assert then == [vm_events.VmSecretMigrated(sid=SID, owner=NEW_OWNER, at=NOW)]
    after = state([*HISTORIES[status], *then])
    assert after.owner == NEW_OWNER
    assert after.status == status
    with pytest.raises(NotFound):
        when([*HISTORIES[status], *then], REKEY, CTX)  # the old owner no longer reaches it


def test_rekey_refuses_a_deleted_vm() -> None:
    with pytest.raises(InvalidState, match="cannot migrate a deleted vm"):
        when(HISTORIES["deleted"], REKEY)


def test_rekey_of_an_absent_vm_is_not_found() -> None:
    with pytest.raises(NotFound, match=VM_NOT_FOUND):
        when([], REKEY)


# Outcome commands: recorded where they fit, nothing elsewhere -------------------------------

RECORD_DEPLOYED = vm_events.VmDeployed(sid=SID, node_id=21, mycelium_ip="5a1:9::7", at=T0)
RECORD_DEPLOY_FAILED = vm_events.VmDeployFailed(sid=SID, error="no capacity", at=T0)
RECORD_DELETED = vm_events.VmDeleted(sid=SID, at=T0)
RECORD_OPERATION_FAILED = vm_events.VmOperationFailed(
    sid=SID, operation="stop", error="timeout", at=T0
)

OUTCOME_FITS: list[tuple[str, VmCommand, dict[str, list[Event]]]] = [
    (
        "deployed",
        RECORD_DEPLOYED,
        {"deploying": [vm_events.VmDeployed(sid=SID, node_id=21, mycelium_ip="5a1:9::7", at=NOW)]},
    ),
    (
        "deploy_failed",
        RECORD_DEPLOY_FAILED,
        {"deploying": [vm_events.VmDeployFailed(sid=SID, error="no capacity", at=NOW)]},
    ),
    ("deleted", RECORD_DELETED, {"deleting": [vm_events.VmDeleted(sid=SID, at=NOW)]}),
    (
        "operation_failed",
        RECORD_OPERATION_FAILED,
        {
            s: [vm_events.VmOperationFailed(sid=SID, operation="stop", error="timeout", at=NOW)]
            for s in ("deploying", "running", "failed", "stopped", "deleting")
        },
    ),
]


@pytest.mark.parametrize(
    ("command", "status", "then"),
    [
        pytest.param(c, s, fits.get(s, []), id=f"{n}-{s}")
        for n, c, fits in OUTCOME_FITS
        for s in STATUSES
    ],
)
def test_outcome_command_in_every_status(
    command: VmCommand, status: str, then: list[Event]
) -> None:
    """An outcome that does not fit the state (late, repeated, or after deletion) records nothing.

    Outcome commands come from the service itself, so they need no owner.
    """
    assert when(HISTORIES[status], command, Context(now=NOW)) == then


@pytest.mark.parametrize("command", [c for _, c, _ in OUTCOME_FITS], ids=lambda c: type(c).__name__)
def test_outcome_for_an_absent_vm_is_not_found(command: VmCommand) -> None:
    with pytest.raises(NotFound, match=VM_NOT_FOUND):
        when([], command, Context(now=NOW))


def test_a_repeated_outcome_records_nothing_the_second_time() -> None:
    given = list(HISTORIES["deploying"])
    first = when(given, RECORD_DEPLOYED)
    assert len(first) == 1
    assert when([*given, *first], RECORD_DEPLOYED) == []
    assert when([*given, *first], RECORD_DEPLOY_FAILED) == []


# Decide then evolve: the state each allowed command leads to ---------------------------------

LEADS_TO: list[tuple[str, VmCommand, VmStatus]] = [
    ("stopped", START, "running"),
    ("running", STOP, "stopped"),
    ("running", RESTART, "running"),
    *((s, DELETE, "deleting") for s in ("deploying", "running", "failed", "stopped")),
    ("deploying", RECORD_DEPLOYED, "running"),
    ("deploying", RECORD_DEPLOY_FAILED, "failed"),
    ("deleting", RECORD_DELETED, "deleted"),
]


@pytest.mark.parametrize(
    ("status", "command", "after"),
    [pytest.param(s, c, a, id=f"{type(c).__name__}-{s}") for s, c, a in LEADS_TO],
)
def test_allowed_command_leads_to_the_contract_status(
    status: str, command: VmCommand, after: VmStatus
) -> None:
    given = HISTORIES[status]
    vm = state([*given, *when(given, command)])
    assert vm.status == after
    assert vm.updated_at == NOW
    assert vm.created_at == at(0)


def test_deployed_sets_node_and_address_and_clears_the_error() -> None:
    vm = state([*HISTORIES["deploying"], *when(HISTORIES["deploying"], RECORD_DEPLOYED)])
    assert (vm.node_id, vm.mycelium_ip, vm.error) == (21, "5a1:9::7", "")


def test_deploy_failure_keeps_the_reason() -> None:
    given = HISTORIES["deploying"]
    vm = state([*given, *when(given, RECORD_DEPLOY_FAILED)])
    assert (vm.status, vm.error) == ("failed", "no capacity")


def test_an_operation_failure_sets_the_error_and_keeps_the_status() -> None:
    given = HISTORIES["stopped"]
    vm = state([*given, *when(given, RECORD_OPERATION_FAILED)])
    assert (vm.status, vm.error) == ("stopped", "timeout")
    failed = [*given, vm_events.VmOperationFailed(sid=SID, operation="start", error="e", at=NOW)]
    assert (
        state([*failed, vm_events.VmStarted(sid=SID, at=at(2000))]).error == ""
    )  # a success clears it


def test_the_fresh_vm_carries_the_request() -> None:
    vm = state(HISTORIES["deploying"])
    assert vm == Vm(
        **fields_but(REQUESTED, "at"),  # sid, name, owner, image, sizes, slice, node: all of it
        status="deploying",
        mycelium_ip="",
        error="",
        created_at=at(0),
        updated_at=at(0),
    )
    assert "owner" not in msgspec.structs.asdict(vm.public())


# evolve is total ----------------------------------------------------------------------------

SAMPLES: list[Event] = [
    REQUESTED,
    DEPLOYED,
    vm_events.VmDeployFailed(sid=SID, error="boom", at=at(50)),
    vm_events.VmStarted(sid=SID, at=at(50)),
    vm_events.VmStopped(sid=SID, at=at(50)),
    vm_events.VmRestarted(sid=SID, at=at(50)),
    vm_events.VmDeleteRequested(sid=SID, at=at(50)),
    vm_events.VmDeleted(sid=SID, at=at(50)),
    vm_events.VmOperationFailed(sid=SID, operation="start", error="boom", at=at(50)),
    vm_events.VmSecretMigrated(sid=SID, owner=NEW_OWNER, at=at(50)),
]


def test_the_samples_cover_every_event_type() -> None:
    assert [type(e) for e in SAMPLES] == list(vm_events.VM_EVENT_TYPES)


@pytest.mark.parametrize("event", SAMPLES, ids=lambda e: type(e).__name__)
def test_evolve_on_nothing(event: Event) -> None:
    """Only a deploy request creates a VM; anything else on nothing stays nothing."""
    vm = evolve(None, event)
    if isinstance(event, vm_events.VmDeployRequested):
        assert vm == state([event])
    else:
        assert vm is None


@pytest.mark.parametrize(
    ("status", "event"),
    [
        pytest.param(s, e, id=f"{type(e).__name__}-on-{s}")
        for s in STATUSES
        for e in SAMPLES
        if not isinstance(e, vm_events.VmDeployRequested)
    ],
)
def test_evolve_is_total_on_every_status(status: str, event: Event) -> None:
    before = state(HISTORIES[status])
    after = evolve(before, event)
    assert isinstance(after, Vm)
    assert after.sid == before.sid
    assert after.created_at == before.created_at
    assert after.updated_at == event.at  # type: ignore[attr-defined]


class Unrelated(Event, frozen=True, kw_only=True):
    """An event of some other aggregate."""

    note: str = ""


@pytest.mark.parametrize("status", HISTORIES)
def test_evolve_ignores_events_it_does_not_know(status: str) -> None:
    before = fold(HISTORIES[status])
    assert evolve(before, Unrelated(note="x")) == before


@pytest.mark.parametrize("event", SAMPLES, ids=lambda e: type(e).__name__)
def test_a_subclass_of_an_event_folds_like_the_event(event: Event) -> None:
    """What a rebuild decodes (tagged subclasses of the events) must fold exactly the same."""
    base = type(event)
    sub = msgspec.defstruct(base.__name__, [], bases=(base,), tag_field="type", tag="x")
    copy = sub(**msgspec.structs.asdict(event))
    for status in STATUSES:
        before = state(HISTORIES[status])
        assert evolve(before, copy) == evolve(before, event)
    assert evolve(None, copy) == evolve(None, event)


def test_evolve_is_pure() -> None:
    before = state(HISTORIES["running"])
    copy = msgspec.structs.replace(before)
    evolve(before, vm_events.VmStopped(sid=SID, at=NOW))
    assert before == copy


# Every event type round-trips through JSON ---------------------------------------------------


@pytest.mark.parametrize("event", SAMPLES, ids=lambda e: type(e).__name__)
def test_event_round_trips_through_json(event: Event) -> None:
    data = msgspec.json.encode(event)
    decoded = msgspec.json.Decoder(type(event)).decode(data)
    assert decoded == event
    assert type(decoded) is type(event)


@pytest.mark.parametrize("event_type", vm_events.VM_EVENT_TYPES, ids=lambda t: t.__name__)
def test_event_data_holds_no_secret_field(event_type: type[Event]) -> None:
    fields = {f.name for f in msgspec.structs.fields(event_type)}
    assert not fields & {"secret", "password", "private_key", "token"}
