"""The generated AsyncAPI document: up to date, valid AsyncAPI 3.0.0, and true to the service."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from core.user_events import USER_EVENT_TYPES
from core.vm_events import VM_EVENT_TYPES
from hero_deployer.sdk.asyncapi import build_spec, render_spec
from hero_deployer.sdk.client import OPERATIONS
from tests.conftest import TOKEN, Service
from tests.helpers import strings_under

ROOT = Path(__file__).resolve().parent.parent
CHECKED_IN = ROOT / "docs" / "asyncapi.json"
ASYNCAPI_SCHEMA = Path(__file__).resolve().parent / "schemas" / "asyncapi-3.0.0.json"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_the_checked_in_copy_is_up_to_date() -> None:
    assert CHECKED_IN.read_text(encoding="utf-8") == render_spec(), (
        "docs/asyncapi.json is out of date: run "
        "`.venv/bin/python -m hero_deployer.sdk.asyncapi --output docs/asyncapi.json`"
    )


@pytest.mark.parametrize("prefix", ["hero.v1", "t0.v1"])
def test_the_document_is_valid_asyncapi_3(prefix: str) -> None:
    schema = json.loads(ASYNCAPI_SCHEMA.read_text(encoding="utf-8"))
    errors = [
        f"{list(e.absolute_path)}: {e.message[:200]}"
        for e in jsonschema.Draft7Validator(schema).iter_errors(build_spec(prefix))
    ]
    assert errors == []


def _resolve(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = document
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def test_every_reference_resolves() -> None:
    spec = build_spec()
    for ref in strings_under("$ref", spec):
        _resolve(spec, ref)


def test_every_operation_and_event_type_is_described() -> None:
    spec = build_spec("x.v2")
    for op in OPERATIONS:
        assert spec["channels"][op.name]["address"] == f"x.v2.{op.name}"
        operation = spec["operations"][op.name]
        assert operation["action"] == "receive"
        assert operation["reply"]["channel"] == {"$ref": f"#/channels/{op.name}.reply"}
        headers = spec["components"]["messages"][f"{op.name}.request"]["headers"]
        assert ("Idempotency-Key" in headers["properties"]) == op.mutates
        assert ("Authorization" in headers.get("required", [])) == (op.name != "health")
    for kind, parameter, types in (
        ("vm", "sid", VM_EVENT_TYPES),
        ("user", "username", USER_EVENT_TYPES),
    ):
        for event in types:
            channel = spec["channels"][f"events.{kind}.{event.__name__}"]
            assert channel["address"] == f"x.v2.events.{kind}.{{{parameter}}}.{event.__name__}"
            assert set(channel["parameters"]) == {parameter}
    codes = spec["components"]["schemas"]["ErrorReply"]["properties"]["error"]["properties"]
    assert codes["code"]["enum"] == [
        "InvalidInput", "Unauthorized", "NotFound", "Conflict", "InvalidState", "Unavailable",
        "Internal",
    ]  # fmt: skip


def _validator(spec: dict[str, Any], pointer: str) -> jsonschema.Validator:
    root = {**spec, "$ref": pointer}
    return jsonschema.Draft202012Validator(root)


async def test_real_replies_and_events_match_their_schemas(service: Service) -> None:
    """The document is checked against what the running service actually sends."""
    prefix = service.settings.prefix
    spec = build_spec(prefix)
    payload = "#/components/schemas/"

    sub = await service.nc.subscribe(f"{prefix}.events.>")
    await service.nc.flush()
    body, _ = await service.request("deploy_vm", b'{"name":"a","secret":"s"}', AUTH)
    _validator(spec, payload + "deploy_vm.reply").validate(body)
    sid = body["result"]["sid"]  # type: ignore[index]
    for operation, request in (
        ("get_vm", {"sid": sid, "secret": "s"}),
        ("list_vms", {"secret": "s"}),
        ("events", {"limit": 10}),
        ("health", {}),
    ):
        reply, _ = await service.request(operation, json.dumps(request).encode(), AUTH)
        _validator(spec, payload + f"{operation}.reply").validate(reply)
        _validator(spec, payload + spec_request(spec, operation)).validate(request)

    error, headers = await service.request("get_vm", b'{"sid":"vm_x","secret":"s"}', AUTH)
    _validator(spec, payload + "ErrorReply").validate(error)
    error_message = spec["components"]["messages"]["ErrorReply"]
    jsonschema.Draft202012Validator(error_message["headers"]).validate(headers)

    async with asyncio.timeout(10):
        while True:
            msg = await sub.next_msg(timeout=None)
            event = json.loads(msg.data)
            name = event["type"]
            assert msg.subject == f"{prefix}.events.vm.{sid}.{name}"
            _validator(spec, payload + f"{name}Envelope").validate(event)
            if name == "VmDeployed":
                break
    await sub.unsubscribe()


def spec_request(spec: dict[str, Any], operation: str) -> str:
    ref: str = spec["components"]["messages"][f"{operation}.request"]["payload"]["$ref"]
    return ref.rsplit("/", 1)[1]


def test_invalid_requests_fail_their_schema() -> None:
    spec = build_spec()
    deploy = _validator(spec, "#/components/schemas/DeployVm")
    deploy.validate({"name": "a", "secret": "s", "cpu_count": 2})
    for bad in (
        {"secret": "s"},
        {"name": "a b", "secret": "s"},
        {"name": "a", "secret": "s", "cpu_count": 65},
        {"name": "a", "secret": "s", "admin": True},
    ):
        with pytest.raises(jsonschema.ValidationError):
            deploy.validate(bad)
