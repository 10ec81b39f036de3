"""A record signed by X cannot be deleted, hidden or made unrefreshable by anyone but X before it
expires (issue 11, root cause 2): storage rules for signed subkeys, per-subkey merging of replicas'
answers, and the live attack over real sockets (an attacker with its own identity storing ``{}`` or a
scalar with a far expiration under a shared key such as ``swarm.runs``, straight to the nodes that
hold it), also against the real callers in swarm/runs.py and swarm/progress.py."""


import msgpack
import pytest

from dht import DHT, DHTNode, get_dht_time
from dht.peer.identity import Identity, b58encode
from dht.routing import DHTID
from dht.storage import Storage, StoreRefused
from dht.validation import has_owner_marker

from tests.dht_net import net  # noqa: F401 -- the fixture
from tests.dht_net import raw_store

DAY = 86400.0


def pack(x) -> bytes:
    return msgpack.packb(x, use_bin_type=True)


def marker(identity: Identity) -> str:
    return f"[owner:{b58encode(identity.public_key)}]"

# ---- storage rules ------------------------------------------------------------------------------


def test_owner_marker_detection_matches_what_the_validator_protects():
    owner = Identity()
    assert has_owner_marker(pack(f"run {marker(owner)}"))
    assert not has_owner_marker(pack("run [owner:0OIl]")) and not has_owner_marker(pack("run"))
    assert not has_owner_marker(None) and not has_owner_marker(b"[owner:")


def test_a_key_holding_signed_subkeys_accepts_only_subkeys():
    signed = pack(f"run {marker(Identity())}")
    s = Storage()
    assert s.store(1, b"swarm.runs", signed, b"announcement", 100.0, now=0.0, origin="owner")
    assert s.store(1, b"swarm.runs", b"plain", b"other", 50.0, now=0.0, origin="someone")
    for value, expiration in ((pack({}), 29 * DAY), (pack(0), 101.0), (pack(None), 1e9)):
        with pytest.raises(StoreRefused, match="only subkeys"):
            s.store(1, b"swarm.runs", None, value, expiration, now=0.0, origin="mallory")
    assert set(s.get(1, 0.0).subkeys) == {signed, b"plain"}
    assert s.store(1, b"swarm.runs", signed, b"refreshed", 200.0, now=0.0, origin="owner")  # newer wins
    assert s.get(1, 0.0).subkeys[signed] == (b"refreshed", 200.0)
    # once the signed subkey expired, the key is an ordinary one again
    assert s.store(1, b"swarm.runs", None, b"plain value", 300.0, now=201.0, origin="someone")


def test_a_signed_subkey_replaces_a_plain_value_whatever_the_expirations():
    signed = pack(f"run {marker(Identity())}")
    s = Storage()
    assert s.store(1, b"swarm.runs", None, pack({}), 29 * DAY, now=0.0, origin="mallory")  # squatted first
    assert s.store(1, b"swarm.runs", signed, b"announcement", 60.0, now=0.0, origin="owner")
    entry = s.get(1, 0.0)
    assert entry.regular is None and entry.subkeys == {signed: (b"announcement", 60.0)} and len(s) == 1


def test_unsigned_dictionaries_keep_newest_wins():
    s = Storage()
    s.store(1, b"k", b"a", b"1", 10.0, now=0.0)
    assert s.store(1, b"k", None, b"r", 9.0, now=0.0) is False
    assert s.store(1, b"k", None, b"r", 11.0, now=0.0)  # newer than every (unsigned) subkey: replaces
    assert s.store(1, b"k", b"a", b"1", 10.0, now=0.0) is False  # an unsigned subkey must be newer

# ---- the live attack, over real sockets ----------------------------------------------------------


def holders(nodes: list[DHTNode], key) -> list[DHTNode]:
    key_id = DHTID.of_key(pack(key))
    return [n for n in nodes if n.storage.get(key_id, n.clock()) is not None]


async def test_unsigned_stores_cannot_erase_or_block_signed_subkeys(net):
    nodes = await net.many(5)
    owners, reader = nodes[:2], nodes[4]
    key = "swarm.runs"
    subkeys = [f"run{i} {o.signature_validator.ownership_marker}" for i, o in enumerate(owners)]
    for i, owner in enumerate(owners):
        assert await owner.store(key, {"run": i, "v": 1}, get_dht_time() + 60, subkey=subkeys[i])
    victims = holders(nodes, key)
    assert len(victims) == 5
    mallory = await net.raw_peer()
    now = get_dht_time()
    attack = [[pack(key), None, pack({}), now + 29 * DAY, False],  # the store("swarm.runs", {}, now + 29 days)
              [pack(key), None, pack(0), now + 29 * DAY, False],
              [pack(key), None, pack({}), now + 29 * DAY, True],  # also into the nodes' caches (may take it)
              [pack(key), pack("garbage"), b"\xc1 not msgpack", now + 29 * DAY, False]]  # an undecodable subkey
    for victim in victims:
        answers = await raw_store(mallory, victim, attack)
        assert all(isinstance(a, str) and "only subkeys" in a for a in answers[:2]), answers
    for reader_node in (reader, nodes[2]):
        result = await reader_node.get(key, latest=True)
        assert result is not None and isinstance(result.value, dict)
        assert {s: result.value[s].value for s in subkeys} == {subkeys[0]: {"run": 0, "v": 1},
                                                               subkeys[1]: {"run": 1, "v": 1}}
    # the owners' refreshes are accepted everywhere, and seen
    for i, owner in enumerate(owners):
        assert await owner.store(key, {"run": i, "v": 2}, get_dht_time() + 120, subkey=subkeys[i])
    result = await reader.get(key, latest=True)
    assert [result.value[s].value["v"] for s in subkeys] == [2, 2]
    for victim in victims:
        entry = victim.storage.get(DHTID.of_key(pack(key)), get_dht_time())
        assert entry.regular is None and {pack(s) for s in subkeys} <= set(entry.subkeys)


async def test_a_squatted_key_takes_the_owners_signed_subkey_anyway(net):
    nodes = await net.many(4)
    mallory = await net.raw_peer()
    key = "swarm.runs"
    for node in nodes:  # before any run exists, with the longest expiration the nodes accept
        assert await raw_store(mallory, node, [[pack(key), None, pack({}), get_dht_time() + 29 * DAY, False]]) == [True]
    owner = nodes[1]
    subkey = f"r {owner.signature_validator.ownership_marker}"
    assert await owner.store(key, {"run": "r"}, get_dht_time() + 60, subkey=subkey)
    assert len(holders(nodes, key)) == 4
    result = await nodes[3].get(key, latest=True)
    assert isinstance(result.value, dict) and result.value[subkey].value == {"run": "r"}


async def test_a_replica_answering_a_fake_newer_value_cannot_hide_signed_subkeys(net):
    nodes = await net.many(5)
    owner, evil, reader = nodes[0], nodes[1], nodes[4]
    key = "swarm.runs"
    subkey = f"run {owner.signature_validator.ownership_marker}"
    assert await owner.store(key, {"run": 1}, get_dht_time() + 60, subkey=subkey)
    # a malicious replica answers finds with a plain value that expires far later than every subkey
    key_bytes = pack(key)
    evil.storage = Storage()
    assert evil.storage.store(DHTID.of_key(key_bytes), key_bytes, None, pack({}), get_dht_time() + 29 * DAY,
                              get_dht_time())
    reader.storage = Storage()  # the reader asks the others (its own replica would answer first)
    assert reader.storage.store(DHTID.of_key(key_bytes), key_bytes, None, pack("stale"), get_dht_time() + 29 * DAY,
                                get_dht_time())
    result = await reader.get(key, latest=True)
    assert isinstance(result.value, dict) and result.value[subkey].value == {"run": 1}


def test_swarm_runs_and_progress_survive_unsigned_writes():
    from swarm.progress import progress_key
    from swarm.runs import RUNS_KEY, RunAnnouncement, announce_run, find_run, list_runs

    bootstrap = DHT(host="127.0.0.1")
    dhts = [bootstrap]
    try:
        for _ in range(2):
            dhts.append(DHT(initial_peers=bootstrap.get_visible_addresses(), host="127.0.0.1"))
        creator, other = dhts[1], dhts[2]
        announcement = RunAnnouncement("demo", "examples/digits.py", "ab" * 32, str(creator.peer_id),
                                       get_dht_time())
        assert announce_run(creator, announcement, expiration=60)

        async def publish_progress(dht, node):
            record = {"peer_id": str(dht.peer_id), "epoch": 3, "samples": 10, "samples_per_second": 5.0,
                      "loss": 0.5, "time": get_dht_time(), "client_mode": False}
            return await node.store(progress_key("demo"), record, get_dht_time() + 60,
                                    subkey=node.signature_validator.ownership_marker)

        assert creator.run_coroutine(publish_progress)
        attacker = DHT(initial_peers=bootstrap.get_visible_addresses(), host="127.0.0.1")
        dhts.append(attacker)

        async def attack(_dht, node):  # its own identity, straight to every node, bypassing lookups
            answers = []
            for target in dhts[:3]:
                for key in (RUNS_KEY, progress_key("demo")):
                    request = {"v": 1, "server": True,
                               "items": [[pack(key), None, pack({}), get_dht_time() + 29 * DAY, False]]}
                    response = await node.p2p.call(target.get_visible_addresses()[0], "dht.store", request,
                                                   timeout=10)
                    answers += response["ok"]
            return answers

        answers = attacker.run_coroutine(attack)
        assert answers and all(a is not True for a in answers)
        for reader in (other, bootstrap, attacker):
            assert find_run(reader, "demo") == announcement
            runs = list_runs(reader)
            assert [r.run_id for r in runs] == ["demo"] and runs[0].epoch == 3
        assert announce_run(creator, announcement, expiration=120)  # the refresh is accepted
    finally:
        for dht in reversed(dhts):
            dht.shutdown()
