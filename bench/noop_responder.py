"""The baseline: a bare nats-py responder that answers every request with a fixed reply."""

from __future__ import annotations

import asyncio
import sys

import nats


async def main(url: str, subject: str) -> None:
    nc = await nats.connect(url)

    async def reply(msg: nats.aio.msg.Msg) -> None:
        await nc.publish(msg.reply, b"ok")

    await nc.subscribe(subject, queue="noop", cb=reply)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main(sys.argv[1], sys.argv[2]))
