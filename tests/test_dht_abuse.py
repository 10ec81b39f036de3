"""Hostile peers against one DHT node over real sockets (127.0.0.1): bounded work per message
(record hand-over to newcomers, find floods) and contact poisoning (issue 11, root causes 4 and 5).

Every attack is bounded in count and time; every peer is shut down at the end, even on failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import random
import time
from typing import AsyncIterator

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dht import DHTLimits, DHTNode, P2P, RemoteError, get_dht_time
from dht.peer.identity import Identity, PeerID
from dht.routing import DHTID, RoutingTable

HOST = "127.0.0.1"


def pack(x) -> bytes:
    return msgpack.packb(x, use_bin_type=True)


def fake_peer(rng: random.Random) -> PeerID:
    return PeerID(b"\x12\x20" + rng.randbytes(32))


def addr(p2p: P2P) -> str:
    return str(p2p.get_visible_addresses()[0])


class Cleanup:
    """Nodes and peers started by a test, all shut down by ``close``."""

    def __init__(self):
        self.things: list = []

    def add(self, thing):
        self.things.append(thing)
        return thing

    async def close(self):
        await asyncio.gather(*(t.shutdown() for t in self.things), return_exceptions=True)


@contextlib.asynccontextmanager
async def cleanup() -> AsyncIterator[Cleanup]:
    c = Cleanup()
    try:
        yield c
    finally:
        await c.close()


class LagMeter:
    """How late a task sleeping 10 ms at a time wakes up: the event loop's worst blocking, in seconds
    of this thread's CPU time (what the loop did meanwhile: robust to a loaded machine, where the
    process may wait for a core) and of wall-clock time (``worst_wall``, informative)."""

    def __init__(self):
        self.worst = self.worst_wall = 0.0
        gc.collect()  # the test's own set-up (and earlier tests) must not show up as a collector pause
        gc.freeze()
        self._task = asyncio.ensure_future(self._run())

    async def _run(self):
        loop = asyncio.get_running_loop()
        while True:
            start, cpu = loop.time(), time.thread_time()
            await asyncio.sleep(0.01)
            self.worst = max(self.worst, time.thread_time() - cpu)
            self.worst_wall = max(self.worst_wall, loop.time() - start - 0.01)

    async def stop(self) -> float:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        gc.unfreeze()
        return self.worst


def fill_table(node: DHTNode, n: int, seed: int = 0) -> None:
    """Give ``node`` a big routing table of made-up contacts (they are never dialled in these tests)."""
    rng = random.Random(seed)
    for _ in range(n):
        node.routing_table.add_or_update(fake_peer(rng))


def close_identity(node_id: int, bits: int) -> Identity:
    """A fresh identity whose DHT id shares its first ``bits`` bits with ``node_id``."""
    for _ in range(100_000):
        identity = Identity()
        if (DHTID.of_peer(identity.peer_id) ^ node_id) >> (160 - bits) == 0:
            return identity
    raise AssertionError("no close identity found")


async def raw_server(c: Cleanup, identity: Identity | None = None, stored: list | None = None) -> P2P:
    """An attacker's peer that answers the DHT ping as a server and swallows stores."""
    peer = c.add(await P2P.create(host=HOST, identity=identity))

    async def ping(request, ctx):
        return {"v": 1, "server": True, "t": get_dht_time()}

    async def store(request, ctx):
        if stored is not None:
            stored.extend(request["items"])
        return {"v": 1, "ok": [True] * len(request["items"])}

    peer.add_unary_handler("dht.ping", ping)
    peer.add_unary_handler("dht.store", store)
    return peer


# ---- root cause 4: bounded work per message -----------------------------------------------------


async def test_hand_over_to_close_newcomers_keeps_the_event_loop_responsive():
    """Three pings from ids close to ours used to make the victim scan every record against the whole
    table in one callback (seconds without an await); now the hand-over waits for a dial-back, is
    queued and rate-limited, and yields every few hundred records."""
    async with cleanup() as c:
        limits = DHTLimits(max_entries=100_000, max_entries_per_peer=100_000, max_bytes_per_peer=64 << 20,
                           max_bytes_per_ip=64 << 20)
        victim = c.add(await DHTNode.create(host=HOST, limits=limits))
        fill_table(victim, 300)
        now = get_dht_time()
        for i in range(60_000):
            key = pack(f"record/{i}")
            assert victim.storage.store(DHTID.of_key(key), key, None, pack(i), now + 600, now, victim.peer_id)
        received: list[list] = [[], [], []]
        newcomers = [await raw_server(c, close_identity(victim.node_id, 8), received[i]) for i in range(3)]
        meter = LagMeter()
        try:
            for newcomer in newcomers:
                await newcomer.call(addr(victim.p2p), "dht.ping", {"v": 1, "server": True, "t": get_dht_time()},
                                    timeout=10)
            deadline = time.monotonic() + 30
            while not all(received) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)
        finally:
            lag = await meter.stop()
        assert all(received), [len(r) for r in received]  # the newcomers did get their records
        newcomer_ids = {n.peer_id for n in newcomers}
        others = [i for p, i in victim.routing_table._ids.items() if p not in newcomer_ids]
        for newcomer, items in zip(newcomers, received):
            new_id = DHTID.of_peer(newcomer.peer_id)
            assert newcomer.peer_id in victim.routing_table
            assert len(items) < 60_000 // 4  # not everything: only what moves to the newcomer
            for key, *_ in items[:300]:  # the newcomer is among the closest nodes for each record it got
                key_id = DHTID.of_key(key)
                assert sum((i ^ key_id) < (new_id ^ key_id) for i in others) < victim.num_replicas
        assert lag < 0.2, f"event loop blocked for {lag:.3f} s of CPU ({meter.worst_wall:.3f} s wall)"


async def test_find_flood_from_one_identity_is_rate_limited_and_pings_stay_fast():
    """512 keys per dht.find from one identity, with no rate limit, drove a client's ping p95 to 2.5 s;
    now a token bucket per peer refuses the excess with 'overloaded' at once."""
    async with cleanup() as c:
        limits = DHTLimits(find_rate=500.0, find_burst=1000.0)
        victim = c.add(await DHTNode.create(host=HOST, limits=limits))
        fill_table(victim, 300)
        mallory = c.add(await P2P.create(host=HOST))
        honest = c.add(await P2P.create(host=HOST))
        target = addr(victim.p2p)
        await mallory.connect(target)
        await honest.connect(target)
        request = {"v": 1, "server": False, "keys": [os.urandom(20) for _ in range(512)], "k": 20}
        served = refused = 0

        async def flood():
            nonlocal served, refused
            for _ in range(20):
                try:
                    await mallory.call(victim.peer_id, "dht.find", request, timeout=30)
                    served += 1
                except RemoteError as e:
                    assert e.code == "overloaded", e
                    refused += 1

        latencies = []

        async def pings():
            for _ in range(20):
                start = time.perf_counter()
                await honest.call(victim.peer_id, "dht.ping", {"v": 1, "server": False}, timeout=10)
                latencies.append(time.perf_counter() - start)
                await asyncio.sleep(0.02)

        meter = LagMeter()
        started = time.monotonic()
        try:
            await asyncio.gather(*(flood() for _ in range(10)), pings())
        finally:
            lag = await meter.stop()
        elapsed = time.monotonic() - started
        assert served + refused == 200
        assert served * 512 <= 1000 + 500 * elapsed + 512, (served, elapsed)
        assert refused > 0
        latencies.sort()
        assert latencies[int(0.95 * len(latencies))] < 2.0, latencies  # (the issue saw 2.5 s; a loaded CI machine)
        assert lag < 0.2, f"event loop blocked for {lag:.3f} s of CPU ({meter.worst_wall:.3f} s wall)"
        # the honest peer's own lookups are not charged to mallory's bucket
        reply = await honest.call(victim.peer_id, "dht.find", {**request, "keys": request["keys"][:100]}, timeout=10)
        assert len(reply["results"]) == 100


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, (1 << 160) - 1), min_size=0, max_size=80, unique=True),
       st.integers(0, (1 << 160) - 1), st.integers(0, (1 << 160) - 1), st.integers(1, 25), st.integers(0, 1000))
def test_among_nearest_matches_brute_force(ids, newcomer, key, k, seed):
    rng = random.Random(seed)
    table = RoutingTable(DHTID(rng.randrange(1 << 160)), bucket_size=8)
    peers = {fake_peer(rng): DHTID(i) for i in ids}
    for peer, node_id in peers.items():
        table.add_or_update(peer, node_id)
    newcomer_peer = fake_peer(rng)
    table.add_or_update(newcomer_peer, DHTID(newcomer))
    test = table.among_nearest(newcomer, k, exclude=newcomer_peer)
    others = [node_id for peer, node_id in table._ids.items() if peer != newcomer_peer and node_id != newcomer]
    closer = sum((node_id ^ key) < (newcomer ^ key) for node_id in others)
    assert test(key) == (closer < k)

@settings(max_examples=40, deadline=None)
@given(st.integers(50, 600), st.integers(0, (1 << 160) - 1), st.integers(1, 25), st.integers(0, 1000), st.booleans())
def test_nearest_in_big_tables_matches_brute_force(n, target, k, seed, exclude_one):
    """nearest() walks only the buckets nearest the target in big tables (bounded work per find key)."""
    rng = random.Random(seed)
    table = RoutingTable(DHTID(rng.randrange(1 << 160)), bucket_size=20)
    for _ in range(n):
        table.add_or_update(fake_peer(rng))
    exclude = next(iter(table._ids)) if exclude_one and len(table) else None
    expected = sorted(((i ^ target, p, i) for p, i in table._ids.items() if p != exclude))[:k]
    assert table.nearest(target, k, exclude=exclude) == [(p, i) for _, p, i in expected]

# ---- root cause 5: contact poisoning ------------------------------------------------------------


async def test_third_party_cannot_make_a_peer_unreachable():
    """A find reply listing peer L at the attacker's address used to make us dial the attacker, fail the
    handshake, give up on L and drop it from the routing table. Now the address L announced itself (and
    the one we reached it at) rank first, a mismatching address is dropped and the next one tried."""
    async with cleanup() as c:
        victim = c.add(await DHTNode.create(host=HOST))
        target = c.add(await DHTNode.create([addr(victim.p2p)], host=HOST))
        mallory = c.add(await P2P.create(host=HOST))
        mallory_address = str(mallory.get_visible_addresses()[0].without_peer_id())

        async def ping(request, ctx):
            return {"v": 1, "server": True, "t": get_dht_time()}

        async def find(request, ctx):  # every key: "L is at my address"
            return {"v": 1, "results": [[None, [[target.peer_id.raw, [mallory_address]]]] for _ in request["keys"]]}

        mallory.add_unary_handler("dht.ping", ping)
        mallory.add_unary_handler("dht.find", find)
        await mallory.call(addr(victim.p2p), "dht.ping", {"v": 1, "server": True, "t": get_dht_time()}, timeout=10)
        deadline = time.monotonic() + 15
        while not (target.peer_id in victim.routing_table and mallory.peer_id in victim.routing_table):
            assert time.monotonic() < deadline, "the target and mallory never entered the table"
            await asyncio.sleep(0.05)
        await victim.find_nearest_nodes(DHTID.of_peer(target.peer_id))  # mallory's poisoned reply is learned
        assert mallory_address in [str(a.without_peer_id()) for a in victim.p2p.get_addresses(target.peer_id)]
        # L's connection drops; the next call must dial L, and must find it despite the poisoned entry
        victim.p2p.disconnect(target.peer_id)
        target.p2p.disconnect(victim.peer_id)
        while victim.p2p.is_connected(target.peer_id):
            await asyncio.sleep(0.01)
        assert await victim.ping(target.peer_id)
        assert target.peer_id in victim.routing_table
        assert victim.p2p.get_addresses(target.peer_id)[0] == target.p2p.get_visible_addresses()[0]
        # hearsay is not passed on when the peer's own address is known
        assert victim.p2p.get_address_texts(target.peer_id) == [str(target.p2p.get_visible_addresses()[0].without_peer_id())]

        # a peer that only knows L from third parties, the attacker's version newest: the attacker's
        # address fails the handshake, is dropped, and the next address reaches L
        other = c.add(await P2P.create(host=HOST))
        real = str(target.p2p.get_visible_addresses()[0].without_peer_id())
        other.add_addresses(target.peer_id, [real], third_party=True)
        other.add_addresses(target.peer_id, [mallory_address], third_party=True)
        assert str(other.get_addresses(target.peer_id)[0].without_peer_id()) == mallory_address
        assert await other.call(target.peer_id, "dht.ping", {"v": 1, "server": False}, timeout=10)
        assert [str(a.without_peer_id()) for a in other.get_addresses(target.peer_id)] == [real]


async def test_address_book_is_bounded_and_third_party_addresses_are_capped():
    async with cleanup() as c:
        from dht import Limits

        peer = c.add(await P2P.create(host=HOST, limits=Limits(max_known_peers=50)))
        rng = random.Random(1)
        someone = fake_peer(rng)
        peer.add_addresses(someone, [f"/ip4/10.0.0.1/tcp/{p}" for p in range(1, 30)], third_party=True)
        assert len(peer.get_addresses(someone)) == 4  # hearsay per peer is capped
        peer.add_addresses(someone, [f"/ip4/10.0.0.2/tcp/{p}" for p in range(1, 30)])
        assert len(peer.get_addresses(someone)) == 16
        assert all(a.host == "10.0.0.2" for a in peer.get_addresses(someone))  # own announcements rank first
        for _ in range(500):
            peer.add_addresses(fake_peer(rng), ["/ip4/10.0.0.3/tcp/1"], third_party=True)
        assert peer.known_peers() == 50


async def test_finds_are_also_limited_per_ip_prefix():
    """Many identities from one prefix share one find budget (with the per-prefix limits applied to
    loopback, as for a remote attacker): fresh identities do not buy fresh budgets."""
    async with cleanup() as c:
        limits = DHTLimits(diversity_for_local_addresses=True, find_rate=1000.0, find_burst=1000.0,
                           find_rate_per_prefix=1.0, find_burst_per_prefix=300.0)
        victim = c.add(await DHTNode.create(host=HOST, limits=limits))
        request = {"v": 1, "server": False, "keys": [os.urandom(20) for _ in range(100)], "k": 20}
        outcomes = []
        for _ in range(6):  # each identity alone is well within its own budget
            peer = c.add(await P2P.create(host=HOST))
            try:
                await peer.call(addr(victim.p2p), "dht.find", request, timeout=10)
                outcomes.append("served")
            except RemoteError as e:
                outcomes.append(e.code)
        assert outcomes[:3] == ["served"] * 3 and outcomes[3:] == ["overloaded"] * 3, outcomes
