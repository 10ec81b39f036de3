"""The sparse all-gather (averaging/sparse_allgather.py): in memory on the virtual clock for the many
cases, over loopback TCP for the end-to-end claims, and through Averager with real DHTs.

Every surviving member ends with the same bits: the deterministic weighted mean (or the robust
aggregate) of the decoded contributions of exactly the honest members. A contribution with
duplicated or out-of-range indices, a wrong length, NaN values, or different bytes for different
members is excluded everywhere with its sender named; a member that stalls or is killed
mid-transfer is excluded; a failed round leaves the codec's error feedback as it was.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
from typing import Any, Sequence

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from averaging import Averager, StepResult, aggregators, compression, protocol, sparse_allgather
from averaging.allreduce import RoundConfig
from averaging.errors import AveragingError
from averaging.group import GroupInfo
from averaging.partition import flatten
from averaging.sparse_allgather import SparseAllGatherService, deterministic_mean, gather_chunks
from averaging.sparse_codecs import SparseLoCo
from dht import DHT, P2P
from dht.peer import virtual_clock
from dht.peer.errors import BadRequestError
from dht.peer.memory_transport import MemoryNetwork
from tests.test_sparse_codecs import crafted

SIZE = 10_000  # chunks of 4096, 4096 and 1808 values
CHUNK = 4096
SENDER_TIMEOUT = 2.0
GROUP_ID = b"\x17" * 20


class Round:
    """``n`` peers with a SparseAllGatherService each, on a MemoryNetwork or loopback TCP."""

    def __init__(self, n: int, codec: str = "sparseloco", tcp: bool = False, clients: Sequence[int] = (),
                 seed: int = 0):
        self.n, self.codec_name, self.tcp, self.clients = n, codec, tcp, set(clients)
        g = torch.Generator().manual_seed(seed)
        self.values = [torch.randn(SIZE, generator=g) for _ in range(n)]
        self.weights = [float(i + 1) for i in range(n)]
        self.codecs = [compression.get(codec) for _ in range(n)]
        self.peers: list[P2P] = []

    async def __aenter__(self) -> "Round":
        network = MemoryNetwork(latency=0.005, seed=0)
        for i in range(self.n):
            peer = await P2P.create(host="127.0.0.1") if self.tcp else await network.create_peer(name=f"p{i}")
            self.peers.append(peer)
        for a in self.peers:
            for b in self.peers:
                if a is not b:
                    a.add_addresses(b.peer_id, b.get_visible_addresses())
        self.services = [SparseAllGatherService(p, "sparse") for p in self.peers]
        self.group = GroupInfo(GROUP_ID, [p.peer_id for p in self.peers], [SIZE // self.n] * self.n, [None] * self.n,
                               [i in self.clients for i in range(self.n)], [None] * self.n)
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        for service in self.services:
            service.close()
        await asyncio.gather(*(p.shutdown() for p in self.peers), return_exceptions=True)

    def config(self, i: int, **kwargs: Any) -> RoundConfig:
        options: dict[str, Any] = dict(chunk_elems=CHUNK, sender_timeout=SENDER_TIMEOUT)
        options.update(kwargs)
        return RoundConfig(self.group, i, self.weights[i], self.codecs[i], **options)

    async def run(self, configs: dict[int, dict] | None = None, members: Sequence[int] | None = None) -> list[Any]:
        configs = configs or {}
        members = range(self.n) if members is None else members
        return await asyncio.gather(*(self.services[i].run(self.config(i, **configs.get(i, {})), self.values[i])
                                      for i in members), return_exceptions=True)

    def decoded(self, i: int) -> list[torch.Tensor]:
        """Member ``i``'s contribution as everyone decodes it, chunk by chunk (a fresh codec encodes
        it alike: the members' error feedback starts at 0)."""
        codec = compression.get(self.codec_name)
        return [codec.decode(codec.encode(self.values[i][lo:hi], lo), hi - lo)
                for lo, hi in gather_chunks(codec, SIZE, CHUNK)]

    def expected(self, honest: Sequence[int]) -> torch.Tensor:
        rows = [torch.cat(self.decoded(i)) for i in honest]
        return deterministic_mean(rows, [self.weights[i] for i in honest])

    def name(self, i: int) -> str:
        return str(self.peers[i].peer_id)


def assert_result(r: Round, outcomes: Sequence[Any], honest: Sequence[int], expected: torch.Tensor | None = None
                  ) -> None:
    expected = r.expected(honest) if expected is None else expected
    ids = [r.peers[i].peer_id for i in sorted(honest)]
    for i in honest:
        assert isinstance(outcomes[i], tuple), f"member {i}: {outcomes[i]!r}"
        result, info = outcomes[i]
        assert info.survivors == ids and info.parts == [(0, SIZE, ids)]
        assert torch.equal(result.view(torch.int32), expected.view(torch.int32)), (result - expected).abs().max()


def test_every_member_ends_with_the_same_bits_and_sends_its_contribution_once_per_member():
    async def main() -> None:
        async with Round(4) as r:
            outcomes = await r.run()
            assert_result(r, outcomes, range(4))
            contribution = sum(len(sparse_allgather._packed(m)) for m in
                               [compression.get("sparseloco").encode(r.values[0][lo:hi], lo)
                                for lo, hi in gather_chunks(r.codecs[0], SIZE, CHUNK)])
            for _, info in outcomes:
                assert 3 * contribution < info.bytes_sent < 3 * contribution + 600  # + weight, reports
                assert info.bytes_received == info.bytes_sent
            assert all(s.table_sizes() == {"rounds": 0, "ready": 0, "waiting": 0, "waiting_peers": 0}
                       for s in r.services)

    virtual_clock.run(main())


def test_bytes_per_step_at_charlm_size_are_over_100x_below_float32():
    """4 members averaging charlm's 470 528 parameters (examples/charlm.py) with sparseloco: each
    sends (payload and msgpack framing, reports included) over 100x less than float32 in the
    butterfly (2 (N - 1) / N * 4 bytes per parameter, benchmarks/low_bandwidth.py's reference)."""
    size = 470_528

    async def main() -> None:
        async with Round(4) as r:
            r.values = [torch.randn(size, generator=torch.Generator().manual_seed(i)) * 1e-3 for i in range(4)]
            outcomes = await r.run({i: {"chunk_elems": 1 << 18} for i in range(4)})
            float32 = 2 * 3 / 4 * size * 4
            for _, info in outcomes:
                assert float32 / info.bytes_sent >= 100, float32 / info.bytes_sent
            assert all(torch.equal(outcomes[0][0], result) for result, _ in outcomes)

    virtual_clock.run(main())


def _corrupt(codec: Any, chunk: int, message: Any) -> None:
    """``codec`` sends ``message`` for chunk number ``chunk`` of the vector."""
    start = gather_chunks(codec, SIZE, CHUNK)[chunk][0]
    encode = codec.encode

    def faulty(x: torch.Tensor, lo: int = 0, result: bool = False) -> dict:
        sent = encode(x, lo, result)
        return message() if lo == start else sent

    codec.encode = faulty


BAD = {
    "duplicated indices": (lambda: crafted(1808, [3, 3, 9]),
                           "malformed contribution (indices out of range or duplicated)"),
    "out-of-range index": (lambda: crafted(1808, [3, 9, 1900]), "malformed contribution (indices out of range"),
    "wrong length": (lambda: SparseLoCo().compress(torch.randn(1807))[0], "malformed contribution (field 'g'"),
    "non-finite scale": (lambda: crafted(1808, [3, 9, 20], scales=(1.0, float("inf"))),
                         "malformed contribution (non-finite or negative scale)"),
}


@pytest.mark.parametrize("fault", sorted(BAD))
def test_bad_contributions_are_excluded_with_the_sender_named(fault, caplog):
    make, reason = BAD[fault]

    async def main() -> None:
        async with Round(4) as r:
            _corrupt(r.codecs[1], 2, make)
            r.values[3][::97] = float("nan")
            outcomes = await r.run()
            assert_result(r, outcomes, [0, 2])
            for i in (1, 3):
                assert isinstance(outcomes[i], AveragingError), outcomes[i]
            assert f"excluding {r.name(1)}: sent a {reason}" in caplog.text
            # sparseloco sends a tile holding NaN with NaN scales, which no receiver decodes
            assert f"excluding {r.name(3)}: sent a malformed contribution (non-finite or negative scale)" in caplog.text
            for i in (0, 2):
                assert f"excluding {r.name(i)}" not in caplog.text

    with caplog.at_level(logging.INFO, logger="averaging.sparse_allgather"):
        virtual_clock.run(main())


def _stall_after(monkeypatch: pytest.MonkeyPatch, service: SparseAllGatherService, payloads: int) -> None:
    """``service``'s member sends ``payloads`` messages of its contribution on each stream, then stalls."""
    original = sparse_allgather._Round._send_own

    async def send_own(self: Any, stream: Any) -> None:
        if self.service is not service:
            return await original(self, stream)
        for payload in self.own_packed[:payloads]:
            await stream.send_packed(payload)
        await asyncio.Event().wait()

    monkeypatch.setattr(sparse_allgather._Round, "_send_own", send_own)


def test_a_member_that_stalls_mid_transfer_is_excluded(monkeypatch, caplog):
    async def main() -> None:
        async with Round(4) as r:
            _stall_after(monkeypatch, r.services[2], 2)  # its weight and first chunk
            started = asyncio.get_running_loop().time()
            outcomes = await r.run()
            assert_result(r, outcomes, [0, 1, 3])
            assert isinstance(outcomes[2], AveragingError)
            assert asyncio.get_running_loop().time() - started < 4 * SENDER_TIMEOUT
            assert f"excluding {r.name(2)}: sent nothing for {SENDER_TIMEOUT:.1f} s" in caplog.text

    with caplog.at_level(logging.INFO, logger="averaging.sparse_allgather"):
        virtual_clock.run(main())


def test_a_member_that_sends_different_contributions_is_excluded(monkeypatch, caplog):
    """Member 1 sends other values to member 0 than to the others: the digests in the reports differ."""
    original = sparse_allgather._Round._send_own

    async def main() -> None:
        async with Round(4) as r:
            other = SparseLoCo()
            forged = [sparse_allgather._packed({"w": r.weights[1]})] + [
                sparse_allgather._packed(other.encode(torch.randn(hi - lo), lo)) for lo, hi in
                gather_chunks(other, SIZE, CHUNK)]

            async def send_own(self: Any, stream: Any) -> None:
                if self.service is r.services[1] and stream.peer_id == r.peers[0].peer_id:
                    for payload in forged:
                        await stream.send_packed(payload)
                    return
                await original(self, stream)

            monkeypatch.setattr(sparse_allgather._Round, "_send_own", send_own)
            outcomes = await r.run()
            assert_result(r, outcomes, [0, 2, 3])
            assert f"excluding {r.name(1)}: sent different contributions to different members" in caplog.text

    with caplog.at_level(logging.INFO, logger="averaging.sparse_allgather"):
        virtual_clock.run(main())


def test_robust_aggregator_and_demo():
    """The RoundConfig's reducer applies: the coordinate-wise median of the decoded contributions."""
    median = aggregators.as_reducer(aggregators.get("median"))

    async def main() -> None:
        async with Round(5, codec="demo") as r:
            outcomes = await r.run({i: {"reducer": median} for i in range(5)})
            rows = torch.stack([torch.cat(r.decoded(i)) for i in range(5)])
            expected = torch.cat([median(rows[:, lo:hi], torch.tensor(r.weights)) for lo, hi in
                                  gather_chunks(r.codecs[0], SIZE, CHUNK)])
            assert_result(r, outcomes, range(5), expected)

    virtual_clock.run(main())


def test_client_mode_members_are_relayed(caplog):
    """Client-mode members dial the others; two clients cannot reach each other, so the lowest-index
    other member relays their contributions and reports: everyone averages everyone. A client's
    bad contribution is excluded everywhere."""
    async def main() -> None:
        async with Round(4, clients=[2]) as r:
            assert_result(r, await r.run(), range(4))
        async with Round(6, clients=[0, 3, 4]) as r:
            assert_result(r, await r.run(), range(6))
        async with Round(6, clients=[1, 3, 4]) as r:
            _corrupt(r.codecs[3], 2, BAD["out-of-range index"][0])
            outcomes = await r.run()
            assert_result(r, outcomes, [0, 1, 2, 4, 5])
            assert isinstance(outcomes[3], AveragingError)
            # the members it reaches exclude it; the relay does not pass it on to the other clients
            assert caplog.text.count(f"excluding {r.name(3)}: sent a malformed contribution (indices out of range "
                                     f"or duplicated)") == 3

    with caplog.at_level(logging.INFO, logger="averaging.sparse_allgather"):
        virtual_clock.run(main())


def test_a_failed_round_leaves_the_error_feedback_as_it_was():
    async def main() -> None:
        async with Round(2) as r:
            r.codecs[0].encode(torch.randn(SIZE), 0)  # a residual from an earlier round
            before = r.codecs[0].feedback.residual.clone()
            outcomes = await r.run(members=[0])  # member 1 never runs this round
            assert isinstance(outcomes[0], AveragingError)
            assert torch.equal(r.codecs[0].feedback.residual, before)
            reference = SparseLoCo()
            reference.load_state_dict(r.codecs[0].state_dict())
            mine = torch.cat([reference.decode(reference.encode(r.values[0][lo:hi], lo), hi - lo)
                              for lo, hi in gather_chunks(reference, SIZE, CHUNK)])
            r.group = dataclasses.replace(r.group, group_id=b"\x18" * 20)  # a new group, as matchmaking forms
            outcomes = await r.run()  # the retry encodes from the same residual
            assert_result(r, outcomes, [0, 1], deterministic_mean([mine, torch.cat(r.decoded(1))], r.weights))

    virtual_clock.run(main())


# ---------------------------------------------------------------------------------------------
# loopback TCP
# ---------------------------------------------------------------------------------------------

async def test_over_tcp_bad_contribution_and_a_member_killed_mid_transfer(monkeypatch, caplog):
    """Real sockets: member 1 sends duplicated indices, member 4 is shut down after its first chunk;
    the others end with the same bits, the mean over themselves."""
    caplog.set_level(logging.INFO, logger="averaging.sparse_allgather")
    async with Round(5, tcp=True) as r:
        _corrupt(r.codecs[1], 2, BAD["duplicated indices"][0])
        original = sparse_allgather._Round._send_own
        killed = asyncio.Event()

        async def send_own(self: Any, stream: Any) -> None:
            if self.service is not r.services[4]:
                return await original(self, stream)
            for payload in self.own_packed[:2]:
                await stream.send_packed(payload)
            if not killed.is_set():
                killed.set()
                await r.peers[4].shutdown()
            await asyncio.Event().wait()

        monkeypatch.setattr(sparse_allgather._Round, "_send_own", send_own)
        outcomes = await asyncio.wait_for(r.run({i: {"sender_timeout": 1.0} for i in range(5)}), 30)
        assert_result(r, outcomes, [0, 2, 3])
        assert isinstance(outcomes[1], AveragingError) and isinstance(outcomes[4], BaseException)
        assert f"excluding {r.name(1)}: sent a malformed contribution" in caplog.text
        assert f"excluding {r.name(4)}" in caplog.text


# ---------------------------------------------------------------------------------------------
# Averager with real DHTs
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("codec", ["sparseloco", "demo"])
def test_averager_selects_the_all_gather_for_sparse_codecs(codec):
    shapes = [(64, 96), (96,), (30, 50)]
    dhts: list[DHT] = []
    made: list[Averager] = []
    try:
        dhts.append(DHT(host="127.0.0.1"))
        for _ in range(2):
            dhts.append(DHT(initial_peers=dhts[0].get_visible_addresses(), host="127.0.0.1"))
        tensors = [[torch.randn(s, generator=torch.Generator().manual_seed(10 * i + j)) for j, s in enumerate(shapes)]
                   for i in range(3)]
        flats = [flatten(ts) for ts in tensors]
        for dht, ts in zip(dhts, tensors):
            made.append(Averager(ts, dht, f"sparse-{codec}", target_group_size=3, min_group_size=3,
                                 compression=codec, min_matchmaking_time=0.8, request_timeout=0.4, sender_timeout=2.0))
        assert all(isinstance(a.core._service, SparseAllGatherService) for a in made)
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            results = list(pool.map(lambda i: made[i].step(weight=i + 1.0, timeout=20), range(3)))
        assert all(isinstance(res, StepResult) and len(res.survivors) == 3 for res in results)
        reference = compression.get(codec)
        if hasattr(reference, "bind"):
            reference.bind(shapes)
        chunks = gather_chunks(reference, flats[0].numel(), made[0].core.chunk_elems)
        rows = [torch.cat([compression.get(codec).decode(reference.compress(f[lo:hi], lo)[0], hi - lo)
                           for lo, hi in chunks]) for f in flats]
        order = [[d.peer_id for d in dhts].index(peer) for peer in results[0].members]  # the group's order
        expected = deterministic_mean([rows[i] for i in order], [i + 1.0 for i in order])
        for a in made:
            assert torch.equal(flatten(a.tensors).view(torch.int32), expected.view(torch.int32))
        assert results[0].bytes_sent < 4 * flats[0].numel() / 20
    finally:
        for a in made:
            a.shutdown()
        for d in dhts:
            d.shutdown()


# ---------------------------------------------------------------------------------------------
# avg.gather messages (averaging/protocol.py)
# ---------------------------------------------------------------------------------------------

GATHER_VECTORS = {  # the wire bytes of version 1
    "header": (protocol.gather_header(b"\x17" * 20, 3),
               "83a167c4141717171717171717171717171717171717171717a16903a17601"),
    "have": (protocol.gather_have({2: b"\x02" * 16, 0: b"\x01" * 16}),
             "81a468617665929200c41001010101010101010101010101010101"
             "9202c41002020202020202020202020202020202"),
    "final": (protocol.gather_final([0, 2]), "81a166920002"),
    "weight": (protocol.gather_weight(2.5), "81a177cb4004000000000000"),
    "relay": (protocol.gather_relay(3, True), "82a17203a16e01"),
    "relayed_have": (protocol.gather_relayed_have({3: {0: b"\x01" * 16}, 1: None}),
                     "81a27268929201c09203919200c41001010101010101010101010101010101"),
}
GATHER_PARSERS = {
    "header": protocol.parse_gather_header,
    "have": lambda m: protocol.parse_gather_have(m, 4),
    "final": lambda m: protocol.parse_gather_final(m, 4),
    "weight": protocol.parse_gather_weight,
    "relay": lambda m: protocol.parse_gather_relay(m, 4),
    "relayed_have": lambda m: protocol.parse_gather_relayed_have(m, 4),
}


def test_gather_messages_are_the_recorded_bytes_and_parse_back():
    for name, (message, hexed) in GATHER_VECTORS.items():
        assert msgpack.packb(message, use_bin_type=True).hex() == hexed, name
    assert protocol.parse_gather_header(GATHER_VECTORS["header"][0]) == protocol.GatherHeader(b"\x17" * 20, 3)
    assert protocol.parse_gather_have(GATHER_VECTORS["have"][0], 4) == {0: b"\x01" * 16, 2: b"\x02" * 16}
    assert protocol.parse_gather_final(GATHER_VECTORS["final"][0], 4) == [0, 2]
    assert protocol.parse_gather_weight(GATHER_VECTORS["weight"][0]) == 2.5
    assert protocol.parse_gather_relay(GATHER_VECTORS["relay"][0], 4) == (3, True)
    assert protocol.parse_gather_relayed_have(GATHER_VECTORS["relayed_have"][0], 4) == {1: None, 3: {0: b"\x01" * 16}}
    for bad in ({"r": 4, "n": 1}, {"r": 0, "n": 2}, {"r": 0}):
        with pytest.raises(BadRequestError):
            protocol.parse_gather_relay(bad, 4)
    for bad in ({"rh": [[1, None], [1, None]]}, {"rh": [[5, None]]}, {"rh": [[1, [[9, b"\x01" * 16]]]]}):
        with pytest.raises(BadRequestError):
            protocol.parse_gather_relayed_have(bad, 4)
    for bad in ({"g": b"x", "i": 0, "v": 2}, {"g": b"x", "i": 0}, {"g": b"", "i": 0, "v": 1}):
        with pytest.raises(BadRequestError):
            protocol.parse_gather_header(bad)
    for bad in ({"have": [[0, b"\x01" * 16], [0, b"\x01" * 16]]}, {"have": [[4, b"\x01" * 16]]},
                {"have": [[0, b"\x01" * 15]]}, {"have": [[0, b"\x01" * 16]] * 5}):
        with pytest.raises(BadRequestError):
            protocol.parse_gather_have(bad, 4)
    for bad in ({"w": -1.0}, {"w": float("nan")}, {"w": True}, {"w": "1"}):
        with pytest.raises(BadRequestError):
            protocol.parse_gather_weight(bad)


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2 ** 63), 2 ** 64 - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=4), children, max_size=4),
    max_leaves=16)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(GATHER_PARSERS)), data=st.data())
def test_gather_parsers_refuse_anything_else_with_a_bounded_bad_request(name, data):
    """Arbitrary values, or a valid message with one field replaced: parsed or BadRequestError."""
    message = data.draw(msgpack_values) if data.draw(st.booleans()) else dict(GATHER_VECTORS[name][0])
    if isinstance(message, dict) and message and data.draw(st.booleans()):
        message[data.draw(st.sampled_from(sorted(message)))] = data.draw(msgpack_values)
    try:
        GATHER_PARSERS[name](message)
    except BadRequestError as e:
        assert len(str(e)) < 400
