"""averaging.protocol: recorded wire vectors, encoders, validating parsers (hypothesis-fuzzed), and
live exchanges over MemoryNetwork / loopback whose every message is one of the recorded vectors.

The vectors were recorded from the code before :mod:`averaging.protocol` existed (commit b04c9ef,
when matchmaking.py and allreduce.py built their messages by hand): every message sent on the
streams (``Stream.send`` wrapped, packed as the transport packs it) during the round and the join
exchanges that the live tests below replay with the same identities, group ids and values. The
refactor keeps the wire byte-identical: the encoders reproduce them and the live code sends them.
"""

from __future__ import annotations

import asyncio
import random

import msgpack
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from averaging import compression, protocol
from averaging.allreduce import AllReduceService, RoundConfig
from averaging.group import GroupInfo
from averaging.protocol import BadRequestError, Begin, PartHeader, ReportRequest
from dht.peer import multiplex
from dht.peer.identity import Identity
from dht.peer.memory_transport import MemoryNetwork


def _hex(*parts: str) -> bytes:
    return bytes.fromhex("".join(parts))


def _identity(k: int) -> Identity:
    return Identity(Ed25519PrivateKey.from_private_bytes(bytes([k]) * 32))


GROUP_ID = b"\x01" * 20
TAG = bytes.fromhex("9964c60f25b1acb88cb04add5274eaa1")  # the recovery tag of the recorded round

# ---- the recorded messages -----------------------------------------------------------------------
# avg.part headers: member 1 (weight 2.0) in phase 0 and in recovery
HEADER_P0 = _hex("85a167c4140101010101010101010101010101010101010101a17000a174c400a16901a177cb4000000000000000")
HEADER_P1 = _hex("85a167c4140101010101010101010101010101010101010101a17001a174c4109964c60f25b1acb88cb04add5274eaa1",
                 "a16901a177cb4000000000000000")
DONE = _hex("82a4646f6e6593000102a56d69786564c2")  # {"done": [0, 1, 2], "mixed": False}
REPORT_REQUEST = _hex("83a167c4140101010101010101010101010101010101010101a16900a66661696c65649103")  # i=0, [3]
REPORT_REPLY = _hex("81a66661696c65649103")
REPORT_REPLY_TO_CLIENT = _hex("83a66661696c65649103a5686561726490a772656c6179656490")
CHUNK_NONE = _hex("81a164c4080000803f00000040")  # codec "none": float32 [1.0, 2.0]

ROUND = {_hex(h) for h in [  # every distinct message of the recorded 4-member round (see _round)
    "85a167c4140101010101010101010101010101010101010101a17000a174c400a16900a177cb3ff0000000000000",
    "81a164c408000080400000a040", "81a164c4080000c0400000e040", "81a164c4080000004100001041",
    "81a164c4080000204100003041",
    "85a167c4140101010101010101010101010101010101010101a17000a174c400a16901a177cb4000000000000000",
    "81a164c4080000803f00000040", "81a164c4080000404000008040", "81a164c4080000104100002041",
    "81a164c4080000304100004041",
    "85a167c4140101010101010101010101010101010101010101a17000a174c400a16902a177cb4008000000000000",
    "81a164c4080000004000004040", "81a164c4080000404100005041", "81a164c408abaaaa3f56551540",
    "81a164c40856555540abaa8a40", "82a4646f6e6593000102a56d69786564c2", "81a164c408abaaaa40abaaca40",
    "81a164c408abaaea4056550541",
    "85a167c4140101010101010101010101010101010101010101a17001a174c4109964c60f25b1acb88cb04add5274eaa1"
    "a16901a177cb4000000000000000",
    "85a167c4140101010101010101010101010101010101010101a17001a174c4109964c60f25b1acb88cb04add5274eaa1"
    "a16902a177cb4008000000000000",
    "85a167c4140101010101010101010101010101010101010101a17001a174c4109964c60f25b1acb88cb04add5274eaa1"
    "a16900a177cb3ff0000000000000",
    "81a164c4085655154156552541", "81a164c4085655354156554541",
    "83a167c4140101010101010101010101010101010101010101a16902a66661696c65649103",
    "83a167c4140101010101010101010101010101010101010101a16900a66661696c65649103",
    "83a66661696c65649103a5686561726490a772656c6179656490", "81a66661696c65649103",
]}

# avg.join, between identities 11 (the follower, memory:n0) and 12 (the leader, memory:n1)
JOIN_REQUEST_OTHER_KEY = _hex(
    "86a36b6579a77665632e306231a6736368656d61c41073737373737373737373737373737373a3657870cb427d1a94a2",
    "000000a4696e666f84a473697a650aa962616e647769647468c0a667617468657281a17801a86d696e5f7061727400a6",
    "636c69656e74c2a5616464727391d93d2f6d656d6f72792f6e302f7032702f516d6653325435426b6e47344e35344651",
    "755a4164436a4d59704b69634459537966486f7852786e39507753464e")
JOIN_REJECTED = _hex("82a6737461747573a872656a6563746564a6726561736f6eb3646966666572656e742067726f7570206b6579")
JOIN_REQUEST = _hex(
    "86a36b6579a67665632e3062a6736368656d61c41073737373737373737373737373737373a3657870cb427d1a94a200",
    "0000a4696e666f84a473697a650aa962616e647769647468c0a667617468657281a17801a86d696e5f7061727400a663",
    "6c69656e74c2a5616464727391d93d2f6d656d6f72792f6e302f7032702f516d6653325435426b6e47344e3534465175",
    "5a4164436a4d59704b69634459537966486f7852786e39507753464e")
JOIN_ACCEPTED = _hex("82a6737461747573a86163636570746564a3657870cb426d1a94a2000000")
JOIN_BEGIN = _hex(  # group id b"\x02" * 20 (os.urandom patched), member order reversed (random.shuffle patched)
    "88a6737461747573a5626567696ea867726f75705f6964c4140202020202020202020202020202020202020202a76d65",
    "6d6265727392c4221220fdf72a088f18f7399e8c52bce448441501f759a595a86980e5d9a422a01e5d55c4221220ed23",
    "d853125a3acff2782dddf84e018ebc85942ebf328ff1287202a479964207a561646472739291d93d2f6d656d6f72792f",
    "6e302f7032702f516d6653325435426b6e47344e35344651755a4164436a4d59704b69634459537966486f7852786e39",
    "507753464e91d93d2f6d656d6f72792f6e312f7032702f516d654a4d33315231354d456f6b733944315168665a645038",
    "65453259656a526f783179634c4e4a536e79747143a573697a6573920505aa62616e6477696474687392c0cb40140000",
    "00000000a6636c69656e7492c2c2a867617468657265649284a473697a650aa962616e647769647468c0a66761746865",
    "7281a17801a86d696e5f706172740084a473697a650aa962616e647769647468cb4014000000000000a6676174686572",
    "c0a86d696e5f7061727400")
JOIN_REQUEST_NO_GATHER = _hex(
    "86a36b6579a67665632e3062a6736368656d61c41073737373737373737373737373737373a3657870cb427d1a94a200",
    "0000a4696e666f84a473697a650aa962616e647769647468c0a6676174686572c0a86d696e5f7061727400a6636c6965",
    "6e74c2a5616464727391d93d2f6d656d6f72792f6e302f7032702f516d6653325435426b6e47344e35344651755a4164",
    "436a4d59704b69634459537966486f7852786e39507753464e")
JOIN_DISBANDED = _hex(
    "83a6737461747573a964697362616e646564a6726561736f6ed926746865206c65616465722073746f70706564206c6f",
    "6f6b696e6720666f7220612067726f7570a66c6561646572c4221220fdf72a088f18f7399e8c52bce448441501f759a5",
    "95a86980e5d9a422a01e5d55")
JOIN = [JOIN_REQUEST_OTHER_KEY, JOIN_REJECTED, JOIN_REQUEST, JOIN_ACCEPTED, JOIN_BEGIN, JOIN_REQUEST_NO_GATHER,
        JOIN_ACCEPTED, JOIN_DISBANDED]

# gossip.push of [1.0, 2.0, 3.0] (float64) with weight 0.5
PUSH_HEADER = _hex("81a177cb3fe0000000000000")
PUSH = [PUSH_HEADER, _hex("83a56474797065a7666c6f61743634a573686170659103a56368756e6bce00100000"),
        _hex("c418000000000000f03f00000000000000400000000000000840"), _hex("a26f6b")]

FOLLOWER_INFO = {"size": 10, "bandwidth": None, "gather": {"x": 1}, "min_part": 0}
LEADER_INFO = {"size": 10, "bandwidth": 5.0, "gather": None, "min_part": 0}


def pack(message) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def unpack(data: bytes):
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def _addr(k: int, name: str) -> str:
    return f"/memory/{name}/p2p/{_identity(k).peer_id}"


# ---- encoders and parsers against the vectors ----------------------------------------------------

def test_encoders_reproduce_the_recorded_bytes():
    follower, leader = _identity(11).peer_id, _identity(12).peer_id
    assert pack(protocol.part_header(PartHeader(GROUP_ID, 0, b"", 1, 2.0))) == HEADER_P0
    assert pack(protocol.part_header(PartHeader(GROUP_ID, 1, TAG, 1, 2.0))) == HEADER_P1
    assert pack(protocol.part_done([0, 1, 2], False)) == DONE
    assert pack(protocol.report_request(GROUP_ID, 0, [3])) == REPORT_REQUEST
    assert pack(protocol.report_reply([3])) == REPORT_REPLY
    assert pack(protocol.report_reply([3], [], [])) == REPORT_REPLY_TO_CLIENT
    assert pack(compression.get(None).encode(torch.tensor([1.0, 2.0]))) == CHUNK_NONE
    addrs = [_addr(11, "n0")]
    assert pack(protocol.join_request("vec.0b1", b"s" * 16, 2e12, FOLLOWER_INFO, False, addrs)) == JOIN_REQUEST_OTHER_KEY
    assert pack(protocol.join_request("vec.0b", b"s" * 16, 2e12, FOLLOWER_INFO, False, addrs)) == JOIN_REQUEST
    assert pack(protocol.join_rejected("different group key")) == JOIN_REJECTED
    assert pack(protocol.join_accepted(1e12)) == JOIN_ACCEPTED
    assert pack(protocol.join_begin(b"\x02" * 20, [follower.raw, leader.raw], [addrs, [_addr(12, "n1")]], [5, 5],
                                    [None, 5.0], [False, False], [FOLLOWER_INFO, LEADER_INFO])) == JOIN_BEGIN
    assert pack(protocol.join_disbanded("the leader stopped looking for a group", follower.raw)) == JOIN_DISBANDED
    assert pack(protocol.push_header(0.5)) == PUSH_HEADER
    assert pack(protocol.PUSH_OK) == PUSH[-1]


def test_parsers_read_the_recorded_vectors():
    assert protocol.parse_part_header(unpack(HEADER_P0)) == PartHeader(GROUP_ID, 0, b"", 1, 2.0)
    assert protocol.parse_part_header(unpack(HEADER_P1)) == PartHeader(GROUP_ID, 1, TAG, 1, 2.0)
    assert protocol.parse_part_done(unpack(DONE), 4) == ([0, 1, 2], False)
    request = protocol.parse_report_request(unpack(REPORT_REQUEST))
    assert request == ReportRequest(GROUP_ID, 0, [3]) and protocol.member_indices(request.failed, 4) == [3]
    assert protocol.parse_report_reply(unpack(REPORT_REPLY), 4) == ([3], [], [])
    assert protocol.parse_report_reply(unpack(REPORT_REPLY_TO_CLIENT), 4) == ([3], [], [])
    assert protocol.parse_join_request(unpack(JOIN_REQUEST))["info"] == FOLLOWER_INFO
    assert protocol.parse_join_accepted(unpack(JOIN_ACCEPTED)) == 1e12
    assert protocol.parse_join_accepted(unpack(JOIN_REJECTED)) is None
    begin = protocol.parse_begin(unpack(JOIN_BEGIN), total=10)
    assert begin == Begin(b"\x02" * 20, [_identity(11).peer_id, _identity(12).peer_id],
                          [[_addr(11, "n0")], [_addr(12, "n1")]], [5, 5], [None, 5.0], [False, False],
                          [FOLLOWER_INFO, LEADER_INFO])
    assert protocol.parse_begin(unpack(JOIN_DISBANDED)) is None
    with pytest.raises(BadRequestError, match="part sizes"):
        protocol.parse_begin(unpack(JOIN_BEGIN), total=11)
    assert protocol.parse_push_header(unpack(PUSH_HEADER)) == 0.5
    protocol.check_push_reply(unpack(PUSH[-1]))
    with pytest.raises(BadRequestError):
        protocol.check_push_reply("no" * 1000)


# ---- live: the code sends exactly the recorded messages ------------------------------------------

class _Recorder:
    """Wraps ``Stream.send`` for the duration of a test: the packed bytes of every message sent on a
    stream whose method starts with one of ``prefixes``."""

    def __init__(self, monkeypatch, *prefixes: str):
        self.sent: list[bytes] = []
        original = multiplex.Stream.send
        recorder = self

        async def send(stream, message, *, end=False):
            if stream.method.startswith(prefixes):
                recorder.sent.append(pack(message))
            return await original(stream, message, end=end)

        monkeypatch.setattr(multiplex.Stream, "send", send)


async def test_a_round_with_a_failed_member_and_a_client_sends_exactly_the_recorded_messages(monkeypatch):
    """4 members (member 2 in client mode, member 3 never serves: it fails and its part is recovered
    among the 3 survivors), chunks of 2 values: the same messages, byte for byte, as before."""
    recorder = _Recorder(monkeypatch, "avg.part.", "avg.report.")
    network = MemoryNetwork(latency=0.001, seed=0)
    peers = [await network.create_peer(_identity(i + 1)) for i in range(4)]
    try:
        for p in peers:
            for q in peers:
                if p is not q:
                    p.add_addresses(q.peer_id, q.get_visible_addresses())
        services = [AllReduceService(p, "vec") for p in peers[:3]]
        group = GroupInfo(GROUP_ID, [p.peer_id for p in peers], [4, 4, 0, 4], [None, None, 0.0, None],
                          [False, False, True, False], [None] * 4)
        flats = [torch.arange(12, dtype=torch.float32) + i for i in range(3)]
        codec = compression.get(None)
        outcomes = await asyncio.wait_for(asyncio.gather(*(
            services[i].run(RoundConfig(group, i, float(i + 1), codec, chunk_elems=2, sender_timeout=0.5), flats[i])
            for i in range(3))), 20)
    finally:
        await asyncio.gather(*(p.shutdown() for p in peers))
    expected = sum((i + 1) * flats[i].double() for i in range(3)) / 6
    for result, info in outcomes:
        assert torch.equal(result, outcomes[0][0]) and torch.allclose(result.double(), expected)
        assert info.survivors == group.members[:3] and info.recovered_ranges == [(8, 12)]
    assert set(recorder.sent) == ROUND


def _arm(matchmaker, key: str, expiration: float, info: dict) -> None:
    """Put ``matchmaker`` in the state of a search under ``key`` (what look_for_group sets up)."""
    matchmaker._looking, matchmaker._group_ready = True, asyncio.get_running_loop().create_future()
    matchmaker._key, matchmaker._expiration, matchmaker._deadline = key, expiration, expiration + 100
    matchmaker._my_info, matchmaker._followers, matchmaker._leader = info, {}, None
    matchmaker._joining = matchmaker._beginning = matchmaker._begin_started = False


async def test_join_exchanges_send_exactly_the_recorded_messages(monkeypatch):
    """A follower asks under another key (rejected), then under the leader's (accepted, begin); then
    the leader disbands a waiting follower: the same messages as before, byte for byte (the group id
    aside, which is random: compared after substituting the recorded one)."""
    from averaging import matchmaking

    recorder = _Recorder(monkeypatch, "avg.join.")
    monkeypatch.setattr(random, "shuffle", lambda x: x.reverse())
    network = MemoryNetwork(latency=0.001, seed=0)
    a, b = await network.create_peer(_identity(11)), await network.create_peer(_identity(12))
    try:
        a.add_addresses(b.peer_id, b.get_visible_addresses())
        options = dict(target_group_size=2, min_group_size=2, min_matchmaking_time=1.0, request_timeout=2.0,
                       client_mode=False)
        leader = matchmaking.Matchmaker(b, None, "vec", b"s" * 16, **options)
        follower = matchmaking.Matchmaker(a, None, "vec", b"s" * 16, **options)
        _arm(leader, "vec.0b", 1e12, LEADER_INFO)
        _arm(follower, "vec.0b1", 2e12, FOLLOWER_INFO)
        assert await follower._try_join(b.peer_id) is None  # rejected: another key
        follower._key = "vec.0b"
        group, index = await follower._try_join(b.peer_id)
        assert (group.members, index, group.part_sizes) == ([a.peer_id, b.peer_id], 0, [5, 5])
        leader.target_group_size = 3  # now the follower waits, until the leader disbands
        _arm(leader, "vec.0b", 1e12, LEADER_INFO)
        _arm(follower, "vec.0b", 2e12, {**FOLLOWER_INFO, "gather": None})
        waiting = asyncio.ensure_future(follower._try_join(b.peer_id))
        for _ in range(200):
            if leader._followers:
                break
            await asyncio.sleep(0.01)
        await leader._disband("the leader stopped looking for a group", suggested=a.peer_id)
        assert await asyncio.wait_for(waiting, 5) is None
        leader.close()
        follower.close()
    finally:
        await asyncio.gather(a.shutdown(), b.shutdown())
    sent = [unpack(m) for m in recorder.sent]
    assert sent[4]["status"] == "begin" and len(sent[4]["group_id"]) == 20
    sent[4]["group_id"] = b"\x02" * 20
    assert [pack(m) for m in sent] == JOIN


@pytest.mark.slow
def test_a_gossip_push_sends_exactly_the_recorded_messages(monkeypatch):
    from averaging import Gossip
    from dht import DHT

    recorder = _Recorder(monkeypatch, "gossip.push.")
    first = DHT(host="127.0.0.1")
    second = DHT(initial_peers=first.get_visible_addresses(), host="127.0.0.1")
    gossips = [Gossip([torch.tensor([2.0, 4.0, 6.0])], d, "vec", declare_period=60) for d in (first, second)]
    try:
        gossips[1].step()  # declares itself
        assert gossips[0].step()  # pushes half of (s, w) = ([2, 4, 6], 1) to the other one
    finally:
        for g in gossips:
            g.shutdown()
        second.shutdown()
        first.shutdown()
    assert recorder.sent == PUSH


# ---- parsers under hypothesis: only BadRequestError, with a bounded message ----------------------

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2 ** 63), 2 ** 64 - 1) | st.floats() | st.text(max_size=80)
    | st.binary(max_size=80),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=8), children, max_size=6),
    max_leaves=24)

VALID = {
    "part_header": (unpack(HEADER_P1), protocol.parse_part_header),
    "part_done": (unpack(DONE), lambda m: protocol.parse_part_done(m, 4)),
    "report_request": (unpack(REPORT_REQUEST), protocol.parse_report_request),
    "report_reply": (unpack(REPORT_REPLY_TO_CLIENT), lambda m: protocol.parse_report_reply(m, 4)),
    "join_request": (unpack(JOIN_REQUEST), protocol.parse_join_request),
    "join_accepted": (unpack(JOIN_ACCEPTED), protocol.parse_join_accepted),
    "join_begin": (unpack(JOIN_BEGIN), lambda m: protocol.parse_begin(m, total=10)),
    "push_header": (unpack(PUSH_HEADER), protocol.parse_push_header),
    "push_reply": ("ok", protocol.check_push_reply),
    "member_indices": ([0, 2], lambda m: protocol.member_indices(m, 4)),
}


def _parse_or_refuse(parser, message) -> None:
    try:
        parser(message)
    except BadRequestError as e:
        assert len(str(e)) < 400, str(e)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(VALID)), message=msgpack_values)
def test_parsers_refuse_arbitrary_values_with_a_bounded_bad_request(name, message):
    _parse_or_refuse(VALID[name][1], message)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(VALID)), data=st.data())
def test_parsers_refuse_valid_messages_with_one_field_replaced(name, data):
    """Each valid message with one field (or list element) replaced by an arbitrary value."""
    message, parser = VALID[name]
    if isinstance(message, dict):
        message = dict(message)
        key = data.draw(st.sampled_from(sorted(message)))
        if isinstance(message[key], list) and message[key] and data.draw(st.booleans()):
            items = list(message[key])
            items[data.draw(st.integers(0, len(items) - 1))] = data.draw(msgpack_values)
            message[key] = items
        else:
            message[key] = data.draw(msgpack_values)
    elif isinstance(message, list):
        message = [*message, data.draw(msgpack_values)]
    else:
        message = data.draw(msgpack_values)
    _parse_or_refuse(parser, message)


group_ids = st.binary(min_size=1, max_size=protocol.MAX_GROUP_ID_BYTES)
indices = st.lists(st.integers(0, 15), max_size=16, unique=True).map(sorted)


@settings(max_examples=200, deadline=None)
@given(group_id=group_ids, phase=st.integers(0, 1), tag=st.binary(max_size=protocol.MAX_TAG_BYTES),
       member=st.integers(0, protocol.MAX_MEMBER_INDEX - 1),
       weight=st.integers(0, 2 ** 53) | st.floats(allow_nan=False), contributors=indices, mixed=st.booleans(),
       heard=st.none() | indices, relayed=indices)
def test_allreduce_messages_round_trip(group_id, phase, tag, member, weight, contributors, mixed, heard, relayed):
    header = PartHeader(group_id, phase, tag, member, weight)
    assert protocol.parse_part_header(unpack(pack(protocol.part_header(header)))) == header
    assert protocol.parse_part_done(unpack(pack(protocol.part_done(contributors, mixed))), 16) == (contributors, mixed)
    request = protocol.parse_report_request(unpack(pack(protocol.report_request(group_id, member, contributors))))
    assert request == ReportRequest(group_id, member, contributors)
    reply = unpack(pack(protocol.report_reply(contributors, heard, relayed if heard is not None else None)))
    assert protocol.parse_report_reply(reply, 16) == (contributors, heard or [], relayed if heard is not None else [])


@settings(max_examples=100, deadline=None)
@given(key=st.text(max_size=protocol.MAX_KEY_CHARS), schema=st.binary(max_size=protocol.MAX_SCHEMA_BYTES),
       exp=st.floats(allow_nan=False, allow_infinity=False), client=st.booleans(),
       addrs=st.lists(st.text(max_size=40), max_size=protocol.MAX_ADDRS),
       sizes=st.lists(st.integers(0, 1000), min_size=1, max_size=5), group_id=group_ids)
def test_join_messages_round_trip(key, schema, exp, client, addrs, sizes, group_id):
    info = {"size": sum(sizes), "bandwidth": None, "gather": None, "min_part": 0}
    request = protocol.join_request(key, schema, exp, info, client, addrs)
    assert protocol.parse_join_request(unpack(pack(request))) == request
    assert protocol.parse_join_accepted(unpack(pack(protocol.join_accepted(exp)))) == exp
    members = [_identity(k + 1).peer_id for k in range(len(sizes))]
    n = len(sizes)
    message = protocol.join_begin(group_id, [m.raw for m in members], [addrs] * n, sizes, [1.0] * n, [client] * n,
                                  [info] * n)
    assert protocol.parse_begin(unpack(pack(message)), total=sum(sizes)) == Begin(
        group_id, members, [addrs] * n, sizes, [1.0] * n, [client] * n, [info] * n)
