"""Staging a batch in either event store: checking it, numbering and chaining its events."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from adapters.event_chain import link
from core.errors import ConcurrencyError, Conflict
from core.events import RecordedEvent, StreamAppend


def refusal(
    appends: Sequence[StreamAppend], current: Callable[[str], int], key: str | None, keys: set[str]
) -> Exception | None:
    """Why `appends` cannot follow the batch so far (a stream is at another version than
    expected, their idempotency `key` is among `keys`), if they cannot."""
    for a in appends:
        version = current(a.stream)
        if version != a.expected_version:
            return ConcurrencyError(f"{a.stream} is at version {version}, not {a.expected_version}")
    if key is not None and key in keys:
        return Conflict("idempotency key is in use by a concurrent request")
    return None


@dataclass(slots=True)
class Numbering:
    """The log's end as a batch is staged: the last position given and the hash of its event."""

    position: int
    chain: bytes
    now: datetime
    at: str = field(init=False)  # `now` as the chain and the log keep it

    def __post_init__(self) -> None:
        self.at = self.now.isoformat()

    def events(
        self, append: StreamAppend, version: int, request_id: str, actor: str
    ) -> Iterator[RecordedEvent]:
        """The append's events after the last one given, its stream at `version`; while one is
        yielded, `chain` is its hash."""
        stream = append.stream
        for new in append.events:
            self.position += 1
            version += 1
            self.chain = link(
                self.chain, self.position, stream, version, new.type, new.data, self.at
            )
            yield RecordedEvent(
                position=self.position,
                stream=stream,
                version=version,
                type=new.type,
                data=new.data,
                recorded_at=self.now,
                request_id=request_id,
                actor=actor,
            )
