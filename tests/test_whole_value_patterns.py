"""A pattern matches the whole value: a trailing newline or a control character is outside it.

msgspec checks `Meta(pattern=…)` with `re.search`, and Python's `$` also matches before a final
`\\n`, so `^…$` let `"web\\n"` through. Every request field with a pattern and every header rule is
tried here through the decoder and over the wire, and nothing is appended.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client
from nats.protocol import command as prot_command

from core.errors import InvalidInput
from core.operations import BEARER_PATTERN, IDEMPOTENCY_KEY_PATTERN
from hero_deployer.sdk.asyncapi import build_spec, ecma_pattern
from hero_deployer.sdk.client import OPERATIONS_BY_NAME
from tests.conftest import TOKEN, Service
from tests.helpers import REQUEST_BODIES, strings_under

AUTH = {"Authorization": f"Bearer {TOKEN}"}

# A valid value per field that has a pattern (REQUEST_BODIES: a valid request per operation).
VALUES: dict[str, str] = {
    "name": "web",
    "image": "ubuntu-24.04",
    "username": "alice",
    "forge_email": "alice@example.com",
    "profile": "demo",
    "stream": "vm:vm_0123456789abcdef",
}
FIELDS: list[tuple[str, str]] = [
    ("deploy_vm", "name"),
    ("deploy_vm", "image"),
    ("provision_user", "username"),
    ("provision_user", "forge_email"),
    ("provision_user", "profile"),
    ("decommission_user", "username"),
    ("get_user", "username"),
    ("reveal_initial_password", "username"),
    ("events", "stream"),
    ("audit_events", "stream"),
]


def variants(value: str) -> dict[str, str]:
    """The value with a trailing LF or CR, and with CR, TAB or NUL inside."""
    return {
        "trailing LF": value + "\n",
        "trailing CRLF": value + "\r\n",
        "trailing CR": value + "\r",
        "CR inside": value[:1] + "\r" + value[1:],
        "TAB inside": value[:1] + "\t" + value[1:],
        "NUL inside": value[:1] + "\x00" + value[1:],
    }


CASES = [
    pytest.param(op, field, bad, id=f"{op}.{field}-{how}")
    for op, field in FIELDS
    for how, bad in variants(VALUES[field]).items()
]


def patterned_fields(request: type[msgspec.Struct]) -> dict[str, str]:
    """Every string field of a request type that carries a pattern, with its pattern."""
    info = msgspec.inspect.type_info(request)
    assert isinstance(info, msgspec.inspect.StructType)
    found: dict[str, str] = {}
    for field in info.fields:
        kinds = (
            field.type.types if isinstance(field.type, msgspec.inspect.UnionType) else [field.type]
        )
        for kind in kinds:
            if isinstance(kind, msgspec.inspect.StrType) and kind.pattern is not None:
                found[field.encode_name] = kind.pattern
    return found


def test_every_field_with_a_pattern_is_tried_here() -> None:
    discovered = {
        (name, field)
        for name, op in OPERATIONS_BY_NAME.items()
        for field in patterned_fields(op.request)
    }
    assert discovered <= set(FIELDS)
    assert {"name", "image", "forge_email", "profile", "stream"} <= {f for _, f in discovered}


@pytest.mark.parametrize(("op", "field"), FIELDS)
def test_the_valid_value_decodes(op: str, field: str) -> None:
    """The baseline: the same request with the clean value is accepted."""
    decoder = msgspec.json.Decoder(OPERATIONS_BY_NAME[op].request)
    decoded = decoder.decode(msgspec.json.encode({**REQUEST_BODIES[op], field: VALUES[field]}))
    assert getattr(decoded, field) == VALUES[field]


@pytest.mark.parametrize(("op", "field", "bad"), CASES)
def test_the_decoder_refuses_it(op: str, field: str, bad: str) -> None:
    decoder = msgspec.json.Decoder(OPERATIONS_BY_NAME[op].request)
    with pytest.raises((msgspec.ValidationError, InvalidInput)):
        decoder.decode(msgspec.json.encode({**REQUEST_BODIES[op], field: bad}))


@pytest.mark.parametrize(("op", "field", "bad"), CASES)
async def test_the_service_refuses_it_and_appends_nothing(
    service: Service, op: str, field: str, bad: str
) -> None:
    before = await service.app.store.last_position()
    body = msgspec.json.encode({**REQUEST_BODIES[op], field: bad})
    reply, headers = await service.request(op, body, AUTH)
    assert reply["ok"] is False
    assert reply["error"]["code"] == "InvalidInput", reply
    assert headers["Nats-Service-Error-Code"] == "400"
    assert await service.app.store.last_position() == before
    assert (await service.client.call("health"))["status"] == "ok"  # still serving


# Header rules ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "valid"),
    [(BEARER_PATTERN, f"Bearer {TOKEN}"), (IDEMPOTENCY_KEY_PATTERN, "key-1")],
    ids=["Authorization", "Idempotency-Key"],
)
def test_each_header_rule_is_whole_value(pattern: str, valid: str) -> None:
    """msgspec-style `search`, as the edge uses it: only the clean value matches."""
    rule = re.compile(pattern)
    assert rule.search(valid)
    for how, bad in variants(valid).items():
        assert rule.search(bad) is None, how


def header_block(headers: dict[str, bytes]) -> bytes:
    """A NATS header block as given, byte for byte (nats-py would trim and replace CR/LF)."""
    lines = b"".join(name.encode() + b": " + value + b"\r\n" for name, value in headers.items())
    return b"NATS/1.0\r\n" + lines + b"\r\n"


async def raw_request(
    nc: Client, subject: str, headers: dict[str, bytes], body: bytes
) -> tuple[dict[str, Any], dict[str, str]]:
    """Sends an HPUB with exactly these header bytes; returns the decoded reply and headers."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, max_msgs=1)
    await nc._send_command(prot_command.hpub_cmd(subject, inbox, header_block(headers), body))
    await nc.flush()
    msg = await sub.next_msg(timeout=10)
    return msgspec.json.decode(msg.data), dict(msg.headers or {})


INSIDE = {"TAB inside": b"\t", "NUL inside": b"\x00", "DEL inside": b"\x7f", "ESC inside": b"\x1b"}


@pytest.mark.parametrize("inside", INSIDE.values(), ids=INSIDE.keys())
async def test_a_control_character_in_a_header_is_refused_over_the_wire(
    service: Service, inside: bytes
) -> None:
    subject = f"{service.settings.prefix}.deploy_vm"
    body = msgspec.json.encode(REQUEST_BODIES["deploy_vm"])
    bearer = f"Bearer {TOKEN}".encode()
    before = await service.app.store.last_position()

    reply, headers = await raw_request(
        service.nc, subject, {"Authorization": bearer[:9] + inside + bearer[9:]}, body
    )
    assert reply["error"]["code"] == "Unauthorized", reply
    assert headers["Nats-Service-Error-Code"] == "401"

    key = b"key" + inside + b"1"
    reply, headers = await raw_request(
        service.nc, subject, {"Authorization": bearer, "Idempotency-Key": key}, body
    )
    assert reply["error"]["code"] == "InvalidInput", reply
    assert headers["Nats-Service-Error-Code"] == "400"
    assert await service.app.store.last_position() == before


async def test_a_trailing_newline_in_a_header_never_reaches_the_edge(service: Service) -> None:
    """NATS header values are trimmed on receipt, so `key\\n` is the key `key`, not a new one.

    nats-io/nats.py nats/aio/client.py `_parse_header_lines` splits the block on CRLF and strips
    each value; the edge's rules then see no trailing whitespace at all.
    """
    subject = f"{service.settings.prefix}.deploy_vm"
    body = msgspec.json.encode(REQUEST_BODIES["deploy_vm"])
    auth = {"Authorization": f"Bearer {TOKEN}".encode()}
    first, _ = await raw_request(service.nc, subject, {**auth, "Idempotency-Key": b"k1\n"}, body)
    again, _ = await raw_request(service.nc, subject, {**auth, "Idempotency-Key": b"k1"}, body)
    assert first["ok"] is True
    assert again == first  # the replay of the same key
    assert len((await service.client.call("list_vms", {"secret": "s"}))["vms"]) == 1


# The AsyncAPI document ------------------------------------------------------------------------


def test_the_document_gives_every_pattern_in_its_ecma_262_whole_value_form() -> None:
    """ECMA-262 has no `\\Z`; its `^…$` without the m flag already spans the whole value."""
    patterns = strings_under("pattern", build_spec())
    assert patterns
    for pattern in patterns:
        assert "\\Z" not in pattern and "\\A" not in pattern, pattern
        assert pattern.startswith("^") and pattern.endswith("$"), pattern
    documented = set(patterns)
    for name, op in OPERATIONS_BY_NAME.items():
        for field, pattern in patterned_fields(op.request).items():
            assert ecma_pattern(pattern) in documented, (name, field)
    assert ecma_pattern(BEARER_PATTERN) in documented
    assert ecma_pattern(IDEMPOTENCY_KEY_PATTERN) in documented


@pytest.mark.parametrize(
    ("python", "ecma"),
    [
        (r"^[a-z]+\Z", "^[a-z]+$"),
        (r"\A(vm|user):x\Z", "^(vm|user):x$"),
        (r"^a\\Z\Z", r"^a\\Z$"),  # an escaped backslash then `Z` is a literal, kept
        (r"^[\x00-\x1f]\.\Z", r"^[\x00-\x1f]\.$"),
    ],
)
def test_ecma_pattern_converts_only_the_anchors(python: str, ecma: str) -> None:
    assert ecma_pattern(python) == ecma
    # ECMA `^…$` (no m flag) is Python's fullmatch of the same body
    body = ecma[1:-1]
    for sample in ("abc", "abc\n", "vm:x", "vm:x\n", "a\\Z", "\x01.", "\x01.\n"):
        assert bool(re.search(python, sample)) == bool(re.fullmatch(body, sample)), sample
