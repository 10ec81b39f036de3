"""DHTNode's backoffs, store token buckets and address-book ages follow the event loop's clock, so on
dht.peer.virtual_clock they expire in virtual time (as real time would), not after wall seconds."""

import asyncio
import time

import msgpack

from dht import DHTNode
from dht.peer import virtual_clock
from dht.peer.memory_transport import MemoryNetwork
from dht.protocol import DHTLimits, StoreItem, parse_store_response, store_request


def test_backoff_and_buckets_run_on_the_virtual_clock():
    async def main():
        loop = asyncio.get_running_loop()
        network = MemoryNetwork(latency=0.01, seed=0)
        limits = DHTLimits(store_rate=1.0, store_burst=2.0)
        a = DHTNode(await network.create_peer(), rpc_timeout=0.5, limits=limits)
        b = DHTNode(await network.create_peer(), rpc_timeout=0.5, limits=limits)
        try:
            await a.bootstrap([b.p2p.get_visible_addresses()[0]])
            assert b.peer_id in a.routing_table
            network.kill(b.peer_id)
            assert not await a.ping(b.peer_id)  # fails after rpc_timeout: backed off for 5 virtual s
            assert a._excluded(b.peer_id)
            await asyncio.sleep(4.0)
            assert a._excluded(b.peer_id)
            await asyncio.sleep(1.5)
            assert not a._excluded(b.peer_id)  # 5.5 virtual s later (a few ms of wall time)

            # a's store bucket for a caller: 2 items at once, then 1 per virtual second
            caller = await network.create_peer()

            async def store(*keys: str) -> list:
                items = [StoreItem(msgpack.packb(k), None, msgpack.packb(1), a.clock() + 600, False) for k in keys]
                reply = await caller.call(a.p2p.get_visible_addresses()[0], "dht.store", store_request(False, items), timeout=5)
                return [answer is True for answer in parse_store_response(reply, len(items))]

            assert await store("k0", "k1", "k2") == [True, True, False]
            await asyncio.sleep(1.1)
            assert await store("k2", "k3") == [True, False]
            assert loop.time() < 10
            await caller.shutdown()
        finally:
            await a.shutdown()
            await b.shutdown()

    wall = time.monotonic()
    virtual_clock.run(main())
    assert time.monotonic() - wall < 5
