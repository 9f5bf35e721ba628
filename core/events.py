"""The event envelope: what the store records and what the status stream publishes."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import msgspec


class Event(msgspec.Struct, frozen=True, kw_only=True):
    """Base of every domain event: named in the past tense, never renamed, fields only added."""


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event decided but not yet recorded, with its JSON encoding made once."""

    type: str
    data: bytes
    event: Event

    @classmethod
    def of(cls, event: Event) -> NewEvent:
        return cls(type=type(event).__name__, data=msgspec.json.encode(event), event=event)


@dataclass(frozen=True, slots=True)
class StreamAppend:
    """New events for one stream, valid only if the stream is at `expected_version`."""

    stream: str
    expected_version: int
    events: tuple[NewEvent, ...]


@dataclass(frozen=True, slots=True)
class IdempotencyRecord:
    """The first reply to a keyed request, stored with the request's events."""

    key: str
    operation: str
    body_hash: str
    reply: bytes


class RecordedEvent(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """An event as committed: a gap-free global position and a per-stream version."""

    position: int
    stream: str
    version: int
    type: str
    data: bytes
    recorded_at: datetime
    request_id: str = ""
    actor: str = ""

    def wire(self) -> EventOut:
        return EventOut(
            position=self.position,
            stream=self.stream,
            version=self.version,
            type=self.type,
            data=msgspec.Raw(self.data),
            recorded_at=self.recorded_at,
        )


class EventOut(msgspec.Struct, frozen=True, kw_only=True):
    """The contract's event payload, as `events` returns it and the status stream publishes it."""

    position: int
    stream: str
    version: int
    type: str
    data: msgspec.Raw
    recorded_at: datetime


class EventRegistry:
    """Maps event type names to their Structs and decodes recorded data back into them."""

    def __init__(self, types: Iterable[type[Event]]) -> None:
        self._decoders: dict[str, msgspec.json.Decoder[Any]] = {
            t.__name__: msgspec.json.Decoder(t) for t in types
        }

    def __contains__(self, name: str) -> bool:
        return name in self._decoders

    def decode(self, type_name: str, data: bytes) -> Event:
        event: Event = self._decoders[type_name].decode(data)
        return event


def vm_stream(sid: str) -> str:
    return f"vm:{sid}"


def user_stream(username: str) -> str:
    return f"user:{username}"
