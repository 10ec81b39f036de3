"""Sybil attacks on routing-table admission over real sockets (issue 11, root cause 3).

One attacker address, many throw-away identities: identities that cannot be dialled back never
enter a routing table; live ones get at most the per-prefix slots (``DHTLimits.max_peers_per_prefix``
and ``max_peers_per_prefix_per_bucket``), so honest nodes still serve a client's store-then-get; the
bookkeeping departed identities leave behind is dropped.

Loopback test swarms put everyone on 127.0.0.0/8, which the per-prefix limits skip by default; these
tests turn on ``DHTLimits(diversity_for_local_addresses=True)`` to emulate remote peers: the
attacker's identities all sit on 127.0.0.1, honest nodes listen on 127.0.X.1 (one /24 each).
(The kernel gives every outbound loopback connection the source 127.0.0.1, so honest nodes that
join after the attacker filled 127.0.0.0/24 are only admitted where they are dialled: enough here.)
Every peer is shut down at the end, even on failure; counts and waits are bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import AsyncIterator

import msgpack
import pytest

from dht import DHTLimits, DHTNode, Limits, P2P, get_dht_time
from dht.peer.admission import prefix_of
from dht.peer.identity import PeerID
from dht.routing import DHTID

ATTACKER_HOST = "127.0.0.1"


def pack(x) -> bytes:
    return msgpack.packb(x, use_bin_type=True)


def addr(p2p: P2P) -> str:
    return str(p2p.get_visible_addresses()[0])


@contextlib.asynccontextmanager
async def everything() -> AsyncIterator[list]:
    things: list = []
    try:
        yield things
    finally:
        await asyncio.gather(*(t.shutdown() for t in things), return_exceptions=True)


async def settle(nodes: list[DHTNode], timeout: float = 30.0) -> None:
    """Wait until no dial-back is waiting or running on any of ``nodes``."""
    deadline = time.monotonic() + timeout
    while any(len(n._dial_backs) for n in nodes):
        assert time.monotonic() < deadline, "dial-backs did not finish"
        await asyncio.sleep(0.05)


def claim_server() -> dict:
    return {"v": 1, "server": True, "t": get_dht_time()}


async def test_sybils_that_fail_the_dial_back_never_enter_and_leave_no_bookkeeping():
    """300 throw-away identities from one IP ping and store claiming to be servers: half listen
    nowhere, half announce another peer's address (the handshake there proves someone else). Before,
    every one of them entered the routing table at once; now none does, and once they are gone the
    victim keeps nothing per identity."""
    limits = DHTLimits(forget_after=0.2, dial_back_retry_after=0.2)
    async with everything() as things:
        victim = await DHTNode.create(host="127.0.0.1", limits=limits)
        things.append(victim)
        bystander = await P2P.create(host="127.0.0.1")
        things.append(bystander)
        elsewhere = str(bystander.get_visible_addresses()[0].without_peer_id())
        target = addr(victim.p2p)
        now = get_dht_time()
        sybil_ids: set[PeerID] = set()
        handshakes = asyncio.Semaphore(4)
        for batch in range(6):  # 6 x 50 identities, each batch shut down before the next
            sybils = [await P2P.create(host=ATTACKER_HOST, client_mode=(i % 2 == 0),
                                       announce=None if i % 2 == 0 else [elsewhere]) for i in range(50)]
            things.extend(sybils)
            sybil_ids.update(s.peer_id for s in sybils)

            async def attack(sybil: P2P, i: int) -> None:
                async with handshakes:  # the victim takes a few pending handshakes per IP at a time
                    await sybil.connect(target)
                await sybil.call(target, "dht.ping", claim_server(), timeout=10)
                await sybil.call(target, "dht.store", {"v": 1, "server": True, "items": [
                    [pack(f"sybil/{batch}/{i}"), None, pack(i), now + 60, False]]}, timeout=10)
                await sybil.call(target, "dht.find", {"v": 1, "server": True, "keys": [bytes(20)], "k": 20}, timeout=10)

            await asyncio.gather(*(attack(s, i) for i, s in enumerate(sybils)))
            await settle([victim])
            assert not any(victim.routing_table.knows(p) for p in sybil_ids)
            await asyncio.gather(*(s.shutdown() for s in sybils))
        assert victim._dial_backs.verified == 0
        # bounded work: at most one dial-back per identity and call (retry_after is short here), and the
        # total dial-back rate is capped (DHTLimits.dial_back_rate_total)
        assert 0 < victim._dial_backs.refused <= 3 * 300
        assert not any(victim.routing_table.knows(p) for p in sybil_ids)
        # the attackers are gone: after forget_after, nothing per identity is left behind
        deadline = time.monotonic() + 10
        while any(victim.p2p.is_connected(p) for p in sybil_ids):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        victim.forget_departed()
        assert not any(p in victim._buckets for p in sybil_ids)
        assert not any(p in victim._backoff for p in sybil_ids)
        assert victim.p2p.known_peers() <= 1  # the bystander (it was dialled back) at most
        assert victim._dial_backs.remembered() == 0
        assert len(victim._find_rates) == 0


def sybil_handlers(sybil: P2P, swarm: list[P2P]) -> None:
    """A live malicious node: answers pings as a server, swallows stores, and answers every lookup
    with the attacker's identities closest to the key (real addresses: they answer when dialled)."""

    def near(key_id: int, n: int) -> list:
        closest = sorted(swarm, key=lambda s: DHTID.of_peer(s.peer_id) ^ key_id)[:n]
        return [[s.peer_id.raw, [str(s.get_visible_addresses()[0].without_peer_id())]] for s in closest]

    async def ping(request, ctx):
        return claim_server()

    async def store(request, ctx):
        items = request["items"]
        reply = {"v": 1, "ok": [True] * len(items)}
        if request.get("near") and items:
            reply["near"] = near(DHTID.of_key(items[0][0]), request["near"])
        return reply

    async def find(request, ctx):
        return {"v": 1, "results": [[None, near(DHTID.from_bytes20(k), request.get("k", 20))] for k in request["keys"]]}

    sybil.add_unary_handler("dht.ping", ping)
    sybil.add_unary_handler("dht.store", store)
    sybil.add_unary_handler("dht.find", find)


async def test_live_sybils_from_one_prefix_get_a_few_slots_and_store_then_get_succeeds():
    """100 live identities on one IP that swallow stores and answer lookups with each other. Before,
    they filled the honest nodes' tables and lookups (the issue saw 2 of 12 store-then-gets succeed
    with 200); now each table holds at most the per-prefix cap of them and every get succeeds."""
    limits = DHTLimits(diversity_for_local_addresses=True)
    p2p_limits = Limits(max_connections_per_ip=1024)  # every identity here connects from 127.0.0.1
    async with everything() as things:
        honest: list[DHTNode] = []
        for i in range(6):
            initial = [addr(honest[0].p2p)] if honest else []
            node = await DHTNode.create(initial, host=f"127.0.{11 + i}.1", limits=limits, p2p_limits=p2p_limits)
            things.append(node)
            honest.append(node)
        await settle(honest)
        for node in honest:  # bucket refresh, as the refresh loop would do
            await node.find_nearest_nodes(node.node_id)
        await settle(honest)
        sybils = [await P2P.create(host=ATTACKER_HOST) for _ in range(100)]
        things.extend(sybils)
        for sybil in sybils:
            sybil_handlers(sybil, sybils)
        sybil_ids = {s.peer_id for s in sybils}

        handshakes = asyncio.Semaphore(4)  # the victims take a few pending handshakes per IP at a time

        async def knock(sybil: P2P, node: DHTNode) -> None:
            async with handshakes:
                await sybil.connect(addr(node.p2p))
            await sybil.call(node.peer_id, "dht.ping", claim_server(), timeout=10)

        await asyncio.gather(*(knock(s, n) for s in sybils for n in honest))
        await settle(honest)
        client = await DHTNode.create([addr(honest[0].p2p)], host="127.0.30.1", limits=limits, p2p_limits=p2p_limits)
        things.append(client)
        await asyncio.gather(*(knock(s, client) for s in sybils))
        await settle([client, *honest])
        attacker_prefix = prefix_of(ATTACKER_HOST, local_too=True)
        for node in [client, *honest]:
            table = node.routing_table
            admitted = [p for p in sybil_ids if table.knows(p)]
            assert 0 < len(admitted) <= limits.max_peers_per_prefix, len(admitted)
            assert table.group_count(attacker_prefix) == len(admitted)
            for bucket in table.buckets:
                assert sum(p in sybil_ids for p in [*bucket.nodes, *bucket.replacements]) <= \
                    limits.max_peers_per_prefix_per_bucket
            assert sum(p.peer_id in table for p in honest if p is not node) >= 3
        now = get_dht_time()
        for i in range(6):
            key = f"run/{i}"
            assert await client.store(key, {"step": i}, now + 60)
            got = await honest[i % len(honest)].get(key)
            assert got is not None and got.value == {"step": i}, key
            got = await client.get(key)
            assert got is not None and got.value == {"step": i}, key


async def test_diversity_filter_applies_to_global_addresses_only_by_default():
    assert prefix_of("127.0.0.1") is None and prefix_of("10.1.2.3") is None and prefix_of("::1") is None
    assert prefix_of("127.0.0.1", local_too=True) == "127.0.0.0/24"
    assert prefix_of("8.8.8.8") == "8.8.8.0/24"
    assert prefix_of("::ffff:8.8.4.4") == "8.8.4.0/24"
    assert prefix_of("2001:4860:4860::8888") == "2001:4860:4860::/48"
    assert prefix_of("not an ip") is None and prefix_of(None) is None


def test_admission_limits_are_validated():
    for bad in (dict(max_peers_per_prefix=0), dict(max_peers_per_prefix_per_bucket=-1), dict(find_rate=0.0),
                dict(dial_back_rate=float("inf")), dict(forget_after=-1.0), dict(handover_chunk=True)):
        with pytest.raises(ValueError, match="DHTLimits"):
            DHTLimits(**bad)


def test_routing_table_diversity_filter_counts_nodes_and_spares_per_group():
    import random

    from dht.routing import ID_MAX, RoutingTable

    rng = random.Random(3)
    table = RoutingTable(DHTID(rng.randrange(ID_MAX)), bucket_size=4, max_per_group_per_bucket=2, max_per_group=5)

    def peer() -> PeerID:
        return PeerID(b"\x12\x20" + rng.randbytes(32))

    honest = [peer() for _ in range(60)]
    for i, p in enumerate(honest):  # other prefixes (and contacts without one) are not limited by it
        table.add_or_update(p, group=None if i % 2 else f"10.{i}.0.0/24")
    known = sum(table.knows(p) for p in honest)
    assert known > 20
    sybils = [peer() for _ in range(200)]
    for p in sybils:
        table.add_or_update(p, group="6.6.6.0/24")
    present = [p for p in sybils if table.knows(p)]
    assert 0 < len(present) == table.group_count("6.6.6.0/24") <= 5
    for bucket in table.buckets:
        assert sum(p in present for p in [*bucket.nodes, *bucket.replacements]) <= 2
    # a slot is freed when its holder goes, and can then be taken by another identity of the prefix
    gone = next(p for p in present if p in table) if any(p in table for p in present) else present[0]
    before = table.group_count("6.6.6.0/24")
    table.remove(gone)
    assert table.group_count("6.6.6.0/24") == before - 1
    newcomer = next(p for p in sybils if not table.knows(p) and p != gone and
                    table.admits(DHTID.of_peer(p), "6.6.6.0/24"))
    table.add_or_update(newcomer, group="6.6.6.0/24")
    assert table.knows(newcomer) and table.group_count("6.6.6.0/24") == before
