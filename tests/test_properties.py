"""Properties over generated input: the request decoders and the pure decide/evolve pairs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bus.edge import validation_message
from core import user as users
from core import user_events, user_state, vm_events
from core import vm as vms
from core.contract import EventsRequest, UserStatus
from core.errors import VM_NOT_FOUND, DomainError, NotFound
from core.secrets import Fingerprinter
from hero_deployer.sdk.client import OPERATIONS

FAST = settings(max_examples=150, deadline=None, database=None)  # no .hypothesis/ in the tree
FINGERPRINT = Fingerprinter(b"k" * 32)
START = datetime(2026, 11, 30, tzinfo=UTC)
MARKER = "s3cr3t-MARKER"

REQUEST_TYPES = sorted(
    {op.request for op in OPERATIONS} | {EventsRequest}, key=lambda t: t.__name__
)
FIELDS = sorted({f for t in REQUEST_TYPES for f in getattr(t, "__struct_fields__", ())})

# Arbitrary JSON: the fields the contract knows (and some it does not) with any JSON value.
scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=80)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
bodies = st.dictionaries(
    st.sampled_from([*FIELDS, "extra", ""]) | st.text(max_size=12), json_values, max_size=6
)


def _decode(request_type: type[msgspec.Struct], data: bytes) -> Any:
    """Decodes as the edge does; a decoding error must be msgspec's and its message must be safe."""
    try:
        return msgspec.json.decode(data, type=request_type)
    except msgspec.MsgspecError as error:  # the edge turns exactly these into InvalidInput
        message = validation_message(error)
        assert MARKER not in message  # msgspec names the field, never echoes the value
        return None


@FAST
@given(request_type=st.sampled_from(REQUEST_TYPES), body=bodies)
def test_decoders_raise_only_invalid_input_on_any_json_object(
    request_type: type[msgspec.Struct], body: dict[str, Any]
) -> None:
    _decode(request_type, msgspec.json.encode(body))


@FAST
@given(request_type=st.sampled_from(REQUEST_TYPES), value=json_values)
def test_decoders_raise_only_invalid_input_on_any_json_value(
    request_type: type[msgspec.Struct], value: Any
) -> None:
    _decode(request_type, msgspec.json.encode(value))


@FAST
@given(request_type=st.sampled_from(REQUEST_TYPES), data=st.binary(max_size=200))
def test_decoders_raise_only_invalid_input_on_any_bytes(
    request_type: type[msgspec.Struct], data: bytes
) -> None:
    _decode(request_type, data)


@FAST
@given(
    request_type=st.sampled_from(REQUEST_TYPES),
    field=st.sampled_from(FIELDS),
    text=st.text(max_size=40),
)
def test_a_rejected_value_never_reaches_the_message(
    request_type: type[msgspec.Struct], field: str, text: str
) -> None:
    _decode(request_type, msgspec.json.encode({field: MARKER + text, "not_a_field": MARKER}))


# The VM aggregate ---------------------------------------------------------------------------

SECRETS = ("", "alpha", "beta")
SIDS = ("vm_a", "vm_b")
TRANSITIONS = (
    {  # the contract's Vm status graph; `None` is "no VM yet"
        (None, "deploying"),
        ("deploying", "running"),
        ("deploying", "failed"),
        ("running", "stopped"),
        ("stopped", "running"),
        ("running", "running"),
    }
    | {(s, "deleting") for s in ("deploying", "running", "failed", "stopped", "deleting")}
    | {("deleting", "deleted")}
)

KEEP_STATUS = (vm_events.VmOperationFailed, vm_events.VmSecretMigrated)  # they change no status

sid = st.sampled_from(SIDS)
secret = st.sampled_from(SECRETS)
text = st.text(max_size=20)
at = st.just(START)  # an outcome's own time; decide stamps the decision's over it
vm_commands = st.one_of(
    st.builds(vms.DeployVm, name=st.just("web"), secret=secret),
    *(
        st.builds(cls, sid=sid, secret=secret)
        for cls in (vms.StartVm, vms.StopVm, vms.RestartVm, vms.DeleteVm)
    ),
    st.builds(vm_events.VmDeployed, sid=sid, node_id=st.integers(1, 99), mycelium_ip=text, at=at),
    st.builds(vm_events.VmDeployFailed, sid=sid, error=text, at=at),
    st.builds(vm_events.VmDeleted, sid=sid, at=at),
    st.builds(vm_events.VmOperationFailed, sid=sid, operation=text, error=text, at=at),
    st.builds(vms.RekeyVm, sid=sid, new_owner=secret.map(FINGERPRINT)),
)


def _owner_of(command: object) -> str:
    """The fingerprint the caller proves: its secret's, or (for a re-key) the tested one's."""
    return FINGERPRINT(getattr(command, "secret", "alpha"))


def _vm_step(vm: vms.Vm | None, command: vms.VmCommand, at: datetime) -> list[Any]:
    """Decides one command on the one stream under test: its events, or [] for a DomainError."""
    ctx = vms.Context(now=at, owner=_owner_of(command), new_sid="vm_a")
    try:
        return list(vms.decide(vm, command, ctx))
    except DomainError:  # any other exception fails the test
        return []


@FAST
@given(commands=st.lists(vm_commands, max_size=25))
def test_vm_decide_and_evolve_keep_the_invariants(commands: list[vms.VmCommand]) -> None:
    vm: vms.Vm | None = None
    history: list[Any] = []
    for index, command in enumerate(commands):
        at = START + timedelta(seconds=index)
        for event in _vm_step(vm, command, at):
            after = vms.evolve(vm, event)
            assert after == vms.evolve(vm, event)  # pure: the same input, the same output
            move = ((vm.status if vm else None), (after.status if after else None))
            assert move in TRANSITIONS or (move[0] == move[1] and type(event) in KEEP_STATUS)
            vm = after
            history.append(event)
        if vm is not None:
            assert vm.sid == "vm_a"
        _assert_tenancy(vm, at)
    assert vms.fold(history) == vm  # replaying what was decided gives the same state


def _assert_tenancy(vm: vms.Vm | None, at: datetime) -> None:
    """A secret that is not the owner's gets NotFound, exactly as a VM that does not exist."""
    for wrong in SECRETS:
        if vm is not None and FINGERPRINT(wrong) == vm.owner:
            continue
        for cls in (vms.StartVm, vms.StopVm, vms.RestartVm, vms.DeleteVm):
            command = cls(sid="vm_a", secret=wrong)
            with pytest.raises(NotFound) as raised:
                vms.decide(vm, command, vms.Context(now=at, owner=FINGERPRINT(wrong)))
            assert raised.value.message == VM_NOT_FOUND


vm_events = st.one_of(
    *(
        st.builds(cls, sid=sid, at=st.just(START))
        for cls in (
            vm_events.VmStarted,
            vm_events.VmStopped,
            vm_events.VmRestarted,
            vm_events.VmDeleteRequested,
            vm_events.VmDeleted,
        )
    ),
    st.builds(
        vm_events.VmDeployRequested,
        sid=sid,
        name=text,
        owner=text,
        image=text,
        cpu_count=st.integers(),
        memory_gb=st.integers(),
        disk_gb=st.integers(),
        rootfs_gb=st.integers(),
        at=st.just(START),
    ),
    st.builds(
        vm_events.VmDeployed, sid=sid, node_id=st.integers(), mycelium_ip=text, at=st.just(START)
    ),
    st.builds(vm_events.VmDeployFailed, sid=sid, error=text, at=st.just(START)),
    st.builds(vm_events.VmOperationFailed, sid=sid, operation=text, error=text, at=st.just(START)),
    st.builds(vm_events.VmSecretMigrated, sid=sid, owner=text, at=st.just(START)),
)


@FAST
@given(events=st.lists(vm_events, max_size=20))
def test_vm_evolve_is_total_in_any_order(events: list[Any]) -> None:
    vm: vms.Vm | None = None
    for event in events:  # any order, any history: evolve never raises
        vm = vms.evolve(vm, event)
    assert vms.fold(events) == vm


# The user aggregate -------------------------------------------------------------------------

USER_COMMANDS: tuple[type[msgspec.Struct], ...] = tuple(
    t
    for t in users.UserCommand.__args__  # type: ignore[attr-defined]
    if t is not users.ProvisionUser
)
any_user_command = st.one_of(
    st.builds(users.ProvisionUser, username=st.just("alice")),
    *(st.builds(cls) for cls in USER_COMMANDS),
)
STEP_OUTCOMES: dict[str, st.SearchStrategy[Any]] = {
    "forge_user": st.builds(user_events.ForgeUserEnsured),
    "ssh_key": st.builds(user_events.SshKeyGenerated),
    "select_node": st.builds(user_events.NodeSelected),
    "deploy_gateway": st.builds(user_events.GatewayDeployed),
    "wait_ssh": st.builds(user_events.SshReachable),
    "upload_manifest": st.builds(user_events.ManifestUploaded),
    "run_setup": st.builds(user_events.SetupCompleted, exit_status=st.sampled_from([0, 0, 0, 2])),
    "verify_health": st.builds(user_events.HealthVerified, status_code=st.sampled_from([200, 503])),
}
DECOMMISSION_OUTCOMES = st.one_of(
    st.builds(user_events.GatewayDeleted),
    st.builds(user_events.UserVmDeleted, vm_sid=st.just("vm_u")),
    st.builds(users.RecordDecommissionFailed),
    st.builds(user_events.UserDecommissioned),
)


def _plausible(user: user_state.User | None) -> st.SearchStrategy[Any]:
    """What the process manager would report next, so sequences get past the first step."""
    if user is None or user.status in ("ready", "failed", "decommissioned"):
        return st.sampled_from(
            [users.ProvisionUser(username="alice"), users.DecommissionUser(username="alice")]
        )
    if user.status == "decommissioning":
        return DECOMMISSION_OUTCOMES
    if user.step == "deploy_vm":
        if not user.vm_sid:
            return st.builds(user_events.UserVmDeployRequested, vm_sid=st.just("vm_u"))
        return st.builds(user_events.UserVmDeployed, vm_sid=st.just(user.vm_sid))
    return STEP_OUTCOMES.get(user.step, any_user_command)


@FAST
@given(data=st.data())
def test_user_decide_raises_only_domain_errors_and_evolve_is_total(data: st.DataObject) -> None:
    user: user_state.User | None = None
    history: list[Any] = []
    for index in range(data.draw(st.integers(0, 40))):
        random_one = data.draw(st.integers(0, 3)) == 0
        command = data.draw(any_user_command if random_one else _plausible(user))
        try:
            decided = users.decide(user, command, users.Context(now=START + timedelta(index)))
        except DomainError:  # any other exception fails the test
            continue
        for event in decided:
            after = user_state.evolve(user, event)
            assert after == user_state.evolve(user, event)  # pure
            user = after
        history.extend(decided)
        if user is not None:
            assert user.status in UserStatus.__args__  # type: ignore[attr-defined]
            assert user.status != "ready" or user.step == "done"
    assert user_state.fold(history) == user
