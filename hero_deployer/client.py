"""An async client of the wire contract, used by the CLI (and by other services)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import nats
from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from core.errors import ERRORS_BY_CODE, DomainError, Internal, Unavailable

MUTATING = frozenset(
    {
        "deploy_vm",
        "start_vm",
        "stop_vm",
        "restart_vm",
        "delete_vm",
        "migrate_secret",
        "provision_user",
        "decommission_user",
    }
)


class _Error(msgspec.Struct):
    code: str
    message: str


class _Reply(msgspec.Struct):
    ok: bool
    result: msgspec.Raw = msgspec.Raw(b"null")
    error: _Error | None = None


_reply_decoder = msgspec.json.Decoder(_Reply)


def raise_error(code: str, message: str) -> DomainError:
    return ERRORS_BY_CODE.get(code, Internal)(message)


class HeroDeployerClient:
    """Request-reply over NATS with the bearer token; errors come back as DomainErrors."""

    def __init__(
        self, nc: Client, *, token: str, prefix: str = "hero.v1", timeout: float = 10.0
    ) -> None:
        self.nc = nc
        self._token = token
        self._prefix = prefix
        self._timeout = timeout

    @classmethod
    async def connect(cls, url: str, **kwargs: Any) -> HeroDeployerClient:
        nc = await nats.connect(url, allow_reconnect=True, max_reconnect_attempts=3)
        return cls(nc, **kwargs)

    async def close(self) -> None:
        await self.nc.drain()

    async def call(
        self, operation: str, body: Any = None, *, idempotency_key: str | None = None
    ) -> Any:
        """Sends one request and returns its `result` as plain JSON values."""
        raw = await self.call_raw(operation, body, idempotency_key=idempotency_key)
        return msgspec.json.decode(raw)

    async def call_raw(
        self, operation: str, body: Any = None, *, idempotency_key: str | None = None
    ) -> bytes:
        headers = {"Authorization": f"Bearer {self._token}"}
        if operation in MUTATING:
            headers["Idempotency-Key"] = idempotency_key or uuid.uuid4().hex
        payload = msgspec.json.encode(body if body is not None else {})
        try:
            msg = await self.nc.request(
                f"{self._prefix}.{operation}", payload, timeout=self._timeout, headers=headers
            )
        except NoRespondersError:
            raise Unavailable("no hero-deployer is answering on NATS") from None
        except NatsTimeout:
            raise Unavailable(f"{operation} timed out after {self._timeout:g}s") from None
        reply = _reply_decoder.decode(msg.data)
        if reply.ok:
            return bytes(reply.result)
        error = reply.error or _Error(code="Internal", message="malformed reply")
        raise raise_error(error.code, error.message)

    async def follow(self, after: int = 0, stream: str | None = None) -> AsyncIterator[Any]:
        """Every event after `after`: catches up with `events`, then follows the status stream."""
        subject = f"{self._prefix}.events.>"
        if stream is not None:
            kind, _, ident = stream.partition(":")
            subject = f"{self._prefix}.events.{kind}.{ident}.*"
        sub = await self.nc.subscribe(subject)
        try:
            last = after
            while True:
                body: dict[str, Any] = {"after": last, "limit": 1000}
                if stream is not None:
                    body["stream"] = stream
                page = await self.call("events", body)
                for event in page["events"]:
                    yield event
                last = page["last"]
                if len(page["events"]) < 1000:
                    break
            async for msg in sub.messages:
                event = msgspec.json.decode(msg.data)
                if event["position"] <= last:
                    continue
                if event["position"] > last + 1 and stream is None:
                    page = await self.call("events", {"after": last, "limit": 1000})
                    for missed in page["events"]:
                        if missed["position"] < event["position"]:
                            yield missed
                yield event
                last = event["position"]
        finally:
            await sub.unsubscribe()
