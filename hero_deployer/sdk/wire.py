"""What travels besides a body: the reply envelope, error codes, the caller's identity and label,
and the tries of one request."""

from __future__ import annotations

import asyncio
import getpass
import re
import socket
from pathlib import Path
from typing import Any, TypedDict

import msgspec
from nats.aio.client import Client
from nats.errors import (
    ConnectionClosedError,
    ConnectionReconnectingError,
    NoRespondersError,
    OutboundBufferLimitError,
)
from nats.errors import TimeoutError as NatsTimeout

from core.domain import EVENTS
from core.errors import ERRORS_BY_CODE, DomainError, Internal, Unavailable
from core.events import Event, EventOut
from core.retry import RetryPolicy


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


async def request_with_retries(
    nc: Client,
    subject: str,
    payload: bytes,
    *,
    headers: dict[str, str],
    timeout: float,
    policy: RetryPolicy,
) -> bytes:
    """Sends one request, again (per `policy`) after a timeout, a reconnect or no responders;
    returns its reply's `result` or raises the reply's error."""
    operation = subject.rpartition(".")[2]
    failure: Unavailable = Unavailable("no attempt was made")
    for tries in range(1, policy.tries_of() + 1):
        try:
            msg = await nc.request(subject, payload, timeout=timeout, headers=headers)
        except NoRespondersError:
            failure = Unavailable("no hero-deployer is answering on NATS")
        except NatsTimeout:
            failure = RequestTimeout(f"{operation} timed out after {timeout:g}s")
            continue  # the reply is late or lost: send again at once
        except (ConnectionReconnectingError, OutboundBufferLimitError):
            failure = Unavailable("the NATS connection is reconnecting")
        except ConnectionClosedError:
            raise Unavailable("the NATS connection is closed") from None
        else:
            return result_of(msg.data)
        if tries < policy.tries_of():
            await asyncio.sleep(policy.delay(tries))
    raise failure


def decode_event(event: EventOut) -> Event:
    """The domain event (`core.vm` or `core.user`) an EventOut carries, e.g. a `VmStarted`."""
    return EVENTS.decode(event.type, bytes(event.data))


def event_dict(event: EventOut) -> dict[str, Any]:
    """The event as plain JSON values (the CLI's `events --follow`)."""
    value: dict[str, Any] = msgspec.json.decode(msgspec.json.encode(event))
    return value
