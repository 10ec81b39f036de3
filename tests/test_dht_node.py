"""DHTNode with in-process peers: on the in-memory transport (logic, virtual time) and on real sockets
(127.0.0.1); records, expiration, signatures, schemas, hostile input, client mode, the sync facade."""

import asyncio
import math
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time

import msgpack
import pydantic
import pytest

from dht import (DHT, DHTLimits, DHTNode, P2P, PeerID, PeerUnreachableError, RemoteError, SchemaValidator,
                 ValidationError, ValueWithExpiration, get_dht_time)
from dht.peer import virtual_clock
from dht.peer.memory_transport import MemoryNetwork
from dht.routing import DHTID
from dht.validation import DHTRecord

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIG_SUFFIX = len(b"[signature:") + 64 + 1


def pack(x) -> bytes:
    return msgpack.packb(x, use_bin_type=True)


def addr(node: DHTNode):
    return node.p2p.get_visible_addresses()[0]


class Swarm:
    """DHT nodes (and bare P2P peers) on one transport; everything is shut down by ``close``."""

    def __init__(self, transport: str, clock=get_dht_time, latency: float = 0.002):
        self.transport, self.clock = transport, clock
        self.network = MemoryNetwork(latency=latency, seed=0)
        self.nodes: list[DHTNode] = []
        self.peers: list[P2P] = []

    async def node(self, initial=(), client_mode: bool = False, **kwargs) -> DHTNode:
        kwargs.setdefault("clock", self.clock)
        if self.transport == "tcp":
            node = await DHTNode.create(list(initial), host="127.0.0.1", client_mode=client_mode, **kwargs)
            self.nodes.append(node)
        else:
            node = DHTNode(await self.network.create_peer(), client_mode=client_mode, **kwargs)
            self.nodes.append(node)
            await node.bootstrap(list(initial))
        return node

    async def many(self, n: int, **kwargs) -> list[DHTNode]:
        first = await self.node(**kwargs)
        return [first] + [await self.node([addr(first)], **kwargs) for _ in range(n - 1)]

    async def raw_peer(self) -> P2P:
        """A bare peer that speaks the DHT protocol by hand (a malicious or buggy client)."""
        peer = await (P2P.create(host="127.0.0.1") if self.transport == "tcp" else self.network.create_peer())
        self.peers.append(peer)
        return peer

    async def close(self) -> None:
        await asyncio.gather(*(n.shutdown() for n in self.nodes), *(p.shutdown() for p in self.peers),
                             return_exceptions=True)


@pytest.fixture(params=["tcp", "memory"])
async def swarm(request):
    s = Swarm(request.param)
    try:
        yield s
    finally:
        await s.close()


tcp_only = pytest.mark.parametrize("swarm", ["tcp"], indirect=True)


def holders(nodes: list[DHTNode], key) -> list[DHTNode]:
    key_id = DHTID.of_key(pack(key))
    return [n for n in nodes if n.storage.get(key_id, n.clock()) is not None]


async def raw_store(peer: P2P, node: DHTNode, items: list, server: bool = True) -> list:
    response = await peer.call(addr(node), "dht.store", {"v": 1, "server": server, "items": items}, timeout=10)
    return response["ok"]

# ---- store / get ------------------------------------------------------------------------------


async def test_store_get_across_eight_nodes(swarm):
    nodes = await swarm.many(8, bucket_size=4)
    now = get_dht_time()
    assert await nodes[3].store("run/loss", {"loss": 0.42, "step": 7}, now + 30)
    for node in nodes:
        result = await node.get("run/loss")
        assert isinstance(result, ValueWithExpiration)
        value, expiration = result
        assert value == {"loss": 0.42, "step": 7} and expiration == now + 30
    # stored on the num_replicas (= bucket size) nodes closest to the key; the store RPCs double as the
    # lookup's queries, so a node the lookup asked before finding closer ones keeps a spare replica
    key_id = DHTID.of_key(pack("run/loss"))
    closest = sorted(nodes, key=lambda n: n.node_id ^ key_id)[:4]
    assert {n.peer_id for n in closest} <= {n.peer_id for n in holders(nodes, "run/loss")}
    assert await nodes[0].get("missing") is None
    # store_many / get_many, and values of several types
    items = [(f"k{i}", v, now + 30, None) for i, v in enumerate([1, "two", b"three", [4.0], None, {"6": [7]}])]
    assert await nodes[1].store_many(items) == [True] * len(items)
    got = await nodes[6].get_many([k for k, *_ in items])
    assert {k: r.value for k, r in got.items()} == {k: v for k, v, *_ in items}


async def test_subkeys_from_different_nodes_merge_with_latest(swarm):
    nodes = await swarm.many(8)
    now = get_dht_time()
    for i, node in enumerate(nodes[:5]):
        assert await node.store("peers", {"rank": i}, now + 30 + i, subkey=f"peer-{i}")
    # an older write of an existing subkey loses, a newer one wins
    assert not await nodes[6].store("peers", {"rank": -1}, now + 10, subkey="peer-0")
    assert await nodes[6].store("peers", {"rank": 100}, now + 60, subkey="peer-0")
    for reader in (nodes[5], nodes[7]):
        result = await reader.get("peers", latest=True)
        assert set(result.value) == {f"peer-{i}" for i in range(5)}
        assert result.value["peer-0"] == ValueWithExpiration({"rank": 100}, now + 60)
        assert result.value["peer-3"] == ValueWithExpiration({"rank": 3}, now + 33)
        assert result.expiration_time == now + 60


async def test_latest_returns_the_newest_of_two_values(swarm):
    nodes = await swarm.many(8)  # bucket size 20 > 8: every node is a replica
    now = get_dht_time()
    assert await nodes[0].store("model/version", "old", now + 30)
    assert len(holders(nodes, "model/version")) == 8
    # a newer value reached one replica only (e.g. its other stores were lost)
    key_bytes = pack("model/version")
    nodes[6].storage.store(DHTID.of_key(key_bytes), key_bytes, None, pack("new"), now + 40, now)
    reader = nodes[2]
    assert (await reader.get("model/version")).value == "old"  # its own replica answers at once
    result = await reader.get("model/version", latest=True)
    assert result == ValueWithExpiration("new", now + 40)


@tcp_only
async def test_values_expire_on_real_sockets(swarm):
    nodes = await swarm.many(4)
    now = get_dht_time()
    assert await nodes[0].store("ephemeral", "soon gone", now + 1.5)
    assert await nodes[0].store("dict", 1, now + 1.5, subkey="short")
    assert await nodes[0].store("dict", 2, now + 30, subkey="long")
    assert (await nodes[3].get("ephemeral")).value == "soon gone"
    await asyncio.sleep(max(0.0, now + 1.6 - get_dht_time()))
    for node in nodes:
        assert await node.get("ephemeral") is None
        assert set((await node.get("dict", latest=True)).value) == {"long"}
    assert not holders(nodes, "ephemeral")
    assert not await nodes[1].store("late", 1, get_dht_time() - 1)  # already expired: nobody takes it


def test_values_expire_in_virtual_time():
    async def main():
        loop = asyncio.get_running_loop()
        s = Swarm("memory", clock=loop.time, latency=0.05)
        try:
            nodes = await s.many(6)
            now = loop.time()
            assert await nodes[0].store("ephemeral", "soon gone", now + 1.5)
            assert (await nodes[4].get("ephemeral")).value == "soon gone"
            await asyncio.sleep(1.6 - (loop.time() - now))
            assert [await n.get("ephemeral") for n in nodes] == [None] * 6
            assert not holders(nodes, "ephemeral") and all(len(n.storage) == 0 for n in nodes)
            # a long-lived value survives an hour of virtual time
            assert await nodes[1].store("durable", 1, loop.time() + 7200)
            await asyncio.sleep(3600)
            assert (await nodes[5].get("durable")).value == 1
        finally:
            await s.close()

    wall = time.monotonic()
    virtual_clock.run(main())
    assert time.monotonic() - wall < 10


def test_many_nodes_with_failures_in_virtual_time():
    async def main():
        loop = asyncio.get_running_loop()
        s = Swarm("memory", clock=loop.time, latency=0.05)
        try:
            nodes = await s.many(40, bucket_size=6, rpc_timeout=1.0)
            now = loop.time()
            items = [(f"key{i}", i, now + 600, None) for i in range(30)]
            assert await nodes[7].store_many(items) == [True] * 30
            for i in range(30):
                assert len(holders(nodes, f"key{i}")) == 6
            # a quarter of the nodes vanish silently; the other replicas still answer
            for node in nodes[30:]:
                s.network.kill(node.peer_id)
            for reader in (nodes[0], nodes[15], nodes[29]):
                got = await reader.get_many([f"key{i}" for i in range(30)])
                assert {k: v.value for k, v in got.items() if v is not None} == {f"key{i}": i for i in range(30)}
        finally:
            await s.close()

    virtual_clock.run(main())

# ---- client mode ------------------------------------------------------------------------------


async def test_client_mode_node_stores_and_gets_but_is_never_routed_to(swarm):
    nodes = await swarm.many(5)
    client = await swarm.node([addr(nodes[0])], client_mode=True)
    now = get_dht_time()
    assert await client.store("from-client", "hello", now + 30)
    assert await nodes[0].store("from-server", "world", now + 30)
    assert (await client.get("from-server")).value == "world"
    assert (await nodes[4].get("from-client")).value == "hello"
    assert len(client.storage) == 0  # a client never holds replicas
    assert len(client.routing_table) >= 4
    for node in nodes:
        assert client.peer_id not in node.routing_table
    if swarm.transport == "tcp":
        assert client.p2p.get_visible_addresses() == []

# ---- signatures -------------------------------------------------------------------------------


def owner_key(node: DHTNode, name: str) -> str:
    return f"{name}{node.signature_validator.ownership_marker}"


def signed(node: DHTNode, key, value, expiration: float) -> bytes:
    return node.validator.sign_value(DHTRecord(pack(key), None, pack(value), expiration))


async def test_tampered_signed_record_is_refused_and_dropped_on_get(swarm):
    nodes = await swarm.many(6)
    owner, reader = nodes[0], nodes[5]
    mallory = await swarm.raw_peer()
    key, now = owner_key(owner, "weights"), get_dht_time()
    assert await owner.store(key, "good", now + 30)
    assert (await reader.get(key)).value == "good"
    good = signed(owner, key, "good", now + 30)
    tampered = pack("evil") + good[-SIG_SUFFIX:]
    for victim in nodes:
        answers = await raw_store(mallory, victim, [[pack(key), None, tampered, now + 50, False],
                                                    [pack(key), None, good, now + 50, False]])  # exp changed
        assert all(isinstance(a, str) and "signature" in a for a in answers), answers
        unsigned = await raw_store(mallory, victim, [[pack(key), None, pack("evil"), now + 50, False]])
        assert "not signed" in unsigned[0]
    assert (await reader.get(key, latest=True)).value == "good"
    # a tampered record planted behind the validators' back is dropped by whoever reads it
    other = owner_key(owner, "other")
    for node in nodes:
        node.storage.store(DHTID.of_key(pack(other)), pack(other), None, tampered, now + 50, now)
    assert await reader.get(other) is None
    assert await reader.get(other, latest=True) is None
    for node in nodes[:3]:  # newer than the good record, so storage keeps it in place of the good one
        node.storage.store(DHTID.of_key(pack(key)), pack(key), None, tampered, now + 50, now)
    for node in (nodes[1], reader):
        assert (await node.get(key, latest=True)).value == "good"
    # only the owner can write under the marker
    with pytest.raises(ValidationError, match="not signed"):
        await reader.store(key, "mine now", now + 60)


async def test_replayed_older_signed_record_is_refused(swarm):
    nodes = await swarm.many(5)
    owner, reader = nodes[0], nodes[4]
    mallory = await swarm.raw_peer()
    key, now = owner_key(owner, "config"), get_dht_time()
    old = signed(owner, key, "v1", now + 20)  # captured by mallory when it was current
    assert await owner.store(key, "v1", now + 20)
    assert await owner.store(key, "v2", now + 40)
    for victim in nodes:
        assert await raw_store(mallory, victim, [[pack(key), None, old, now + 20, False]]) == [False]
    assert (await reader.get(key, latest=True)) == ValueWithExpiration("v2", now + 40)
    # the replay is genuine (it validates), it only loses to the newer one
    owner.validator.validate(DHTRecord(pack(key), None, old, now + 20))

# ---- schemas ----------------------------------------------------------------------------------


class TrainingSchema(pydantic.BaseModel):
    step: int
    peers: dict[str, float]


async def test_schema_is_enforced_by_remote_nodes():
    s = Swarm("memory")
    try:
        nodes = await s.many(4, record_validators=[SchemaValidator(TrainingSchema)])
        mallory = await s.raw_peer()
        now = get_dht_time()
        with pytest.raises(ValidationError, match="step"):
            await nodes[0].store("step", "seven", now + 30)
        assert await nodes[0].store("step", 7, now + 30)
        assert await nodes[0].store("peers", 0.5, now + 30, subkey="a")
        answers = await raw_store(mallory, nodes[1], [[pack("step"), None, pack(7.5), now + 30, False],
                                                      [pack("peers"), pack("b"), pack("x"), now + 30, False]])
        assert "TrainingSchema.step" in answers[0] and "TrainingSchema.peers" in answers[1]
        assert (await nodes[3].get("step", latest=True)).value == 7
    finally:
        await s.close()


def test_facade_schema_violation_raises_validation_error():
    with DHT(host="127.0.0.1", record_validators=[SchemaValidator(TrainingSchema)]) as dht:
        with pytest.raises(ValidationError) as info:
            dht.store("step", "seven", get_dht_time() + 30)
        assert "'step'" in str(info.value) and "TrainingSchema.step" in str(info.value)
        with pytest.raises(ValidationError, match="TrainingSchema.peers"):
            dht.store("peers", "fast", get_dht_time() + 30, subkey="a")
        assert dht.store("step", 3, get_dht_time() + 30)
        assert dht.get("step").value == 3

# ---- hostile and malformed input ---------------------------------------------------------------


MALFORMED = [
    ("dht.store", None), ("dht.store", {"v": 2, "items": []}), ("dht.store", {"v": 1, "items": "x"}),
    ("dht.store", {"v": 1, "items": [[b"k", None, b"v", math.nan, False]]}),
    ("dht.store", {"v": 1, "items": [[b"k", None, b"v"]]}),
    ("dht.store", {"v": 1, "items": [[b"k", None, b"v", 1e12, False]] * 5000}),
    ("dht.find", {"v": 1, "keys": [b"short"]}), ("dht.find", {"v": 1, "keys": [b"\0" * 20] * 513}),
    ("dht.find", {"v": 1, "keys": [], "k": 10_000}), ("dht.find", [1, 2, 3]),
    ("dht.ping", "hello"), ("dht.ping", {"v": "1"}), ("dht.ping", {"v": 1, "server": "yes"}),
]


async def test_malformed_requests_get_bad_request_and_node_keeps_serving(swarm):
    nodes = await swarm.many(3)
    mallory = await swarm.raw_peer()
    victim = nodes[1]
    for method, request in MALFORMED:
        with pytest.raises(RemoteError) as info:
            await mallory.call(addr(victim), method, request, timeout=5)
        assert info.value.code == "bad_request", (method, request, info.value)
    # still serving: the bad peer (with a correct request) and the honest ones
    pong = await mallory.call(addr(victim), "dht.ping", {"v": 1, "server": False, "t": 0}, timeout=5)
    assert pong["v"] == 1 and pong["server"] is True
    assert mallory.peer_id not in victim.routing_table  # server=False: never routed to
    assert await nodes[0].store("after", 1, get_dht_time() + 30)
    assert (await nodes[2].get("after", latest=True)).value == 1
    assert await nodes[2].ping(victim.peer_id)


async def test_oversized_values_and_absurd_expirations_are_refused(swarm):
    limits = DHTLimits(max_value_size=1000)
    nodes = await swarm.many(3, limits=limits)
    mallory = await swarm.raw_peer()
    now = get_dht_time()
    answers = await raw_store(mallory, nodes[1], [
        [pack("big"), None, b"\0" * 1001, now + 30, False],
        [pack("far"), None, pack(1), 1e12, False],
        [pack("decade"), None, pack(1), now + 10 * 365 * 86400, False],
        [pack("past"), None, pack(1), now - 5, False],
        [pack("ok"), None, b"\0" * 1000, now + 30, False],
    ])
    assert "exceeds the limit of 1000" in answers[0]
    assert "expiration" in answers[1] and "future" in answers[1]
    assert "expiration" in answers[2] and "future" in answers[2]
    assert "expired" in answers[3]
    assert answers[4] is True
    assert len(nodes[1].storage) == 1
    with pytest.raises(ValueError, match="exceeds the DHT limit"):
        await nodes[0].store("big", b"\0" * 2000, now + 30)
    assert await nodes[0].store("decade", 1, now + 10 * 365 * 86400) is False  # every replica refuses
    with pytest.raises(ValueError, match="finite"):
        await nodes[0].store("nan", 1, math.nan)


@tcp_only
async def test_store_flood_is_rate_limited_and_victim_stays_responsive(swarm):
    limits = DHTLimits(store_rate=1000, store_burst=5000)
    nodes = await swarm.many(4, limits=limits)
    victim, honest = nodes[1], nodes[2]
    mallory = await swarm.raw_peer()
    now = get_dht_time()
    requests = [[[pack(f"flood/{r}/{i}"), None, pack(i), now + 60, False] for i in range(4096)] for r in range(20)]
    started = time.monotonic()
    answers = [a for batch in await asyncio.gather(*(raw_store(mallory, victim, items) for items in requests))
               for a in batch]
    elapsed = time.monotonic() - started
    accepted = sum(a is True for a in answers)
    limited = sum(isinstance(a, str) and "rate limit" in a for a in answers)
    assert accepted + limited == 20 * 4096
    assert 5000 <= accepted <= 5000 + 1000 * elapsed + 1
    assert len(victim.storage) <= accepted
    # other peers are served promptly, and their stores are not charged to mallory's bucket
    started = time.monotonic()
    assert await honest.store("honest", "value", get_dht_time() + 30)
    assert (await raw_store(honest.p2p, victim, [[pack("direct"), None, pack(1), now + 30, False]])) == [True]
    assert (await nodes[3].get("honest", latest=True)).value == "value"
    assert time.monotonic() - started < 2.0
    assert DHTID.of_key(pack("honest")) in {k for k, _ in victim.storage.items(get_dht_time())}

# ---- the synchronous facade -------------------------------------------------------------------


def dht_threads() -> int:
    return sum(t.name == "dht-event-loop" and t.is_alive() for t in threading.enumerate())


def test_sync_facade_store_get_and_shutdown():
    threads_before = dht_threads()
    first = DHT(host="127.0.0.1")
    try:
        addresses = first.get_visible_addresses()
        assert addresses and all(a.startswith("/ip4/127.0.0.1/tcp/") and a.endswith(f"/p2p/{first.peer_id}")
                                 for a in addresses)
        assert isinstance(first.peer_id, PeerID) and not first.client_mode
        with DHT(initial_peers=addresses, host="127.0.0.1") as second:
            assert second.peer_id != first.peer_id
            assert second.store("run/loss", 0.42, expiration_time=get_dht_time() + 60)
            assert first.get("run/loss").value == 0.42
            assert second.store("peers", {"samples": 32}, get_dht_time() + 60, subkey="peer-A")
            assert first.get("peers", latest=True).value["peer-A"].value == {"samples": 32}
            future = first.get("run/loss", return_future=True)
            assert future.result(timeout=10).value == 0.42
            assert second.store_many([("a", 1, get_dht_time() + 60, None)]) == [True]
            assert {k: v.value for k, v in first.get_many(["a", "run/loss"]).items()} == {"a": 1, "run/loss": 0.42}

            async def inspect(dht, node):
                assert asyncio.get_running_loop() is dht.loop
                return node.peer_id, len(node.routing_table)

            assert second.run_coroutine(inspect) == (second.peer_id, 1)
            assert first.run_coroutine(inspect, return_future=True).result(timeout=10) == (first.peer_id, 1)
            assert "1 peer in the routing table" in repr(first)
        assert dht_threads() == threads_before + 1  # second's thread is gone
    finally:
        first.shutdown()
    first.shutdown()  # idempotent
    assert dht_threads() == threads_before


def test_sync_facade_unreachable_initial_peer_names_the_address():
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ghost = PeerID.from_public_key(os.urandom(32))
    address = f"/ip4/127.0.0.1/tcp/{port}/p2p/{ghost}"
    threads_before = dht_threads()
    with pytest.raises(PeerUnreachableError) as info:
        DHT(initial_peers=[address], host="127.0.0.1", rpc_timeout=1.0)
    assert address in str(info.value)
    assert dht_threads() == threads_before  # nothing left running

# ---- no torch in the DHT's import graph ---------------------------------------------------------


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def test_importing_dht_does_not_import_torch():
    result = run_python("""
        import sys
        import dht, dht.facade, dht.node
        assert "torch" not in sys.modules, "dht imported torch"
        import torch  # the check above can fail: torch is importable here
        assert "torch" in sys.modules
    """)
    assert result.returncode == 0, result.stderr


def test_swarm_dht_help_does_not_import_torch():
    result = subprocess.run([sys.executable, "-m", "swarm", "dht", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--initial-peers" in result.stdout and "--client-mode" in result.stdout
    result = run_python("""
        import runpy, sys
        sys.argv = ["swarm", "dht", "--help"]
        try:
            runpy.run_module("swarm", run_name="__main__", alter_sys=True)
        except SystemExit as e:
            assert e.code in (0, None), e.code
        else:
            raise AssertionError("--help did not exit")
        assert "argparse" in sys.modules and "torch" not in sys.modules, "swarm dht --help imported torch"
    """)
    assert result.returncode == 0, result.stderr
    assert "--initial-peers" in result.stdout
