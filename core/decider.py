"""An aggregate as one value: its stream kind, decide, evolve and the events it records."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, get_args

from core.events import Event, EventRegistry, stream_name, stream_parts

S = TypeVar("S")


@dataclass(frozen=True, slots=True)
class Decider(Generic[S]):
    """Initial state (None), `decide`, a pure `evolve` and the tagged event union, passed whole.

    `decide(state, command, context)` returns the events a command causes or raises a
    DomainError; `evolve(state, event)` folds one event and never raises.
    """

    kind: str
    decide: Callable[[S | None, Any, Any], Sequence[Event]]
    evolve: Callable[[S | None, Event], S | None]
    events: object
    """The tagged union of the aggregate's events (`VmEvent`), for readers and documents."""
    types: tuple[type[Event], ...] = field(init=False)
    """The union's members, in its order."""
    registry: EventRegistry = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "types", get_args(self.events))
        object.__setattr__(self, "registry", EventRegistry(self.types))

    def stream(self, id: str) -> str:
        """The stream id of the aggregate `id`."""
        return stream_name(self.kind, id)

    def id_of(self, stream: str) -> str | None:
        """The aggregate id of one of this kind's streams; None for another kind's."""
        kind, id = stream_parts(stream)
        return id if kind == self.kind else None

    def fold(self, events: Iterable[Event], state: S | None = None) -> S | None:
        """The state after `events`, in order, from `state` (the initial None by default)."""
        evolve = self.evolve
        for event in events:
            state = evolve(state, event)
        return state
