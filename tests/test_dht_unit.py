"""Pure unit tests of the DHT's parts: routing table, storage rules, validators, wire parsers, lookup."""

import asyncio
import functools
import math
import os
import random

import msgpack
import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule

from dht.peer.errors import BadRequestError, ProtocolError
from dht.peer.identity import Identity, PeerID
from dht.protocol import DHTLimits, parse_find, parse_ping, parse_store, parse_store_contacts, parse_store_near
from dht.routing import ID_MAX, DHTID, RoutingTable
from dht.storage import Storage, StoreRefused
from dht.traverse import iterative_lookup
from dht.validation import (CompositeValidator, DHTRecord, SchemaValidator, SignatureValidator,
                            ValidationError)


def pid(rng: random.Random | None = None) -> PeerID:
    data = rng.randbytes(32) if rng else os.urandom(32)
    return PeerID(b"\x12\x20" + data)


def pack(x) -> bytes:
    return msgpack.packb(x, use_bin_type=True)


HALF = ID_MAX // 2

# ---- routing table ----------------------------------------------------------------------------


def test_add_or_update_moves_node_to_most_recent():
    table = RoutingTable(DHTID(0), bucket_size=4)
    a, b, c = pid(), pid(), pid()
    for p, i in ((a, HALF + 1), (b, HALF + 2), (c, HALF + 3)):
        assert table.add_or_update(p, DHTID(i)) is None
    bucket = table.buckets[table.bucket_index(HALF + 1)]
    assert list(bucket.nodes) == [a, b, c]
    assert table.add_or_update(a, DHTID(HALF + 1)) is None
    assert list(bucket.nodes) == [b, c, a]
    assert len(table) == 3 and a in table and table.get_id(a) == HALF + 1


def test_own_id_is_never_added():
    own = pid()
    table = RoutingTable(DHTID.of_peer(own))
    assert table.add_or_update(own) is None
    assert len(table) == 0 and own not in table


def test_bucket_splitting_keeps_every_accepted_node_findable():
    rng = random.Random(1)
    own = DHTID.random(rng)
    table = RoutingTable(own, bucket_size=4, depth_modulo=5)
    accepted = {}
    for _ in range(500):
        p, i = pid(rng), DHTID.random(rng)
        table.add_or_update(p, i)
        if p in table:
            accepted[p] = i
    assert len(table.buckets) > 1 and len(table) > 4 * 3
    # buckets tile [0, 2^160) in order, none overfull
    assert table.buckets[0].lower == 0 and table.buckets[-1].upper == ID_MAX
    for left, right in zip(table.buckets, table.buckets[1:]):
        assert left.upper == right.lower
    assert all(len(b.nodes) <= 4 for b in table.buckets)
    assert sum(len(b.nodes) for b in table.buckets) == len(table)
    # every node still in the table lives in the bucket covering its id and is its own nearest
    current = {p: i for p, i in accepted.items() if p in table}
    assert set(current) == set(table.all_peers())
    for p, i in current.items():
        assert p in table.buckets[table.bucket_index(i)].nodes
        assert table.nearest(i, 1) == [(p, i)]


def test_depth_modulo_lets_far_buckets_split():
    # own id 0: every id >= HALF is in the far half. With depth_modulo=5 buckets of depth 1..4 still
    # split, so the far half keeps more than bucket_size nodes; with depth_modulo=1 it keeps exactly k.
    rng = random.Random(2)
    ids = [DHTID(rng.randrange(HALF, ID_MAX)) for _ in range(200)]
    relaxed, strict = RoutingTable(DHTID(0), 4, depth_modulo=5), RoutingTable(DHTID(0), 4, depth_modulo=1)
    for i in ids:
        p = pid(rng)
        relaxed.add_or_update(p, i)
        strict.add_or_update(p, i)
    assert len(strict) == 4
    assert len(relaxed) > 4


def test_full_far_bucket_asks_to_ping_least_recent_and_keeps_replacement():
    table = RoutingTable(DHTID(0), bucket_size=2, depth_modulo=1)
    a, b, c, d = pid(), pid(), pid(), pid()
    assert table.add_or_update(a, DHTID(HALF + 1)) is None
    assert table.add_or_update(b, DHTID(HALF + 2)) is None
    assert table.add_or_update(c, DHTID(HALF + 3)) == a  # full (after the split): ping a
    assert c not in table
    far = table.buckets[table.bucket_index(HALF + 3)]
    assert list(far.replacements) == [c]
    assert table.add_or_update(a, DHTID(HALF + 1)) is None  # a answered: now most recent
    assert table.add_or_update(d, DHTID(HALF + 4)) == b  # so b is the least recently seen
    assert list(far.replacements) == [c, d]
    # b does not answer: the newest replacement (d) takes its place
    assert table.remove(b) is True
    assert b not in table and d in table and c not in table
    assert list(far.nodes) == [a, d] and list(far.replacements) == [c]
    assert table.remove(b) is False  # already gone
    # removing a node that only waits as a replacement drops it from the cache
    assert table.remove(c) is False and not far.replacements
    # the bucket covering our own id splits instead of refusing: ids 1..10 (own id 0) end up in buckets
    # [1,2) [2,4) [4,8) [8,16) holding 1 + 2 + 2 + 2; 6, 7 and 10 wait as replacements
    stale = [table.add_or_update(pid(), DHTID(n)) for n in range(1, 11)]
    assert [n for n, s in zip(range(1, 11), stale) if s is not None] == [6, 7, 10]
    assert len(table) == 2 + 7


def test_replacement_cache_is_bounded():
    table = RoutingTable(DHTID(0), bucket_size=2, depth_modulo=1)
    for n in range(20):
        table.add_or_update(pid(), DHTID(HALF + n))
    far = table.buckets[table.bucket_index(HALF)]
    assert len(far.nodes) == 2 and len(far.replacements) == 2


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, ID_MAX - 1), min_size=1, max_size=80, unique=True),
       st.integers(0, ID_MAX - 1), st.integers(1, 30), st.integers(0, ID_MAX - 1), st.booleans())
def test_nearest_matches_brute_force(ids, target, k, own, exclude_one):
    rng = random.Random(0)
    table = RoutingTable(DHTID(own), bucket_size=4)
    peers = {}
    for i in ids:
        p = pid(rng)
        table.add_or_update(p, DHTID(i))
        if p in table:
            peers[p] = i
    exclude = next(iter(peers), None) if exclude_one else None
    expected = sorted(((p, i) for p, i in peers.items() if p != exclude), key=lambda x: x[1] ^ target)[:k]
    got = table.nearest(target, k, exclude=exclude)
    assert got == expected
    distances = [i ^ target for _, i in got]
    assert distances == sorted(distances)


def test_dhtid_bytes_roundtrip_and_errors():
    i = DHTID.random()
    assert DHTID.from_bytes20(i.to_bytes20()) == i
    for bad in (b"\0" * 19, b"\0" * 21, "x" * 20):
        with pytest.raises(ValueError):
            DHTID.from_bytes20(bad)
    assert DHTID.of_key(b"a") != DHTID.of_key(b"b") and 0 <= DHTID.of_key(b"a") < ID_MAX

# ---- storage ----------------------------------------------------------------------------------


def test_regular_value_rules():
    s = Storage()
    assert s.store(1, b"k", None, b"v1", 10.0, now=0.0)
    assert s.store(1, b"k", None, b"v1", 10.0, now=0.0) is True  # identical: idempotent
    assert len(s) == 1
    assert s.store(1, b"k", None, b"v2", 10.0, now=0.0) is False  # same expiration, different value
    assert s.store(1, b"k", None, b"v0", 9.0, now=0.0) is False  # older
    assert s.get(1, 0.0).regular == (b"v1", 10.0)
    assert s.store(1, b"k", None, b"v3", 11.0, now=0.0)  # newer wins
    assert s.get(1, 0.0).regular == (b"v3", 11.0)
    assert s.store(1, b"k", None, b"x", 5.0, now=5.0) is False  # already expired
    assert s.store(1, b"other", None, b"v", 20.0, now=0.0) is False  # id collision: first key kept


def test_expired_values_are_never_returned_and_purge_forgets_them():
    s = Storage()
    s.store(1, b"k", None, b"v", 10.0, now=0.0)
    s.store(2, b"d", b"a", b"va", 5.0, now=0.0)
    s.store(2, b"d", b"b", b"vb", 20.0, now=0.0)
    assert s.get(1, 9.99).regular == (b"v", 10.0)
    assert s.get(1, 10.0) is None
    assert set(s.get(2, 6.0).subkeys) == {b"b"}
    assert [k for k, _ in s.items(6.0)] == [2]
    s.purge(21.0)
    assert len(s) == 0 and s.get(2, 21.0) is None and not s.stored_at
    # an expired key can be stored again, even with an earlier expiration than the old value
    assert s.store(1, b"k", None, b"w", 25.0, now=21.0)


def test_dictionary_subkeys_have_their_own_expirations():
    s = Storage()
    assert s.store(1, b"k", b"a", b"1", 10.0, now=0.0)
    assert s.store(1, b"k", b"b", b"2", 20.0, now=0.0)
    assert s.store(1, b"k", b"a", b"1", 10.0, now=0.0) is True  # idempotent
    assert s.store(1, b"k", b"a", b"x", 10.0, now=0.0) is False
    assert s.store(1, b"k", b"a", b"x", 9.0, now=0.0) is False
    entry = s.get(1, 0.0)
    assert entry.subkeys == {b"a": (b"1", 10.0), b"b": (b"2", 20.0)} and entry.expiration_time == 20.0
    assert s.store(1, b"k", b"a", b"3", 30.0, now=0.0)
    assert s.get(1, 25.0).subkeys == {b"a": (b"3", 30.0)}
    assert len(s) == 1


def test_regular_replaces_dictionary_only_when_newer_than_every_subkey():
    s = Storage()
    s.store(1, b"k", b"a", b"1", 10.0, now=0.0)
    s.store(1, b"k", b"b", b"2", 20.0, now=0.0)
    assert s.store(1, b"k", None, b"r", 20.0, now=0.0) is False
    assert s.store(1, b"k", None, b"r", 15.0, now=0.0) is False
    assert s.get(1, 0.0).regular is None
    assert s.store(1, b"k", None, b"r", 21.0, now=0.0)
    entry = s.get(1, 0.0)
    assert entry.regular == (b"r", 21.0) and not entry.subkeys and len(s) == 1


def test_subkey_replaces_regular_only_when_newer():
    s = Storage()
    s.store(1, b"k", None, b"r", 20.0, now=0.0)
    assert s.store(1, b"k", b"a", b"1", 20.0, now=0.0) is False
    assert s.store(1, b"k", b"a", b"1", 10.0, now=0.0) is False
    assert s.get(1, 0.0).regular == (b"r", 20.0)
    assert s.store(1, b"k", b"a", b"1", 21.0, now=0.0)
    entry = s.get(1, 0.0)
    assert entry.regular is None and entry.subkeys == {b"a": (b"1", 21.0)} and len(s) == 1


def test_quotas_per_peer_and_total():
    s = Storage(max_entries=4, max_entries_per_peer=2)
    s.store(1, b"k1", None, b"v", 10.0, now=0.0, origin="p")
    s.store(2, b"k2", b"s", b"v", 10.0, now=0.0, origin="p")
    with pytest.raises(StoreRefused, match="quota of 2"):
        s.store(3, b"k3", None, b"v", 10.0, now=0.0, origin="p")
    with pytest.raises(StoreRefused, match="quota"):
        s.store(2, b"k2", b"t", b"v", 10.0, now=0.0, origin="p")  # every subkey counts
    assert s.store(1, b"k1", None, b"v2", 11.0, now=0.0, origin="p")  # replacing does not count twice
    s.store(3, b"k3", None, b"v", 10.0, now=0.0, origin="q")
    s.store(4, b"k4", None, b"v", 30.0, now=0.0, origin="q")
    # full: a newcomer's store evicts the oldest record of the peer holding the most bytes (p: k2),
    # and the heaviest peer itself is refused
    assert s.store(5, b"k5", None, b"v", 10.0, now=0.0, origin="r")
    assert s.get(2, 0.0) is None and s.get(1, 0.0) is not None and len(s) == 4
    assert s.store(5, b"k5", None, b"v" * 2000, 10.5, now=0.0, origin="r")  # r: the most bytes now
    with pytest.raises(StoreRefused, match="full"):
        s.store(8, b"k8", None, b"v", 10.0, now=0.0, origin="r")
    # expired entries free their quota (also when a get noticed the expiry first)
    assert s.get(1, 12.0) is None and s.get(2, 12.0) is None
    assert len(s) == 1
    s.store(6, b"k6", None, b"v", 40.0, now=12.0, origin="p")
    s.store(7, b"k7", None, b"v", 40.0, now=12.0, origin="p")
    assert len(s) == 3


def test_get_of_expired_parts_does_not_leak_quota():
    s = Storage(max_entries_per_peer=1)
    for n in range(5):
        t = n * 10.0
        assert s.store(n, b"k%d" % n, None, b"v", t + 5, now=t, origin="p")
        assert s.get(n, t + 6) is None  # the reader notices the expiry before any purge
    s2 = Storage(max_entries_per_peer=2)
    s2.store(1, b"k", b"a", b"v", 5.0, now=0.0, origin="p")
    s2.store(1, b"k", b"b", b"v", 50.0, now=0.0, origin="p")
    assert set(s2.get(1, 6.0).subkeys) == {b"b"}
    assert s2.store(2, b"k2", None, b"v", 50.0, now=6.0, origin="p")


class RegularValueModel(RuleBasedStateMachine):
    """Storage vs a dict model for regular values: newer expiration wins, ties keep the first."""

    KEYS = [(1, b"k1"), (2, b"k2"), (3, b"k3")]

    def __init__(self):
        super().__init__()
        self.storage = Storage(max_entries=100, max_entries_per_peer=100)
        self.model: dict[int, tuple[bytes, float]] = {}
        self.now = 0.0

    def live(self, key_id):
        item = self.model.get(key_id)
        return item if item is not None and item[1] > self.now else None

    @rule(key=st.sampled_from(KEYS), value=st.sampled_from([b"a", b"b", b"c"]), ttl=st.integers(-2, 8),
          origin=st.sampled_from(["p", "q"]))
    def store(self, key, value, ttl, origin):
        key_id, key_bytes = key
        exp = self.now + ttl
        current = self.live(key_id)
        if exp <= self.now:
            expected = False
        elif current is None or exp > current[1]:
            expected = True
            self.model[key_id] = (value, exp)
        else:
            expected = exp == current[1] and value == current[0]
        assert self.storage.store(key_id, key_bytes, None, value, exp, self.now, origin) is expected
        # store purges first, so the counts (which back the quotas) are exact right after it
        live = sum(self.live(k) is not None for k, _ in self.KEYS)
        assert len(self.storage) == live == sum(self.storage._per_peer.values())

    @rule(dt=st.sampled_from([0.5, 1.0, 3.0]))
    def advance(self, dt):
        self.now += dt

    @rule(key=st.sampled_from(KEYS))
    def get(self, key):
        entry = self.storage.get(key[0], self.now)
        current = self.live(key[0])
        if current is None:
            assert entry is None
        else:
            assert entry is not None and entry.regular == current and entry.key_bytes == key[1]

    @rule()
    def items_match(self):  # a rule, not an invariant: items() purges, which would hide counting bugs
        assert {k: e.regular for k, e in self.storage.items(self.now)} == \
            {k: self.live(k) for k, _ in self.KEYS if self.live(k) is not None}


TestRegularValueModel = RegularValueModel.TestCase
TestRegularValueModel.settings = settings(max_examples=80, stateful_step_count=40, deadline=None)

# ---- signature validator ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def owner():
    return Identity()


def owned_record(validator: SignatureValidator, value=b"\xa5hello", exp=100.0, subkey=None, key=None):
    key = key if key is not None else pack(f"data{validator.ownership_marker}")
    record = DHTRecord(key, subkey, value, exp)
    return DHTRecord(key, subkey, validator.sign_value(record), exp)


def test_owner_signed_record_validates_and_strips(owner):
    v = SignatureValidator(owner)
    record = owned_record(v)
    assert record.value != b"\xa5hello" and b"[signature:" in record.value
    v.validate(record)
    assert v.strip_value(record) == b"\xa5hello"
    # ownership in the subkey protects the record too
    sub = DHTRecord(pack("peers"), pack(v.ownership_marker), b"\x01", 100.0)
    signed = DHTRecord(sub.key, sub.subkey, v.sign_value(sub), sub.expiration_time)
    v.validate(signed)
    with pytest.raises(ValidationError, match="not signed"):
        v.validate(sub)


@pytest.mark.parametrize("field", ["value", "expiration", "key", "subkey"])
def test_tampered_record_fails(owner, field):
    v = SignatureValidator(owner)
    record = owned_record(v)
    body, sig = record.value[:-(len(b"[signature:") + 65)], record.value[-(len(b"[signature:") + 65):]
    tampered = {
        "value": DHTRecord(record.key, None, b"\xa5HELLO" + sig, record.expiration_time),
        "expiration": DHTRecord(record.key, None, record.value, record.expiration_time + 1000),
        "key": DHTRecord(pack(f"other{v.ownership_marker}"), None, record.value, record.expiration_time),
        "subkey": DHTRecord(record.key, pack("x"), record.value, record.expiration_time),
    }[field]
    assert body == b"\xa5hello"
    with pytest.raises(ValidationError, match="signature does not match"):
        v.validate(tampered)


def test_record_signed_by_another_key_fails(owner):
    v, mallory = SignatureValidator(owner), Identity()
    key = pack(f"data{v.ownership_marker}")
    record = DHTRecord(key, None, b"\x01", 100.0)
    assert SignatureValidator(mallory).sign_value(record) == b"\x01"  # not mallory's key to sign
    forged = b"\x01[signature:" + mallory.sign(SignatureValidator._signed_payload(record, b"\x01")) + b"]"
    with pytest.raises(ValidationError, match="signature does not match"):
        v.validate(DHTRecord(key, None, forged, 100.0))
    # any node (not just the owner) rejects it: validation needs no private key
    with pytest.raises(ValidationError):
        SignatureValidator(mallory).validate(DHTRecord(key, None, forged, 100.0))


def test_unsigned_protected_record_and_two_owners_fail(owner):
    v, other = SignatureValidator(owner), SignatureValidator(Identity())
    with pytest.raises(ValidationError, match="not signed"):
        v.validate(DHTRecord(pack(f"x{v.ownership_marker}"), None, b"\x01", 100.0))
    with pytest.raises(ValidationError, match="not signed"):
        v.validate(DHTRecord(pack(f"x{v.ownership_marker}"), None, b"]", 100.0))
    two = DHTRecord(pack(f"x{v.ownership_marker}"), pack(other.ownership_marker), b"\x01", 100.0)
    assert v.sign_value(two) == b"\x01"  # not solely ours: left unsigned
    with pytest.raises(ValidationError, match="more than one owner"):
        v.validate(two)
    # unprotected records pass untouched
    plain = DHTRecord(pack("x"), None, b"\x01", 100.0)
    v.validate(plain)
    assert v.sign_value(plain) == b"\x01" and v.strip_value(plain) == b"\x01"

# ---- schema validator -------------------------------------------------------------------------


class Schema(pydantic.BaseModel):
    step: int
    loss: float
    peers: dict[str, int]


def rec(key, value, subkey=None):
    return DHTRecord(pack(key), None if subkey is None else pack(subkey), pack(value), 100.0)


def test_schema_accepts_matching_values():
    s = SchemaValidator(Schema)
    s.validate(rec("step", 3))
    s.validate(rec("loss", 0.5))
    s.validate(rec("peers", 4, subkey="peer-a"))
    s.validate(rec("unrelated", "anything"))  # extra keys allowed by default
    with pytest.raises(ValidationError, match="holds a dictionary"):  # it would replace the subkeys
        s.validate(rec("peers", {"a": 1}))


@pytest.mark.parametrize("key,value,subkey,field", [
    ("step", "3", None, "step"),
    ("step", 3.0, None, "step"),
    ("step", True, None, "step"),
    ("loss", "0.5", None, "loss"),
    ("peers", "many", "peer-a", "peers"),
    ("peers", 1, 7, "peers"),  # subkey must be a str
    ("peers", [1], None, "peers"),
])
def test_schema_rejects_wrong_types_strictly(key, value, subkey, field):
    s = SchemaValidator(Schema)
    record = rec(key, value, subkey)
    with pytest.raises(ValidationError) as info:
        s.validate(record)
    message = str(info.value)
    assert repr(key) in message and f"Schema.{field}" in message


def test_schema_prefix_and_extra_keys():
    s = SchemaValidator(Schema, prefix="run", allow_extra_keys=False)
    s.validate(rec("run_step", 1))
    with pytest.raises(ValidationError, match="run_step"):
        s.validate(rec("run_step", "1"))
    for key in ("step", "run_other", 5):
        with pytest.raises(ValidationError, match="not allowed"):
            s.validate(rec(key, 1))
    lenient = SchemaValidator(Schema, prefix="run")
    lenient.validate(rec("step", "not an int"))  # not under the prefix: not governed
    with pytest.raises(ValidationError, match="not valid msgpack"):
        lenient.validate(DHTRecord(pack("run_step"), None, b"\xc1", 100.0))


def test_composite_checks_signature_then_schema_on_stripped_value(owner):
    sig = SignatureValidator(owner)
    composite = CompositeValidator([SchemaValidator(Schema), sig])
    record = DHTRecord(pack("peers"), pack(sig.ownership_marker), pack(5), 100.0)
    signed = DHTRecord(record.key, record.subkey, composite.sign_value(record), 100.0)
    assert composite.validate_and_strip(signed) == pack(5)
    bad = DHTRecord(record.key, record.subkey, pack("five"), 100.0)
    bad = DHTRecord(bad.key, bad.subkey, composite.sign_value(bad), 100.0)
    with pytest.raises(ValidationError, match="Schema.peers"):
        composite.validate(bad)
    with pytest.raises(ValidationError, match="not signed"):
        composite.validate(record)

# ---- wire parsers -----------------------------------------------------------------------------

LIMITS = DHTLimits(max_items_per_store=4, max_keys_per_find=3, max_key_size=8)
GOOD_ITEM = [b"k", None, b"v", 10.0, False]


def test_parsers_accept_well_formed_requests():
    assert parse_ping({"v": 1, "server": True, "t": 5}) == (True, 5.0)
    assert parse_ping({"v": 1, "t": math.nan}) == (False, None)
    server, items = parse_store({"v": 1, "server": True, "items": [GOOD_ITEM, [b"k", b"s", b"", 3, True]]}, LIMITS)
    assert server and items[0].key == b"k" and items[1].subkey == b"s" and items[1].expiration_time == 3.0
    assert parse_find({"v": 1, "keys": [b"\0" * 20], "k": 5}, LIMITS) == (False, [b"\0" * 20], 5)


@pytest.mark.parametrize("request_", [
    None, [], "x", {}, {"v": 2, "items": []}, {"v": "1", "items": []}, {"v": 1, "server": "yes", "items": []},
    {"v": 1}, {"v": 1, "items": {}}, {"v": 1, "items": [GOOD_ITEM] * 5},
    {"v": 1, "items": [GOOD_ITEM[:4]]}, {"v": 1, "items": [GOOD_ITEM + [1]]}, {"v": 1, "items": ["x"]},
    {"v": 1, "items": [["k", None, b"v", 10.0, False]]}, {"v": 1, "items": [[b"", None, b"v", 10.0, False]]},
    {"v": 1, "items": [[b"k" * 9, None, b"v", 10.0, False]]}, {"v": 1, "items": [[b"k", b"", b"v", 10.0, False]]},
    {"v": 1, "items": [[b"k", "s", b"v", 10.0, False]]}, {"v": 1, "items": [[b"k", None, "v", 10.0, False]]},
    {"v": 1, "items": [[b"k", None, b"v", math.nan, False]]}, {"v": 1, "items": [[b"k", None, b"v", math.inf, False]]},
    {"v": 1, "items": [[b"k", None, b"v", -math.inf, False]]}, {"v": 1, "items": [[b"k", None, b"v", "10", False]]},
    {"v": 1, "items": [[b"k", None, b"v", True, False]]}, {"v": 1, "items": [[b"k", None, b"v", 10.0, 0]]},
])
def test_parse_store_rejects_malformed(request_):
    with pytest.raises(BadRequestError):
        parse_store(request_, LIMITS)


@pytest.mark.parametrize("request_", [
    None, {"v": 0, "keys": []}, {"keys": []}, {"v": 1}, {"v": 1, "keys": b"\0" * 20},
    {"v": 1, "keys": [b"\0" * 20] * 4}, {"v": 1, "keys": [b"\0" * 19]}, {"v": 1, "keys": [b"\0" * 21]},
    {"v": 1, "keys": ["a" * 20]}, {"v": 1, "keys": [], "k": 0}, {"v": 1, "keys": [], "k": 65},
    {"v": 1, "keys": [], "k": "5"}, {"v": 1, "keys": [], "k": 2.0}, {"v": 1, "server": 1, "keys": []},
])
def test_parse_find_rejects_malformed(request_):
    with pytest.raises(BadRequestError):
        parse_find(request_, LIMITS)


@pytest.mark.parametrize("request_", [None, b"", {"v": 3}, {"server": True}, {"v": 1, "server": None}])
def test_parse_ping_rejects_malformed(request_):
    with pytest.raises(BadRequestError):
        parse_ping(request_)


@pytest.mark.parametrize("near", [0, 65, -1, "5", 2.0, True, [3]])
def test_parse_store_near_rejects_malformed(near):
    with pytest.raises(BadRequestError, match="near"):
        parse_store_near({"v": 1, "items": [GOOD_ITEM], "near": near})


def test_store_contacts_parsing():
    assert parse_store_near({"v": 1, "items": [GOOD_ITEM]}) is None
    assert parse_store_near({"v": 1, "items": [GOOD_ITEM], "near": 20}) == 20
    peer = Identity().peer_id
    assert parse_store_contacts({"ok": [True]}) == []  # a responder that sent none (or an older one)
    assert parse_store_contacts({"ok": [True], "near": [[peer.raw, ["/ip4/127.0.0.1/tcp/1"]], ["junk"], 5]}) == \
        [(peer, ["/ip4/127.0.0.1/tcp/1"])]  # malformed contacts are skipped, the rest kept
    with pytest.raises(ProtocolError):
        parse_store_contacts({"ok": [True], "near": "x"})
    with pytest.raises(ProtocolError):
        parse_store_contacts({"ok": [True], "near": [[peer.raw, []]] * 65})


def test_bad_request_error_names_the_problem():
    with pytest.raises(BadRequestError, match="version 7"):
        parse_ping({"v": 7})
    with pytest.raises(BadRequestError, match="too many items"):
        parse_store({"v": 1, "items": [GOOD_ITEM] * 5}, LIMITS)
    assert BadRequestError.code == "bad_request"

# ---- iterative lookup -------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def make_graph(n: int, k: int, seed: int) -> tuple[dict[PeerID, int], dict[PeerID, list[tuple[PeerID, int]]]]:
    """n nodes, each with a Kademlia routing table (bucket size k) filled with every other node."""
    rng = random.Random(seed)
    ids = {pid(rng): DHTID.random(rng) for _ in range(n)}
    tables = {}
    for p, i in ids.items():
        table = RoutingTable(DHTID(i), bucket_size=k)
        for q, j in rng.sample(list(ids.items()), n):
            if q != p:
                table.add_or_update(q, DHTID(j))
        tables[p] = table
    return ids, tables


class GraphQuery:
    def __init__(self, tables, target, k, failing=(), delay=0.001):
        # k: how many contacts each answer carries
        self.tables, self.target, self.k, self.failing, self.delay = tables, target, k, set(failing), delay
        self.in_flight = self.max_in_flight = self.answered = 0
        self.queried: list[PeerID] = []

    async def __call__(self, peer):
        self.queried.append(peer)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
            if peer in self.failing:
                if len(self.queried) % 2:
                    raise ConnectionError("peer is down")
                return None
            self.answered += 1
            return self.tables[peer].nearest(self.target, self.k)
        finally:
            self.in_flight -= 1


@pytest.mark.parametrize("seed", range(3))
async def test_lookup_finds_true_k_closest_with_alpha_concurrency(seed):
    k, alpha = 8, 3
    ids, tables = make_graph(200, k, seed)
    rng = random.Random(seed + 100)
    target = DHTID.random(rng)
    start = rng.choice(list(ids))
    query = GraphQuery(tables, target, k)
    initial = tables[start].nearest(target, k)
    result = await iterative_lookup(target, initial, query, k=k, alpha=alpha, exclude=start)
    expected = sorted(((p, i) for p, i in ids.items() if p != start), key=lambda x: x[1] ^ target)[:k]
    assert result.nearest == expected
    assert query.max_in_flight == alpha
    assert result.queried == len(query.queried) == len(set(query.queried))  # nobody asked twice
    assert start not in query.queried
    assert result.queried < 100 and result.rounds >= 1


async def test_lookup_survives_failing_queries():
    k, alpha = 8, 3
    ids, tables = make_graph(200, k, 1)
    rng = random.Random(8)
    target = DHTID.random(rng)
    by_distance = sorted(ids, key=lambda p: ids[p] ^ target)
    failing = set(by_distance[:3]) | set(rng.sample(by_distance[3:], 60))  # the 3 closest are down
    start = next(p for p in by_distance[::-1] if p not in failing)
    # answers carry 3k contacts so that the k closest live nodes stay reachable around the dead ones
    query = GraphQuery(tables, target, 3 * k, failing=failing)
    result = await iterative_lookup(target, tables[start].nearest(target, k), query, k=k, alpha=alpha,
                                    exclude=start)
    alive = [p for p in by_distance if p not in failing and p != start]
    assert [p for p, _ in result.nearest] == alive[:k]
    assert set(by_distance[:3]) <= set(query.queried)  # they were tried, and dropped


async def test_lookup_stops_early_when_done():
    k = 8
    ids, tables = make_graph(200, k, 2)
    target = DHTID.random(random.Random(4))
    start = next(iter(ids))
    query = GraphQuery(tables, target, k)
    result = await iterative_lookup(target, tables[start].nearest(target, k), query, k=k, alpha=2,
                                    done=lambda: query.answered >= 1,
                                    exclude=start)
    # the first answer makes done() true: at most the alpha queries sent before it ran
    assert len(query.queried) <= 2 and result.queried == len(query.queried)
    full = await iterative_lookup(target, tables[start].nearest(target, k), GraphQuery(tables, target, k),
                                  k=k, alpha=2, exclude=start)
    assert full.queried > result.queried


async def test_lookup_with_no_contacts_or_all_failing():
    result = await iterative_lookup(5, [], GraphQuery({}, 5, 8), k=8)
    assert result.nearest == [] and result.queried == 0
    peers = [(pid(), i) for i in range(5)]
    query = GraphQuery({}, 0, 8, failing=[p for p, _ in peers])
    result = await iterative_lookup(0, peers, query, k=8, alpha=2)
    assert result.nearest == [] and result.queried == 5 and query.max_in_flight == 2
