"""core.structs: one frozen keyword-only base, and one way to copy a Struct into another shape."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import pytest

from core.contract import DeployVm, ProvisionUser
from core.structs import Frozen, from_fields
from core.user_events import ProvisioningRequested
from core.vm_events import VmDeployRequested

AT = datetime(2026, 11, 30, tzinfo=UTC)


class Point(Frozen):
    x: int
    label: str = ""
    y: int  # a required field after a default: only keyword-only allows it


class Loose(Frozen, kw_only=False):
    x: int


def test_a_subclass_is_frozen_and_keyword_only_without_saying_so() -> None:
    point = Point(x=1, y=2)
    with pytest.raises(AttributeError):
        point.x = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        Point(1, "a", 2)  # type: ignore[misc]
    assert Point.__struct_config__.frozen


def test_a_class_line_still_chooses_for_itself() -> None:
    assert Loose(5) == Loose(x=5)


def test_defstruct_can_extend_a_frozen_struct() -> None:
    """msgspec.defstruct hands the metaclass its fields as __slots__ (msgspec#974)."""
    tagged = msgspec.defstruct("Tagged", [("z", int)], bases=(Point,), kw_only=True, tag=True)
    value = tagged(x=1, y=2, z=3)
    assert msgspec.json.encode(value) == b'{"type":"Tagged","x":1,"label":"","y":2,"z":3}'


def test_from_fields_copies_the_shared_fields_and_given_ones_win() -> None:
    request = DeployVm(name="web", secret="s3cr3t", cpu_count=4)
    event = from_fields(VmDeployRequested, request, sid="vm_1", owner="fp", at=AT, name="other")
    assert event == VmDeployRequested(
        sid="vm_1",
        name="other",
        owner="fp",
        image=request.image,
        cpu_count=4,
        memory_gb=request.memory_gb,
        disk_gb=request.disk_gb,
        rootfs_gb=request.rootfs_gb,
        at=AT,
    )
    assert b"s3cr3t" not in msgspec.json.encode(event)  # a field the target lacks stays behind


def test_from_fields_refuses_a_target_whose_required_field_nothing_gives() -> None:
    with pytest.raises(TypeError, match="owner"):
        from_fields(VmDeployRequested, DeployVm(name="web", secret="s"), sid="vm_1", at=AT)


@pytest.mark.parametrize(
    ("request_type", "event_type", "copied"),
    [
        (
            DeployVm,
            VmDeployRequested,
            {"name", "image", "cpu_count", "memory_gb", "disk_gb", "rootfs_gb"}
            | {"slice_sid", "node_id"},
        ),
        (
            ProvisionUser,
            ProvisioningRequested,
            {"username", "display_name", "forge_email", "profile"},
        ),
    ],
)
def test_what_a_request_hands_its_event_by_name_is_exactly_this(
    request_type: type[msgspec.Struct], event_type: type[msgspec.Struct], copied: set[str]
) -> None:
    # from_fields copies every field the two share by name: a new request field that an event
    # also has (a secret above all) would be stored unseen; this list makes it a decision
    shared = set(request_type.__struct_fields__) & set(event_type.__struct_fields__)
    assert shared == copied
    assert "secret" not in event_type.__struct_fields__
