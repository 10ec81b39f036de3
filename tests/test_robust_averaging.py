"""Robust all-reduce over real sockets on loopback: five dht.DHT peers on 127.0.0.1 in one process,
averaging.Averager with aggregator="centered_clip" / "median" / "flag_aggregate" while one peer sends a
sign-flipped, NaN or heavily weighted vector. Each part owner aggregates its part (partitioned scheme)."""

from __future__ import annotations

import concurrent.futures
import contextlib
from typing import Any, Iterator, Sequence

import pytest
import torch

from averaging import Averager, AveragingError, StepResult, aggregators
from averaging.partition import flatten
from dht import DHT

pytestmark = pytest.mark.slow

PEERS = 5
SHAPES = [(7, 13), (1003,)]  # 1094 values: parts are not all equal
FAST = dict(min_matchmaking_time=0.8, request_timeout=0.4, sender_timeout=2.0)


@pytest.fixture(scope="module")
def swarm() -> Iterator[list[DHT]]:
    dhts: list[DHT] = []
    try:
        dhts.append(DHT(host="127.0.0.1"))
        for _ in range(PEERS - 1):
            dhts.append(DHT(initial_peers=dhts[0].get_visible_addresses(), host="127.0.0.1"))
        yield dhts
    finally:
        for d in dhts:
            d.shutdown()


def honest_tensors(seed: int) -> list[list[torch.Tensor]]:
    """Every peer: a shared signal plus its own noise (like gradients of one model on different data)."""
    g = torch.Generator().manual_seed(seed)
    signal = [torch.randn(shape, generator=g) for shape in SHAPES]
    return [[s + 0.3 * torch.randn(s.shape, generator=g) for s in signal] for _ in range(PEERS)]


@contextlib.contextmanager
def averagers(dhts: Sequence[DHT], prefix: str, tensors: Sequence[list[torch.Tensor]], aggregator: Any,
              **options: Any) -> Iterator[list[Averager]]:
    made: list[Averager] = []
    try:
        for dht, ts in zip(dhts, tensors):
            made.append(Averager(ts, dht, prefix, target_group_size=len(dhts), min_group_size=len(dhts),
                                 aggregator=aggregator, **{**FAST, **options}))
        yield made
    finally:
        for a in made:
            a.shutdown()


def step_all(group: Sequence[Averager], weights: Sequence[float] | None = None) -> list[Any]:
    weights = weights or [1.0] * len(group)

    def run(i: int) -> Any:
        try:
            return group[i].step(weight=weights[i], timeout=15.0)
        except AveragingError as e:
            return e

    with concurrent.futures.ThreadPoolExecutor(len(group)) as pool:
        return list(pool.map(run, range(len(group))))


def relative_error(flat: torch.Tensor, target: torch.Tensor) -> float:
    return float((flat.double() - target).norm() / target.norm())


def run_round(swarm, prefix: str, aggregator: Any, attack: str, seed: int = 0, attacker_weight: float = 1.0):
    """Peers 0..3 honest, peer 4 the attacker. Returns (results, flats after, honest mean, honest median)."""
    tensors = honest_tensors(seed)
    honest = torch.stack([flatten(ts) for ts in tensors[:-1]]).double()
    if attack == "sign_flip":
        for t in tensors[-1]:
            t.mul_(-1000.0)
    elif attack == "nan":
        tensors[-1][1][5] = float("nan")
    elif attack == "shift":  # plausible-looking but wrong values, with a huge claimed batch
        for t in tensors[-1]:
            t.add_(5.0)
    with averagers(swarm, prefix, tensors, aggregator) as group:
        results = step_all(group, weights=[1.0] * (PEERS - 1) + [attacker_weight])
        flats = [flatten(a.tensors) for a in group]
    return results, flats, honest.mean(0), honest.median(0).values


@pytest.mark.parametrize("aggregator", ["centered_clip", "median", "flag_aggregate"])
def test_robust_aggregators_resist_a_sign_flipping_peer(swarm, aggregator):
    results, flats, mu, _ = run_round(swarm, f"flip-{aggregator}", aggregator, "sign_flip")
    assert all(isinstance(r, StepResult) for r in results), results
    assert all(len(r.survivors) == PEERS for r in results)  # nobody excluded: robustness did the work
    for flat in flats:
        assert torch.equal(flat, flats[0])  # every peer, attacker included, holds the same result
    error = relative_error(flats[0], mu)
    cosine = float(flats[0].double() @ mu / (flats[0].double().norm() * mu.norm()))
    print(f"{aggregator}: relative error to the honest mean {error:.3f}, cosine {cosine:.4f}")
    assert cosine > 0.95
    if aggregator == "flag_aggregate":
        # the flipped unit vector cancels one honest one inside the subspace: right direction, but the
        # rescaled length is (p - 2f) / p = 3/5 of the honest one (bounded influence, design §3.3)
        assert error < 0.45
    else:
        assert error < 0.3


def test_the_plain_mean_is_wrecked_by_the_same_peer(swarm):
    results, flats, mu, _ = run_round(swarm, "flip-mean", "mean", "sign_flip")
    assert all(isinstance(r, StepResult) for r in results), results
    assert relative_error(flats[0], mu) > 100  # (4 mu - 1000 mu) / 5: about 200


def test_a_huge_claimed_weight_is_capped(swarm):
    """The attacker claims a batch of 1e6 samples: robust mode counts it as a median peer."""
    results, flats, mu, med = run_round(swarm, "weight-median", "median", "shift", attacker_weight=1e6)
    assert all(isinstance(r, StepResult) for r in results), results
    shift = 5.0 * flats[0].numel() ** 0.5
    assert float((flats[0].double() - med).norm()) < 0.1 * shift  # the median of 5 rows, one of them shifted
    results, flats, mu, _ = run_round(swarm, "weight-mean", "mean", "shift", attacker_weight=1e6)
    assert all(isinstance(r, StepResult) for r in results), results
    assert float((flats[0].double() - mu).norm()) > 0.99 * shift  # the plain weighted mean trusts the claim


def test_a_nan_contribution_is_excluded_before_aggregation(swarm):
    """The NaN sender is excluded by the all-reduce, and the aggregator reduces the others. (Known
    collateral, an all-reduce matter: the excluded attacker, as a part owner itself, sometimes times out
    an honest peer too, which then fails this round; so we ask for 3 of the 4 honest peers.)"""
    results, flats, mu, _ = run_round(swarm, "nan-cclip", "centered_clip", "nan")
    attacker = swarm[-1].peer_id
    done = [i for i, r in enumerate(results[:-1]) if isinstance(r, StepResult)]
    assert len(done) >= PEERS - 2, results
    assert not isinstance(results[-1], StepResult)  # the attacker itself was excluded
    for i in done:
        assert attacker not in results[i].survivors
        assert results[i].survivors == results[done[0]].survivors
        assert torch.equal(flats[i], flats[done[0]])
    assert relative_error(flats[done[0]], mu) < 0.3


def test_b4_butterfly_clip_with_a_huge_tau_is_the_mean(swarm):
    """Design check B4: honest peers only, tau = 1e9: every peer ends with the mean, bit-identical."""
    tensors = honest_tensors(1)
    expected = torch.stack([flatten(ts) for ts in tensors]).double().mean(0)
    reducer = aggregators.as_reducer(aggregators.get("centered_clip", tau=1e9))
    with averagers(swarm, "b4", tensors, reducer) as group:
        results = step_all(group)
        flats = [flatten(a.tensors) for a in group]
    assert all(isinstance(r, StepResult) for r in results), results
    assert len({tuple(s for s, _, _ in r.parts) for r in results}) == 1 and len(results[0].parts) > 1
    for flat in flats:
        assert torch.equal(flat, flats[0])
    assert torch.allclose(flats[0].double(), expected, rtol=0, atol=1e-5)
