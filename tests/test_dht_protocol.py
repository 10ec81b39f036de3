"""The DHT wire format (dht.protocol): recorded byte vectors of every message DHTNode sends and answers,
the encoders next to their parsers, and hypothesis fuzzing of every parser."""

from __future__ import annotations

import asyncio

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dht import get_dht_time
from dht.node import STORE_NEAR, DHTNode
from dht.peer.errors import BadRequestError, ErrorCode, OverloadedError, ProtocolError, RemoteError
from dht.peer.identity import Identity
from dht.peer.memory_transport import MemoryNetwork
from dht.peer.p2p import CallContext
from dht.protocol import (DHTLimits, StoreItem, decode_entry, encode_entry, find_request, find_response, parse_find,
                          parse_find_response, parse_ping, parse_ping_response, parse_store, parse_store_contacts,
                          parse_store_near, parse_store_response, ping_request, ping_response, store_request,
                          store_response)
from dht.routing import DHTID
from dht.storage import Entry
from tests.dht_net import addr, net, raw_store  # noqa: F401 (net: the fixture)

T = 1_700_000_000.0  # the fixed DHT time of every node in the recording


def pack(x) -> bytes:
    return msgpack.packb(x, use_bin_type=True)


def fixed_identity(seed: int) -> Identity:
    return Identity(Ed25519PrivateKey.from_private_bytes(bytes([seed]) * 32))


async def capture_wire() -> dict[str, bytes]:
    """Run DHTNodes with fixed identities and a fixed clock on a MemoryNetwork and record the exact
    msgpack bytes of each request and response they exchange (``name`` -> bytes)."""
    network = MemoryNetwork(latency=0.0, seed=0)
    nodes: dict[str, DHTNode] = {}
    log: list[tuple[str, str, str, bytes, bytes]] = []  # (caller, callee, method, request, response)
    names = {}
    for seed, name in enumerate("abcd", 1):
        p2p = await network.create_peer(fixed_identity(seed), name=name)
        nodes[name] = DHTNode(p2p, clock=lambda: T, client_mode=name == "d")
        names[p2p.peer_id] = name
    try:
        a, b, c, d = (nodes[n] for n in "abcd")
        for n in (b, c):
            await n.bootstrap([a.p2p.get_visible_addresses()[0]])
        await asyncio.sleep(0.2)  # dial-backs settle
        for name, node in nodes.items():
            original = node.p2p.call

            async def call(peer, method, request, *, timeout=None, _name=name, _original=original):
                response = await _original(peer, method, request, timeout=timeout)
                log.append((_name, names.get(peer, str(peer)), method, pack(request), pack(response)))
                return response

            node.p2p.call = call

        def last(caller: str, callee: str, method: str) -> tuple[bytes, bytes]:
            found = [(q, r) for who, whom, m, q, r in log if (who, whom, m) == (caller, callee, method)]
            assert found, (caller, callee, method, [entry[:3] for entry in log])
            return found[-1]

        wire: dict[str, bytes] = {}

        def record(name: str, caller: str, callee: str, method: str) -> None:
            wire[name + "_request"], wire[name + "_response"] = last(caller, callee, method)

        assert await a.ping(b.p2p.peer_id)
        record("ping", "a", "b", "dht.ping")
        await d.bootstrap([a.p2p.get_visible_addresses()[0]])
        record("client_ping", "d", "a", "dht.ping")
        assert await a.store("key", "value", T + 60)  # one key: the store is its own lookup (near)
        record("store_near", "a", "b", "dht.store")
        assert await a.store("dict", 1, T + 60, subkey="s1") and await a.store("dict", 2, T + 90, subkey="s2")
        assert all(await a.store_many([("k2", "v2", T + 60, None), ("k3", [1, 2.5], T + 120, None)]))
        record("store_many", "a", "b", "dht.store")
        await a._find(b.p2p.peer_id, [DHTID.of_key(pack("key")), DHTID.of_key(pack("dict")),
                                      DHTID.of_key(pack("absent"))], k=5)
        record("find", "a", "b", "dht.find")
        entry = b.storage.get(DHTID.of_key(pack("dict")), T)
        await a._cache_at(c.p2p.peer_id, DHTID.of_key(pack("dict")), entry)
        record("cache", "a", "c", "dht.store")
        await b._hand_over_records(c.p2p.peer_id)
        record("handover", "b", "c", "dht.store")
        return wire
    finally:
        await asyncio.gather(*(n.shutdown() for n in nodes.values()), return_exceptions=True)


# recorded from DHTNode (commit b04c9ef, before dht.protocol had encoders) by capture_wire(): the wire
# format must stay byte-for-byte identical
VECTORS = {
    "ping_request": "83a17601a6736572766572c3a174cb41d954fc40000000",
    "ping_response": "83a17601a6736572766572c3a174cb41d954fc40000000",
    "client_ping_request": "83a17601a6736572766572c2a174cb41d954fc40000000",
    "client_ping_response": "83a17601a6736572766572c3a174cb41d954fc40000000",
    "store_near_request": (
        "84a17601a6736572766572c3a56974656d739195c404a36b6579c0c406a576616c7565cb41d954fc4f000000c2a46e65"
        "617206"
    ),
    "store_near_response": (
        "83a17601a26f6b91c3a46e6561729192c4221220b62e867fa2f33afe62d5d6b1642e1621d543307846b2a57b897e7109"
        "19b7670991a92f6d656d6f72792f63"
    ),
    "store_many_request": (
        "83a17601a6736572766572c3a56974656d739295c403a26b32c0c403a27632cb41d954fc4f000000c295c403a26b33c0"
        "c40b9201cb4004000000000000cb41d954fc5e000000c2"
    ),
    "store_many_response": "82a17601a26f6b92c3c3",
    "find_request": (
        "84a17601a6736572766572c3a46b65797393c4144b8f3d7f234a9bef60f2d794dc05809aeaacced7c41408527d545a78"
        "3fd80290ff1dddceabbedb9b1926c4148e6616d6e87829607b11185fc12f02c0346840b9a16b05"
    ),
    "find_response": (
        "82a17601a7726573756c7473939293c404a36b6579c406a576616c7565cb41d954fc4f0000009192c4221220b62e867f"
        "a2f33afe62d5d6b1642e1621d543307846b2a57b897e710919b7670991a92f6d656d6f72792f639292c405a464696374"
        "9293c403a27331c40101cb41d954fc4f00000093c403a27332c40102cb41d954fc568000009192c4221220b62e867fa2"
        "f33afe62d5d6b1642e1621d543307846b2a57b897e710919b7670991a92f6d656d6f72792f6392c09192c4221220b62e"
        "867fa2f33afe62d5d6b1642e1621d543307846b2a57b897e710919b7670991a92f6d656d6f72792f63"
    ),
    "cache_request": (
        "83a17601a6736572766572c3a56974656d739295c405a464696374c403a27331c40101cb41d954fc4f000000c395c405"
        "a464696374c403a27332c40102cb41d954fc56800000c3"
    ),
    "cache_response": "82a17601a26f6b92c3c3",
    "handover_request": (
        "83a17601a6736572766572c3a56974656d739595c404a36b6579c0c406a576616c7565cb41d954fc4f000000c295c405"
        "a464696374c403a27331c40101cb41d954fc4f000000c295c405a464696374c403a27332c40102cb41d954fc56800000"
        "c295c403a26b32c0c403a27632cb41d954fc4f000000c295c403a26b33c0c40b9201cb4004000000000000cb41d954fc"
        "5e000000c2"
    ),
    "handover_response": "82a17601a26f6b95c3c3c3c3c3",
}


async def test_dht_node_sends_the_recorded_bytes():
    wire = await capture_wire()
    assert sorted(wire) == sorted(VECTORS)
    for name, data in wire.items():
        assert data.hex() == VECTORS[name], name

# ---- the encoders give the recorded bytes back ----------------------------------------------------


def unpack(data: bytes):
    return msgpack.unpackb(data, raw=False, strict_map_key=False)  # as dht.peer.multiplex decodes


def vector(name: str) -> bytes:
    return bytes.fromhex(VECTORS[name])


def test_encoders_rebuild_the_recorded_bytes_from_what_the_parsers_read():
    limits = DHTLimits()
    for name in ("ping_request", "client_ping_request"):
        server, t = parse_ping(unpack(vector(name)))
        assert pack(ping_request(server, t)) == vector(name)
    for name in ("ping_response", "client_ping_response"):
        assert pack(ping_response(*parse_ping_response(unpack(vector(name))))) == vector(name)
    for name in ("store_near", "store_many", "cache", "handover"):
        request = unpack(vector(name + "_request"))
        server, items = parse_store(request, limits)
        assert pack(store_request(server, items, parse_store_near(request))) == vector(name + "_request")
        response = unpack(vector(name + "_response"))
        ok = parse_store_response(response, len(items))
        near = parse_store_contacts(response) if "near" in response else None
        assert pack(store_response(ok, near)) == vector(name + "_response")
    assert parse_store_near(unpack(vector("store_near_request"))) == STORE_NEAR
    assert [item.in_cache for item in parse_store(unpack(vector("cache_request")), limits)[1]] == [True, True]
    server, keys, k = parse_find(unpack(vector("find_request")), limits)
    assert (server, len(keys), k) == (True, 3, 5)
    assert pack(find_request(server, keys, k)) == vector("find_request")
    results = parse_find_response(unpack(vector("find_response")), len(keys))
    assert [None if e is None else (e.regular is not None) for e, _ in results] == [True, False, None]
    assert pack(find_response([(encode_entry(e), c) for e, c in results])) == vector("find_response")


def test_roundtrip_of_every_message():
    limits = DHTLimits()
    peer = fixed_identity(7).peer_id
    contacts = [(peer, ["/ip4/127.0.0.1/tcp/4001", "/memory/x"])]
    items = [StoreItem(b"k", None, b"v", 12.5, False), StoreItem(b"d", b"s", b"", 3.0, True)]
    assert parse_ping(unpack(pack(ping_request(False, 2.5)))) == (False, 2.5)
    request = unpack(pack(store_request(True, items, near=3)))
    assert parse_store(request, limits) == (True, items) and parse_store_near(request) == 3
    assert "near" not in store_request(True, items)
    response = unpack(pack(store_response([True, "full"], contacts)))
    assert parse_store_response(response, 2) == [True, "full"] and parse_store_contacts(response) == contacts
    assert parse_store_contacts(unpack(pack(store_response([False])))) == []
    assert parse_find(unpack(pack(find_request(False, [b"\1" * 20], 64))), limits) == (False, [b"\1" * 20], 64)
    dictionary = Entry(b"d", subkeys={b"s": (b"v", 5.0)})
    response = unpack(pack(find_response([(encode_entry(dictionary), contacts), (None, [])])))
    (entry, found), (missing, none) = parse_find_response(response, 2)
    assert entry == dictionary and found == contacts and missing is None and none == []

# ---- fuzzing: every parser raises its validation error and nothing else ---------------------------


ints = st.integers(-(1 << 63), (1 << 64) - 1)  # what msgpack carries
scalars = st.none() | st.booleans() | ints | st.floats() | st.text(max_size=12) | st.binary(max_size=40)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=5)
                      | st.dictionaries(st.text(max_size=6) | st.binary(max_size=6) | ints, inner, max_size=5),
                      max_leaves=8)
peer_ids = st.sampled_from([fixed_identity(1).peer_id.raw, b"\x12\x20" + b"\0" * 31, b"\x12\x20" + b"\0" * 32])
item = st.lists(st.binary(min_size=1, max_size=10) | st.none() | st.floats() | ints | st.booleans() | values,
                min_size=4, max_size=6)
contact = st.tuples(peer_ids | values, st.lists(st.text(max_size=20), max_size=3) | values)
entry = st.none() | st.tuples(st.binary(max_size=5), st.binary(max_size=5) | values, st.floats() | values) \
    | st.tuples(st.binary(max_size=5), st.lists(st.tuples(st.binary(max_size=4) | values, st.binary(max_size=4),
                                                          st.floats() | values) | values, max_size=3), ints | values)
plausible = st.fixed_dictionaries({}, optional={
    "v": st.sampled_from([1, 1, 1, 2, "1", None, True]), "server": st.booleans() | values, "t": st.floats() | values,
    "items": st.lists(item | values, max_size=4) | values, "near": st.lists(contact | values, max_size=4) | values,
    "keys": st.lists(st.binary(min_size=19, max_size=21) | values, max_size=4) | values, "k": ints | values,
    "ok": st.lists(st.booleans() | values, max_size=3) | values,
    "results": st.lists(st.tuples(entry | values, st.lists(contact, max_size=3) | values) | values, max_size=3),
})
# as the wire delivers them: tuples become lists, map keys stay whatever msgpack allows
messages = (plausible | values | entry | st.lists(contact, max_size=3)).map(lambda m: unpack(pack(m)))

LIMITS = DHTLimits(max_items_per_store=3, max_keys_per_find=3)
PARSERS = [
    (parse_ping, BadRequestError), (parse_store_near, BadRequestError),
    (lambda m: parse_store(m, LIMITS), BadRequestError), (lambda m: parse_find(m, LIMITS), BadRequestError),
    (parse_ping_response, ProtocolError), (lambda m: parse_store_response(m, 2), ProtocolError),
    (parse_store_contacts, ProtocolError), (lambda m: parse_find_response(m, 2), ProtocolError),
    (decode_entry, ProtocolError),
    (lambda m: parse_find_response({"v": 1, "results": [m]}, 1), ProtocolError),
    (lambda m: parse_store_contacts({"v": 1, "ok": [], "near": m}), ProtocolError),
]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages)
def test_parsers_raise_only_their_validation_error(message):
    for parser, error in PARSERS:
        try:
            parser(message)
        except error as e:
            assert len(str(e)) < 300  # bounded, whatever the peer sent
        except Exception as e:  # pragma: no cover - what this test exists to catch
            raise AssertionError(f"{parser} raised {type(e).__name__}: {e}") from e


def test_handlers_raise_only_bad_request_or_overloaded():
    """The DHT's handlers, called in-process with fuzzed requests: a reply (msgpack-able), or
    BadRequestError (the caller sees ``bad_request``) or OverloadedError, never another exception."""
    loop = asyncio.new_event_loop()
    network = MemoryNetwork(latency=0.0, seed=0)
    node = DHTNode(loop.run_until_complete(network.create_peer(fixed_identity(9))), clock=lambda: T,
                   limits=DHTLimits(max_items_per_store=3, max_keys_per_find=3))
    ctx = CallContext(fixed_identity(10).peer_id, "/memory/mallory", "dht.store", None)
    handlers = [node._rpc_ping, node._rpc_store, node._rpc_find]

    @settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(messages | plausible.map(lambda m: unpack(pack({**m, "v": 1}))))
    def check(request):
        for handler in handlers:
            try:
                reply = loop.run_until_complete(handler(request, ctx))
            except (BadRequestError, OverloadedError) as e:
                assert e.code in (ErrorCode.BAD_REQUEST, ErrorCode.OVERLOADED) and len(str(e)) < 300
            else:
                assert isinstance(reply, dict) and reply["v"] == 1 and unpack(pack(reply)) == reply

    try:
        check()
    finally:
        loop.run_until_complete(node.shutdown())
        loop.close()


async def test_malformed_requests_over_tcp_get_bad_request_and_change_nothing(net):
    victim, other = await net.many(2)
    mallory = await net.raw_peer()
    good = [pack("k"), None, pack("v"), get_dht_time() + 60, False]
    malformed = [
        ("dht.store", {"v": 1, "server": False, "items": [good], "near": 0}),  # (the item used to be stored first)
        ("dht.store", {"v": 1, "items": [good, [b"k", None, b"v", "soon", False]]}),
        ("dht.store", {"v": [1] * 10_000, "items": [good]}),  # (its repr used to be the error message)
        ("dht.find", {"v": 1, "keys": [b"\0" * 20], "k": True}), ("dht.find", {"v": 1, "keys": {"a": 1}}),
        ("dht.ping", {"v": 1, "server": "yes"}),
    ]
    for method, request in malformed:
        with pytest.raises(RemoteError) as info:
            await mallory.call(addr(victim), method, request, timeout=5)
        assert info.value.code == ErrorCode.BAD_REQUEST, (method, request, info.value)
        assert len(str(info.value)) < 400
    assert victim.storage.get(DHTID.of_key(pack("k")), get_dht_time()) is None  # nothing of a refused request kept
    # the node keeps serving: the same peer with a well-formed request, and the others
    assert await raw_store(mallory, victim, [good], server=False) == [True]
    assert await other.ping(victim.p2p.peer_id)
    assert (await other.get("k", latest=True)).value == "v"
