"""Publishes every committed event on the status stream, in position order, at least once."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
from nats.aio.client import Client

from core.events import RecordedEvent

_encoder = msgspec.json.Encoder()


def event_subject(prefix: str, recorded: RecordedEvent) -> str:
    """`<prefix>.events.<stream type>.<stream id>.<EventType>`."""
    stream_type, _, stream_id = recorded.stream.partition(":")
    return f"{prefix}.events.{stream_type}.{stream_id}.{recorded.type}"


class StatusPublisher:
    """A follower handler: publishes a batch, flushes, and only then lets the checkpoint move."""

    name = "publisher"

    def __init__(self, nc: Client, prefix: str) -> None:
        self._nc = nc
        self._prefix = prefix

    async def handle(self, events: Sequence[RecordedEvent]) -> None:
        publish = self._nc.publish
        prefix = self._prefix
        for recorded in events:
            await publish(event_subject(prefix, recorded), _encoder.encode(recorded.wire()))
        await self._nc.flush()

    def safe_position(self, read_position: int) -> int:
        # `handle` returns only after the server has the batch, so all that was read is out
        return read_position
