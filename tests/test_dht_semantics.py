"""DHT behaviour applications rely on, over real sockets on 127.0.0.1: lookups that find more nodes
than one bucket holds, a cache of looked-up values that evicts instead of refusing, schemas whose
dictionary fields accept only subkeys, the swarm's own keys under schemas registered by the
components that own them, and schema validators of several applications that each govern only
their own keys (issue 19, points 5 to 8)."""

from __future__ import annotations

import asyncio

import msgpack
import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dht import DHT, DHTLimits, SchemaValidator, ValidationError, get_dht_time
from dht.peer.identity import Identity
from dht.routing import DHTID
from dht.storage import RECORD_OVERHEAD, Storage, StoreRefused
from dht.validation import CompositeValidator, DHTRecord, MergedSchemaValidator, SignatureValidator

from tests.dht_net import addr, net  # noqa: F401 -- net: the fixture
from tests.dht_net import raw_store


def pack(x) -> bytes:
    return msgpack.packb(x, use_bin_type=True)




async def wait_until(condition, timeout: float = 20.0) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True

# ---- point 5: find_nearest_nodes(k) with k above the bucket size --------------------------------


async def test_find_nearest_nodes_returns_k_nodes_when_k_exceeds_the_bucket_size(net):
    """16 nodes with buckets of 5: asking for 16 finds all 15 others (the old lookup asked its nodes
    for bucket-size contacts only and found about 6), and asking for 9 finds exactly the 9 closest."""
    nodes = await net.many(16, bucket_size=5)
    others = {n.peer_id for n in nodes}
    # every node is in some other node's routing table (admission by dial-back is asynchronous)
    assert await wait_until(lambda: all(any(n.peer_id in m.routing_table for m in nodes if m is not n)
                                        for n in nodes))
    asker = nodes[3]
    target = DHTID.of_key(pack("find all"))
    found = await asker.find_nearest_nodes(target, k=16)
    assert {p for p, _ in found} == others - {asker.peer_id}, f"found {len(found)} of 15"
    assert [i for _, i in found] == sorted((i for _, i in found), key=lambda i: i ^ target)  # closest first
    nine = await asker.find_nearest_nodes(target, k=9)
    brute_force = sorted((n for n in nodes if n is not asker), key=lambda n: n.node_id ^ target)[:9]
    assert [p for p, _ in nine] == [n.peer_id for n in brute_force]
    assert len(await asker.find_nearest_nodes(target)) == 5  # the default stays the bucket size

# ---- point 6: the cache of looked-up values evicts, never refuses -------------------------------


async def test_a_full_cache_evicts_the_least_recently_used_value_and_keeps_caching(net):
    """A client node with a cache of 8 entries looks up 12 keys: every get answers, the cache holds
    the 8 most recently used values (the old cache refused everything once full: the newest value
    was not cached), and a cached value that was read again outlives older ones."""
    server = await net.node()
    client = await net.node([addr(server)], client_mode=True, cache_size=8)
    now = get_dht_time()
    keys = [f"key{i}" for i in range(14)]
    assert all(await server.store_many([(k, {"i": i}, now + 60, None) for i, k in enumerate(keys)]))

    def cached(key: str) -> bool:
        return client.cache.get(DHTID.of_key(pack(key)), get_dht_time()) is not None

    for i, key in enumerate(keys[:12]):
        assert (await client.get(key)).value == {"i": i}
        assert cached(key), f"the value of {key} was not cached once {len(client.cache)} were"
    assert len(client.cache) == 8 and [cached(k) for k in keys[:12]] == [False] * 4 + [True] * 8
    assert (await client.get("key4")).value == {"i": 4}  # from the cache: now the most recently used
    assert client.storage.get(DHTID.of_key(pack("key4")), get_dht_time()) is None
    for key in keys[12:]:
        assert (await client.get(key)) is not None
    assert cached("key4") and not cached("key5") and not cached("key6") and cached("key13")
    assert len(client.cache) == 8


async def test_the_cache_stays_within_its_byte_budgets_and_a_remote_peer_cannot_flush_it(net):
    """``max_cache_bytes`` (issue 11) still bounds the cache: our own lookups keep at most that, a
    remote peer's cache stores at most a quarter, evicting its own oldest first (all accepted: a
    cache never refuses), so the values we looked up ourselves stay."""
    limits = DHTLimits(max_cache_bytes=96 << 10)
    server = await net.node()
    node = await net.node([addr(server)], limits=limits)
    now = get_dht_time()
    blob = "x" * 4000
    for i in range(40):  # stored at the server only: the node must look them up
        key_bytes = pack(f"big{i}")
        server.storage.store(DHTID.of_key(key_bytes), key_bytes, None, pack(blob), now + 60, now, origin="t")
    for i in range(40):
        assert (await node.get(f"big{i}")).value == blob
        assert node.cache.total_bytes <= limits.max_cache_bytes
    assert node.cache.get(DHTID.of_key(pack("big39")), get_dht_time()) is not None
    assert node.cache.evicted > 0
    own = [i for i in range(40) if node.cache.get(DHTID.of_key(pack(f"big{i}")), get_dht_time()) is not None]
    mallory = await net.raw_peer()
    items = [[pack(f"junk{i}"), None, pack("y" * 4000), now + 60, True] for i in range(30)]
    answers = await raw_store(mallory, node, items)
    assert answers == [True] * 30, answers  # (the old cache answered refusals once the quarter was spent)
    assert node.cache.bytes_of(mallory.peer_id) <= limits.max_cache_bytes // 4
    assert node.cache.total_bytes <= limits.max_cache_bytes
    # mallory's quarter came out of our lookups' share at most once: the newest of them are still there
    still = [i for i in own if node.cache.get(DHTID.of_key(pack(f"big{i}")), get_dht_time()) is not None]
    assert still and still == own[len(own) - len(still):] and 39 in still
    assert len(still) * 4000 >= limits.max_cache_bytes // 2

# ---- point 7: a dictionary field accepts only subkeys; the swarm's keys have schemas ------------


class Training(pydantic.BaseModel):
    step: int
    peers: dict[str, int]


async def test_a_plain_dict_cannot_replace_a_schema_dictionary(net):
    """Under a key whose schema field is a dictionary, a plain value (a dict with a later
    expiration, which the old schema check accepted) is refused by every node, locally and from a
    remote peer, and the subkeys stay."""
    nodes = await net.many(3, record_validators=[SchemaValidator(Training)])
    now = get_dht_time()
    assert await nodes[0].store("peers", 1, now + 30, subkey="a")
    assert await nodes[1].store("peers", 2, now + 30, subkey="b")
    with pytest.raises(ValidationError, match="holds a dictionary"):
        await nodes[2].store("peers", {"a": 99}, now + 600)
    mallory = await net.raw_peer()
    for node in nodes:
        answers = await raw_store(mallory, node, [[pack("peers"), None, pack({"a": 99}), now + 600, False],
                                                  [pack("peers"), None, pack({}), now + 600, False]])
        assert all(isinstance(a, str) and "holds a dictionary" in a for a in answers), answers
    result = await nodes[2].get("peers", latest=True)
    assert {k: v.value for k, v in result.value.items()} == {"a": 1, "b": 2}
    assert await nodes[2].store("step", 3, now + 30) and (await nodes[0].get("step", latest=True)).value == 3


def test_swarm_components_register_schemas_for_their_keys():
    """ProgressTracker, StateSharing and the run functions register the schemas of ``{run}.progress``,
    ``{run}.state`` and ``swarm.runs`` on their DHT; then malformed records are refused by the nodes
    (here: a plain dict under each dictionary key, and wrongly typed fields), well-formed ones pass."""
    from swarm.progress import ProgressTracker, progress_key
    from swarm.runs import RUNS_KEY, RunAnnouncement, announce_run, find_run
    from swarm.state_sharing import StateSharing

    with DHT(host="127.0.0.1") as first, DHT(initial_peers=first.get_visible_addresses(), host="127.0.0.1") as second:
        trackers = [ProgressTracker(d, "demo", 100) for d in (first, second)]
        sharing = [StateSharing(d, "demo", serve=False) for d in (first, second)]
        announcement = RunAnnouncement("demo", "examples/digits.py", "ab" * 32, str(first.peer_id), get_dht_time())
        assert announce_run(first, announcement, expiration=60)
        assert find_run(second, "demo") == announcement
        try:
            now = get_dht_time()
            good = {"peer_id": "p", "epoch": 1, "samples": 5, "samples_per_second": 2.0, "loss": None, "time": now}
            bad = [(progress_key("demo"), {}, None), (progress_key("demo"), dict(good, epoch="one"), "s"),
                   (progress_key("demo"), dict(good, samples=-1), "s"), (progress_key("demo"), {"peer_id": 5}, "s"),
                   ("demo.state", {"x": 1}, None), ("demo.state", {"epoch": 1, "hash": 7, "size": 1, "peer_id": "p"}, "s"),
                   (RUNS_KEY, {}, None), (RUNS_KEY, dict(vars(announcement), created="yesterday"), "demo s"),
                   (RUNS_KEY, dict(vars(announcement), settings={"lr": [1, 2]}), "demo s")]
            for dht in (first, second):
                for key, value, subkey in bad:
                    with pytest.raises(ValidationError):
                        dht.store(key, value, now + 30, subkey=subkey)

            async def remote(_dht, node):  # straight to the other node, bypassing our own validators
                target = (second if node.peer_id == first.peer_id else first).get_visible_addresses()[0]
                items = [[pack(k), None if s is None else pack(s), pack(v), now + 30, False] for k, v, s in bad]
                items.append([pack(progress_key("demo")), pack("s"), pack(good), now + 30, False])
                items.append([pack("demo.state"), pack("s"), pack(None), now + 30, False])  # a withdrawal
                return (await node.p2p.call(target, "dht.store", {"v": 1, "server": True, "items": items},
                                            timeout=10))["ok"]

            for dht in (first, second):
                answers = dht.run_coroutine(remote)
                assert all(isinstance(a, str) and "invalid record" in a for a in answers[:-2]), answers
                assert answers[-2:] == [True, True], answers
            assert first.store(progress_key("demo"), good, now + 30, subkey="t")
        finally:
            for component in (*trackers, *sharing):
                component.shutdown()


async def test_matchmaking_registers_a_schema_for_its_group_keys(net):
    """A Matchmaker's group keys ``{prefix}[.{scope}].0b{bits}`` accept declarations only: a plain
    value or a malformed declaration is refused; other keys are not its business."""
    from averaging.matchmaking import Matchmaker

    nodes = await net.many(2)
    for node in nodes:
        Matchmaker(node.p2p, node, "grid", b"h", target_group_size=2, min_group_size=2, min_matchmaking_time=1.0,
                   request_timeout=1.0, client_mode=False)
    now = get_dht_time()
    mallory = await net.raw_peer()
    items = [[pack("grid.0b01"), None, pack({"x": 1}), now + 30, False],
             [pack("grid.7.0b1"), pack("Qm"), pack({"addrs": "not a list"}), now + 30, False],
             [pack("grid.0b"), pack("Qm"), pack({"addrs": [1, 2]}), now + 30, False],
             [pack("grid.0b01"), pack("Qm"), pack({"addrs": ["/ip4/127.0.0.1/tcp/1"], "client": False}), now + 30, False],
             [pack("grid.7.0b1"), pack("Qm"), pack(None), now + 30, False],
             [pack("grid.0bxyz"), None, pack({"x": 1}), now + 30, False],  # not a group key
             [pack("other.0b01"), None, pack("anything"), now + 30, False]]
    for node in nodes:
        answers = await raw_store(mallory, node, items)
        assert all(isinstance(a, str) and "GroupKeySchema" in a for a in answers[:3]), answers
        assert answers[3:] == [True] * 4, answers

# ---- point 8: several applications' schemas, each governing its own keys -------------------------


class AppA(pydantic.BaseModel):
    alpha: int
    shared: dict[str, int]


class AppB(pydantic.BaseModel):
    beta: str
    shared: dict[str, int]


async def test_two_applications_schemas_each_govern_only_their_own_keys(net):
    """Two strict schemas (no extra keys) on one DHT: each accepts the other's keys (the old chain
    required every schema to pass, so each rejected the other's keys as "not allowed"), still checks
    its own, a key both declare must satisfy both, a key neither declares is refused, and the
    signature validator still protects owner-marked keys."""
    strict_a, strict_b = SchemaValidator(AppA, allow_extra_keys=False), SchemaValidator(AppB, allow_extra_keys=False)
    nodes = await net.many(3, record_validators=[strict_a])
    for node in nodes:
        node.validator.extend([strict_b, strict_a])  # (as dht.DHT.add_validators does; a repeat is no-op)
    now = get_dht_time()
    assert await nodes[0].store("alpha", 1, now + 30)
    assert await nodes[1].store("beta", "b", now + 30)
    assert await nodes[2].store("shared", 3, now + 30, subkey="x")
    for key, value, subkey, problem in (("alpha", "1", None, "AppA.alpha"), ("beta", 2, None, "AppB.beta"),
                                        ("shared", "3", "x", "AppA.shared"), ("gamma", 1, None, "not allowed")):
        with pytest.raises(ValidationError, match=problem):
            await nodes[0].store(key, value, now + 30, subkey=subkey)
    mallory = await net.raw_peer()
    marker = SignatureValidator(Identity()).ownership_marker  # someone else's key: mallory cannot sign
    answers = await raw_store(mallory, nodes[1], [[pack("beta"), None, pack(5), now + 30, False],
                                                  [pack("alpha"), None, pack(2), now + 60, False],
                                                  [pack("shared"), pack(marker), pack(4), now + 30, False]])
    assert "AppB.beta" in answers[0] and answers[1] is True and "not signed" in answers[2], answers
    assert (await nodes[2].get("alpha", latest=True)).value == 2
    assert (await nodes[0].get("beta", latest=True)).value == "b"
    for node in nodes:  # one merged schema validator, after the signature validator (validated first)
        assert [type(v) for v in node.validator.validators] == [MergedSchemaValidator, SignatureValidator]
        assert node.validator.validators[0].parts == (strict_a, strict_b)


def test_a_key_no_schema_declares_passes_if_any_schema_allows_extra_keys():
    """As hivemind merges them: allow_extra_keys of merged schemas is the 'or' of theirs."""
    record = DHTRecord(pack("gamma"), None, pack(1), 100.0)
    chain = CompositeValidator([SchemaValidator(AppA, allow_extra_keys=False), SchemaValidator(AppB)])
    chain.validate(record)
    with pytest.raises(ValidationError, match="not allowed by schemas AppA, AppB"):
        CompositeValidator([SchemaValidator(AppA, allow_extra_keys=False),
                            SchemaValidator(AppB, allow_extra_keys=False)]).validate(record)
    with pytest.raises(ValidationError, match="not allowed by schema AppA"):  # one schema alone: as before
        SchemaValidator(AppA, allow_extra_keys=False).validate(record)


def test_facade_add_validators_merges_with_the_constructor_schemas():
    with DHT(host="127.0.0.1", record_validators=[SchemaValidator(AppA, allow_extra_keys=False)]) as dht:
        dht.add_validators([SchemaValidator(AppB, allow_extra_keys=False)])
        assert dht.store("beta", "b", get_dht_time() + 30) and dht.store("alpha", 1, get_dht_time() + 30)
        with pytest.raises(ValidationError, match="AppB.beta"):
            dht.store("beta", 1, get_dht_time() + 30)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([None, "p1", "p2", "p3"]), st.sampled_from([None, "a", "b"]),
                          st.integers(0, 12), st.one_of(st.none(), st.integers(0, 4)), st.integers(0, 3000)),
                max_size=120))
def test_a_cache_storage_never_refuses_a_record_that_fits_and_keeps_every_budget(ops):
    """(In-process property of dht.storage.Storage(cache=True), the cache above.) Whatever the order of
    stores by peers and address ranges, each one that fits the budgets is stored (evicting least
    recently used records), and the total, per-peer and per-range budgets hold after each."""
    cache = Storage(20, 8, max_bytes=24_000, max_bytes_per_peer=6_000, max_bytes_per_ip=12_000,
                    max_subkeys_per_key=3, cache=True)
    for step, (peer, source, key, subkey, size) in enumerate(ops):
        key_bytes, sub = pack(f"k{key}"), None if subkey is None else pack(subkey)
        cost = len(key_bytes) + len(sub or b"") + size + RECORD_OVERHEAD
        fits = cost <= 24_000 and (peer is None or cost <= 6_000) and (source is None or cost <= 12_000)
        if not fits:
            with pytest.raises(StoreRefused, match="larger than the cache"):
                cache.store(key, key_bytes, sub, b"v" * size, 1000.0 + step, now=0.0, origin=peer, source=source)
            continue
        assert cache.store(key, key_bytes, sub, b"v" * size, 1000.0 + step, now=0.0, origin=peer, source=source)
        entry = cache.get(key, 0.0)
        assert (entry.regular if sub is None else entry.subkeys[sub]) == (b"v" * size, 1000.0 + step)
        assert cache.total_bytes <= 24_000 and len(cache) <= 20
        for p in ("p1", "p2", "p3"):
            assert cache.bytes_of(p) <= 6_000
        for s in ("a", "b"):
            assert cache.bytes_of_source(s) <= 12_000
        assert all(len(e.subkeys) <= 3 for _, e in cache.items(0.0))
