"""Publishes every committed event on the status stream, in position order, at least once.

An event that no retry can publish (a subject NATS refuses, a payload over the server's limit: old
logs may hold such events) is set aside with an error log and counted, and the events after it
flow. Any other failure (NATS disconnected, a flush timing out) raises, and the follower retries
the batch.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import msgspec
import structlog
from nats.aio.client import Client
from nats.errors import BadSubjectError, MaxPayloadError

from core.events import RecordedEvent, stream_parts

log = structlog.get_logger(__name__)

_encoder = msgspec.json.Encoder()

# One token of a literal subject. nats-io/nats-server server/sublist.go (IsValidSubject,
# IsValidLiteralSubject): no empty token, no whitespace or NUL, no `*` or `>` wildcard; `.` splits
# tokens. nats-io/nats.py nats/aio/client.py (_validate_subject) refuses whitespace and CRLF.
# Stricter here: no control character and no `*`/`>` anywhere in a token.
_STREAM = re.compile(r"[^\s.*>:\x00-\x1f\x7f-\x9f]+:[^\s.*>\x00-\x1f\x7f-\x9f]+\Z")
_TYPE = re.compile(r"[^\s.*>\x00-\x1f\x7f-\x9f]+\Z")


def event_subject(prefix: str, recorded: RecordedEvent) -> str:
    """`<prefix>.events.<stream type>.<stream id>.<EventType>`."""
    stream_type, stream_id = stream_parts(recorded.stream)
    return f"{prefix}.events.{stream_type}.{stream_id}.{recorded.type}"


def subject_problem(recorded: RecordedEvent) -> str | None:
    """Why the event's subject is not one literal NATS subject of the contract's shape, if so."""
    if _STREAM.match(recorded.stream) is None:
        return "the stream is not `<type>:<id>` with each part one NATS subject token"
    if _TYPE.match(recorded.type) is None:
        return "the event type is not one NATS subject token"
    return None


@dataclass(slots=True)
class SetAside:
    """The events the publisher could never publish, since this process started."""

    count: int = 0
    last_position: int | None = None

    def add(self, recorded: RecordedEvent, reason: str) -> None:
        """Counts an event once, however often its batch is retried, and logs why (no data)."""
        if self.last_position is not None and recorded.position <= self.last_position:
            return
        self.count += 1
        self.last_position = recorded.position
        log.error(
            "publisher.event_set_aside",
            position=recorded.position,
            stream=ascii(recorded.stream),
            type=ascii(recorded.type),
            reason=reason,
        )


class StatusPublisher:
    """A follower handler: publishes a batch, flushes, and only then lets the checkpoint move."""

    name = "publisher"

    def __init__(self, nc: Client, prefix: str, set_aside: SetAside | None = None) -> None:
        self._nc = nc
        self._prefix = prefix
        self.set_aside = set_aside if set_aside is not None else SetAside()

    async def handle(self, events: Sequence[RecordedEvent]) -> None:
        publish = self._nc.publish
        prefix = self._prefix
        for recorded in events:
            problem = subject_problem(recorded)
            if problem is not None:
                self.set_aside.add(recorded, problem)
                continue
            try:
                await publish(event_subject(prefix, recorded), _encoder.encode(recorded.wire()))
            except BadSubjectError:
                self.set_aside.add(recorded, "NATS refuses the subject")
            except MaxPayloadError:
                self.set_aside.add(recorded, "the payload exceeds the server's max_payload")
        await self._nc.flush()

    def safe_position(self, read_position: int) -> int:
        # `handle` returns only after the server has the batch, so all that was read is out
        return read_position
