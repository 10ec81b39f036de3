"""DHT nodes and bare (attacker) peers on 127.0.0.1 for tests over real sockets, all shut down by
the ``net`` fixture however the test ends.

>>> async def test_x(net):              # from tests.dht_net import addr, net
...     first, *rest = await net.many(5)
...     attacker = await net.raw_peer()
"""

from __future__ import annotations

import asyncio

import pytest

from dht import P2P
from dht.node import DHTNode

__all__ = ["LoopbackNet", "addr", "net", "raw_store"]


def addr(node: DHTNode):
    return node.p2p.get_visible_addresses()[0]


async def raw_store(peer: P2P, node: DHTNode, items: list, server: bool = True, timeout: float = 10) -> list:
    """Send ``dht.store`` straight to ``node`` (no lookup, no client-side checks); its ``ok`` list."""
    response = await peer.call(addr(node), "dht.store", {"v": 1, "server": server, "items": items}, timeout=timeout)
    return response["ok"]


class LoopbackNet:
    def __init__(self) -> None:
        self.nodes: list[DHTNode] = []
        self.peers: list[P2P] = []

    async def node(self, initial=(), **kwargs) -> DHTNode:
        node = await DHTNode.create(list(initial), host="127.0.0.1", **kwargs)
        self.nodes.append(node)
        return node

    async def many(self, n: int, **kwargs) -> list[DHTNode]:
        """``n`` nodes, each joined through the first."""
        first = await self.node(**kwargs)
        return [first] + [await self.node([addr(first)], **kwargs) for _ in range(n - 1)]

    async def raw_peer(self) -> P2P:
        """A bare peer with a fresh identity: it may send anything over RPC."""
        peer = await P2P.create(host="127.0.0.1")
        self.peers.append(peer)
        return peer

    async def close(self) -> None:
        await asyncio.gather(*(n.shutdown() for n in self.nodes), *(p.shutdown() for p in self.peers),
                             return_exceptions=True)


@pytest.fixture
async def net():
    n = LoopbackNet()
    try:
        yield n
    finally:
        await n.close()
