"""Pipeline control plane: the rebalancing decision (algorithms.md 1.9 S6) and the stage step."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from swarm.pipeline.rebalance import capacities, choose_stage, compute_to_comm_ratio, leximin_better, plan_move

T = 300.0


@dataclass
class Rec:
    peer_id: str
    stage: int
    samples_per_s: float
    queue: int = 2
    last_moved_at: float = -1e9


def swarm_of(speeds_per_stage: list[list[float]]) -> list[Rec]:
    return [Rec(f"peer{s}-{i}", s, tau) for s, speeds in enumerate(speeds_per_stage) for i, tau in enumerate(speeds)]


def simulate(records: list[Rec], periods: int, costs: list[float] | None = None) -> tuple[list[int], list[list[float]]]:
    """Every period all peers decide from the same snapshot; the chosen one moves. Returns
    (migrations per period, capacities after each period)."""
    costs = costs or [1.0] * (1 + max(r.stage for r in records))
    moves, history = [], []
    for period in range(periods):
        now = period * T
        plan = plan_move(records, costs, period=period, now=now, period_seconds=T)
        if plan is not None:
            mover = next(r for r in records if r.peer_id == plan.peer_id)
            assert mover.stage == plan.source
            mover.samples_per_s *= costs[plan.source] / costs[plan.target]  # same rho on the new stage
            mover.stage, mover.last_moved_at = plan.target, now
        moves.append(int(plan is not None))
        history.append(capacities(records, costs))
    return moves, history


def test_s6_one_migration_then_stable():
    records = swarm_of([[1] * 4, [1], [1] * 2, [1] * 3])
    moves, history = simulate(records, 11)
    assert moves == [1] + [0] * 10
    assert sorted(history[-1]) == [2, 2, 3, 3]


def test_s6_ties_between_slow_stages_resolved():
    records = swarm_of([[1] * 2, [1] * 2, [1] * 4, [1] * 4])  # pure min-improvement deadlocks here
    moves, history = simulate(records, 12)
    assert sum(moves) == 2
    assert history[-1] == [3, 3, 3, 3]


def test_s6_mixed_speeds_min_capacity_reaches_two_within_two_periods():
    records = swarm_of([[3, 1], [1], [1, 1, 1, 1], [0.5, 0.5]])
    _, history = simulate(records, 2)
    assert min(history[1]) >= 2 - 1e-9


def test_leximin_hysteresis():
    assert leximin_better([2, 2, 3, 3], [1, 2, 3, 4])
    assert not leximin_better([2, 2, 3, 3], [3, 2, 2, 3])  # a permutation is no better
    assert not leximin_better([3.05, 3, 3, 3], [3, 3, 3, 3])  # within h * min(c)
    assert not leximin_better([1, 4, 4, 4], [2, 2, 4, 4])


def test_backlog_trigger_and_refill():
    records = swarm_of([[1] * 4, [1], [1] * 2, [1] * 3])
    for r in records:
        r.queue = 0
    assert plan_move(records, [1.0] * 4, period=0, now=0, period_seconds=T) is None  # nobody is backlogged
    records = swarm_of([[1] * 3, [], [1] * 2, [1]])
    for r in records:
        r.queue = 0
    plan = plan_move(records, [1.0] * 4, period=0, now=0, period_seconds=T)
    assert plan is not None and plan.target == 1 and plan.source == 0  # an empty stage is refilled at once


def test_unmeasured_server_refills_an_empty_stage():
    records = [Rec("a", 0, 0.0), Rec("b", 0, 0.0), Rec("c", 1, 0.0)]
    plan = plan_move(records, [1.0, 1.0, 1.0], period=0, now=0, period_seconds=T)
    assert plan is not None and plan.target == 2 and plan.source == 0


def test_cooldown_memory_and_min_peers():
    records = swarm_of([[1] * 4, [1]])
    for r in records:
        r.last_moved_at = 0.0  # all moved recently
    assert plan_move(records, [1.0, 1.0], period=1, now=T, period_seconds=T) is None
    records = swarm_of([[1] * 4, [1]])
    assert plan_move(records, [1.0, 1.0], period=1, now=T, period_seconds=T,
                     can_host=lambda r, stage: stage != 1) is None
    assert plan_move(swarm_of([[1], [1]]), [1.0, 1.0], period=0, now=0, period_seconds=T) is None
    with pytest.raises(ValueError):
        plan_move(records, [1.0, 0.0], period=0, now=0, period_seconds=T)


def test_costs_predict_speed_on_another_stage():
    # stage 1 costs 4x per sample: one unit-rho peer there serves 0.25 samples/s
    records = [Rec("a", 0, 1.0), Rec("b", 0, 1.0), Rec("c", 0, 1.0), Rec("d", 1, 0.25)]
    assert capacities(records, [1.0, 4.0]) == [3.0, 0.25]
    plan = plan_move(records, [1.0, 4.0], period=0, now=0, period_seconds=T)
    assert plan is not None and plan.target == 1 and plan.after == (2.0, 0.5)


def test_single_decision_every_peer_agrees():
    records = swarm_of([[1] * 4, [1] * 1, [1] * 4, [1] * 1])
    plans = {plan_move(list(reversed(records)) if i % 2 else records, [1.0] * 4, period=7, now=0,
                       period_seconds=T) for i in range(4)}
    assert len(plans) == 1


def test_choose_stage_auto():
    assert choose_stage(swarm_of([[1], [], [1]]), [1.0, 1.0, 1.0]) == 1
    assert choose_stage(swarm_of([[1, 1], [1], [1, 1]]), [1.0, 1.0, 1.0]) == 1
    assert choose_stage(swarm_of([[1, 1], [1], [1, 1]]), [1.0, 1.0, 1.0], can_host=lambda s: s != 1) == 0
    # nobody measured yet (servers that just started): the stage with the fewest servers
    assert choose_stage(swarm_of([[0, 0], [0], [0, 0], [0]]), [1.0] * 4) == 1
    # an unmeasured server counts at the others' mean speed: stage 1 is not seen as empty
    assert choose_stage(swarm_of([[1, 1], [0, 1], [1]]), [1.0] * 3) == 2
    with pytest.raises(ValueError):
        choose_stage([], [1.0], can_host=lambda s: False)


# ---------------------------------------------------------------- the stage step (algorithms.md 1.4)

class _Accumulating:
    """What a StageStepper steps: a stage module whose ``.grad`` the backward calls accumulate (the
    calls are made by the test itself, as a StageServer's backward would), and the samples count."""

    def __init__(self, module):
        import asyncio
        self.stage, self.module = 1, module
        self.samples_accumulated = 0
        self._lock = asyncio.Lock()
        self.paused_count = 0

    def backward(self, x, y):  # a summed per-sample loss, as trainers send it
        loss = ((self.module(x) - y) ** 2).sum()
        loss.backward()
        self.samples_accumulated += len(x)

    def reset_accumulated(self):
        self.samples_accumulated = 0

    def paused(self):
        self.paused_count += 1
        return self._lock


def test_stage_servers_average_and_step_together_replicas_stay_identical(tmp_path):
    import threading
    import time

    import torch

    from dht import DHT
    from swarm.pipeline.stage_training import StageStepper

    first = DHT(host="127.0.0.1")
    second = DHT(initial_peers=first.get_visible_addresses(), host="127.0.0.1")
    steppers = []
    try:
        servers = []
        for _ in range(2):
            torch.manual_seed(3)  # what Task.build_stage does: the same initial weights on every server
            servers.append(_Accumulating(torch.nn.Linear(8, 2)))
        initial = [p.detach().clone() for p in servers[0].module.parameters()]
        g = torch.Generator().manual_seed(0)
        data = [(torch.randn(16, 8, generator=g), torch.randn(16, 2, generator=g)) for _ in range(4)]
        for i, (x, y) in enumerate(data):  # 48 samples on the first server, 16 on the second
            servers[0 if i < 3 else 1].backward(x, y)
        for dht, server in zip((first, second), servers):
            steppers.append(StageStepper(dht, "ptest", server, lambda p: torch.optim.SGD(p, lr=0.01),
                                         target_batch_size=64, matchmaking_time=1.0, averaging_timeout=10))
        results = [False, False]

        def run(i):
            deadline = time.monotonic() + 40
            while not results[i] and time.monotonic() < deadline:
                results[i] = steppers[i].handover()
                time.sleep(0.1)
        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results == [True, True]
        assert all(s.epoch == 1 and s.steps == 1 for s in steppers)
        assert steppers[0].opt.last_averaging is not None and steppers[0].opt.bytes_sent > 0, "no averaging"
        # the reference: one SGD step on the mean gradient of all 64 samples
        reference = torch.nn.Linear(8, 2)
        with torch.no_grad():
            for p, v in zip(reference.parameters(), initial):
                p.copy_(v)
        x = torch.cat([d[0] for d in data])
        y = torch.cat([d[1] for d in data])
        ((reference(x) - y) ** 2).sum(dim=1).mean().backward()
        for a, b, r in zip(servers[0].module.parameters(), servers[1].module.parameters(), reference.parameters()):
            assert torch.equal(a, b), "the replicas of the stage differ"
            assert torch.allclose(a, r - 0.01 * r.grad, atol=1e-6)
        assert all(s.samples_accumulated == 0 and s.module.weight.grad is None for s in servers)
        assert all(s.paused_count >= 1 for s in servers)
    finally:
        for s in steppers:
            s.shutdown()
        second.shutdown()
        first.shutdown()


def test_s7_square_cube_ratio():
    """S7 (algorithms.md 1.9): ratio(d=4096, L=1, B=62.5e6, F=25e12) = 0.4915 +- 1e-3; the table of 1.6."""
    assert compute_to_comm_ratio(4096, 1, 62.5e6, 25e12) == pytest.approx(0.4915, abs=1e-3)
    assert compute_to_comm_ratio(1024, 1, 62.5e6, 25e12) == pytest.approx(0.12, abs=5e-3)
    assert compute_to_comm_ratio(12288, 1, 62.5e6, 150e12) == pytest.approx(0.25, abs=5e-3)
    assert compute_to_comm_ratio(4096, 3, 62.5e6, 25e12) >= 1  # 3 layers per stage at d = 4096 on a T4
    with pytest.raises(ValueError):
        compute_to_comm_ratio(0, 1, 62.5e6, 25e12)
