"""averaging.Averager in one process over real sockets on loopback: several dht.DHT facades on
127.0.0.1 (each with its own event-loop thread), threads calling ``step`` at the same time."""

from __future__ import annotations

import concurrent.futures
import contextlib
import time
from typing import Any, Iterator, Sequence

import pytest
import torch

from averaging import Averager, AveragingError, StepResult
from averaging.partition import flatten
from dht import DHT

pytestmark = pytest.mark.slow

SHAPES = [(7, 13), (101,), (1,)]  # odd sizes: 193 values
FAST = dict(min_matchmaking_time=0.8, request_timeout=0.4, sender_timeout=2.0)


@pytest.fixture(scope="module")
def swarm() -> Iterator[list[DHT]]:
    """Four DHT peers that accept connections, then one client-mode peer (cannot be dialed)."""
    dhts: list[DHT] = []
    try:
        dhts.append(DHT(host="127.0.0.1"))
        for _ in range(3):
            dhts.append(DHT(initial_peers=dhts[0].get_visible_addresses(), host="127.0.0.1"))
        dhts.append(DHT(initial_peers=dhts[0].get_visible_addresses(), host="127.0.0.1", client_mode=True))
        yield dhts
    finally:
        for d in dhts:
            d.shutdown()


def make_tensors(seed: int, shapes: Sequence[tuple[int, ...]] = SHAPES) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for shape in shapes]


@contextlib.contextmanager
def averagers(dhts: Sequence[DHT], prefix: str, tensors: Sequence[list[torch.Tensor]] | None = None,
              **options: Any) -> Iterator[list[Averager]]:
    tensors = tensors if tensors is not None else [make_tensors(i) for i in range(len(dhts))]
    made: list[Averager] = []
    try:
        for dht, ts in zip(dhts, tensors):
            made.append(Averager(ts, dht, prefix, **{**FAST, **options}))
        yield made
    finally:
        for a in made:
            a.shutdown()


def step_all(group: Sequence[Averager], delays: Sequence[float] | None = None, **kwargs: Any) -> list[Any]:
    """``step`` on every averager at once (after its delay, s); a StepResult or the exception raised."""
    kwargs.setdefault("timeout", 10.0)
    delays = delays or [0.0] * len(group)
    per_peer = [{k: v[i] if isinstance(v, list) else v for k, v in kwargs.items()} for i in range(len(group))]

    def run(i: int) -> Any:
        time.sleep(delays[i])
        try:
            return group[i].step(**per_peer[i])
        except AveragingError as e:
            return e

    with concurrent.futures.ThreadPoolExecutor(len(group)) as pool:
        return list(pool.map(run, range(len(group))))


def weighted_mean(flats: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    return sum(w * f.double() for w, f in zip(weights, flats)) / sum(weights)


def assert_succeeded(results: Sequence[Any]) -> list[StepResult]:
    for r in results:
        assert isinstance(r, StepResult), f"step failed: {r!r}"
    return list(results)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


@pytest.mark.parametrize("n", [2, 4])
def test_exact_weighted_mean_and_bit_identical_results(swarm, n):
    weights = [1.0, 3.5, 0.25, 7.0][:n]
    with averagers(swarm[:n], f"exact{n}", target_group_size=n, min_group_size=n) as group:
        before = [flatten(a.tensors) for a in group]
        results = assert_succeeded(step_all(group, weight=weights))
        expected = weighted_mean(before, weights)
        after = [flatten(a.tensors) for a in group]
        for flat in after:
            assert torch.allclose(flat.double(), expected, rtol=1e-6, atol=1e-6)
            assert torch.equal(bits(flat), bits(after[0]))
        for a in group:  # written back into the caller's tensors, shapes kept
            assert [tuple(t.shape) for t in a.tensors] == SHAPES
        members = results[0].members
        assert len(members) == n and set(members) == {d.peer_id for d in swarm[:n]}
        for r in results:
            assert r.group_id == results[0].group_id and r.members == members and r.survivors == members
            assert r.recovered_ranges == []
            assert sorted((s, e) for s, e, _ in r.parts) == sorted(p[:2] for p in results[0].parts)
            covered = sorted((s, e) for s, e, contributors in r.parts if contributors == members)
            assert sum(e - s for s, e in covered) == 193
            assert r.bytes_sent > 0 and r.bytes_received > 0


def test_step_without_waiting_returns_a_future(swarm):
    with averagers(swarm[:2], "future", target_group_size=2) as group:
        before = [flatten(a.tensors) for a in group]
        futures = [a.step(weight=w, wait=False, timeout=10) for a, w in zip(group, (1.0, 2.0))]
        assert all(isinstance(f, concurrent.futures.Future) for f in futures)
        results = [f.result(timeout=15) for f in futures]
        assert_succeeded(results)
        expected = weighted_mean(before, [1.0, 2.0])
        for a in group:
            assert torch.allclose(flatten(a.tensors).double(), expected, rtol=1e-6, atol=1e-6)


def test_alone_raises_and_leaves_the_tensors_unchanged(swarm):
    with averagers(swarm[:1], "alone", target_group_size=4, min_group_size=2) as (single,):
        before = [t.clone() for t in single.tensors]
        started = time.monotonic()
        with pytest.raises(AveragingError):
            single.step(timeout=2.0)
        elapsed = time.monotonic() - started
        assert elapsed < 2.0 + 1.5  # within the step's timeout (plus a little for the unwinding)
        for t, b in zip(single.tensors, before):
            assert torch.equal(bits(t), bits(b))
        # a future handle reports the same failure
        with pytest.raises(AveragingError):
            single.step(timeout=1.0, wait=False).result(timeout=5)


def test_client_arriving_before_the_leader_still_joins(swarm):
    """Regression: a client-mode peer that declares itself before any peer that can lead used to give
    up (it ranked first, and only joined earlier-ranked leaders). Five rounds in a row, with the
    leader arriving a different time after the client and different pauses between rounds."""
    server, client = swarm[0], swarm[4]
    assert client.client_mode
    with averagers([server, client], "client-first", target_group_size=2) as (leader, follower):
        assert follower.client_mode and not leader.client_mode
        for round_, (head_start, pause) in enumerate([(0.3, 0.0), (0.9, 0.4), (0.05, 0.1), (1.5, 0.7), (0.6, 0.2)]):
            time.sleep(pause)
            before = [flatten(leader.tensors), flatten(follower.tensors)]
            results = step_all([leader, follower], delays=[head_start, 0.0], weight=[1.0, 3.0], timeout=8.0)
            assert_succeeded(results)
            expected = weighted_mean(before, [1.0, 3.0])
            a, b = flatten(leader.tensors), flatten(follower.tensors)
            assert torch.equal(bits(a), bits(b)), f"round {round_}"
            assert torch.allclose(a.double(), expected, rtol=1e-6, atol=1e-6), f"round {round_}"
            leader.tensors[0].add_(1.0)  # new values for the next round
            follower.tensors[1].mul_(-2.0)


def test_scopes_separate_groups(swarm):
    with averagers(swarm[:4], "scoped", target_group_size=4) as group:
        before = [flatten(a.tensors) for a in group]
        scopes = ["a", "b", "a", "b"]
        results = assert_succeeded(step_all(group, scope=scopes))
        for scope in ("a", "b"):
            inside = [i for i, s in enumerate(scopes) if s == scope]
            expected = weighted_mean([before[i] for i in inside], [1.0] * len(inside))
            for i in inside:
                assert set(results[i].members) == {swarm[j].peer_id for j in inside}
                assert torch.allclose(flatten(group[i].tensors).double(), expected, rtol=1e-6, atol=1e-6)


def test_target_group_size_setter(swarm):
    with averagers(swarm[:4], "target", target_group_size=16, min_matchmaking_time=4.0) as group:
        with pytest.raises(ValueError):
            group[0].target_group_size = 1
        assert group[0].target_group_size == 16
        for a in group:
            a.target_group_size = 4
        assert all(a.target_group_size == 4 for a in group)
        results = assert_succeeded(step_all(group))
        # a full group starts at once instead of waiting for the leader's matchmaking time (4 s)
        for r in results:
            assert len(r.members) == 4
            assert r.matchmaking_seconds < 4.0
        for a in group:
            a.target_group_size = 2
        results = assert_succeeded(step_all(group))
        assert all(len(r.members) == 2 for r in results)
        assert len({r.group_id for r in results}) == 2


def test_pairs_never_share_a_peer(swarm):
    """Four peers with groups of two, rounds back to back: every round forms two disjoint pairs.
    Regression: a peer whose join request was in flight could meanwhile start its own group with a
    follower, then join the leader as well; it sat in two groups and both of them failed."""
    with averagers(swarm[:4], "pairs", target_group_size=2, min_matchmaking_time=4.0) as group:
        for round_ in range(8):
            results = assert_succeeded(step_all(group))
            assert all(len(r.members) == 2 for r in results), f"round {round_}"
            pairs = {r.group_id: frozenset(r.members) for r in results}
            assert len(pairs) == 2 and set().union(*pairs.values()) == {d.peer_id for d in swarm[:4]}


def test_mismatched_shapes_never_group(swarm):
    tensors = [make_tensors(0), make_tensors(1), make_tensors(2, [(7, 13), (100,), (1,)])]
    with averagers(swarm[:3], "shapes", tensors=tensors, target_group_size=3) as group:
        before = [flatten(a.tensors) for a in group]
        results = step_all(group, timeout=[6.0, 6.0, 3.0])
        ok = assert_succeeded(results[:2])
        assert all(len(r.members) == 2 for r in ok)
        assert isinstance(results[2], AveragingError)
        assert torch.equal(bits(flatten(group[2].tensors)), bits(before[2]))
        expected = weighted_mean(before[:2], [1.0, 1.0])
        for a in group[:2]:
            assert torch.allclose(flatten(a.tensors).double(), expected, rtol=1e-6, atol=1e-6)


def test_gathered_metadata(swarm):
    with averagers(swarm[:3], "gather", target_group_size=3, min_group_size=3) as group:
        values = [{"rank": i, "samples": 10 * i, "tag": f"peer{i}"} for i in range(3)]
        results = assert_succeeded(step_all(group, gather=values))
        expected = {swarm[i].peer_id: values[i] for i in range(3)}
        for r in results:
            assert r.gathered == expected


def test_float16_results_are_bit_identical(swarm):
    with averagers(swarm[:3], "half", target_group_size=3, min_group_size=3, compression="float16") as group:
        before = [flatten(a.tensors) for a in group]
        assert_succeeded(step_all(group, weight=[1.0, 2.0, 3.0]))
        expected = weighted_mean(before, [1.0, 2.0, 3.0])
        after = [flatten(a.tensors) for a in group]
        for flat in after:
            assert torch.equal(bits(flat), bits(after[0]))
            # contributions and results each rounded to float16 once: relative error about 2 * 2^-11
            assert torch.allclose(flat.double(), expected, rtol=2e-3, atol=2e-3)
        assert not torch.equal(after[0].double(), expected.float().double())  # it did go through float16
