import asyncio
import contextlib
from typing import AsyncIterator, Awaitable, Callable

import pytest

from dht import Limits, P2P
from dht.peer.memory_transport import MemoryNetwork

PeerFactory = Callable[..., Awaitable[P2P]]


@pytest.fixture(params=["tcp", "memory"])
async def make_peer(request) -> AsyncIterator[PeerFactory]:
    """Factory of started peers on the chosen transport; every peer is shut down at the end."""
    peers: list[P2P] = []
    network = MemoryNetwork(latency=0.001, seed=0)

    async def factory(limits: Limits | None = None) -> P2P:
        if request.param == "tcp":
            peer = await P2P.create(host="127.0.0.1", limits=limits)
        else:
            peer = await network.create_peer(limits=limits)
        peers.append(peer)
        return peer

    factory.transport = request.param  # type: ignore[attr-defined]
    try:
        yield factory
    finally:
        await asyncio.gather(*(p.shutdown() for p in peers), return_exceptions=True)


@contextlib.asynccontextmanager
async def tcp_peers(n: int, **kwargs) -> AsyncIterator[list[P2P]]:
    peers = []
    try:
        for _ in range(n):
            peers.append(await P2P.create(host="127.0.0.1", **kwargs))
        yield peers
    finally:
        await asyncio.gather(*(p.shutdown() for p in peers), return_exceptions=True)
