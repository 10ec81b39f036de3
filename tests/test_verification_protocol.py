"""The verification protocol core (issue 15): commitments inside the all-reduce, evidence, shared
randomness, the ban list and the hooks that honour it.

Unit and hypothesis tests for the codecs of commitments, accusations and seed messages; in-memory
rounds (MemoryNetwork on the virtual clock) where a member swaps its part after committing, an owner
returns a wrong aggregate, an owner equivocates, a member lies in its seed opening: detected,
accused with evidence anyone checks, banned; a false accusation bans its accuser; a banned peer is
never grouped with again and its DHT stores under the run prefix are refused. One round over
loopback TCP with commitments on. The bytes commitments add are measured and printed (-s).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from typing import Any

import msgpack
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from averaging import AsyncAverager, compression
from averaging.allreduce import AllReduceService, RoundConfig, weighted_mean
from averaging.commitments import group_digest
from averaging.group import GroupInfo
from dht import P2P, DHTNode, P2PError
from dht.peer import virtual_clock
from dht.peer.errors import BadRequestError
from dht.peer.identity import Identity
from dht.peer.memory_transport import MemoryNetwork
from tests.fault_injection import on_outgoing_chunk, stall_forever
from verification.audit import InputsService, audit_aggregate, find_equivocations, results_view
from verification.banlist import BanList, banned_key
from verification.commitments import Commitment, TensorHasher, find_equivocation, tensor_digest
from verification.evidence import Accusation, CannotVerify, decode_tensor, encode_tensor, verify_accusation
from verification.randomness import (
    RandomnessExchange,
    SeedCommitment,
    SeedOpening,
    bad_opening_accusations,
    choose_checks,
    combine,
    seed_hash,
)

PART = 3_000
CHUNK = 1_024
GROUP_ID = b"\x17" * 20
RUN = "verify-run"


def identity(seed: int) -> Identity:
    return Identity(Ed25519PrivateKey.from_private_bytes(random.Random(seed).randbytes(32)))


# ---- commitments --------------------------------------------------------------------------------

def test_digest_is_over_dtype_shape_and_bytes_and_incremental():
    t = torch.randn(10, 7)
    assert tensor_digest(t) == tensor_digest(t.clone())
    assert tensor_digest(t) != tensor_digest(t.double())
    assert tensor_digest(t) != tensor_digest(t.reshape(70))
    nudged = t.clone()
    nudged[3, 3] = torch.nextafter(nudged[3, 3], torch.tensor(10.0))
    assert tensor_digest(t) != tensor_digest(nudged)
    hasher = TensorHasher(torch.float32, (70,))
    flat = t.reshape(-1)
    for lo in range(0, 70, 9):
        hasher.update(flat[lo:lo + 9])
    assert hasher.digest() == tensor_digest(flat)
    with pytest.raises(ValueError):
        TensorHasher(torch.float32, (71,)).digest()


def test_commitment_binds_every_field():
    me = identity(1)
    c = Commitment.sign(me, RUN, GROUP_ID, 0, 2, "input", tensor_digest(torch.ones(3)), 4.0, (), b"\x01" * 32,
                        "none", [(10, 13)])
    assert c.verify() and c.sender == me.peer_id and c.matches(torch.ones(3))
    assert Commitment.from_wire(msgpack.unpackb(msgpack.packb(c.to_wire()))) == c
    for change in (dict(prefix="other"), dict(round_id=b"x"), dict(phase=1), dict(part=3), dict(role="result"),
                   dict(digest=b"\x00" * 32), dict(weight=5.0), dict(members=(1,)), dict(group=b"\x02" * 32),
                   dict(public_key=identity(2).public_key), dict(codec="uint8"), dict(ranges=((10, 12),)),
                   dict(ranges=())):
        assert not dataclasses.replace(c, **change).verify(), change
    other = Commitment.sign(me, RUN, GROUP_ID, 0, 2, "input", tensor_digest(torch.zeros(3)), 4.0, (), b"\x01" * 32,
                            "none", [(10, 13)])
    assert c.conflicts(other) and find_equivocation([c, other]) == (c, other)
    assert not c.conflicts(dataclasses.replace(other, signature=b"\x00" * 64))  # an unsigned one proves nothing
    # a result re-signed with fewer contributors (an honest owner that dropped a member late) is no lie
    r1 = Commitment.sign(me, RUN, GROUP_ID, 0, 2, "result", b"\x05" * 32, 0.0, (0, 1, 2))
    assert not r1.conflicts(Commitment.sign(me, RUN, GROUP_ID, 0, 2, "result", b"\x05" * 32, 0.0, (0, 1)))


wire_values = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats() | st.binary(max_size=70)
                           | st.text(max_size=20), lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.sampled_from(list("vxgpjrdwmhksc") + ["kind", "run", "t", "detail",
                                                                                    "time", "accused", "round"]),
                                             inner, max_size=12), max_leaves=30)


@settings(max_examples=80, deadline=None)
@given(wire_values)
def test_parsers_refuse_garbage_with_bad_request_only(value: Any):
    for parse in (Commitment.from_wire, Accusation.from_wire, SeedCommitment.from_wire, SeedOpening.from_wire,
                  decode_tensor, lambda v: Commitment.from_compact(v, RUN, GROUP_ID, 0, 0, "input")):
        try:
            parse(value)
        except BadRequestError:
            pass


@settings(max_examples=50, deadline=None)
@given(st.text(max_size=30), st.binary(min_size=1, max_size=64), st.integers(0, 1), st.integers(0, 4095),
       st.sampled_from(["input", "result"]), st.floats(-1e6, 1e6), st.lists(st.integers(0, 4095), max_size=8))
def test_commitment_round_trips(prefix, round_id, phase, part, role, weight, members):
    c = Commitment.sign(identity(3), prefix, round_id, phase, part, role, bytes(32), weight, members)
    back = Commitment.from_wire(msgpack.unpackb(msgpack.packb(c.to_wire())))
    assert back == c and back.verify()


def test_tensor_codec_round_trips_and_checks_sizes():
    for t in (torch.randn(5, 3), torch.randn(4).half(), torch.randn(2, 2).double(), torch.randn(3).bfloat16(),
              torch.empty(0)):
        back = decode_tensor(msgpack.unpackb(msgpack.packb(encode_tensor(t))))
        assert back.dtype == t.dtype and torch.equal(back, t)
    bad = encode_tensor(torch.randn(4))
    bad["data"] = bad["data"][:-1]
    with pytest.raises(BadRequestError):
        decode_tensor(bad)


# ---- evidence ----------------------------------------------------------------------------------

def _aggregate_case(n: int = 5, d: int = 200, shift: float = 0.0, aggregator: str = "mean", seed: int = 0):
    """A part's inputs committed by n members and the owner's (member 0's) signed result."""
    ids = [identity(100 + i) for i in range(n)]
    members = [i.peer_id for i in ids]
    group = group_digest(members)
    g = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(d, generator=g) for _ in range(n)]
    weights = [float(i + 1) for i in range(n)]
    commitments = [Commitment.sign(ids[i], RUN, GROUP_ID, 0, 0, "input", tensor_digest(inputs[i]), weights[i], (),
                                   group) for i in range(n)]
    from verification.evidence import _reducer

    reducer = _reducer(aggregator)
    result = reducer(torch.stack(inputs), torch.tensor(weights)).float() + shift
    signed = Commitment.sign(ids[0], RUN, GROUP_ID, 0, 0, "result", tensor_digest(result), 0.0, range(n), group)
    tensors = {0: result, **{i + 1: inputs[i] for i in range(n)}}
    detail = {"members": [m.raw for m in members], "aggregator": aggregator}
    return ids, [signed, *commitments], tensors, detail


@pytest.mark.parametrize("aggregator", ["mean", "centered_clip", "median"])
def test_wrong_aggregate_is_proven_and_a_right_one_bans_the_accuser(aggregator: str):
    accuser = identity(7)
    ids, commitments, tensors, detail = _aggregate_case(aggregator=aggregator)
    honest = Accusation.make(accuser, "wrong_aggregate", RUN, ids[0].peer_id, GROUP_ID, commitments, tensors, detail)
    assert verify_accusation(honest).guilty == "accuser"
    ids, commitments, tensors, detail = _aggregate_case(aggregator=aggregator, shift=0.05)
    lying = Accusation.make(accuser, "wrong_aggregate", RUN, ids[0].peer_id, GROUP_ID, commitments, tensors, detail)
    verdict = verify_accusation(Accusation.from_wire(msgpack.unpackb(msgpack.packb(lying.to_wire()))))
    assert verdict.guilty == "accused", verdict
    # evidence with a member's input left out, or another member list, proves nothing
    partial = Accusation.make(accuser, "wrong_aggregate", RUN, ids[0].peer_id, GROUP_ID, commitments[:-1],
                              {k: v for k, v in tensors.items() if k < len(commitments) - 1}, detail)
    assert verify_accusation(partial).guilty == "accuser"
    forged = dict(detail, members=[identity(999).peer_id.raw] + detail["members"][1:])
    assert verify_accusation(Accusation.make(accuser, "wrong_aggregate", RUN, ids[0].peer_id, GROUP_ID, commitments,
                                             tensors, forged)).guilty == "accuser"


def test_commitments_of_an_averager_under_the_run_count_for_the_run():
    liar, accuser = identity(13), identity(14)
    a = Commitment.sign(liar, f"{RUN}.grads", GROUP_ID, 0, 1, "result", b"\x01" * 32)
    b = Commitment.sign(liar, f"{RUN}.grads", GROUP_ID, 0, 1, "result", b"\x02" * 32)
    assert verify_accusation(Accusation.make(accuser, "equivocation", RUN, liar.peer_id, GROUP_ID, [a, b])).holds
    for run in (f"{RUN}.gr", "verify", f"{RUN}.grads.x"):
        assert verify_accusation(Accusation.make(accuser, "equivocation", run, liar.peer_id, GROUP_ID,
                                                 [a, b])).guilty == "accuser"


def test_equivocation_gradient_and_unsigned_accusations():
    liar, accuser = identity(11), identity(12)
    a = Commitment.sign(liar, RUN, GROUP_ID, 0, 1, "result", b"\x01" * 32)
    b = Commitment.sign(liar, RUN, GROUP_ID, 0, 1, "result", b"\x02" * 32)
    assert verify_accusation(Accusation.make(accuser, "equivocation", RUN, liar.peer_id, GROUP_ID, [a, b])).holds
    assert not verify_accusation(Accusation.make(accuser, "equivocation", RUN, liar.peer_id, GROUP_ID, [a, a])).holds
    values = torch.randn(50)
    c = Commitment.sign(liar, RUN, GROUP_ID, 0, 1, "input", tensor_digest(values), 1.0)
    grad = Accusation.make(accuser, "wrong_gradient", RUN, liar.peer_id, GROUP_ID, [c], {0: values}, {"claim": 1})
    with pytest.raises(CannotVerify):
        verify_accusation(grad)  # nobody to recompute it here: nobody is blamed
    assert verify_accusation(grad, recompute=lambda acc: False).guilty == "accused"
    assert verify_accusation(grad, recompute=lambda acc: True).guilty == "accuser"
    swapped = Accusation.make(accuser, "wrong_gradient", RUN, liar.peer_id, GROUP_ID, [c], {0: values + 1})
    assert verify_accusation(swapped, recompute=lambda acc: False).guilty == "accuser"  # data it never committed
    # a plain mismatch (unsigned data) proves nothing; data the accused also signed does
    mismatch = Accusation.make(accuser, "commitment_mismatch", RUN, liar.peer_id, GROUP_ID, [c], {0: values + 1})
    assert verify_accusation(mismatch).guilty == "accuser"
    c2 = Commitment.sign(liar, RUN, GROUP_ID, 0, 1, "input", tensor_digest(values + 1), 1.0)
    assert verify_accusation(Accusation.make(accuser, "commitment_mismatch", RUN, liar.peer_id, GROUP_ID, [c, c2],
                                             {0: values + 1})).holds
    with pytest.raises(CannotVerify):
        verify_accusation(dataclasses.replace(grad, signature=b"\x00" * 64))
    assert verify_accusation(Accusation.make(liar, "equivocation", RUN, liar.peer_id, GROUP_ID, [a, b])).guilty \
        == "accuser"  # nobody accuses itself
    with pytest.raises(ValueError):  # more than one P2P message
        Accusation.make(accuser, "equivocation", RUN, liar.peer_id, GROUP_ID, [a], {0: torch.zeros(4_000_000)})


# ---- randomness --------------------------------------------------------------------------------

def test_combine_and_choose_checks_are_deterministic_and_fair():
    seeds = [bytes([i]) * 32 for i in range(4)]
    assert combine(seeds, b"t") == combine(list(reversed(seeds)), b"t") != combine(seeds, b"u")
    members = [identity(200 + i).peer_id for i in range(16)]
    r = combine(seeds, b"t")
    assert choose_checks(r, members, 0.25) == choose_checks(r, list(reversed(members)), 0.25)
    assert choose_checks(r, members, 0.0) == [] and len(choose_checks(r, members, 1.0)) == 16
    counts = []
    for t in range(400):
        checks = choose_checks(combine(seeds, t.to_bytes(4, "little")), members, 1 / 16)
        assert all(v != u for v, u in checks)
        counts.append(len(checks))
    assert 0.6 < sum(counts) / 400 < 1.4  # expected 1 check per round at p = 1/16 with 16 members
    low_bits = [combine([bytes([t % 256, t // 256]) * 16], b"r")[0] & 7 for t in range(4000)]
    assert all(abs(low_bits.count(v) - 500) < 110 for v in range(8))


# ---- in-memory rounds ---------------------------------------------------------------------------

class Group:
    """n P2P peers on one MemoryNetwork, an AllReduceService, InputsService and RandomnessExchange each."""

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed = n, seed
        g = torch.Generator().manual_seed(seed)
        self.values = [torch.randn(n * PART, generator=g) for _ in range(n)]
        self.weights = [float(i + 1) for i in range(n)]

    async def __aenter__(self) -> "Group":
        self.network = network = MemoryNetwork(latency=0.002, seed=self.seed)
        self.peers = [await network.create_peer(identity=identity(300 + i), name=f"p{i}") for i in range(self.n)]
        for a in self.peers:
            for b in self.peers:
                if a is not b:
                    a.add_addresses(b.peer_id, b.get_visible_addresses())
        self.services = [AllReduceService(p, RUN) for p in self.peers]
        self.inputs = [InputsService(p, RUN) for p in self.peers]
        self.seeds = [RandomnessExchange(p, RUN) for p in self.peers]
        self.group = GroupInfo(GROUP_ID, [p.peer_id for p in self.peers], [PART] * self.n, [None] * self.n,
                               [False] * self.n, [None] * self.n)
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        for things in (self.services, self.inputs, self.seeds):
            for thing in things:
                thing.close()
        await asyncio.gather(*(p.shutdown() for p in self.peers))

    def config(self, i: int, **kwargs: Any) -> RoundConfig:
        options: dict[str, Any] = dict(codec=compression.get("none"), chunk_elems=CHUNK, sender_timeout=2.0,
                                       identity=self.peers[i].identity, commit_prefix=RUN)
        options.update(kwargs)
        return RoundConfig(self.group, i, self.weights[i], **options)

    async def run(self, configs: dict[int, dict] | None = None) -> list[Any]:
        configs = configs or {}
        outcomes = await asyncio.gather(*(self.services[i].run(self.config(i, **configs.get(i, {})), self.values[i])
                                          for i in range(self.n)), return_exceptions=True)
        for i, outcome in enumerate(outcomes):
            if not isinstance(outcome, BaseException) and outcome[1].transcript is not None:
                self.inputs[i].add(outcome[1].transcript)
        return outcomes


def expected(values: list[torch.Tensor], weights: list[float], members: list[int]) -> torch.Tensor:
    return sum(weights[i] * values[i].double() for i in members) / sum(weights[i] for i in members)


def test_round_with_commitments_matches_the_plain_round_and_keeps_a_verifiable_transcript():
    async def main() -> None:
        async with Group(4) as group:
            plain = await group.run({i: dict(identity=None) for i in range(4)})
            committed = await group.run()
        for (r0, o0), (r1, o1) in zip(plain, committed):
            assert torch.equal(r0, r1) and o0.transcript is None
            t = o1.transcript
            assert t.aggregator == "mean" and t.survivors == group.group.members
            p = t.butterfly
            assert sorted(p.sent) == sorted(p.results) == [0, 1, 2, 3] and sorted(p.received) == [0, 1, 2, 3]
            for member, c in p.inputs.items():
                assert c.verify() and c.matches(p.received[member]) and c.weight == group.weights[member]
                assert c.ranges == tuple(p.ranges[t.me]) == ((t.me * PART, (t.me + 1) * PART),) and c.codec == "none"
                assert torch.equal(p.received[member], p.part_values(group.values[member], t.me))
            for owner, c in p.results.items():
                assert c.verify() and c.matches(p.part_values(t.result, owner)) and list(c.members) == [0, 1, 2, 3]
            assert all(c.matches(p.part_values(t.contribution, owner)) for owner, c in p.sent.items())
        assert torch.allclose(committed[0][0].double(), expected(group.values, group.weights, [0, 1, 2, 3]),
                              atol=1e-5)

    virtual_clock.run(main())


@pytest.mark.parametrize("codec", ["float16", "uint8", "topk", "powersgd"])
def test_commitments_hold_with_lossy_and_stateful_codecs(codec: str):
    async def main() -> None:
        async with Group(3) as group:
            outcomes = await group.run({i: dict(codec=compression.get(codec)) for i in range(3)})
        for result, outcome in outcomes:
            assert torch.equal(result, outcomes[0][0])  # the codecs' results are bit-identical at every member
            p = outcome.transcript.butterfly
            assert not p.mismatches and sorted(p.results) == sorted(p.received) == [0, 1, 2]
            assert all(c.matches(p.part_values(outcome.transcript.contribution, o)) for o, c in p.sent.items())

    virtual_clock.run(main())


def test_recovery_rounds_are_committed_too():
    async def main() -> None:
        async with Group(5) as group:
            on_outgoing_chunk(group.peers[4], 1, stall_forever)  # alive, but silent after its first chunk
            outcomes = await group.run()
        for result, outcome in outcomes[:4]:
            assert torch.allclose(result.double(), expected(group.values, group.weights, [0, 1, 2, 3]), atol=1e-5)
            recovery = outcome.transcript.phases[1]
            assert recovery.number == 1 and sorted(recovery.results) == [0, 1, 2, 3]
            assert all(c.phase == 1 and c.verify() for c in recovery.results.values())
        assert isinstance(outcomes[4], BaseException)

    virtual_clock.run(main())


def test_the_all_reduce_takes_nothing_from_a_banned_member():
    async def main() -> None:
        async with Group(4) as group:
            banned = group.peers[3].peer_id
            outcomes = await group.run({i: dict(banned=lambda p: p == banned) for i in range(3)})
        for result, outcome in outcomes[:3]:
            assert banned not in outcome.survivors
            assert torch.allclose(result.double(), expected(group.values, group.weights, [0, 1, 2]), atol=1e-5)
            assert 3 not in outcome.transcript.phases[-1].received
        assert isinstance(outcomes[3], BaseException)

    virtual_clock.run(main())


def test_a_member_that_swaps_its_part_after_committing_is_excluded():
    async def main() -> None:
        async with Group(4) as group:
            cheat = group.peers[1]
            original = cheat.open_stream

            async def open_stream(peer: Any, method: str, *args: Any, **kwargs: Any) -> Any:
                stream = await original(peer, method, *args, **kwargs)
                send, sent = stream.send, [0]

                async def swapping_send(message: Any, **kw: Any) -> None:
                    sent[0] += 1
                    if sent[0] == 2 and isinstance(message, dict) and "d" in message:  # its first chunk, committed
                        message = {"d": (torch.frombuffer(bytearray(message["d"]), dtype=torch.float32) * -1).numpy()
                                   .tobytes()}
                    await send(message, **kw)

                stream.send = swapping_send
                return stream

            cheat.open_stream = open_stream  # type: ignore[method-assign]
            outcomes = await group.run()
        honest = [0, 2, 3]
        for i in honest:
            result, outcome = outcomes[i]
            assert set(outcome.survivors) == {group.group.members[j] for j in honest}
            assert torch.allclose(result.double(), expected(group.values, group.weights, honest), atol=1e-5)
            mismatches = [m for p in outcome.transcript.phases for m in p.mismatches]
            assert [m.member for m in mismatches] == [1] and mismatches[0].commitment.sender == cheat.peer_id
        assert isinstance(outcomes[1], BaseException)

    virtual_clock.run(main())


@pytest.mark.parametrize("codec", ["none", "uint8", "float16"])
def test_an_owner_returning_a_wrong_aggregate_is_audited_accused_and_banned(codec: str):
    async def main() -> None:
        async with Group(4) as group:
            def biased(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
                return weighted_mean(x, w) * 1.2

            biased.chunkwise = True  # type: ignore[attr-defined]
            configs = {i: dict(codec=compression.get(codec)) for i in range(4)}
            configs[2]["reducer"] = biased
            outcomes = await group.run(configs)
            assert all(not isinstance(o, BaseException) for o in outcomes)  # signed consistently: it looks fine
            auditor = 0
            transcript = outcomes[auditor][1].transcript
            accusations = [await audit_aggregate(group.peers[auditor], RUN, group.peers[auditor].identity,
                                                 transcript, owner) for owner in range(4) if owner != auditor]
            assert [a is not None for a in accusations] == [False, True, False]
            accusation = accusations[1]
            assert accusation.accused == group.peers[2].peer_id and verify_accusation(accusation).holds
            assert accusation.commitments[0].codec == codec  # the precision its result claims is signed
            # an honest owner (part 1) cannot be framed with a tolerance of 0: the codec's floor holds
            honest = await audit_aggregate(group.peers[auditor], RUN, group.peers[auditor].identity, transcript, 1,
                                           tolerance=0.0)
            assert honest is None

    virtual_clock.run(main())


def test_an_equivocating_owner_is_caught_by_comparing_signed_results():
    async def main() -> None:
        async with Group(3) as group:
            liar, victim = group.peers[0], group.peers[1].peer_id
            service = group.services[0]
            liar.remove_handler(service.part_method)

            async def serve(stream: Any, ctx: Any) -> None:
                if ctx.peer_id == victim:  # results for the victim only: other values, signed anew
                    send, hasher = stream.send, TensorHasher(torch.float32, (PART,))

                    async def lying_send(message: Any, **kw: Any) -> None:
                        if isinstance(message, dict) and "d" in message:
                            values = torch.frombuffer(bytearray(bytes(message["d"])), dtype=torch.float32) + 1.0
                            hasher.update(values)
                            message = {"d": values.numpy().tobytes()}
                        elif isinstance(message, dict) and "done" in message:
                            signed = Commitment.sign(liar.identity, RUN, GROUP_ID, 0, 0, "result", hasher.digest(),
                                                     0.0, message["done"], group_digest(group.group.members), "none",
                                                     [(0, PART)])
                            message = {**message, "c": signed.compact()}
                        await send(message, **kw)

                    stream.send = lying_send
                await service._serve_part(stream, ctx)

            liar.add_stream_handler(service.part_method, serve)
            outcomes = await group.run()
            transcripts = [o[1].transcript for o in outcomes]
            # the seed exchange after the round shows whose view of the results differs
            seeds = await asyncio.gather(*(x.run(GROUP_ID, group.group.members, view=results_view(t))
                                           for x, t in zip(group.seeds, transcripts)))
            assert seeds[2].disagree == [1] and seeds[1].disagree == [0, 2]
            found = await find_equivocations(group.peers[2], RUN, group.peers[2].identity, transcripts[2],
                                             [group.group.members[i] for i in seeds[2].disagree])
            assert [a.accused for a in found] == [liar.peer_id] and all(verify_accusation(a).holds for a in found)

    virtual_clock.run(main())


class LyingExchange(RandomnessExchange):
    """Commits to one seed and opens another."""

    async def _stage(self, state: Any, callees: list[int], stage: str, message: dict, *args: Any) -> None:
        if stage == "open":
            state.opening = state.openings[state.me] = SeedOpening.make(self.identity, self.prefix, state.round_id,
                                                                        state.me, b"\x66" * 32)
            message = state.opening.to_wire()
        await super()._stage(state, callees, stage, message, *args)


def test_shared_randomness_agrees_and_a_bad_opening_is_provable():
    async def main() -> None:
        async with Group(4) as group:
            members = group.group.members
            outcomes = await asyncio.gather(*(x.run(b"round-1", members) for x in group.seeds))
            assert len({o.value for o in outcomes}) == 1 and all(o.included == [0, 1, 2, 3] for o in outcomes)
            group.seeds[3].close()
            group.seeds[3] = LyingExchange(group.peers[3], RUN)
            outcomes = await asyncio.gather(*(x.run(b"round-2", members) for x in group.seeds))
            for outcome in outcomes[:3]:
                assert outcome.included == [0, 1, 2] and [b[0].index for b in outcome.bad] == [3]
            assert len({o.value for o in outcomes[:3]}) == 1
            (accusation,) = bad_opening_accusations(group.peers[0].identity, outcomes[0], RUN)
            assert accusation.accused == members[3] and verify_accusation(accusation).holds
            elsewhere = bad_opening_accusations(group.peers[0].identity, outcomes[0], "another-run")
            assert verify_accusation(elsewhere[0]).guilty == "accuser"  # seed messages of another run
            # a member that vanishes after committing is left out, not blamed
            silent = group.seeds[2]
            silent.close()
            outcomes = await asyncio.gather(*(x.run(b"round-3", members, 1.0, 1.0) for x in group.seeds[:2]))
            assert all(2 in o.silent + o.missing and 2 not in o.included for o in outcomes)
            assert outcomes[0].value == outcomes[1].value
        assert seed_hash(b"\x00" * 32, 1, b"t", RUN) != seed_hash(b"\x00" * 32, 2, b"t", RUN)

    virtual_clock.run(main())


# ---- the ban list, matchmaking and DHT stores ---------------------------------------------------

OPTIONS = dict(target_group_size=3, min_group_size=3, min_matchmaking_time=1.0, request_timeout=1.0,
               sender_timeout=2.0, chunk_bytes=4096, default_timeout=20.0)


def _key_id(key: str) -> Any:
    from dht.routing import DHTID

    return DHTID.of_key(msgpack.packb(key, use_bin_type=True))


async def _nodes(n: int, network: MemoryNetwork) -> list[DHTNode]:
    nodes: list[DHTNode] = []
    for i in range(n):
        p2p = await network.create_peer(identity=identity(400 + i), name=f"n{i}")
        seeds = [nodes[0].p2p.get_visible_addresses()[0]] if nodes else []
        nodes.append(await DHTNode.create(seeds, p2p=p2p, rpc_timeout=1.0, rng=random.Random(i)))
    return nodes


async def _close(closables: Any, nodes: list[DHTNode]) -> None:
    """The ``finally`` of the DHT tests: close the ban lists, averagers, services, then shut the nodes down."""
    for thing in closables:
        thing.close()
    for node in nodes:
        await node.shutdown()


def test_ban_list_bans_the_proven_liar_and_the_false_accuser_and_honours_the_bans():
    async def main() -> None:
        random.seed(5)
        nodes = await _nodes(4, MemoryNetwork(latency=0.002, seed=5))
        honest, liar = nodes[:3], nodes[3]
        bans = [BanList(node, RUN) for node in nodes]
        try:
            # a proven lie: two different results signed for one part
            a = Commitment.sign(liar.p2p.identity, RUN, GROUP_ID, 0, 1, "result", b"\x01" * 32)
            b = Commitment.sign(liar.p2p.identity, RUN, GROUP_ID, 0, 1, "result", b"\x02" * 32)
            proof = Accusation.make(honest[0].p2p.identity, "equivocation", RUN, liar.p2p.peer_id, GROUP_ID, [a, b])
            await bans[0].publish(proof)
            with pytest.raises(ValueError):  # a false accusation is never published by an honest peer
                await bans[0].publish(Accusation.make(honest[0].p2p.identity, "equivocation", RUN,
                                                      honest[1].p2p.peer_id, GROUP_ID, [a, a]))
            for ban in bans[1:3]:
                assert await ban.refresh() == [liar.p2p.peer_id]
                assert ban.entries() == [{"peer_id": str(liar.p2p.peer_id), "reason": ban.entries()[0]["reason"]}]
                assert ban.entries()[0]["reason"].startswith("equivocation")
            # a false accusation stored by hand bans its accuser, not the accused
            h1 = honest[1].p2p.identity
            c = Commitment.sign(h1, RUN, GROUP_ID, 0, 0, "result", b"\x03" * 32)
            false = Accusation.make(honest[2].p2p.identity, "equivocation", RUN, h1.peer_id, GROUP_ID, [c, c])
            await honest[2].store(banned_key(RUN), false.to_wire(), honest[2].clock() + 600,
                                  subkey=f"{h1.peer_id} {honest[2].signature_validator.ownership_marker}")
            assert await bans[0].refresh() == [honest[2].p2p.peer_id]
            assert not bans[0].is_banned(h1.peer_id) and bans[0].is_banned(liar.p2p.peer_id)
            # the liar's stores under the run's prefix are refused by the nodes that banned it
            await liar.store(f"{RUN}.progress", {"fake": 1}, liar.clock() + 600)
            await liar.store("elsewhere", {"fine": 1}, liar.clock() + 600)
            now = honest[0].clock()
            for node in honest[:2]:
                assert node.storage.get(_key_id(f"{RUN}.progress"), now) is None
            assert any(node.storage.get(_key_id("elsewhere"), now) is not None for node in honest)
        finally:
            await _close(bans, nodes)

    virtual_clock.run(main())


def test_evidence_too_big_for_the_dht_is_published_by_reference():
    async def main() -> None:
        nodes = await _nodes(3, MemoryNetwork(latency=0.002, seed=7))
        bans = [BanList(node, RUN) for node in nodes]
        try:
            ids, commitments, tensors, detail = _aggregate_case(n=4, d=20_000, shift=0.05)  # ~400 KB of evidence
            accusation = Accusation.make(nodes[0].p2p.identity, "wrong_aggregate", RUN, ids[0].peer_id, GROUP_ID,
                                         commitments, tensors, detail)
            await bans[0].publish(accusation)
            record = await nodes[1].get(banned_key(RUN), latest=True)
            (entry,) = record.value.values()
            assert entry.value["ref"] == accusation.evidence_id and len(msgpack.packb(entry.value)) < 1024
            assert await bans[1].refresh() == [ids[0].peer_id]
            bans[0].close()  # its holder gone, a newcomer cannot judge it: it bans nobody (and is retried)
            assert await bans[2].refresh() == [] and not bans[2].is_banned(ids[0].peer_id)
        finally:
            await _close(bans, nodes)

    virtual_clock.run(main())


def test_an_accusation_that_needs_a_recompute_function_waits_for_one():
    async def main() -> None:
        nodes = await _nodes(2, MemoryNetwork(latency=0.002, seed=8))
        bans = [BanList(node, RUN) for node in nodes]
        try:
            target = identity(21)
            values = torch.randn(100)
            c = Commitment.sign(target, f"{RUN}.grads", GROUP_ID, 0, 0, "input", tensor_digest(values), 1.0)
            accusation = Accusation.make(nodes[0].p2p.identity, "wrong_gradient", RUN, target.peer_id, GROUP_ID, [c],
                                         {0: values})
            wrong = lambda acc: False  # noqa: E731 - the accused's values are not its gradient
            await bans[0].publish(accusation, check=wrong)
            assert await bans[1].refresh() == []  # it cannot judge it without a recompute function: nobody banned
            assert await bans[1].refresh(check=wrong) == [target.peer_id]
        finally:
            await _close(bans, nodes)

    virtual_clock.run(main())


def test_a_banned_peer_is_never_grouped_with():
    async def main() -> None:
        random.seed(6)
        nodes = await _nodes(4, MemoryNetwork(latency=0.002, seed=6))
        banned = nodes[3].p2p.peer_id
        values = [torch.full((64,), float(i)) for i in range(4)]
        averagers = [AsyncAverager([v], node, RUN, **OPTIONS, banned=(lambda p: p == banned) if i < 3 else None,
                                   commitments=True)
                     for i, (v, node) in enumerate(zip(values, nodes))]
        try:
            for _ in range(2):
                outcomes = await asyncio.gather(*(a.step(timeout=8.0, matchmaking_timeout=6.0) for a in averagers),
                                                return_exceptions=True)
                for outcome in outcomes[:3]:
                    assert not isinstance(outcome, BaseException), outcome
                    assert banned not in outcome.members and outcome.transcript is not None
                assert isinstance(outcomes[3], BaseException)  # nobody takes it
            assert torch.allclose(averagers[0].tensors[0], torch.full((64,), 1.0))
        finally:
            await _close(averagers, nodes)

    virtual_clock.run(main())


def test_a_lying_owner_is_audited_banned_through_the_dht_and_left_out_of_the_next_rounds():
    """The whole flow on AsyncAverager: a round with commitments, an audit of every owner by every
    honest member, the accusation published, the ban list refreshed, and the next round without the
    liar (it finds no group: nobody takes it)."""
    async def main() -> None:
        random.seed(9)
        nodes = await _nodes(4, MemoryNetwork(latency=0.002, seed=9))
        bans = [BanList(node, RUN) for node in nodes]
        inputs = [InputsService(node.p2p, f"{RUN}.grads") for node in nodes]
        values = [torch.randn(3_000, generator=torch.Generator().manual_seed(i)) for i in range(4)]
        options = dict(OPTIONS, target_group_size=4)
        averagers = [AsyncAverager([v.clone()], node, f"{RUN}.grads", **options, banned=ban.is_banned,
                                   commitments=True) for v, node, ban in zip(values, nodes, bans)]

        def biased(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return weighted_mean(x, w) * 1.5

        biased.chunkwise = True  # type: ignore[attr-defined]
        averagers[3].reducer = biased
        liar = nodes[3].p2p.peer_id
        try:
            outcomes = await asyncio.gather(*(a.step(timeout=10.0) for a in averagers))
            assert all(liar in o.members for o in outcomes)
            for i in range(3):
                inputs[i].add(outcomes[i].transcript)
            inputs[3].add(outcomes[3].transcript)
            for i in range(3):
                transcript = outcomes[i].transcript
                for owner in range(4):
                    accusation = await audit_aggregate(nodes[i].p2p, f"{RUN}.grads", nodes[i].p2p.identity,
                                                       transcript, owner, run_id=RUN)
                    if accusation is not None:
                        assert accusation.accused == liar
                        await bans[i].publish(accusation)
            for ban in bans[:3]:
                await ban.refresh()
                assert [e["peer_id"] for e in ban.entries()] == [str(liar)]
                assert ban.entries()[0]["reason"].startswith("wrong_aggregate")
            outcomes = await asyncio.gather(*(a.step(timeout=8.0, matchmaking_timeout=6.0) for a in averagers),
                                            return_exceptions=True)
            for outcome in outcomes[:3]:
                assert not isinstance(outcome, BaseException) and liar not in outcome.members
            assert isinstance(outcomes[3], BaseException)
        finally:
            await _close((*averagers, *bans, *inputs), nodes)

    virtual_clock.run(main())


# ---- loopback TCP -------------------------------------------------------------------------------

async def test_a_round_with_commitments_over_loopback_tcp_and_its_bytes():
    peers = [await P2P.create(host="127.0.0.1") for _ in range(3)]
    try:
        for a in peers:
            for b in peers:
                if a is not b:
                    a.add_addresses(b.peer_id, b.get_visible_addresses())
        services = [AllReduceService(p, RUN) for p in peers]
        seeds = [RandomnessExchange(p, RUN) for p in peers]
        group = GroupInfo(GROUP_ID, [p.peer_id for p in peers], [10_000] * 3, [None] * 3, [False] * 3, [None] * 3)
        values = [torch.randn(30_000) for _ in peers]
        wire: dict[bool, int] = {}
        for commit in (False, True):
            before = sum(_part_bytes(p) for p in peers)
            configs = [RoundConfig(dataclasses.replace(group, group_id=bytes([commit]) * 20), i, 1.0,
                                   compression.get("none"), chunk_elems=4096,
                                   identity=p.identity if commit else None, commit_prefix=RUN)
                       for i, p in enumerate(peers)]
            outcomes = await asyncio.gather(*(s.run(c, v) for s, c, v in zip(services, configs, values)))
            wire[commit] = sum(_part_bytes(p) for p in peers) - before
            assert all(torch.equal(outcomes[0][0], o[0]) for o in outcomes)
            if commit:
                assert all(len(o[1].transcript.butterfly.results) == 3 for o in outcomes)
        randomness = await asyncio.gather(*(s.run(b"tcp", group.members) for s in seeds))
        assert len({r.value for r in randomness}) == 1
        seed_bytes = sum(_method_bytes(p, "verify.seed") for p in peers)
        extra = wire[True] - wire[False]
        print(f"\navg.part bytes per round (3 peers, 30,000 float32 values each): {wire[False]} without commitments, "
              f"{wire[True]} with (+{extra}, {extra / wire[False]:.4%}, {extra / 6} per part stream); "
              f"seed exchange {seed_bytes} bytes")
        assert 0 < extra <= 6 * 2 * 160  # one signed digest per part each way: 6 streams, ~150 bytes each way
        for s in [*services, *seeds]:
            s.close()
    finally:
        await asyncio.gather(*(p.shutdown() for p in peers))


def _method_bytes(p2p: P2P, prefix: str) -> int:
    if p2p.stats is None:
        return 0
    return sum(stats.bytes_sent for table in (p2p.stats.outbound, p2p.stats.inbound)
               for method, stats in table.items() if method.startswith(prefix))


def _part_bytes(p2p: P2P) -> int:
    return _method_bytes(p2p, "avg.part")


def test_hostile_seed_and_inputs_requests_get_refusals_never_tracebacks(caplog):
    hostile: list[Any] = [None, 1, b"x", [], {}, {"g": []}, {"g": {}, "i": 0}, {"g": GROUP_ID, "i": -1},
                          {"g": GROUP_ID, "i": 0, "st": "commit", "m": {"x": RUN}},
                          {"g": GROUP_ID, "i": 0, "st": "fetch", "want": list(range(10_000))},
                          {"g": GROUP_ID, "i": 0, "st": "open", "m": None, "v": b"x" * 99},
                          {"g": GROUP_ID, "p": [], "j": {}}, {"g": GROUP_ID, "results": 1},
                          {"g": GROUP_ID, "p": 0, "j": 0, "m": []}, {"g": GROUP_ID, "p": 0, "j": 2**62}]
    rng = random.Random(9)
    keys = ["g", "i", "st", "m", "want", "v", "p", "j", "results"]
    values = [None, True, -1, 0, 3, 2**62, 1.5, b"", GROUP_ID, "commit", "open", "fetch", [], [0, 1], {}, {"x": 1}]
    hostile += [{k: rng.choice(values) for k in rng.sample(keys, rng.randint(1, 5))} for _ in range(150)]

    async def main() -> None:
        async with Group(3) as group:
            await group.run()  # a round the inputs services hold
            seeds = [asyncio.ensure_future(x.run(GROUP_ID, group.group.members, 2.0, 2.0)) for x in group.seeds[1:]]
            stranger = await group.network.create_peer(name="stranger")  # not a member of the round
            callers = [group.peers[0], stranger]
            for caller in callers:
                for target in (group.peers[1], group.peers[2]):
                    caller.add_addresses(target.peer_id, target.get_visible_addresses())
                    for request in hostile:
                        for method in (group.seeds[1].method, group.inputs[1].method):
                            try:
                                await caller.call(target.peer_id, method, request, timeout=6.0)
                            except Exception as e:  # noqa: BLE001 - refusals of every kind are fine
                                assert isinstance(e, (P2PError, asyncio.TimeoutError)), repr(e)
            await asyncio.gather(*seeds, return_exceptions=True)
            await stranger.shutdown()

    virtual_clock.run(main())
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or "failed for" in r.getMessage()]


# ---- recorded bytes (protocol version 2 of avg.part: the optional "c" keys) ----------------------

HEADER_WITH_COMMITMENT = bytes.fromhex(
    "86a167c4141717171717171717171717171717171717171717a17000a174c400a16901a177cb4000000000000000a16383a164c42000"
    "0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1fa16bc420917cc3f700754b6985c05862e1fa3ce3554b8e"
    "50887963d960fa754e745369bda173c440a83472aeea21e04151f68cd7d0ada94a976eb8846b3ceacfba13072b676a88f5657ce7cf1a"
    "33f428a7df8f3f9e7ee353f32135ab6a1f71013a4a4924004d950b")
DONE_WITH_COMMITMENT = bytes.fromhex(
    "83a4646f6e6593000102a56d69786564c2a16383a164c420202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d"
    "3e3fa16bc420917cc3f700754b6985c05862e1fa3ce3554b8e50887963d960fa754e745369bda173c440d514ff07459cc288f1fa8eff"
    "868a2e52dd1c8718923acd1aa01f9a82e14a671e2520608dfec55a87fcf96e6bfee541d283703134a00a9979a0f502c51776d001")


def test_part_messages_with_commitments_match_the_recorded_bytes():
    from averaging import protocol
    from averaging.protocol import PartHeader

    me = identity(1)
    group = b"\x01" * 32
    c = Commitment.sign(me, RUN, GROUP_ID, 0, 2, "input", bytes(range(32)), 2.0, (), group)
    r = Commitment.sign(me, RUN, GROUP_ID, 0, 1, "result", bytes(range(32, 64)), 0.0, (0, 1, 2), group)
    header = PartHeader(GROUP_ID, 0, b"", 1, 2.0, c.compact())
    assert msgpack.packb(protocol.part_header(header), use_bin_type=True) == HEADER_WITH_COMMITMENT
    assert msgpack.packb(protocol.part_done([0, 1, 2], False, r.compact()), use_bin_type=True) == DONE_WITH_COMMITMENT
    parsed = protocol.parse_part_header(msgpack.unpackb(HEADER_WITH_COMMITMENT))
    assert parsed == header
    again = Commitment.from_compact(parsed.commitment, RUN, GROUP_ID, 0, 2, "input", 2.0, group=group,
                                    sender=me.peer_id)
    assert again == c and again.verify()
    done = msgpack.unpackb(DONE_WITH_COMMITMENT)
    assert protocol.parse_part_done(done, 3) == ([0, 1, 2], False)
    assert Commitment.from_compact(protocol.parse_part_commitment(done), RUN, GROUP_ID, 0, 1, "result", 0.0,
                                   [0, 1, 2], group).verify()
    for bad in ({"d": b"x"}, {"d": bytes(32), "k": bytes(32)}, [1], {"d": bytes(32), "k": bytes(32), "s": bytes(63)}):
        with pytest.raises(BadRequestError):
            protocol.parse_part_header({**msgpack.unpackb(HEADER_WITH_COMMITMENT), "c": bad})
    assert len(HEADER_WITH_COMMITMENT) - len(msgpack.packb(protocol.part_header(
        PartHeader(GROUP_ID, 0, b"", 1, 2.0)), use_bin_type=True)) == 143  # bytes a commitment adds to a header


def test_bytes_commitments_and_the_seed_exchange_add_to_a_16_member_round(capsys):
    """16 members averaging 100,000 float32 values each (in memory): the bytes every member sends per
    round on avg.part with and without commitments, and in the seed exchange (printed with -s)."""
    n = 16

    async def main() -> dict[str, float]:
        group = Group(n)
        group.values = [torch.randn(n * (100_000 // n), generator=torch.Generator().manual_seed(i)) for i in range(n)]
        async with group:
            group.group.part_sizes = [100_000 // n] * n

            def sent(method: str) -> int:
                return sum(_method_bytes(p, method) for p in group.peers)

            before = sent("avg.part")
            await group.run({i: dict(identity=None) for i in range(n)})
            plain = sent("avg.part") - before
            before = sent("avg.part")
            await group.run()
            committed = sent("avg.part") - before
            before = sent("verify.seed")
            outcomes = await asyncio.gather(*(x.run(b"bytes", group.group.members) for x in group.seeds))
            assert len({o.value for o in outcomes}) == 1
            seed = sent("verify.seed") - before
        return {"plain": plain / n, "extra": (committed - plain) / n, "seed": seed / n}

    figures = virtual_clock.run(main())
    with capsys.disabled():
        print(f"\n16 members, 100,000 float32 values each: avg.part {figures['plain']:.0f} B per member per round, "
              f"commitments +{figures['extra']:.0f} B ({figures['extra'] / figures['plain']:.2%}), "
              f"seed exchange {figures['seed']:.0f} B ({figures['seed'] / figures['plain']:.2%})")
    assert 0 < figures["extra"] <= 2 * 150 * (n - 1)  # one signed digest per part stream, each way
    assert 0 < figures["seed"] <= 2 * 250 * (n - 1)  # a commitment and an opening per pair, each way
