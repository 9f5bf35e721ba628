"""The AsyncAPI 3.0.0 document of the wire contract, generated from the msgspec types.

Every operation is a request-reply operation on `<prefix>.<operation>`; every event type is a
channel of the status stream. `python -m hero_deployer.sdk.asyncapi` prints the document (with
`--prefix P` for another prefix); `docs/asyncapi.json` is its checked-in copy.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any, Final

from core.contract import (
    ACTOR_HEADER,
    AUTHORIZATION_HEADER,
    DEFAULT_PREFIX,
    ERROR_CODE_HEADER,
    ERROR_HEADER,
    IDEMPOTENCY_HEADER,
    QUEUE_GROUP,
    SERVICE_NAME,
)
from core.errors import ERRORS_BY_CODE, DomainError
from core.events import Event
from core.operations import ACTOR_PATTERN, BEARER_PATTERN, IDEMPOTENCY_KEY_PATTERN
from core.registry import OPERATIONS, Op
from core.user_events import USER_EVENT_TYPES
from core.usernames import USERNAME_PATTERN
from core.vm_events import VM_EVENT_TYPES
from hero_deployer import VERSION
from hero_deployer.sdk.schemas import ecma_pattern
from hero_deployer.sdk.schemas import schemas as schemas_of

Json = dict[str, Any]

SCHEMAS: Final = "#/components/schemas/"
MESSAGES: Final = "#/components/messages/"

# When each of the contract's errors is the reply, by its code
WHEN: Final[dict[str, str]] = {
    "InvalidInput": "malformed JSON, unknown or missing field, wrong type, value out of range, "
    "rule broken (empty new secret, old == new)",
    "Unauthorized": "missing, malformed (not `Bearer <token>`) or wrong token",
    "NotFound": "no such VM or user, or the secret does not match: the two are "
    "indistinguishable, in body, headers and timing",
    "Conflict": "concurrent change lost the race after retries; idempotency key reused with "
    "another body",
    "InvalidState": "the action is not valid in the resource's current state (only after the "
    "secret matched)",
    "Unavailable": "a dependency is down; nothing was recorded",
    "Internal": "a bug; the message carries no secret, key or stack trace",
}
ERRORS: Final[tuple[tuple[type[DomainError], str], ...]] = tuple(
    (cls, WHEN[code]) for code, cls in ERRORS_BY_CODE.items()
)

INFO_DESCRIPTION: Final = """\
The request-reply API and the status stream of hero-deployer, over NATS core.

* Every operation has one subject, `<prefix>.<operation>`; the service is a NATS micro service
  named `hero-deployer` whose endpoints share the queue group `hero-deployer`.
* A request is one JSON object; unknown fields, wrong types and missing required fields are
  InvalidInput, with a message that names the field.
* `Authorization: Bearer <token>` is required on every operation but the exempt ones
  (default: `health`). `Idempotency-Key` (1..128 printable ASCII) on a state-changing request
  makes a repeat with the same operation and body return the first reply and append nothing;
  the same key with another body is a Conflict.
* Every reply is `{"ok": true, "result": ...}` or `{"ok": false, "error": {"code", "message"}}`;
  an error reply also carries the micro headers `Nats-Service-Error-Code` and
  `Nats-Service-Error`.
* After an event is committed it is published, in position order, on
  `<prefix>.events.<stream type>.<stream id>.<EventType>`. Positions are gap-free; a subscriber
  that missed messages catches up with `events` from the last position it saw.
"""


def _ref(pointer: str) -> Json:
    return {"$ref": pointer}


def _schema_name(cls: type[Any]) -> str:
    return cls.__name__


def _request_headers(op: Op) -> Json:
    properties: Json = {}
    required: list[str] = []
    if op.authenticated:
        properties[AUTHORIZATION_HEADER] = {
            "type": "string",
            "pattern": ecma_pattern(BEARER_PATTERN),
            "description": "`Bearer <token>`: the service credential, compared in constant time.",
        }
        required.append(AUTHORIZATION_HEADER)
    if op.mutates:
        properties[IDEMPOTENCY_HEADER] = {
            "type": "string",
            "minLength": 1,
            "maxLength": 128,
            "pattern": ecma_pattern(IDEMPOTENCY_KEY_PATTERN),
            "description": (
                "Optional. A repeat with the same key, operation and body gets the first reply "
                "and appends nothing; the same key with another body is a Conflict."
            ),
        }
    properties[ACTOR_HEADER] = {
        "type": "string",
        "pattern": ecma_pattern(ACTOR_PATTERN),
        "description": (
            "Optional. Who sends the request (`dashboard op-3f2a`, `cli alice@host`, `sdk`): "
            "kept with the events it records and shown in the audit log; never a secret."
        ),
    }
    schema: Json = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return schema


def _error_reply_schema() -> Json:
    codes = [cls.code for cls, _ in ERRORS]
    table = "\n".join(f"* `{cls.code}` ({cls.number}): {when}" for cls, when in ERRORS)
    return {
        "type": "object",
        "title": "ErrorReply",
        "description": "The reply to a request that failed.\n\n" + table,
        "properties": {
            "ok": {"type": "boolean", "const": False},
            "error": {
                "type": "object",
                "properties": {
                    "code": {"type": "string", "enum": codes},
                    "message": {
                        "type": "string",
                        "description": "Safe to show; never holds a secret, key or stack trace.",
                    },
                },
                "required": ["code", "message"],
            },
        },
        "required": ["ok", "error"],
    }


def _error_headers() -> Json:
    numbers = sorted({str(cls.number) for cls, _ in ERRORS})
    return {
        "type": "object",
        "properties": {
            ERROR_CODE_HEADER: {"type": "string", "enum": numbers},
            ERROR_HEADER: {"type": "string", "description": "The error message."},
        },
        "required": [ERROR_CODE_HEADER, ERROR_HEADER],
    }


def _ok_reply_schema(op: Op) -> Json:
    return {
        "type": "object",
        "title": f"{op.name} reply",
        "properties": {
            "ok": {"type": "boolean", "const": True},
            "result": _ref(SCHEMAS + _schema_name(op.result)),
        },
        "required": ["ok", "result"],
    }


def _event_envelope(event: type[Event], stream_pattern: str) -> Json:
    name = event.__name__
    return {
        "type": "object",
        "title": f"{name} on the status stream",
        "properties": {
            "position": {"type": "integer", "minimum": 1, "description": "Global, gap-free."},
            "stream": {"type": "string", "pattern": stream_pattern},
            "version": {"type": "integer", "minimum": 1, "description": "Within its stream."},
            "type": {"type": "string", "const": name},
            "data": _ref(SCHEMAS + name),
            "recorded_at": {"type": "string", "format": "date-time"},
        },
        "required": ["position", "stream", "version", "type", "data", "recorded_at"],
    }


def _stream_types() -> tuple[tuple[str, str, str, str, tuple[type[Event], ...]], ...]:
    """(stream type, subject parameter, its description, stream pattern, event types)."""
    return (
        ("vm", "sid", "The VM's sid, e.g. `vm_0123456789abcdef`.", r"^vm:.+$", VM_EVENT_TYPES),
        (
            "user",
            "username",
            f"The username (`{ecma_pattern(USERNAME_PATTERN)}`, 1..40 characters).",
            r"^user:.+$",
            USER_EVENT_TYPES,
        ),
    )


def _messages(op: Op) -> Json:
    """The request and reply messages of one operation."""
    request_id, reply_id = f"{op.name}.request", f"{op.name}.reply"
    return {
        request_id: {
            "name": request_id,
            "title": f"{op.name} request",
            "contentType": "application/json",
            "headers": _request_headers(op),
            "payload": _ref(SCHEMAS + _schema_name(op.request)),
        },
        reply_id: {
            "name": reply_id,
            "title": f"{op.name} reply",
            "contentType": "application/json",
            "payload": _ref(SCHEMAS + reply_id),
        },
    }


def _operation(op: Op, prefix: str) -> tuple[Json, Json, Json]:
    """The channels, the operation and the messages of one request-reply operation."""
    request_id, reply_id = f"{op.name}.request", f"{op.name}.reply"
    channels: Json = {
        op.name: {
            "address": f"{prefix}.{op.name}",
            "title": op.name,
            "messages": {"request": _ref(MESSAGES + request_id)},
        },
        reply_id: {
            "address": None,
            "description": "The request's NATS reply inbox.",
            "messages": {"ok": _ref(MESSAGES + reply_id), "error": _ref(MESSAGES + "ErrorReply")},
        },
    }
    operation: Json = {
        "action": "receive",
        "channel": _ref(f"#/channels/{op.name}"),
        "title": op.name,
        "summary": op.summary,
        "messages": [_ref(f"#/channels/{op.name}/messages/request")],
        "reply": {
            "channel": _ref(f"#/channels/{reply_id}"),
            "messages": [
                _ref(f"#/channels/{reply_id}/messages/ok"),
                _ref(f"#/channels/{reply_id}/messages/error"),
            ],
        },
        "bindings": {"nats": {"queue": QUEUE_GROUP, "bindingVersion": "0.1.0"}},
        "x-idempotency-key": op.mutates,
    }
    if op.description:
        operation["description"] = op.description
    if op.authenticated:
        operation["security"] = [_ref("#/components/securitySchemes/bearer")]
    return channels, operation, _messages(op)


def _event_channel(kind: str, parameter: str, about: str, name: str, prefix: str) -> Json:
    return {
        "address": f"{prefix}.events.{kind}.{{{parameter}}}.{name}",
        "title": f"{name} events",
        "parameters": {parameter: {"description": about}},
        "messages": {name: _ref(MESSAGES + name)},
    }


def _add_events(spec: Json, prefix: str) -> None:
    """Adds each event type's channel, publish operation, message and envelope schema."""
    components = spec["components"]
    for kind, parameter, about, pattern, types in _stream_types():
        for event in types:
            name = event.__name__
            channel_id = f"events.{kind}.{name}"
            components["schemas"][f"{name}Envelope"] = _event_envelope(event, pattern)
            components["messages"][name] = {
                "name": name,
                "title": name,
                "contentType": "application/json",
                "payload": _ref(SCHEMAS + f"{name}Envelope"),
            }
            spec["channels"][channel_id] = _event_channel(kind, parameter, about, name, prefix)
            spec["operations"][f"publish.{kind}.{name}"] = {
                "action": "send",
                "channel": _ref(f"#/channels/{channel_id}"),
                "summary": f"Publishes every committed {name}, in position order.",
                "messages": [_ref(f"#/channels/{channel_id}/messages/{name}")],
            }


def _skeleton(schemas: Json) -> Json:
    """The document without its operations and event channels."""
    return {
        "asyncapi": "3.0.0",
        "info": {"title": SERVICE_NAME, "version": VERSION, "description": INFO_DESCRIPTION},
        "defaultContentType": "application/json",
        "servers": {
            "local": {
                "host": "127.0.0.1:4222",
                "protocol": "nats",
                "description": "The NATS server `hero-deployer up` starts (`--nats-port`).",
            }
        },
        "channels": {},
        "operations": {},
        "components": {
            "schemas": schemas,
            "messages": {
                "ErrorReply": {
                    "name": "ErrorReply",
                    "title": "Error reply",
                    "contentType": "application/json",
                    "headers": _error_headers(),
                    "payload": _ref(SCHEMAS + "ErrorReply"),
                }
            },
            "securitySchemes": {
                "bearer": {
                    "type": "httpApiKey",
                    "name": AUTHORIZATION_HEADER,
                    "in": "header",
                    "description": (
                        "The NATS message header `Authorization: Bearer <token>`; the token is "
                        "`HERO_DEPLOYER_TOKEN` or the `token` file in the data directory."
                    ),
                }
            },
        },
        "x-error-codes": [
            {"code": cls.code, "number": cls.number, "when": when} for cls, when in ERRORS
        ],
    }


def build_spec(prefix: str = DEFAULT_PREFIX) -> Json:
    """The AsyncAPI 3.0.0 document for the service on `prefix`, as plain JSON values."""
    event_types = [e for *_, types in _stream_types() for e in types]
    schemas = schemas_of(list(OPERATIONS), event_types, SCHEMAS)
    schemas["ErrorReply"] = _error_reply_schema()
    spec = _skeleton(schemas)
    for op in OPERATIONS:
        schemas[f"{op.name}.reply"] = _ok_reply_schema(op)
        channels, operation, messages = _operation(op, prefix)
        spec["channels"].update(channels)
        spec["operations"][op.name] = operation
        spec["components"]["messages"].update(messages)
    _add_events(spec, prefix)
    return spec


def render_spec(prefix: str = DEFAULT_PREFIX) -> str:
    """The document as the checked-in `docs/asyncapi.json` holds it."""
    return json.dumps(build_spec(prefix), indent=2, ensure_ascii=False) + "\n"


def print_spec(prefix: str = DEFAULT_PREFIX) -> None:
    """Prints the document (`hero-deployer api-spec`)."""
    sys.stdout.write(render_spec(prefix))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hero_deployer.sdk.asyncapi", description=__doc__
    )
    parser.add_argument("--prefix", default=DEFAULT_PREFIX)
    parser.add_argument("--output", help="write to this file instead of stdout")
    args = parser.parse_args(argv)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as file:
            file.write(render_spec(args.prefix))
    else:
        print_spec(args.prefix)
    return 0


if __name__ == "__main__":
    sys.exit(main())
