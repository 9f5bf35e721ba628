"""The command path shared by every aggregate: idempotency, load, decide, append, wait for views."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Generic, TypeVar

import msgspec

from core.errors import ConcurrencyError, Conflict, DomainError
from core.events import Event, IdempotencyRecord, NewEvent, StreamAppend
from core.operations import RequestMeta
from hero_deployer.app.aggregates import Aggregates
from hero_deployer.app.deps import Deps

S = TypeVar("S")

_encoder = msgspec.json.Encoder()

Record = Callable[[bytes], IdempotencyRecord]
"""Makes a keyed request's idempotency record from its reply, once the reply is known."""


def body_hash(deps: Deps, request: msgspec.Struct) -> str:
    """A keyed hash of the request's canonical form: equal bodies match, secrets stay hidden."""
    return deps.fingerprint(_encoder.encode(request).decode())


async def idempotent(
    deps: Deps,
    meta: RequestMeta,
    request: msgspec.Struct,
    run: Callable[[Record | None], Awaitable[bytes]],
) -> bytes:
    """Runs a state-changing request once per Idempotency-Key; repeats get the first reply."""
    key = meta.idempotency_key
    if key is None:
        return await run(None)
    digest = body_hash(deps, request)
    async with deps.idempotency_locks.hold((key,)):
        if (stored := await _first_reply(deps, key, meta.operation, digest)) is not None:
            return stored
        try:
            return await run(partial(IdempotencyRecord, key, meta.operation, digest))
        except Conflict:
            # another replica of a shared log took the key meanwhile: its reply, once stored
            if (stored := await _first_reply(deps, key, meta.operation, digest)) is not None:
                return stored
            raise


async def _first_reply(deps: Deps, key: str, operation: str, digest: str) -> bytes | None:
    """The stored reply to `key`; Conflict if the key was used with another request."""
    stored = await deps.store.idempotent_reply(key)
    if stored is None:
        return None
    if stored.operation != operation or not hmac.compare_digest(stored.body_hash, digest):
        raise Conflict("idempotency key was already used with another request")
    return stored.reply


@dataclass(frozen=True, slots=True)
class Command(Generic[S]):
    """One command for one stream of an aggregate, with what its decision needs from outside.

    `new` says the stream was just named (a fresh sid): its state is not read first.
    """

    aggregate: Aggregates[S]
    id: str
    command: object
    context: object
    new: bool = False


@dataclass(frozen=True, slots=True)
class Decided:
    """What a command decided on its stream: its events and the state after them."""

    stream: str
    version: int
    events: Sequence[Event]
    state: object
    aggregate: Aggregates[Any]


Reply = Callable[[list[Decided]], bytes]


def no_reply(decided: list[Decided]) -> bytes:
    """The reply of a command nobody waits on (a side effect's outcome)."""
    return b""


async def consistent_views(deps: Deps) -> None:
    """Waits until the views reflect every event committed before this call: read-your-writes.

    The log's last position, not this process's: another replica's writes count too (on
    JetStream that is one request to the stream; SQLite knows it in memory).
    """
    await deps.views.wait_for(await deps.store.last_position())


async def run(
    deps: Deps,
    commands: Sequence[Command[Any]],
    meta: RequestMeta,
    record: Record | None = None,
    *,
    reply: Reply = no_reply,
    together: bool = False,
    skip_refused: bool = False,
) -> bytes:
    """Loads, decides, appends with the expected versions, folds once; the one command runner.

    Commands on the same stream run one at a time in this process; across processes the
    store's expected-version check catches the race and the commands are decided again.
    `together`: when one command decides nothing, nothing is appended. `skip_refused`: a
    command its aggregate refuses (a DomainError) is left out. The reply goes out once the
    events are durable; queries wait for the views instead.
    """
    streams = [c.aggregate.decider.stream(c.id) for c in commands]
    async with commands[0].aggregate.locks.hold(streams):
        for attempt in range(deps.max_retries):
            decided = await _decide(commands, streams, fresh=attempt > 0, skip=skip_refused)
            if together and not all(d.events for d in decided):
                decided = []
            result = reply(decided)
            idempotency = record(result) if record is not None else None
            appends = [
                StreamAppend(d.stream, d.version, tuple(NewEvent.of(e) for e in d.events))
                for d in decided
                if d.events
            ]
            if not appends and idempotency is None:
                return result
            try:
                await deps.store.append(
                    appends, idempotency=idempotency, request_id=meta.request_id, actor=meta.actor
                )
            except ConcurrencyError:
                for c, stream in zip(commands, streams, strict=True):
                    c.aggregate.forget(stream)
                continue
            for d in decided:
                if d.events:
                    d.aggregate.remember(d.stream, d.state, d.version + len(d.events))
            return result
    raise Conflict("the resource changed concurrently; try again")


async def _decide(
    commands: Sequence[Command[Any]], streams: list[str], *, fresh: bool, skip: bool
) -> list[Decided]:
    """Each command decided against its stream's state, with the state folded after it."""
    decided = []
    for c, stream in zip(commands, streams, strict=True):
        aggregate = c.aggregate
        state, version = await aggregate.load(stream, fresh=fresh, new=c.new)
        try:
            events = aggregate.decider.decide(state, c.command, c.context)
        except DomainError:
            if skip:
                continue
            raise
        after = aggregate.decider.fold(events, state)
        decided.append(Decided(stream, version, events, after, aggregate))
    return decided
