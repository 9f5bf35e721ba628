"""The transport edge: a NATS micro service whose every reply is the contract's envelope.

decode → authenticate → dispatch → encode. Every failure becomes a coded error reply, so a
caller never waits for a timeout; replies carry only our headers, never the request's.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import os
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import msgspec
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.micro.request import Request
from nats.micro.service import Service, ServiceConfig

from core.contract import (
    ACTOR_HEADER,
    AUTHORIZATION_HEADER,
    ERROR_CODE_HEADER,
    ERROR_HEADER,
    IDEMPOTENCY_HEADER,
    QUEUE_GROUP,
    SERVICE_NAME,
)
from core.errors import DomainError, Internal, InvalidInput, Unauthorized
from core.operations import (
    ACTOR_PATTERN,
    BEARER_PATTERN,
    IDEMPOTENCY_KEY_PATTERN,
    Operation,
    RequestMeta,
)
from core.registry import OPERATIONS

log = structlog.get_logger(__name__)

# nats-py micro's handlers of `$SRV.PING/INFO/STATS` (nats/micro/service.py, Service.start)
_CONTROL_HANDLERS = ("_handle_ping_request", "_handle_info_request", "_handle_stats_request")

_OK_PREFIX = b'{"ok":true,"result":'
_encoder = msgspec.json.Encoder()


class _ErrorBody(msgspec.Struct, frozen=True):
    code: str
    message: str


class _ErrorReply(msgspec.Struct, frozen=True):
    ok: bool
    error: _ErrorBody


def error_reply(error: DomainError) -> tuple[bytes, dict[str, str]]:
    """The envelope and the micro error headers of a domain error."""
    message = " ".join(error.message.split())[:500]
    body = _encoder.encode(_ErrorReply(ok=False, error=_ErrorBody(error.code, message)))
    return body, {ERROR_CODE_HEADER: str(error.number), ERROR_HEADER: message}


def validation_message(error: msgspec.MsgspecError) -> str:
    """msgspec names the field (`at $.name`) and never echoes the value."""
    if isinstance(error, msgspec.ValidationError):
        return str(error)
    return "malformed JSON: " + str(error).removeprefix("JSON is malformed: ")


_BEARER = re.compile(BEARER_PATTERN)
_IDEMPOTENCY_KEY = re.compile(IDEMPOTENCY_KEY_PATTERN)
_ACTOR = re.compile(ACTOR_PATTERN)


def _valid_idempotency_key(key: str) -> bool:
    return _IDEMPOTENCY_KEY.match(key) is not None


class ServiceEdge:
    """Registers every operation as an endpoint in queue group `hero-deployer`."""

    def __init__(
        self,
        nc: Client,
        operations: Sequence[Operation],
        *,
        prefix: str,
        token: str,
        exempt: frozenset[str] = OPERATIONS.unauthenticated,
        version: str = "0.0.0",
    ) -> None:
        self._nc = nc
        self._operations = operations
        self._prefix = prefix
        self._own = prefix + "."
        self._expected = f"Bearer {token}".encode()
        self._exempt = exempt
        self._version = version
        self._service: Service | None = None
        self._in_flight: set[asyncio.Task[None]] = set()
        self._stats: dict[str, Any] = {}
        self._ids = itertools.count(1)
        self._id_prefix = os.urandom(4).hex()

    async def start(self) -> None:
        config = ServiceConfig(
            name=SERVICE_NAME,
            version=self._version,
            description="Event-sourced owner of the Hero OS demo fleet's VMs",
            queue_group=QUEUE_GROUP,
        )
        self._service = Service(self._nc, config)
        for verb in _CONTROL_HANDLERS:  # `$SRV` PING/INFO/STATS answer through the same guard
            setattr(self._service, verb, self._guarded(getattr(self._service, verb)))
        await self._service.start()
        for operation in self._operations:
            await self._service.add_endpoint(
                name=operation.name,
                subject=f"{self._prefix}.{operation.name}",
                queue_group=QUEUE_GROUP,
                handler=self._endpoint(operation),
            )
        # nats-py's micro times only the handler call (ours hands off to a task at once) and
        # counts only exceptions as errors (ours are replies): the edge keeps the endpoint's
        # counters itself, in the fields `$SRV.STATS` reports, as nats micro defines them.
        self._stats = {endpoint._name: endpoint for endpoint in self._service._endpoints}
        await self._nc.flush()

    async def stop(self, timeout: float = 10.0) -> None:
        """Stops accepting, waits for in-flight requests, cancels what is left after `timeout`."""
        if self._service is not None:
            service, self._service = self._service, None
            try:
                # micro drains its control subscriptions; a stuck drain must not stop shutdown
                await asyncio.wait_for(service.stop(), timeout)
            except TimeoutError:
                log.warning("edge.stop_timed_out", timeout=timeout)
        if self._in_flight:
            _, pending = await asyncio.wait(set(self._in_flight), timeout=timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    def _endpoint(self, operation: Operation) -> Any:
        decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(operation.request)
        in_flight = self._in_flight

        async def handle(request: Request) -> None:
            if not self._may_reply(request._msg.reply, operation.name):
                return
            task = asyncio.create_task(self._process(operation, decoder, request))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)

        return handle

    async def _process(
        self, operation: Operation, decoder: msgspec.json.Decoder[Any], request: Request
    ) -> None:
        request_id = f"{self._id_prefix}-{next(self._ids)}"
        started = time.perf_counter_ns()
        failure: DomainError | None = None
        try:
            headers = request.headers or {}
            if operation.name not in self._exempt:
                self._authenticate(headers.get(AUTHORIZATION_HEADER))
            key = headers.get(IDEMPOTENCY_HEADER)
            if key is not None and not _valid_idempotency_key(key):
                raise InvalidInput("Idempotency-Key must be 1..128 printable ASCII characters")
            actor = headers.get(ACTOR_HEADER, "")
            if actor and _ACTOR.match(actor) is None:
                raise InvalidInput("Hero-Actor must be 1..64 letters, digits, spaces or ._@:+/-")
            try:
                command = decoder.decode(request.data or b"{}")
            except msgspec.MsgspecError as error:
                raise InvalidInput(validation_message(error)) from None
            meta = RequestMeta(
                operation=operation.name,
                request_id=request_id,
                idempotency_key=key if operation.mutates else None,
                actor=actor,
            )
            result = await operation.handler(command, meta)
            await _send(request, _OK_PREFIX + result + b"}")
        except DomainError as error:
            failure = error
            await self._respond_error(request, error)
        except asyncio.CancelledError:
            failure = Internal("the service is shutting down")
            await self._respond_error(request, failure)
            raise
        except Exception:
            log.exception("request.failed", operation=operation.name, request_id=request_id)
            failure = Internal("internal error")
            await self._respond_error(request, failure)
        finally:
            self._count(operation.name, time.perf_counter_ns() - started, failure)

    def _count(self, name: str, elapsed_ns: int, error: DomainError | None) -> None:
        """Adds one request's processing time, and its error, to the endpoint's statistics."""
        endpoint = self._stats.get(name)
        if endpoint is None:
            return
        endpoint._processing_time += elapsed_ns
        endpoint._average_processing_time = endpoint._processing_time // max(
            endpoint._num_requests, 1
        )
        if error is not None:
            endpoint._num_errors += 1
            endpoint._last_error = f"{error.number}:{error.message}"

    def _may_reply(self, reply: str, operation: str) -> bool:
        """False, with a warning, when the reply subject is in our namespace or the system's.

        The service's identity may publish status events under `<prefix>.events.>`, so a reply
        there would let any caller forge one; `$` subjects belong to the server and JetStream.
        """
        if not (reply.startswith("$") or reply == self._prefix or reply.startswith(self._own)):
            return True
        log.warning("request.reply_subject_refused", operation=operation, reply=reply[:200])
        return False

    def _guarded(self, handler: Callable[[Msg], Awaitable[None]]) -> Callable[[Msg], Any]:
        """`handler` behind the reply-subject check, for micro's control subjects."""

        async def guarded(msg: Msg) -> None:
            if self._may_reply(msg.reply, msg.subject):
                await handler(msg)

        return guarded

    def _authenticate(self, header: str | None) -> None:
        if header is None:
            raise Unauthorized("missing bearer token")
        if _BEARER.match(header) is None:
            raise Unauthorized("the Authorization header must be 'Bearer <token>'")
        if not hmac.compare_digest(header.encode(), self._expected):
            raise Unauthorized("invalid bearer token")

    async def _respond_error(self, request: Request, error: DomainError) -> None:
        body, headers = error_reply(error)
        try:
            await _send(request, body, headers)
        except Exception:  # a closed connection: nobody is left to answer
            log.debug("request.reply_failed", code=error.code)


async def _send(request: Request, body: bytes, headers: dict[str, str] | None = None) -> None:
    """Replies, unless the message was published without a reply subject."""
    try:
        await request.respond(body, headers=headers)
    except ValueError:
        log.debug("request.no_reply_subject")
