"""Following the JetStream log: a watcher of every new event, the head read from the server,
and whether a sent event landed."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api
from nats.js.client import JetStreamContext

from adapters.jetstream_log import ALL, H_HASH, STREAM, direct_get, message_at
from core.errors import Unavailable


async def watch(
    js: JetStreamContext, head: int, cb: Callable[[Msg], Awaitable[None]]
) -> JetStreamContext.PushSubscription:
    """Follows the headers of every event past `head` with `cb`, on an ordered consumer."""
    return await js.subscribe(
        ALL,
        stream=STREAM,
        ordered_consumer=True,
        headers_only=True,
        deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
        config=api.ConsumerConfig(opt_start_seq=head + 1),
        cb=cb,
        idle_heartbeat=1.0,  # a watcher lost with its server is noticed and made again
    )


async def head_past(
    js: JetStreamContext, nc: Client, known: int, timeout: float
) -> tuple[int, bytes] | None:
    """The log's last position and its hash, from the server, when it is past `known`."""
    try:
        info = await js.stream_info(STREAM)
    except (nats.errors.Error, nats.js.errors.Error) as error:
        raise Unavailable("the event log cannot be reached") from error
    last = info.state.last_seq
    if last <= known:
        return None
    # the head moves only with the hash read at it: a stream peer behind the leader
    # answers 404 for `last`, and chaining onto any other hash would break the chain
    msg = await message_at(nc, last, timeout)
    return last, bytes.fromhex((msg.headers or {})[H_HASH])


async def landed(nc: Client, position: int, chain: bytes, timeout: float) -> bool:
    """Whether the event a store hashed `chain` is at `position` (after a lost reply)."""
    try:
        msg = await direct_get(nc, {"seq": position}, timeout)
    except (nats.errors.Error, Unavailable):
        return False
    return msg is not None and (msg.headers or {}).get(H_HASH) == chain.hex()
