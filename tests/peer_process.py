"""A peer in its own OS process for multi-process tests: prints its address, then serves until killed.

Handlers: ``echo`` (unary), ``sink`` (stream: counts bytes until END, replies the count),
``sleep`` (unary: sleeps the requested seconds, then replies).
"""

import asyncio

from dht import P2P


async def main() -> None:
    p2p = await P2P.create(host="127.0.0.1")

    async def echo(request, ctx):
        return request

    async def sink(stream, ctx):
        total = 0
        async for chunk in stream:
            total += len(chunk)
        await stream.send(total)

    async def sleep(seconds, ctx):
        await asyncio.sleep(seconds)
        return seconds

    p2p.add_unary_handler("echo", echo)
    p2p.add_stream_handler("sink", sink)
    p2p.add_unary_handler("sleep", sleep)
    print(p2p.get_visible_addresses()[0], flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
