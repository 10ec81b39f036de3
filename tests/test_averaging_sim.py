"""averaging.AsyncAverager in one process on MemoryNetwork and the virtual clock: deterministic faults.

Every peer is a real P2P + DHTNode + AsyncAverager on :class:`dht.peer.memory_transport.MemoryNetwork`
(5 ms per frame), all on one :mod:`dht.peer.virtual_clock` loop, so timeouts of seconds cost no wall
time. Faults are injected at exact points of the round: a member killed after its first chunks
(``network.kill``: silent death), one that stalls after them, one that starts its all-reduce late
(less, then more than the sender timeout), one that sends NaN. The survivors end with the weighted
mean over the survivors (float32 accuracy), bit-identical, every part contributed by exactly the
survivors, and the faulty member named in the log. Also: the averaging simulation benchmark runs
at a small size (its rounds converge to 1e-6 of the true mean).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import subprocess
import sys
from typing import Any, AsyncIterator, Callable, Sequence

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from averaging import AsyncAverager, AveragingError, StepResult
from averaging.partition import flatten
from dht import DHTNode
from dht.peer import virtual_clock
from dht.peer.identity import Identity
from dht.peer.memory_transport import MemoryNetwork
from tests.fault_injection import on_outgoing_chunk as inject

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 20_000  # values per peer: parts of 5 000 in chunks of 1 024 (several chunks per part)
SENDER_TIMEOUT = 2.0
OPTIONS = dict(target_group_size=4, min_group_size=4, min_matchmaking_time=1.0, request_timeout=1.0,
               sender_timeout=SENDER_TIMEOUT, chunk_bytes=4096, default_timeout=30.0)


class Swarm:
    """``n`` peers (P2P + DHTNode + AsyncAverager) on one MemoryNetwork, on the running loop."""

    def __init__(self, n: int, seed: int):
        self.n, self.rng = n, random.Random(seed)
        self.network = MemoryNetwork(latency=0.005, seed=seed)
        self.nodes: list[DHTNode] = []
        self.averagers: list[AsyncAverager] = []
        self.values = [torch.randn(SIZE, generator=torch.Generator().manual_seed(seed * 100 + i)) for i in range(n)]

    async def start(self, options: dict) -> None:
        for i in range(self.n):
            identity = Identity(Ed25519PrivateKey.from_private_bytes(self.rng.randbytes(32)))
            p2p = await self.network.create_peer(identity=identity, name=f"p{i}")
            seeds = [self.nodes[0].p2p.get_visible_addresses()[0]] if self.nodes else []
            self.nodes.append(await DHTNode.create(seeds, p2p=p2p, rpc_timeout=1.0,
                                                   rng=random.Random(self.rng.random())))
        for node, values in zip(self.nodes, self.values):
            self.averagers.append(AsyncAverager([values.clone()], node, "sim", **options))

    async def close(self) -> None:
        for averager in self.averagers:
            averager.close()
        for node in self.nodes:
            await node.shutdown()

    async def step_all(self, weights: Sequence[float], **kwargs: Any) -> list[StepResult | BaseException]:
        return await asyncio.gather(*(a.step(weight=w, **kwargs) for a, w in zip(self.averagers, weights)),
                                    return_exceptions=True)


@contextlib.asynccontextmanager
async def swarm(n: int = 4, seed: int = 0, **options: Any) -> AsyncIterator[Swarm]:
    random.seed(seed)  # the matchmaker's member order
    made = Swarm(n, seed)
    try:
        await made.start({**OPTIONS, **options})
        yield made
    finally:
        await made.close()


def on_outgoing_chunk(averager: AsyncAverager, chunk: int, action: Callable[[], Any]) -> None:
    """:func:`tests.fault_injection.on_outgoing_chunk` on ``averager``'s peer."""
    inject(averager.node.p2p, chunk, action)


def after_group_formed(averager: AsyncAverager, action: Callable[[], Any]) -> None:
    """Await ``action()`` when ``averager``'s matchmaking found a group, before its all-reduce starts."""
    matchmaker = averager._matchmaker
    original = matchmaker.look_for_group

    async def look_for_group(deadline: float, info: dict) -> Any:
        group = await original(deadline, info)
        await action()
        return group

    matchmaker.look_for_group = look_for_group


def expected_mean(values: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    return sum(w * v.double() for w, v in zip(weights, values)) / sum(weights)


def assert_exact(results: Sequence[Any], expected: torch.Tensor, averagers: Sequence[AsyncAverager],
                 survivors: set) -> None:
    """Every result succeeded, its tensors hold ``expected`` (float32 accuracy) bit for bit the same
    as the others', and every part was contributed by exactly ``survivors``."""
    first = averagers[0].tensors[0]
    for result, averager in zip(results, averagers):
        assert isinstance(result, StepResult), repr(result)
        assert set(result.survivors) == survivors
        assert all(set(contributors) == survivors for _, _, contributors in result.parts)
        flat = flatten(averager.tensors)
        assert torch.allclose(flat.double(), expected, rtol=1e-6, atol=1e-6), (flat.double() - expected).abs().max()
        assert torch.equal(averager.tensors[0].view(torch.int32), first.view(torch.int32))


def run(coro: Any) -> Any:
    return virtual_clock.run(coro)


WEIGHTS = [1.0, 2.0, 3.0, 4.0]


def test_all_healthy_members_get_the_exact_mean():
    async def main() -> None:
        async with swarm() as s:
            loop = asyncio.get_running_loop()
            started = loop.time()
            results = await s.step_all(WEIGHTS)
            assert_exact(results, expected_mean(s.values, WEIGHTS), s.averagers, {n.peer_id for n in s.nodes})
            assert all(r.recovered_ranges == [] and r.bytes_sent > 0 for r in results)
            assert loop.time() - started < 5.0  # virtual seconds: matchmaking (1 s) and a few round trips
            assert all(n.clock() == loop.dht_time() for n in s.nodes)  # DHT time follows the virtual clock

    run(main())


@pytest.mark.parametrize("fault", ["kill", "stall"])
def test_member_dead_or_stalled_mid_round_survivors_get_the_exact_mean(fault, caplog):
    """Peer 3 contributes two chunks of every part, then dies silently (or stops sending, alive);
    peer 1 pauses after two chunks too (less than the sender timeout), so the owners have averaged
    the first chunks with peer 3 when it fails: its part and the mixed ones are re-reduced."""
    async def main() -> None:
        async with swarm(seed=1) as s:
            victim = s.averagers[3]
            on_outgoing_chunk(s.averagers[1], 2, lambda: asyncio.sleep(SENDER_TIMEOUT / 2))

            async def fail() -> None:
                if fault == "kill":
                    s.network.kill(victim.node.peer_id)
                else:
                    await asyncio.Event().wait()  # alive and connected, but sends nothing more

            on_outgoing_chunk(victim, 2, fail)
            if fault == "kill":  # a dead host runs nothing: its own step is not part of the outcome
                results = await s.step_all(WEIGHTS)
            else:
                results = await s.step_all(WEIGHTS, allow_retries=False)
            survivors = {n.peer_id for n in s.nodes[:3]}
            assert_exact(results[:3], expected_mean(s.values[:3], WEIGHTS[:3]), s.averagers[:3], survivors)
            for result in results[:3]:
                assert result.recovered_ranges, "the victim's part must have been re-reduced among the survivors"
                assert len(result.members) == 4
                # excluded after the sender and reducer timeouts (virtual seconds), far from the step's timeout
                assert result.matchmaking_seconds + result.allreduce_seconds < 1.5 + 4 * SENDER_TIMEOUT
                assert result.recovery_seconds > 0
            if fault == "stall":
                assert isinstance(results[3], AveragingError), results[3]
                assert torch.equal(victim.tensors[0], s.values[3])  # its tensors are untouched
            assert f"excluding {victim.node.peer_id}" in caplog.text

    with caplog.at_level(logging.INFO, logger="averaging.allreduce"):  # member failures are INFO
        run(main())


@pytest.mark.parametrize("delay,included", [(0.5 * SENDER_TIMEOUT, True), (3 * SENDER_TIMEOUT, False)])
def test_member_that_starts_late(delay, included, caplog):
    """Peer 2 starts its all-reduce ``delay`` virtual seconds after its group formed: within the
    sender timeout it is waited for and everyone gets the mean of all four; beyond it, it is
    excluded, named, its tensors untouched, and the other three get the exact mean of theirs."""
    async def main() -> None:
        async with swarm(seed=2) as s:
            late = s.averagers[2]
            after_group_formed(late, lambda: asyncio.sleep(delay))
            results = await s.step_all(WEIGHTS, allow_retries=False)
            if included:
                assert_exact(results, expected_mean(s.values, WEIGHTS), s.averagers, {n.peer_id for n in s.nodes})
                return
            good = [0, 1, 3]
            assert_exact([results[i] for i in good], expected_mean([s.values[i] for i in good], [WEIGHTS[i] for i in good]),
                         [s.averagers[i] for i in good], {s.nodes[i].peer_id for i in good})
            assert isinstance(results[2], AveragingError), results[2]
            assert torch.equal(late.tensors[0], s.values[2])
            assert f"excluding {late.node.peer_id}: sent nothing" in caplog.text

    with caplog.at_level(logging.INFO, logger="averaging.allreduce"):  # member failures are INFO
        run(main())


def test_member_that_sends_nan_is_excluded_and_named(caplog):
    async def main() -> None:
        async with swarm(seed=3) as s:
            bad = s.averagers[1]
            bad.tensors[0][::997] = float("nan")
            poisoned = bad.tensors[0].clone()
            results = await s.step_all(WEIGHTS, allow_retries=False)
            good = [0, 2, 3]
            assert_exact([results[i] for i in good], expected_mean([s.values[i] for i in good], [WEIGHTS[i] for i in good]),
                         [s.averagers[i] for i in good], {s.nodes[i].peer_id for i in good})
            assert isinstance(results[1], AveragingError), results[1]
            assert torch.equal(bad.tensors[0].isnan(), poisoned.isnan())  # untouched
            assert f"excluding {bad.node.peer_id}: sent NaN or Inf values" in caplog.text

    with caplog.at_level(logging.INFO, logger="averaging.allreduce"):  # member failures are INFO
        run(main())


def test_survivors_carry_on_after_a_kill():
    """After a member died mid-round, the three others average again, exactly, without it."""
    async def main() -> None:
        async with swarm(seed=4) as s:
            async def kill() -> None:
                s.network.kill(s.nodes[0].peer_id)

            on_outgoing_chunk(s.averagers[0], 1, kill)
            first = await s.step_all(WEIGHTS)
            assert all(isinstance(r, StepResult) for r in first[1:]), first
            rest = s.averagers[1:]
            fresh = [torch.randn(SIZE, generator=torch.Generator().manual_seed(40 + i)) for i in range(3)]
            for averager, values in zip(rest, fresh):
                averager.tensors[0].copy_(values)
                averager._matchmaker.min_group_size = 3
                averager.target_group_size = 3
            again = await asyncio.gather(*(a.step() for a in rest), return_exceptions=True)
            assert_exact(again, expected_mean(fresh, [1.0] * 3), rest, {n.peer_id for n in s.nodes[1:]})

    run(main())


def test_averaging_sim_benchmark_converges():
    """benchmarks/averaging_sim.py at a small size (32 peers in groups of 8, one round of 10% churn):
    one JSON line, finite rounds to 1e-6, the deviation falls from the first round to that one."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "averaging_sim.py"), "--peers", "32",
                           "--group-size", "8", "--churn-rounds", "1", "--rounds", "20", "--json"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stdout
    report = json.loads(lines[0])
    assert report["peers"] == 32
    rounds = report["rounds_to_1e-6"]
    # churn before round 2: not before round 3; typically 4 to 6 (group ids are random: so are the keys)
    assert isinstance(rounds, int) and 3 <= rounds <= 20, report
    assert report["bytes_per_peer"] > 0
    per_round = report["per_round"]
    assert len(per_round) == rounds and per_round[1]["left"] == per_round[1]["joined"] == 3
    deviations = [r["max_rel_dev"] for r in per_round]
    assert deviations[-1] <= 1e-6 < deviations[0], deviations
    assert all(r["drift"] < 1e-6 for r in per_round)  # the mean is conserved (up to float32 rounding)
