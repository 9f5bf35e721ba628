"""The registry: every operation declared once, and what derives from it."""

from __future__ import annotations

import ast

import msgspec
import pytest

from bench.op_names import files_by_operation, named, over_limit, source_files
from core.contract import AuditEventsRequest, EventsRequest, GetVm, RestartVm, VmOut
from core.registry import OPERATIONS, Op, Registry
from hero_deployer.app.settings import Settings
from hero_deployer.sdk.client import HeroDeployerClient
from tests.conftest import TOKEN, Service
from tests.helpers import REQUEST_BODIES

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_every_operation_has_a_body_here() -> None:
    assert set(REQUEST_BODIES) == {op.name for op in OPERATIONS}


@pytest.mark.parametrize("op", list(OPERATIONS), ids=lambda op: op.name)
def test_a_request_type_takes_its_body_and_refuses_a_type_field(op: Op) -> None:
    decoder = msgspec.json.Decoder(op.request)
    assert isinstance(decoder.decode(msgspec.json.encode(REQUEST_BODIES[op.name])), op.request)
    with pytest.raises(msgspec.ValidationError, match="unknown field `type`"):
        decoder.decode(msgspec.json.encode({**REQUEST_BODIES[op.name], "type": op.name}))


@pytest.mark.parametrize("op", list(OPERATIONS), ids=lambda op: op.name)
def test_a_request_encodes_without_a_type_field(op: Op) -> None:
    request = msgspec.json.decode(msgspec.json.encode(REQUEST_BODIES[op.name]), type=op.request)
    assert "type" not in msgspec.json.decode(msgspec.json.encode(request))


def test_an_operation_is_found_by_its_name_and_by_its_request() -> None:
    assert OPERATIONS["restart_vm"].request is RestartVm
    assert OPERATIONS.of(RestartVm(sid="vm_x", secret="s")).name == "restart_vm"
    assert OPERATIONS.of(AuditEventsRequest()).name == "audit_events"
    assert OPERATIONS.of(EventsRequest()).name == "events"
    assert "restart_vm" in OPERATIONS and "reboot_vm" not in OPERATIONS
    assert OPERATIONS.row(RestartVm).name == "restart_vm"
    assert OPERATIONS.row(AuditEventsRequest).name == "audit_events"
    with pytest.raises(KeyError):
        OPERATIONS.row(VmOut)  # a result type is no operation's request


def test_a_registry_refuses_two_rows_with_one_name_or_one_request() -> None:
    row = OPERATIONS["get_vm"]
    with pytest.raises(ValueError, match="its own name"):
        Registry(row, Op("get_vm", RestartVm, VmOut, "twin"))
    with pytest.raises(ValueError, match="its own request type"):
        Registry(row, Op("peek_vm", GetVm, VmOut, "twin"))


def test_mutating_operations_are_those_the_rows_say() -> None:
    assert OPERATIONS.mutating == {op.name for op in OPERATIONS if op.mutates}
    assert {"deploy_vm", "restart_vm", "migrate_secret", "provision_user"} <= OPERATIONS.mutating
    assert not {"get_vm", "list_vms", "events", "audit_events", "health"} & OPERATIONS.mutating


async def test_the_service_answers_each_row_on_its_own_subject(service: Service) -> None:
    assert [op.name for op in service.app.operations] == [op.name for op in OPERATIONS]
    for op in OPERATIONS:
        reply, _ = await service.request(
            op.name, msgspec.json.encode(REQUEST_BODIES[op.name]), AUTH
        )
        if reply["ok"]:
            continue  # a body of the row's type was taken
        error = reply["error"]
        assert isinstance(error, dict)
        assert error["code"] in {"NotFound", "InvalidState"}, (op.name, error)


async def test_send_returns_the_result_type_of_the_requests_row(service: Service) -> None:
    client: HeroDeployerClient = service.client
    vm = await client.deploy_vm(name="web", secret="s3cret")
    got = await client.send(GetVm(sid=vm.sid, secret="s3cret"))
    assert isinstance(got, VmOut) and got.sid == vm.sid
    page = await client.send(AuditEventsRequest(stream=f"vm:{vm.sid}"))
    assert type(page) is OPERATIONS["audit_events"].result
    assert page.events[0].type == "VmDeployRequested"


def test_the_unauthenticated_operations_are_those_the_rows_say() -> None:
    assert OPERATIONS.unauthenticated == {op.name for op in OPERATIONS if not op.authenticated}
    assert OPERATIONS.unauthenticated == {"health"}
    assert Settings().exempt == OPERATIONS.unauthenticated


def test_an_operation_counts_where_it_stands_as_the_operation() -> None:
    tree = ast.parse(
        "def health(): ...\n"
        "x = client.events()\n"
        "call('get_vm')\n"
        "[].list_vms()\n"
        "events = 1\n"
        "f(list_users=2)\n"
        "'''health, in prose'''\n"
    )
    names = frozenset(op.name for op in OPERATIONS)
    assert named(tree, names) == {"health", "events", "get_vm"}


def test_each_operation_is_named_in_at_most_three_source_files() -> None:
    """Outside tests/ and adapters/ (a backend speaks its own protocol), bench/ included."""
    counted = files_by_operation(source_files(bench=True))
    assert set(counted) == {op.name for op in OPERATIONS}
    assert all(counted.values())  # the measure finds each (the registry names every one)
    assert over_limit(bench=True) == {}
