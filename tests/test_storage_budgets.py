"""Storage budgets in bytes (per storing peer, per address range, in total), eviction before refusal
(foreign region first, then the heaviest source's oldest records), bounded subkeys per key, and find
replies that stay within the message limit. Unit tests of dht.storage and dht.protocol, then the
attacks of issue 11 (root cause 8) over real sockets on 127.0.0.1."""

import asyncio
import os

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from dht import DHTLimits, DHTNode, P2P, get_dht_time
from dht.protocol import decode_entry, encode_entry_within
from dht.routing import DHTID
from dht.storage import RECORD_OVERHEAD, Entry, Storage, StoreRefused, _Heaviest

from tests.dht_net import addr, net  # noqa: F401 -- net: the fixture
from tests.dht_net import raw_store as _raw_store

KiB, MiB = 1 << 10, 1 << 20
LOOPBACK = "127.0.0.0/24"


def pack(x) -> bytes:
    return msgpack.packb(x, use_bin_type=True)


def cost(key: bytes, subkey: bytes | None, value: bytes) -> int:
    return len(key) + len(subkey or b"") + len(value) + RECORD_OVERHEAD

# ---- dht.storage: budgets and eviction ----------------------------------------------------------


def test_bytes_budget_per_peer_refuses_and_counts_key_subkey_and_value():
    one = cost(b"k0", None, b"x" * 1000)
    s = Storage(max_bytes_per_peer=3 * one)
    for i in range(3):
        assert s.store(i, b"k%d" % i, None, b"x" * 1000, 10.0, now=0.0, origin="p", source="a")
    assert s.bytes_of("p") == 3 * one == s.total_bytes == s.bytes_of_source("a")
    with pytest.raises(StoreRefused, match="bytes for this peer"):
        s.store(3, b"k3", None, b"x" * 1000, 10.0, now=0.0, origin="p", source="a")
    assert s.store(0, b"k0", None, b"y" * 1000, 11.0, now=0.0, origin="p", source="a")  # a refresh fits
    with pytest.raises(StoreRefused, match="bytes for this peer"):  # a bigger one does not: the old one stays
        s.store(0, b"k0", None, b"z" * 2000, 12.0, now=0.0, origin="p", source="a")
    assert s.get(0, 0.0).regular == (b"y" * 1000, 11.0) and s.bytes_of("p") == 3 * one
    assert s.store(3, b"k3", None, b"x" * 1000, 10.0, now=0.0, origin="q", source="a")  # others are not charged
    s.purge(10.0)  # expiry gives the budget back
    assert s.bytes_of("p") == cost(b"k0", None, b"y" * 1000) and s.bytes_of("q") == 0
    assert s.total_bytes == s.bytes_of_source("a") == s.bytes_of("p")


def test_address_range_budget_evicts_the_heaviest_other_peer_of_the_range():
    one = cost(b"k00", None, b"x" * 1000)
    s = Storage(max_bytes_per_ip=6 * one)
    for i in range(4):  # p: 4 records, q: 2, all from one range
        s.store(i, b"k%02d" % i, None, b"x" * 1000, 10.0, now=0.0, origin="p", source="a")
    for i in range(4, 6):
        s.store(i, b"k%02d" % i, None, b"x" * 1000, 10.0, now=0.0, origin="q", source="a")
    assert s.bytes_of_source("a") == 6 * one
    assert s.store(6, b"k06", None, b"x" * 1000, 10.0, now=0.0, origin="q", source="a")  # p loses its oldest
    assert s.get(0, 0.0) is None and s.get(1, 0.0) is not None and s.bytes_of("p") == 3 * one
    assert s.store(7, b"k07", None, b"x" * 1000, 10.0, now=0.0, origin="r", source="a")  # p or q (3 each) gives way
    assert s.bytes_of_source("a") == 6 * one and len(s) == 6
    heaviest = max(("p", "q"), key=s.bytes_of)
    assert s.bytes_of(heaviest) == 3 * one and s.bytes_of("r") == one
    with pytest.raises(StoreRefused, match="address range"):  # the heaviest of the range is refused
        s.store(9, b"k09", None, b"x" * 1000, 10.0, now=0.0, origin=heaviest, source="a")
    # another range and unattributed stores (source None) are not charged to this one
    assert s.store(10, b"k10", None, b"x" * 1000, 10.0, now=0.0, origin="q2", source="b")
    assert s.store(11, b"k11", None, b"x" * 1000, 10.0, now=0.0, origin="q3")
    assert s.bytes_of_source("a") == 6 * one and s.bytes_of_source("b") == one


def test_full_storage_evicts_the_foreign_region_first_farthest_key_first():
    own = 0
    foreign = {1 << 150, 1 << 155, 1 << 158}  # far from us (the farthest first)
    s = Storage(max_entries=5, own_id=own, is_foreign=lambda key_id: key_id in foreign)
    for key_id in sorted(foreign):
        assert s.store(key_id, b"f%d" % key_id, b"a", b"v", 10.0, now=0.0, origin="p")
        s.store(key_id, b"f%d" % key_id, b"b", b"v", 10.0, now=0.0, origin="p") if key_id == 1 << 158 else None
    assert s.store(5, b"near5", None, b"v", 10.0, now=0.0, origin="q")
    assert len(s) == 5
    assert s.store(6, b"near6", None, b"v", 10.0, now=0.0, origin="q")  # the farthest key goes whole
    assert s.get(1 << 158, 0.0) is None and s.get(1 << 155, 0.0) is not None and len(s) == 4
    for i in range(7, 10):
        s.store(i, b"near%d" % i, None, b"v", 10.0, now=0.0, origin="q")
    assert {k for k, _ in s.items(0.0)} == {5, 6, 7, 8, 9} and s.evicted == 4
    # nothing foreign left: a new foreign key does not push out what we are responsible for
    foreign.add(1 << 140)
    with pytest.raises(StoreRefused, match="not among the closest"):
        s.store(1 << 140, b"f140", None, b"v", 10.0, now=0.0, origin="r")
    # and a local key evicts the oldest record of the heaviest peer (q, the only one)
    assert s.store(10, b"near10", None, b"v", 10.0, now=0.0, origin="r")
    assert s.get(5, 0.0) is None and len(s) == 5


def test_full_storage_evicts_the_heaviest_address_range_not_the_newest_or_soonest_expiring():
    s = Storage(max_bytes=20 * cost(b"k000", None, b"x" * 100))
    honest = [(i, b"h%03d" % i) for i in range(5)]
    for key_id, key in honest:  # honest peers of several ranges, short expirations
        s.store(key_id, key, None, b"x" * 100, 60.0, now=0.0, origin=f"honest{key_id}", source=f"range{key_id}")
    for i in range(100):  # an attacker: many identities, one range, far expirations, refreshed often
        try:
            s.store(1000 + i, b"m%03d" % i, None, b"x" * 100, 1e6, now=1.0, origin=f"sybil{i}", source="evil")
        except StoreRefused:
            pass
    assert s.total_bytes <= s.max_bytes
    assert all(s.get(key_id, 2.0) is not None for key_id, _ in honest)
    assert s.store(99, b"h099", None, b"x" * 100, 60.0, now=2.0, origin="late", source="range99")
    assert all(s.get(key_id, 2.0) is not None for key_id, _ in honest)


def test_subkeys_per_key_bounded_and_the_heaviest_source_of_the_key_gives_way():
    s = Storage(max_subkeys_per_key=10)
    for i in range(3):
        assert s.store(1, b"k", b"owner%d" % i, b"v", 10.0, now=0.0, origin=f"o{i}", source=f"r{i}")
    accepted = 0
    for i in range(30):
        try:
            accepted += s.store(1, b"k", b"spam%d" % i, b"v", 10.0, now=0.0, origin="m", source="evil")
        except StoreRefused as e:
            assert "subkeys" in str(e)
    assert accepted == 7 and len(s.get(1, 0.0).subkeys) == 10
    assert s.store(1, b"k", b"owner3", b"v", 10.0, now=0.0, origin="o3", source="r3")  # the spammer gives way
    subkeys = s.get(1, 0.0).subkeys
    assert len(subkeys) <= 10 and {b"owner0", b"owner1", b"owner2", b"owner3"} <= set(subkeys)
    assert s.store(1, b"k", b"owner0", b"w", 11.0, now=0.0, origin="o0", source="r0")  # refreshes always fit


def test_refused_replacement_keeps_the_old_record_and_its_accounting():
    s = Storage(max_bytes_per_peer=cost(b"k", b"a", b"x" * 100) + cost(b"k", b"b", b"x" * 100))
    s.store(1, b"k", b"a", b"x" * 100, 10.0, now=0.0, origin="p", source="r")
    s.store(1, b"k", b"b", b"x" * 100, 10.0, now=0.0, origin="p", source="r")
    before = (s.total_bytes, s.bytes_of("p"), s.bytes_of_source("r"), len(s))
    with pytest.raises(StoreRefused):
        s.store(1, b"k", b"a", b"x" * 200, 20.0, now=0.0, origin="p", source="r")
    assert s.get(1, 0.0).subkeys == {b"a": (b"x" * 100, 10.0), b"b": (b"x" * 100, 10.0)}
    assert (s.total_bytes, s.bytes_of("p"), s.bytes_of_source("r"), len(s)) == before
    with pytest.raises(StoreRefused):  # a regular value replacing the whole dictionary: same
        s.store(1, b"k", None, b"x" * 800, 20.0, now=0.0, origin="p", source="r")
    assert set(s.get(1, 0.0).subkeys) == {b"a", b"b"} and s.total_bytes == before[0]


class BudgetModel(RuleBasedStateMachine):
    """Random stores from a few peers and ranges against small budgets: every budget holds after
    every step, and the accounting always equals what a recount of the stored records gives."""

    def __init__(self):
        super().__init__()
        self.s = Storage(max_entries=12, max_entries_per_peer=6, max_bytes=12 * 600, max_bytes_per_peer=4 * 600,
                         max_bytes_per_ip=6 * 600, max_subkeys_per_key=4, own_id=0,
                         is_foreign=lambda key_id: key_id >= 6)
        self.now = 0.0

    @rule(key=st.integers(0, 8), subkey=st.sampled_from([None, b"a", b"b", b"c", b"d", b"e"]),
          size=st.integers(0, 150), ttl=st.integers(-1, 6), peer=st.integers(0, 4), source=st.integers(0, 2))
    def store(self, key, subkey, size, ttl, peer, source):
        try:
            self.s.store(key, b"key%d" % key, subkey, b"v" * size, self.now + ttl, self.now, f"p{peer}",
                         None if source == 2 else f"r{source % 2}")
        except StoreRefused:
            pass

    @rule(dt=st.sampled_from([0.5, 2.0]))
    def advance(self, dt):
        self.now += dt
        self.s.purge(self.now)

    @invariant()
    def budgets_hold_and_accounting_is_exact(self):
        s = self.s
        peers, sources, total, count = {}, {}, 0, 0
        for key_id, entry in s._entries.items():
            assert not entry.empty and len(entry.subkeys) <= s.max_subkeys_per_key
            parts = ([None] if entry.regular is not None else []) + list(entry.subkeys)
            assert entry.regular is None or not entry.subkeys
            for part in parts:
                value = entry.regular[0] if part is None else entry.subkeys[part][0]
                peer, source, c = s._origin[(key_id, part)]
                assert c == cost(entry.key_bytes, part, value)
                peers[peer] = peers.get(peer, 0) + c
                sources[source] = sources.get(source, 0) + c
                total, count = total + c, count + 1
        assert count == len(s) == sum(s._per_peer.values()) and total == s.total_bytes <= s.max_bytes
        assert len(s) <= s.max_entries and all(n <= s.max_entries_per_peer for n in s._per_peer.values())
        assert peers == s._peer_bytes and all(b <= s.max_bytes_per_peer for b in peers.values())
        assert all(s.bytes_of_source(src) == b for src, b in sources.items())
        assert all(b <= s.max_bytes_per_ip for src, b in sources.items() if src is not None)


TestBudgetModel = BudgetModel.TestCase
TestBudgetModel.settings = settings(max_examples=60, stateful_step_count=50, deadline=None)

@given(st.lists(st.tuples(st.integers(0, 6), st.integers(-50, 50), st.sampled_from([None, 0, 1, 2])), max_size=300))
def test_heaviest_tracker_matches_brute_force(changes):
    tracker, amounts = _Heaviest(), {}
    for key, delta, avoid in changes:
        tracker.add(key, delta)
        amounts[key] = amounts.get(key, 0) + delta
        if amounts[key] <= 0:
            del amounts[key]
        assert tracker.amount == amounts
        top = tracker.top(avoid)
        if not amounts:
            assert top is None
            continue
        assert amounts[top] == max(amounts.values())
        if top == avoid:  # only if no other key has as much
            assert [k for k, v in amounts.items() if v == amounts[top]] == [top]

# ---- dht.protocol: replies within a byte budget ---------------------------------------------------


def test_encoded_dictionary_fits_the_budget_smallest_subkeys_first():
    entry = Entry(b"key")
    for i in range(300):
        entry.subkeys[b"big%03d" % i] = (b"x" * (256 * KiB), 100.0 + i)
    for i in range(5):
        entry.subkeys[b"small%d" % i] = (b"y" * 100, 50.0)
    encoded, used = encode_entry_within(entry, 8 * MiB)
    assert used <= 8 * MiB and len(pack(encoded)) <= used
    assert encoded[2] == 305 - len(encoded[1]) > 0  # how many were left out
    sent = {s for s, _, _ in encoded[1]}
    assert {b"small%d" % i for i in range(5)} <= sent and len(sent) == 5 + (8 * MiB - 200) // (256 * KiB + 30)
    assert max(s for s in sent if s.startswith(b"big")) == b"big299"  # among equals, the latest-expiring
    decoded = decode_entry(encoded)
    assert set(decoded.subkeys) == sent
    # whole when it fits; a regular value that does not fit is not sent
    assert encode_entry_within(entry, None)[0][1].__len__() == 305
    regular = Entry(b"key", regular=(b"z" * 1000, 10.0))
    assert encode_entry_within(regular, 500) == (None, 0)
    assert encode_entry_within(regular, 2000)[0] == [b"key", b"z" * 1000, 10.0]

# ---- the attacks, over real sockets ---------------------------------------------------------------


async def raw_store(peer, node, items: list) -> list:  # as a client (not a server), patient with big batches
    return await _raw_store(peer, node, items, server=False, timeout=30)


async def flood(peer: P2P, node: DHTNode, items: list, batch: int = 16) -> list:
    answers = []
    for start in range(0, len(items), batch):
        answers += await raw_store(peer, node, items[start:start + batch])
    return answers


BIG = 256 * KiB  # the default max_value_size


async def test_one_identity_cannot_store_more_than_its_byte_budget_with_defaults(net):
    victim = await net.node()
    honest = await net.node([addr(victim)])
    mallory = await net.raw_peer()
    now = get_dht_time()
    items = [[pack(f"junk/{i}"), None, os.urandom(16) + b"\0" * (BIG - 16), now + 29 * 86400, False]
             for i in range(100)]  # 25 MiB from one identity (the issue: 20,000 x 256 KiB were accepted)
    answers = await flood(mallory, victim, items)
    accepted = sum(a is True for a in answers)
    refused = [a for a in answers if a is not True]
    assert accepted == DHTLimits().max_bytes_per_peer // (BIG + 8 + RECORD_OVERHEAD) == 63
    assert refused and all("bytes for this peer" in a for a in refused)
    assert victim.storage.bytes_of(mallory.peer_id) <= DHTLimits().max_bytes_per_peer
    # the victim still takes and serves everyone else's records
    assert await honest.store("honest", "value", get_dht_time() + 60)
    assert (await honest.get("honest", latest=True)).value == "value"
    assert victim.storage.get(DHTID.of_key(pack("honest")), get_dht_time()) is not None


async def test_many_identities_from_one_address_share_one_budget(net):
    limits = DHTLimits(max_bytes_per_peer=1 * MiB, max_bytes_per_ip=2 * MiB)
    victim = await net.node(limits=limits)
    now = get_dht_time()
    per_identity = []
    for n in range(4):  # four throw-away identities from 127.0.0.1, 2 MiB each
        mallory = await net.raw_peer()
        items = [[pack(f"m{n}/{i}"), None, b"\0" * BIG, now + 3600, False] for i in range(8)]
        answers = await flood(mallory, victim, items, batch=4)
        per_identity.append(sum(a is True for a in answers))
        assert victim.storage.bytes_of(mallory.peer_id) <= 1 * MiB
        assert victim.storage.bytes_of_source(LOOPBACK) <= 2 * MiB
    assert per_identity == [3, 3, 3, 3]  # each got its share, evicting the heaviest other identity
    assert len(victim.storage) <= 2 * MiB // BIG
    # a light peer of the same range still gets in (the heaviest identity of the range gives way)
    honest = await net.node([addr(victim)])
    assert await honest.store("small", 1, get_dht_time() + 60)
    assert victim.storage.get(DHTID.of_key(pack("small")), get_dht_time()) is not None
    assert victim.storage.bytes_of_source(LOOPBACK) <= 2 * MiB


async def test_nine_identities_fill_the_entry_cap_and_legit_stores_still_get_in(net):
    limits = DHTLimits(max_entries=900, max_entries_per_peer=100)
    victim = await net.node(limits=limits)
    honest = await net.node([addr(victim)])
    reader = await net.node([addr(victim)])
    assert await honest.store("before", "stored before the flood", get_dht_time() + 600)
    now = get_dht_time()
    for n in range(9):  # the issue: nine identities filled the entry cap and legit stores were refused
        mallory = await net.raw_peer()
        answers = await raw_store(mallory, victim, [[pack(f"s{n}/{i}"), None, pack(i), now + 29 * 86400, False]
                                                    for i in range(100)])
        assert all(a is True or "full" in a for a in answers)
    assert len(victim.storage) == 900
    for i in range(20):
        assert await honest.store(f"after/{i}", i, get_dht_time() + 600)
        assert victim.storage.get(DHTID.of_key(pack(f"after/{i}")), get_dht_time()) is not None
    assert len(victim.storage) <= 900 and victim.storage.evicted >= 20
    assert (await reader.get("before", latest=True)).value == "stored before the flood"
    assert victim.storage.get(DHTID.of_key(pack("before")), get_dht_time()) is not None


async def test_identities_filling_the_byte_cap_are_evicted_for_legit_stores(net):
    limits = DHTLimits(max_bytes=4 * MiB, max_bytes_per_peer=1 * MiB, max_bytes_per_ip=64 * MiB)
    victim = await net.node(limits=limits)
    honest = await net.node([addr(victim)])
    assert await honest.store("before", "x" * 1000, get_dht_time() + 600)
    now = get_dht_time()
    for n in range(9):
        mallory = await net.raw_peer()
        await flood(mallory, victim, [[pack(f"b{n}/{i}"), None, b"\0" * BIG, now + 3600, False] for i in range(4)],
                    batch=4)
        assert victim.storage.total_bytes <= 4 * MiB
    assert await honest.store("after", "y" * 1000, get_dht_time() + 600)
    for key in ("before", "after"):
        assert victim.storage.get(DHTID.of_key(pack(key)), get_dht_time()) is not None
    assert victim.storage.total_bytes <= 4 * MiB


async def test_300_large_subkeys_cannot_make_a_key_unreadable(net):
    # the victim alone holds the key (the others are clients); its budgets are raised so that one
    # attacker can pile up 75 MiB under one key (more than the 16 MiB message limit)
    limits = DHTLimits(max_bytes_per_peer=128 * MiB, max_bytes_per_ip=128 * MiB)
    victim = await net.node(limits=limits)
    owners = [await net.node([addr(victim)], client_mode=True) for _ in range(3)]
    key = "shared.runs"
    for i, owner in enumerate(owners):
        subkey = f"run{i} {owner.signature_validator.ownership_marker}"
        assert await owner.store(key, {"run": i}, get_dht_time() + 600, subkey=subkey)
    mallory = await net.raw_peer()
    now = get_dht_time()
    items = [[pack(key), pack(f"spam{i}"), pack(b"\0" * (BIG - 16)), now + 29 * 86400, False] for i in range(300)]
    answers = await flood(mallory, victim, items, batch=32)
    assert all(a is True for a in answers)
    assert len(victim.storage.get(DHTID.of_key(pack(key)), get_dht_time()).subkeys) == 303
    # a find reply stays within its budget, the smallest (here: the owners') subkeys first
    response = await mallory.call(addr(victim), "dht.find",
                                  {"v": 1, "server": False, "keys": [DHTID.of_key(pack(key)).to_bytes20()], "k": 20},
                                  timeout=30)
    assert len(pack(response)) <= DHTLimits().max_find_reply_bytes + 64 * KiB
    entry = response["results"][0][0]
    assert len(entry) == 3 and entry[2] > 0
    result = await owners[0].get(key, latest=True)
    assert result is not None
    for i, owner in enumerate(owners):
        assert result.value[f"run{i} {owner.signature_validator.ownership_marker}"].value == {"run": i}
    assert 3 < len(result.value) < 303


async def test_large_batches_are_split_to_fit_the_message_limit(net):
    from dht import Limits

    p2p_limits = Limits(max_message_size=4 * MiB)
    holder = await net.node(p2p_limits=p2p_limits)
    writer = await net.node([addr(holder)], client_mode=True, p2p_limits=p2p_limits)
    now = get_dht_time()
    # 6 MiB under one key, and 6 MiB under 30 keys: each more than one 4 MiB message
    one_key = [("big.dict", b"\0" * (200 * KiB), now + 60, f"part{i}") for i in range(30)]
    many_keys = [(f"big/{i}", b"\1" * (200 * KiB), now + 60, None) for i in range(30)]
    assert await writer.store_many(one_key) == [True] * 30
    assert await writer.store_many(many_keys) == [True] * 30
    assert len(holder.storage.get(DHTID.of_key(pack("big.dict")), get_dht_time()).subkeys) == 30
    assert all(holder.storage.get(DHTID.of_key(pack(f"big/{i}")), get_dht_time()) is not None for i in range(30))
    result = await writer.get("big.dict", latest=True)  # the reply is cut to fit, smallest first
    assert 0 < len(result.value) < 30


async def test_a_full_node_evicts_records_of_the_foreign_region_first(net):
    first = await net.node(bucket_size=2)
    nodes = [first] + [await net.node([addr(first)], bucket_size=2) for _ in range(7)]
    victim = await net.node([addr(first)], bucket_size=2, limits=DHTLimits(max_entries=40))
    await victim.find_nearest_nodes(victim.node_id)
    size, deadline = -1, asyncio.get_running_loop().time() + 5  # let dial-backs settle (which keys are foreign)
    while size != len(victim.routing_table) and asyncio.get_running_loop().time() < deadline:
        size = len(victim.routing_table)
        await asyncio.sleep(0.5)
    assert len(victim.routing_table) >= 2
    foreign, local = [], []
    for i in range(2000):
        key = f"key{i}"
        (foreign if victim._is_foreign(DHTID.of_key(pack(key))) else local).append(key)
    assert len(foreign) >= 40 and len(local) >= 5
    mallory = await net.raw_peer()
    now = get_dht_time()
    assert await raw_store(mallory, victim, [[pack(k), None, pack(1), now + 600, False] for k in foreign[:40]]) \
        == [True] * 40
    farthest = max(foreign[:40], key=lambda k: DHTID.of_key(pack(k)) ^ victim.node_id)
    honest = nodes[3]
    answers = await raw_store(honest.p2p, victim, [[pack(k), None, pack(2), now + 600, False] for k in local[:5]])
    assert answers == [True] * 5 and len(victim.storage) == 40 and victim.storage.evicted == 5
    held = {key_id for key_id, _ in victim.storage.items(get_dht_time())}
    assert all(DHTID.of_key(pack(k)) in held for k in local[:5])
    assert DHTID.of_key(pack(farthest)) not in held


@pytest.mark.parametrize("field, value", [("max_bytes", 0), ("max_bytes_per_peer", -1), ("max_bytes_per_ip", 1.5),
                                          ("max_subkeys_per_key", 0), ("max_find_reply_bytes", 100)])
def test_budget_knobs_are_validated(field, value):
    with pytest.raises(ValueError, match=field):
        DHTLimits(**{field: value})
