"""Pipeline control plane: the rebalancing decision (algorithms.md 1.9 S6) and the stage step."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from swarm.pipeline.rebalance import capacities, choose_stage, leximin_better, plan_move

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
    with pytest.raises(ValueError):
        choose_stage([], [1.0], can_host=lambda s: False)
