"""Load balancing of the butterfly (algorithms.md §5.3): checks L1-L4, the LP optimum, Hagenbach-Bischoff.

Peer i sends and receives D·(1 + (N − 2)·f_i) values in a round, so with bandwidths b_i the round
takes max over peers with b_i > 0 of (1 + (N − 2) f_i)/b_i (unit D). Client-mode peers (b = 0) own
nothing; unknown bandwidths (None) count as the mean of the known ones.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from averaging.load_balancing import hagenbach_bischoff, optimal_fractions, part_sizes


def round_time(bandwidths: list[float], fractions: list[float]) -> float:
    """Seconds per unit of vector for the butterfly with these fractions (algorithms.md §5.3)."""
    n = len(bandwidths)
    return max((1 + (n - 2) * f) / b for b, f in zip(bandwidths, fractions) if b > 0)


# ---------------------------------------------------------------------------------------------
# L1-L4
# ---------------------------------------------------------------------------------------------

CHECKS = [  # (bandwidths, fractions, time, time with a uniform split)
    ("L1", [100, 100, 100, 100], [0.25, 0.25, 0.25, 0.25], 0.015, 0.015),
    ("L2", [100, 100, 50, 50], [0.5, 0.5, 0, 0], 0.020, 0.030),
    ("L3", [10, 20, 30, 40, 50], [0, 0, 1 / 6, 1 / 3, 1 / 2], 0.100, 0.160),
    ("L4", [1000] + [100] * 7, [1] + [0] * 7, 0.010, 0.0175),
]


@pytest.mark.parametrize("name,bandwidths,expected,time,uniform_time", CHECKS, ids=[c[0] for c in CHECKS])
def test_checks_l1_to_l4(name, bandwidths, expected, time, uniform_time):
    fractions = optimal_fractions(bandwidths)
    assert fractions == pytest.approx(expected, abs=1e-12)
    assert round_time(bandwidths, fractions) == pytest.approx(time, rel=1e-9)
    assert round_time(bandwidths, [1 / len(bandwidths)] * len(bandwidths)) == pytest.approx(uniform_time, rel=1e-9)


def test_hagenbach_bischoff_examples():
    assert hagenbach_bischoff(10, [0.5, 0.3, 0.2]) == [5, 3, 2]
    assert hagenbach_bischoff(7, [1, 1, 1]) == [3, 2, 2]
    assert hagenbach_bischoff(0, [1, 2]) == [0, 0]
    assert hagenbach_bischoff(5, [0, 1, 0]) == [0, 5, 0]


def test_two_or_fewer_peers_split_in_proportion_to_bandwidth():
    assert optimal_fractions([30, 10]) == pytest.approx([0.75, 0.25])
    assert optimal_fractions([7]) == [1.0]
    assert optimal_fractions([0, 5]) == [0.0, 1.0]


def test_client_mode_peers_and_unknown_bandwidths():
    assert optimal_fractions([0, 100, 0, 100, 100]) == pytest.approx([0, 1 / 3, 0, 1 / 3, 1 / 3])
    # None counts as the mean of the known bandwidths (100): same as everyone at 100
    assert optimal_fractions([None, 100, 100, 100]) == pytest.approx([0.25] * 4)
    assert optimal_fractions([None, None, None]) == pytest.approx([1 / 3] * 3)
    assert optimal_fractions([None, 0, None]) == pytest.approx([0.5, 0, 0.5])


def test_bad_input_raises():
    with pytest.raises(ValueError, match="bandwidth > 0"):
        optimal_fractions([0, 0, 0])
    with pytest.raises(ValueError):
        hagenbach_bischoff(5, [0, 0])
    with pytest.raises(ValueError):
        hagenbach_bischoff(-1, [1])
    with pytest.raises(ValueError):
        hagenbach_bischoff(5, [1, -1])
    with pytest.raises(ValueError):
        part_sizes(100, [0.0, 0.0])


def test_min_part_drops_tiny_shares():
    # fractions [.5, .5, 0, 0] at 10 000 values, min_part 100: unchanged
    assert part_sizes(10_000, [100, 100, 50, 50], min_part=100) == [5000, 5000, 0, 0]
    sizes = part_sizes(1000, [1000, 990, 100, 100], min_part=0)
    small = min(s for s in sizes if s > 0)
    dropped = part_sizes(1000, [1000, 990, 100, 100], min_part=small + 1)
    assert sum(dropped) == 1000 and dropped.count(0) > sizes.count(0)
    assert all(s == 0 or s > small for s in dropped)
    # when even the largest share is below min_part, nothing is dropped (someone must reduce)
    assert sum(part_sizes(10, [1, 1, 1], min_part=100)) == 10


# ---------------------------------------------------------------------------------------------
# properties
# ---------------------------------------------------------------------------------------------

bandwidth = st.one_of(st.just(0.0), st.none(), st.floats(0.01, 1e4))
bandwidth_lists = st.lists(bandwidth, min_size=1, max_size=24).filter(lambda bs: any(b is None or b > 0 for b in bs))


def effective(bandwidths: list[float | None]) -> list[float]:
    known = [b for b in bandwidths if b is not None and b > 0]
    mean = sum(known) / len(known) if known else 1.0
    return [mean if b is None else b for b in bandwidths]


@settings(max_examples=300, deadline=None)
@given(bandwidth_lists)
def test_fractions_are_a_distribution_and_client_peers_get_none(bandwidths):
    fractions = optimal_fractions(bandwidths)
    assert len(fractions) == len(bandwidths)
    assert all(f >= 0 for f in fractions)
    assert math.fsum(fractions) == pytest.approx(1.0, abs=1e-12)
    for b, f in zip(bandwidths, fractions):
        if b == 0:
            assert f == 0


@settings(max_examples=300, deadline=None)
@given(bandwidth_lists)
def test_fractions_are_monotone_in_bandwidth(bandwidths):
    """A faster peer never reduces less than a slower one."""
    fractions = optimal_fractions(bandwidths)
    bw = effective(bandwidths)
    for i in range(len(bw)):
        for j in range(len(bw)):
            if bw[i] > bw[j]:
                assert fractions[i] >= fractions[j] - 1e-12


@settings(max_examples=200, deadline=None)
@given(bandwidth_lists, st.data())
def test_raising_a_peers_bandwidth_never_lowers_its_share(bandwidths, data):
    bw = effective(bandwidths)
    i = data.draw(st.integers(0, len(bw) - 1))
    factor = data.draw(st.floats(1.0, 10.0))
    faster = list(bw)
    faster[i] = bw[i] * factor if bw[i] > 0 else data.draw(st.floats(0.01, 1e4))
    assert optimal_fractions(faster)[i] >= optimal_fractions(bw)[i] - 1e-9


@settings(max_examples=150, deadline=None)
@given(bandwidth_lists.filter(lambda bs: len(bs) >= 3))
def test_closed_form_matches_the_linear_program(bandwidths):
    """The closed form reaches the optimum of the LP hivemind solves with scipy (minimise ξ subject to
    (1 + (N − 2) f_i)/b_i <= ξ, Σ f = 1, f >= 0, f_i = 0 where b_i = 0)."""
    optimize = pytest.importorskip("scipy.optimize")
    bw = effective(bandwidths)
    n = len(bw)
    fractions = optimal_fractions(bandwidths)
    # variables (f_1..f_n, ξ); rows: (N − 2) f_i − b_i ξ <= −1 for b_i > 0
    a_ub, b_ub = [], []
    for i, b in enumerate(bw):
        if b > 0:
            row = [0.0] * (n + 1)
            row[i], row[n] = n - 2, -b
            a_ub.append(row)
            b_ub.append(-1.0)
    bounds = [(0, 0) if b == 0 else (0, None) for b in bw] + [(0, None)]
    lp = optimize.linprog([0.0] * n + [1.0], A_ub=a_ub, b_ub=b_ub, A_eq=[[1.0] * n + [0.0]], b_eq=[1.0],
                          bounds=bounds, method="highs")
    assert lp.success
    assert round_time(bw, fractions) == pytest.approx(lp.fun, rel=1e-6)


@settings(max_examples=200, deadline=None)
@given(bandwidth_lists.filter(lambda bs: len(bs) >= 2), st.data())
def test_no_split_is_faster(bandwidths, data):
    """Neither the uniform split nor any random split among non-client peers beats the closed form."""
    bw = effective(bandwidths)
    fractions = optimal_fractions(bandwidths)
    best = round_time(bw, fractions)
    servers = [i for i, b in enumerate(bw) if b > 0]
    uniform = [1 / len(servers) if b > 0 else 0.0 for b in bw]
    assert best <= round_time(bw, uniform) * (1 + 1e-9)
    weights = data.draw(st.lists(st.floats(0, 1), min_size=len(servers), max_size=len(servers)))
    if sum(weights) > 0:
        other = [0.0] * len(bw)
        for i, w in zip(servers, weights):
            other[i] = w / sum(weights)
        assert best <= round_time(bw, other) * (1 + 1e-9)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 10 ** 9), st.lists(st.floats(0, 1e6), min_size=1, max_size=30).filter(lambda s: sum(s) > 0))
def test_hagenbach_bischoff_properties(total, scores):
    alloc = hagenbach_bischoff(total, scores)
    assert sum(alloc) == total and all(a >= 0 for a in alloc)
    quota = [total * s / sum(scores) for s in scores]
    for a, q, s in zip(alloc, quota, scores):
        assert a >= math.floor(q) - 1e-6 * total  # at least the floor of its proportional share
        assert a <= q + len(scores)
        if s == 0:
            assert a == 0
    for i in range(len(scores)):
        for j in range(len(scores)):
            if scores[i] > scores[j]:
                assert alloc[i] >= alloc[j]


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 10 ** 8), bandwidth_lists, st.integers(0, 10 ** 6))
def test_part_sizes_sum_to_the_vector_and_clients_get_nothing(total, bandwidths, min_part):
    sizes = part_sizes(total, bandwidths, min_part=min_part)
    assert len(sizes) == len(bandwidths) and sum(sizes) == total and all(s >= 0 for s in sizes)
    for b, s in zip(bandwidths, sizes):
        if b == 0:
            assert s == 0
    bw = effective(bandwidths)
    for i in range(len(bw)):
        for j in range(len(bw)):
            if bw[i] > bw[j]:
                assert sizes[i] >= sizes[j]
