"""The command path shared by every aggregate: idempotency, load, decide, append, wait for views."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import msgspec

from core.errors import ConcurrencyError, Conflict
from core.events import Event, IdempotencyRecord, NewEvent, StreamAppend
from core.operations import RequestMeta
from hero_deployer.aggregates import Aggregates
from hero_deployer.deps import Deps

S = TypeVar("S")

_encoder = msgspec.json.Encoder()


def body_hash(deps: Deps, request: msgspec.Struct) -> str:
    """A keyed hash of the request's canonical form: equal bodies match, secrets stay hidden."""
    return deps.fingerprint(_encoder.encode(request).decode())


async def idempotent(
    deps: Deps,
    meta: RequestMeta,
    request: msgspec.Struct,
    run: Callable[[IdempotencyRecord | None], Awaitable[bytes]],
) -> bytes:
    """Runs a state-changing request once per Idempotency-Key; repeats get the first reply."""
    key = meta.idempotency_key
    if key is None:
        return await run(None)
    digest = body_hash(deps, request)
    async with deps.idempotency_locks.hold((key,)):
        stored = await deps.store.idempotent_reply(key)
        if stored is not None:
            same = stored.operation == meta.operation and hmac.compare_digest(
                stored.body_hash, digest
            )
            if not same:
                raise Conflict("idempotency key was already used with another request")
            return stored.reply
        return await run(IdempotencyRecord(key, meta.operation, digest, b""))


class Decision(msgspec.Struct, frozen=True):
    """What one stream's command decided: its new events and the state after them."""

    stream: str
    expected_version: int
    events: Sequence[Event]


async def consistent_views(deps: Deps) -> None:
    """Waits until the views reflect every event committed before this call: read-your-writes.

    The log's last position, not this process's: another replica's writes count too (on
    JetStream that is one request to the stream; SQLite knows it in memory).
    """
    await deps.views.wait_for(await deps.store.last_position())


async def execute(
    deps: Deps,
    aggregates: Aggregates[S],
    streams: Sequence[str],
    decide: Callable[[dict[str, tuple[S | None, int]]], tuple[list[Decision], bytes]],
    evolve: Callable[[S | None, Event], S | None],
    meta: RequestMeta,
    idempotency: IdempotencyRecord | None,
    *,
    new_streams: bool = False,
) -> bytes:
    """Loads the streams, decides, appends with expected versions; retries when it loses a race.

    Commands on the same stream run one at a time in this process; across processes the
    store's expected-version check catches the race and the command is decided again.
    The reply goes out once the events are durable; queries wait for the views instead.
    """
    async with aggregates.locks.hold(streams):
        for attempt in range(deps.max_retries):
            states = {
                s: await aggregates.load(s, fresh=attempt > 0, new=new_streams) for s in streams
            }
            decisions, result = decide(states)
            appends = [
                StreamAppend(d.stream, d.expected_version, tuple(NewEvent.of(e) for e in d.events))
                for d in decisions
                if d.events
            ]
            record = (
                IdempotencyRecord(
                    idempotency.key, idempotency.operation, idempotency.body_hash, result
                )
                if idempotency is not None
                else None
            )
            if not appends and record is None:
                return result
            try:
                await deps.store.append(
                    appends, idempotency=record, request_id=meta.request_id, actor=meta.actor
                )
            except ConcurrencyError:
                for s in streams:
                    aggregates.forget(s)
                continue
            for d in decisions:
                if d.events:
                    state = states[d.stream][0]
                    for event in d.events:
                        state = evolve(state, event)
                    aggregates.remember(d.stream, state, d.expected_version + len(d.events))
            return result
    raise Conflict("the resource changed concurrently; try again")


async def execute_one(
    deps: Deps,
    aggregates: Aggregates[S],
    stream: str,
    decide: Callable[[S | None], Sequence[Event]],
    evolve: Callable[[S | None, Event], S | None],
    encode: Callable[[S | None], bytes] | None,
    meta: RequestMeta,
    idempotency: IdempotencyRecord | None = None,
    *,
    new_stream: bool = False,
) -> bytes:
    """Decides one command on one stream; returns `encode` of the state after it (or b"")."""

    def decide_one(states: dict[str, tuple[S | None, int]]) -> tuple[list[Decision], bytes]:
        state, version = states[stream]
        events = decide(state)
        decisions = [Decision(stream, version, events)]
        if encode is None:
            return decisions, b""
        for event in events:
            state = evolve(state, event)
        return decisions, encode(state)

    return await execute(
        deps, aggregates, [stream], decide_one, evolve, meta, idempotency, new_streams=new_stream
    )
