"""Events are tagged end to end, and the log keeps the bytes it always has."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

import msgspec
import pytest

from core.contract import DecommissionPart, Step
from core.domain import EVENTS, USERS, VMS
from core.events import Event, NewEvent, event_data, stream_name, stream_parts
from core.user import UserEvent
from core.user_events import DecommissionActionFailed, StepFailed
from core.vm_events import VmEvent, VmStarted
from tests.test_user_aggregate import SAMPLES as USER_SAMPLES
from tests.test_vm_aggregate import SAMPLES as VM_SAMPLES

SAMPLES = [*VM_SAMPLES, *USER_SAMPLES]
AT = datetime(2025, 1, 1, 12, 16, 40, tzinfo=UTC)
STORED = [  # (type, data) of one row of every event type, as the log held them at d932ac9
    tuple(line.split(b" ", 1))
    for line in (Path(__file__).parent / "stored_events.txt").read_bytes().splitlines()
    if not line.startswith(b"#")
]


@pytest.mark.parametrize("event", SAMPLES, ids=lambda e: type(e).__name__)
def test_stored_data_is_the_untagged_json_of_every_field(event: Event) -> None:
    untagged = msgspec.json.encode(msgspec.structs.asdict(event))
    assert event_data(event) == untagged
    assert NewEvent.of(event).data == untagged
    assert NewEvent.of(event).type == type(event).__name__


@pytest.mark.parametrize("event", SAMPLES, ids=lambda e: type(e).__name__)
def test_the_one_decoder_reads_stored_data_back(event: Event) -> None:
    decoded = EVENTS.decode(type(event).__name__, event_data(event))
    assert decoded == event
    assert type(decoded) is type(event)


@pytest.mark.parametrize("event", SAMPLES, ids=lambda e: type(e).__name__)
def test_each_union_is_a_tagged_union(event: Event) -> None:
    union = VmEvent if type(event) in VMS.types else UserEvent
    tagged = msgspec.json.encode(event)
    assert tagged.startswith(b'{"type":"' + type(event).__name__.encode() + b'"')
    assert msgspec.json.decode(tagged, type=union) == event


def test_every_event_type_has_a_stored_row() -> None:
    assert {name.decode() for name, _ in STORED} == {t.__name__ for t in EVENTS.types}


@pytest.mark.parametrize(("name", "data"), STORED, ids=lambda v: v.decode()[:24])
def test_a_stored_row_decodes_and_encodes_to_the_same_bytes(name: bytes, data: bytes) -> None:
    """Field order and encoding stay as they were: the hash chain and old logs depend on it."""
    event = EVENTS.decode(name.decode(), data)
    assert type(event).__name__ == name.decode()
    assert event_data(event) == data
    assert NewEvent.of(event).data == data


def test_an_old_log_row_decodes_unchanged() -> None:
    stored = b'{"sid":"vm_1","at":"2025-01-01T00:00:00Z"}'  # a row as written before tags
    event = EVENTS.decode("VmStarted", stored)
    assert event == VmStarted(sid="vm_1", at=datetime(2025, 1, 1, tzinfo=UTC))
    assert event_data(event) == stored


def test_an_event_without_fields_is_stored_as_an_empty_object() -> None:
    class Nothing(Event, frozen=True, kw_only=True):
        pass

    assert event_data(Nothing()) == b"{}"


def test_stream_ids_are_built_and_parsed_by_one_pair() -> None:
    assert stream_name("vm", "vm_1") == VMS.stream("vm_1") == "vm:vm_1"
    assert stream_parts("user:alice") == ("user", "alice")
    assert stream_parts("user:a:b") == ("user", "a:b")
    assert USERS.id_of("user:alice") == "alice"
    assert VMS.id_of("user:alice") is None
    assert {t.__name__ for t in EVENTS.types} == {t.__name__ for t in (*VMS.types, *USERS.types)}


@pytest.mark.parametrize(
    ("built", "data", "name"),
    [
        (
            StepFailed(username="alice", step=Step.DEPLOY_VM, reason="down", attempts=5, at=AT),
            b'{"username":"alice","step":"deploy_vm","reason":"down","attempts":5,',
            Step.DEPLOY_VM,
        ),
        (
            DecommissionActionFailed(
                username="alice", part=DecommissionPart.DELETE_VM, reason="x", attempts=1, at=AT
            ),
            b'{"username":"alice","part":"delete_vm","reason":"x","attempts":1,',
            DecommissionPart.DELETE_VM,
        ),
    ],
    ids=["step", "part"],
)
def test_a_step_or_part_is_stored_as_the_string_it_always_was(
    built: StepFailed | DecommissionActionFailed, data: bytes, name: StrEnum
) -> None:
    """Step and DecommissionPart are StrEnums: the log holds their names, as it did before."""
    stored = data + b'"at":"2025-01-01T12:16:40Z"}'
    assert event_data(built) == stored
    decoded = EVENTS.decode(type(built).__name__, stored)
    assert decoded == built
    assert type(decoded.step if isinstance(decoded, StepFailed) else decoded.part) is type(name)
