"""The event envelope: what the store records and what the status stream publishes."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import msgspec

from core.structs import Frozen, from_fields


class Event(Frozen, tag_field="type", tag=True):
    """Base of every domain event: named in the past tense, never renamed, fields only added.

    Tagged by its class name under `type`, so a union of events is one msgspec tagged union.
    The log keeps the tag in its own column and the data without it (`event_data`), as it
    always has; a decoder is given the tag from that column.
    """


_encoder = msgspec.json.Encoder()


def event_data(event: Event) -> bytes:
    """The event's JSON as the log stores it: every field, the tag left out.

    msgspec writes the tag first, so `{"type":"Name",` (or the whole `{"type":"Name"}` of an
    event without fields) is cut from the front.
    """
    tagged = _encoder.encode(event)
    cut = len(type(event).__name__) + 10  # len('{"type":"Name"'): a comma or the brace follows
    return b"{" + tagged[cut + 1 :] if len(tagged) > cut + 1 else b"{}"


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event decided but not yet recorded, with its JSON encoding made once."""

    type: str
    data: bytes
    event: Event

    @classmethod
    def of(cls, event: Event) -> NewEvent:
        return cls(type=type(event).__name__, data=event_data(event), event=event)


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


class RecordedEvent(Frozen, gc=False):
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
        return from_fields(EventOut, self, data=msgspec.Raw(self.data))


class EventOut(Frozen):
    """The contract's event payload, as `events` returns it and the status stream publishes it."""

    position: int
    stream: str
    version: int
    type: str
    data: msgspec.Raw
    recorded_at: datetime


class EventRegistry:
    """The one decoder of recorded events: the tag from the log's `type` column, the data JSON.

    Each member of the tagged union decodes its own untagged data (msgspec takes a tagged
    Struct's tag as optional when the Struct is decoded by itself).
    """

    def __init__(self, types: Iterable[type[Event]]) -> None:
        self.types = tuple(types)
        self._decoders: dict[str, Callable[[bytes], Any]] = {
            t.__name__: msgspec.json.Decoder(t).decode for t in self.types
        }

    def __contains__(self, name: str) -> bool:
        return name in self._decoders

    def decode(self, type_name: str, data: bytes) -> Event:
        event: Event = self._decoders[type_name](data)
        return event


def stream_name(kind: str, id: str) -> str:
    """The stream id of aggregate `id` of `kind`: `<kind>:<id>` (the contract's form)."""
    return f"{kind}:{id}"


def stream_parts(stream: str) -> tuple[str, str]:
    """The kind and the aggregate id of a stream id (`vm:vm_0123` → `vm`, `vm_0123`)."""
    kind, _, id = stream.partition(":")
    return kind, id
