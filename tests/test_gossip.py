"""Push-sum gossip over real sockets: 16 peers converge to the global mean; mass is conserved."""

import concurrent.futures

import pytest
import torch

from averaging import Gossip
from dht import DHT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def swarm():
    first = DHT(host="127.0.0.1")
    dhts = [first] + [DHT(initial_peers=first.get_visible_addresses(), host="127.0.0.1") for _ in range(15)]
    yield dhts
    for d in dhts:
        d.shutdown()


def test_sixteen_peers_converge_to_the_weighted_mean(swarm):
    torch.manual_seed(0)
    tensors = [[torch.randn(257), torch.randn(3, 5)] for _ in swarm]
    weights = [1.0 + i % 4 for i in range(len(swarm))]
    target = [sum(w * t[k].double() for w, t in zip(weights, tensors)) / sum(weights) for k in range(2)]
    spread = max(float((t[k].double() - target[k]).abs().max()) for t in tensors for k in range(2))
    total_s = sum(w * torch.cat([t[0].reshape(-1), t[1].reshape(-1)]).double() for w, t in zip(weights, tensors))
    gossips = [Gossip(t, d, "test-gossip", weight=w, declare_period=60, rng=__import__("random").Random(i))
               for i, (t, d, w) in enumerate(zip(tensors, swarm, weights))]
    try:
        deviations = []
        with concurrent.futures.ThreadPoolExecutor(len(gossips)) as pool:
            for round_ in range(60):
                assert all(pool.map(lambda g: g.step(), gossips))
                # mass conservation: the sums over the swarm never change
                assert abs(sum(g.w for g in gossips) - sum(weights)) < 1e-9 * sum(weights)
                assert torch.allclose(sum(g.s for g in gossips), total_s, rtol=0, atol=1e-9 * float(total_s.abs().sum()))
                deviation = max(float((t[k].double() - target[k]).abs().max()) for t in tensors for k in range(2))
                deviations.append(deviation)
                if deviation < 1e-3 * spread:
                    break
        print(f"gossip: {len(deviations)} rounds to reach {deviations[-1] / spread:.1e} of the initial spread; "
              f"{sum(g.bytes_sent for g in gossips) / len(gossips) / 1e3:.1f} kB sent per peer")
        assert deviations[-1] < 1e-3 * spread
        assert len(deviations) <= 40  # push-sum: O(log N + log 1/eps) rounds (about 25 for N=16 here)
    finally:
        for g in gossips:
            g.shutdown()


def test_a_failed_push_is_reabsorbed(swarm):
    dead = DHT(initial_peers=swarm[0].get_visible_addresses(), host="127.0.0.1")
    tensors = [torch.ones(10)]
    alive = Gossip(tensors, swarm[0], "test-gossip-failure", weight=2.0, declare_period=60)
    ghost = Gossip([torch.zeros(10)], dead, "test-gossip-failure", declare_period=60)
    try:
        ghost.step()  # declares itself
        dead.shutdown()  # vanishes without leaving
        before_s, before_w = alive.s.clone(), alive.w
        assert alive.step(timeout=5) is False  # the only other peer is gone
        assert alive.w == before_w and torch.equal(alive.s, before_s)
        assert torch.equal(tensors[0], torch.ones(10))
    finally:
        alive.shutdown()
