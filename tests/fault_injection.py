"""Faults injected into a real peer's averaging traffic, for the in-process averaging tests."""

from __future__ import annotations

import asyncio
from typing import Any, Callable

from dht import P2P


def on_outgoing_chunk(p2p: P2P, chunk: int, action: Callable[[], Any]) -> None:
    """Await ``action()`` before ``p2p`` sends chunk number ``chunk`` (0: the first after the header)
    on each of its outgoing ``avg.part.*`` streams; the send goes on when it returns."""
    original = p2p.open_stream

    async def open_stream(peer: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        stream = await original(peer, method, *args, **kwargs)
        if not method.startswith("avg.part."):
            return stream
        sent = 0
        send = stream.send

        async def faulty_send(message: Any, **kw: Any) -> None:
            nonlocal sent
            sent += 1
            if sent == chunk + 2:
                await action()
            await send(message, **kw)

        stream.send = faulty_send
        return stream

    p2p.open_stream = open_stream  # type: ignore[method-assign]


async def stall_forever() -> None:
    """Alive and connected, but sends nothing more."""
    await asyncio.Event().wait()
