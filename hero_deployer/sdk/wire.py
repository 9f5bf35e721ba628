"""What travels besides a body: the reply envelope, error codes, the caller's identity and label."""

from __future__ import annotations

import getpass
import re
import socket
from pathlib import Path
from typing import Any, TypedDict

import msgspec

from core.domain import EVENTS
from core.errors import ERRORS_BY_CODE, DomainError, Internal, Unavailable
from core.events import Event, EventOut


class RequestTimeout(Unavailable):
    """No reply in time: unlike a service's Unavailable, the request may have been recorded.

    Repeat it with the same Idempotency-Key (the SDK's own retries do) to learn its outcome.
    """


def local_actor(kind: str) -> str:
    """`kind user@host` for this process, within the Hero-Actor rule (other characters as "_")."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    label = f"{kind} {user}@{socket.gethostname()}"
    return re.sub(r"[^A-Za-z0-9 ._@:+/-]", "_", label)[:64]


# Replies ------------------------------------------------------------------------------------


class _Error(msgspec.Struct):
    code: str
    message: str


class _Reply(msgspec.Struct):
    ok: bool
    result: msgspec.Raw = msgspec.Raw(b"null")
    error: _Error | None = None


_reply_decoder = msgspec.json.Decoder(_Reply)


def raise_error(code: str, message: str) -> DomainError:
    """The `core.errors` exception of a contract error code; an unknown code is Internal."""
    return ERRORS_BY_CODE.get(code, Internal)(message)


class NatsIdentity(TypedDict, total=False):
    """The identity a client connects with: an NKey seed file or a creds file (JWT and seed)."""

    nkey: Path
    creds: Path


def nats_credentials(
    *, nkey: str | Path | None = None, creds: str | Path | None = None
) -> dict[str, str]:
    """The `nats.connect` options that authenticate with an NKey seed file or a creds file."""
    if nkey is not None and creds is not None:
        raise ValueError("give an NKey seed or a creds file, not both")
    if nkey is not None:
        return {"nkeys_seed": str(nkey)}
    if creds is not None:
        return {"user_credentials": str(creds)}
    return {}


def result_of(data: bytes) -> bytes:
    try:
        reply = _reply_decoder.decode(data)
    except msgspec.DecodeError:
        raise Internal("malformed reply from hero-deployer") from None
    if reply.ok:
        return bytes(reply.result)
    error = reply.error or _Error(code="Internal", message="malformed reply")
    raise raise_error(error.code, error.message)


def decode_event(event: EventOut) -> Event:
    """The domain event (`core.vm` or `core.user`) an EventOut carries, e.g. a `VmStarted`."""
    return EVENTS.decode(event.type, bytes(event.data))


def event_dict(event: EventOut) -> dict[str, Any]:
    """The event as plain JSON values (the CLI's `events --follow`)."""
    value: dict[str, Any] = msgspec.json.decode(msgspec.json.encode(event))
    return value
