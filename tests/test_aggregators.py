"""Aggregators (averaging.aggregators) against the numeric checks of algorithms.md (§2.6 B1-B3, §3.8 F1-F5,
§4.11, §8.1), hypothesis properties, error cases; and the attack harness (averaging.attacks)."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from averaging import aggregators as A
from averaging import attacks
from averaging.aggregators import TooFewInputs

NAMES = A.names()
TRANSLATION_EQUIVARIANT = ["mean", "median", "trimmed_mean", "geometric_median", "krum", "multi_krum", "bulyan",
                           "centered_clip"]
REPLICATION = {"mean": {}, "median": {}, "trimmed_mean": {}, "geometric_median": {"tol": 1e-14, "nu": 1e-13, "max_iters": 5000},
               "centered_clip": {"eps": 1e-12}, "clipped_mean": {}, "flag_aggregate": {"m": 2}}
PROPERTY = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def min_n(name: str) -> int:
    return 3 if name in ("krum", "multi_krum", "bulyan") else 1


# ------------------------------------------------------------------------------------------------ fixtures

def t13(seed: int, honest: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """T13 (T15 with honest=12): N(0,1) honest rows, 3 attackers at 1000·1; float64, d=1000."""
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((honest, 1000))
    return torch.tensor(np.vstack([h, np.full((3, 1000), 1000.0)])), torch.tensor(h.mean(0))


def hs13(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HS13 honest part: shared m ~ N(0, I), rows m + N(0, I); 10 rows, d=1000. Returns (honest, μ_H)."""
    rng = np.random.default_rng(seed)
    m = rng.standard_normal(1000)
    h = torch.tensor(m + rng.standard_normal((10, 1000)))
    return h, h.mean(0)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


SEEDS = range(20)


# ------------------------------------------------------------------------------------------------ §4.11 on T13

@pytest.mark.parametrize("name, params, bound", [
    ("median", {}, 16), ("trimmed_mean", {"b": 3}, 17), ("geometric_median", {}, 11),
    ("centered_clip", {"tau": 10}, 11), ("krum", {"f": 3}, 33), ("multi_krum", {"f": 3, "m": 8}, 7),
    ("clipped_mean", {}, 9), ("multi_krum", {"f": 3}, 1e-9),
])
def test_baselines_on_t13(name, params, bound):
    f = A.get(name, **params)
    for seed in SEEDS:
        x, mu = t13(seed)
        assert float((f(x) - mu).norm()) < bound, (name, seed)


def test_the_t13_attack_works_on_the_mean():
    for seed in SEEDS:
        x, mu = t13(seed)
        assert float((A.mean(x) - mu).norm()) > 5000


def test_krum_selects_an_honest_row():
    for seed in SEEDS:
        x, _ = t13(seed)
        out = A.krum(x, f=3)
        assert any(torch.equal(out, row) for row in x[:10])


def test_bulyan_on_t15_selects_no_attacker():
    from averaging.aggregators import _bulyan_select
    for seed in SEEDS:
        x, mu = t13(seed, honest=12)
        assert max(_bulyan_select(x, 3)) < 12
        assert float((A.bulyan(x, f=3) - mu).norm()) < 13


def test_geometric_median_and_centered_clip_agree_on_t13():
    for seed in range(5):
        x, _ = t13(seed)
        gm = A.geometric_median(x, tol=1e-15, max_iters=20000)
        cc = A.centered_clip(x, tau=10, eps=1e-13, max_iters=1000)
        assert float((gm - cc).norm()) < 1e-6


# ------------------------------------------------------------------------------------------------ §2.6 CenteredClip

def test_b1_centered_clip_converges_from_the_median():
    for seed in SEEDS:
        x, mu = t13(seed)
        plain = A.centered_clip_solve(x, tau=10, solver="plain", eps=1e-7)  # residual = step <= 1e-6
        irls = A.centered_clip_solve(x, tau=10, eps=1e-7)
        assert plain.converged and plain.iterations <= 100 and plain.residual <= 1e-6
        assert irls.converged and irls.iterations <= 20
        assert float((plain.value - irls.value).norm()) <= 1e-4
        assert float((irls.value - mu).norm()) < 11


def test_b2_centered_clip_large_tau_is_the_weighted_mean():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 300, generator=g, dtype=torch.float64) * 5
    w = torch.rand(9, generator=g, dtype=torch.float64) + 0.1
    assert torch.allclose(A.centered_clip(x, w, tau=1e9), A.mean(x, w), rtol=0, atol=1e-9)
    same = x[0].expand(7, -1)
    assert torch.allclose(A.centered_clip(same), x[0], rtol=0, atol=1e-12)
    assert torch.allclose(A.centered_clip(same, tau=1.0), x[0], rtol=0, atol=1e-12)


def test_b3_a_bad_start_is_not_accepted_as_converged(caplog):
    x, mu = t13(0)
    result = A.centered_clip_solve(x, tau=10, solver="plain", init="mean", max_iters=1000, eps=1e-7)
    assert not result.converged and result.residual > 1e-6 and result.iterations == 1000
    assert float((result.value - mu).norm()) > 1000  # the known failure: 1913 away after 1000 iterations
    with caplog.at_level(logging.WARNING, logger="averaging.aggregators"):
        A.centered_clip(x, tau=10, solver="plain", init="mean", max_iters=50)
    assert "did not converge" in caplog.text


def test_centered_clip_accepts_a_previous_aggregate_as_start():
    x, mu = t13(3)
    out = A.centered_clip(x, tau=10, init=mu.clone())
    assert float((out - mu).norm()) < 11
    with pytest.raises(ValueError, match="init"):
        A.centered_clip(x, init=torch.zeros(5))
    with pytest.raises(ValueError, match="init"):
        A.centered_clip(x, init="somewhere")


# ------------------------------------------------------------------------------------------------ §3.8 Flag Aggregator

def naive_flag(x: np.ndarray, m: int, iters: int, lam: float = 0.0, eps: float = 1e-7) -> np.ndarray:
    """The reference IRLS with explicit SVDs of the d x (p + p(p-1)) column matrix (design §3.2-3.3)."""
    p = x.shape[0]
    xh = x / np.linalg.norm(x, axis=1, keepdims=True)
    a = np.ones(p)
    b = np.full((p, p), lam / (p * (p - 1)) * (1 + eps) ** -0.25)
    previous, best = float(p), None
    for k in range(1, iters + 1):
        cols = [a[i] * xh[i] for i in range(p)]
        if lam > 0:
            cols += [b[i, j] * (xh[i] - xh[j]) for i in range(p) for j in range(p) if i != j]
        u = np.linalg.svd(np.stack(cols, axis=1), full_matrices=False)[0][:, :m]
        v = ((u.T @ xh.T) ** 2).sum(axis=0)
        energy = np.sqrt(np.clip(1 - v, 0, None)).sum()
        if k > 1 and energy > previous:
            break
        best = u
        if previous - energy <= 1e-10 or energy <= 1e-10:
            break
        previous = energy
        a = (np.abs(1 - v) + eps) ** -0.25
        if lam > 0:
            for i in range(p):
                for j in range(p):
                    b[i, j] = lam / (p * (p - 1)) * (abs(1 - ((u.T @ (xh[i] - xh[j])) ** 2).sum()) + eps) ** -0.25
    return (best @ (best.T @ xh.T)).sum(axis=1) / m


@pytest.mark.parametrize("lam", [0.0, 4.0])
def test_f1_coefficient_space_matches_the_naive_svd(lam):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((13, 500)) + 0.5 * rng.standard_normal(500)
    expected = naive_flag(x, m=5, iters=3, lam=lam)
    got = A.flag_aggregate(torch.tensor(x), m=5, iters=3, lam=lam, mode="reference").numpy()
    assert np.linalg.norm(got - expected) <= 1e-10 * np.linalg.norm(expected)


def test_f2_equal_inputs():
    g = torch.randn(200, dtype=torch.float64) * 3
    x = g.expand(13, -1).contiguous()
    assert torch.allclose(A.flag_aggregate(x, m=5, mode="reference"), 13 / 5 * g / g.norm(), rtol=0, atol=1e-9)
    assert torch.allclose(A.flag_aggregate(x, m=5), g, rtol=0, atol=1e-9)
    assert torch.allclose(A.flag_aggregate(x), g, rtol=0, atol=1e-9)


def test_f3_reference_output_is_bounded_and_ignores_scale():
    rng = np.random.default_rng(2)
    x = torch.tensor(rng.standard_normal((13, 300)) * rng.uniform(0.1, 100, (13, 1)))
    for m in (1, 3, 7):
        out = A.flag_aggregate(x, m=m, mode="reference")
        assert float(out.norm()) <= 13 / m + 1e-9
        scaled = x.clone()
        scaled[4] *= 37.5
        assert torch.allclose(A.flag_aggregate(scaled, m=m, mode="reference"), out, rtol=0, atol=1e-10)


@pytest.mark.parametrize("attack, bound", [("constant", 0.85), ("sign_flip", 0.90), ("uniform", 0.85)])
def test_f4_flag_aggregator_on_hs13(attack, bound):
    for seed in SEEDS:
        h, mu = hs13(seed)
        if attack == "constant":
            bad = torch.full((3, 1000), 1000.0, dtype=torch.float64)
        elif attack == "sign_flip":
            bad = -10 * h[:3]
        else:
            bad = torch.tensor(np.random.default_rng(100 + seed).uniform(0, 1, (3, 1000)))
        x = torch.cat([h, bad])
        assert cosine(A.flag_aggregate(x, m=7, iters=5, mode="reference"), mu) >= bound, seed
        if attack == "constant":
            assert abs(cosine(A.mean(x), mu)) < 0.1


def test_f5_energy_never_increases_and_the_best_subspace_is_returned():
    rng = np.random.default_rng(4)
    for seed in range(5):
        rng = np.random.default_rng(seed)
        x = torch.tensor(rng.standard_normal((13, 200)) + rng.standard_normal(200))
        result = A.flag_solve(x, m=4, iters=10)
        e = result.energies
        accepted = e[:result.best + 1]
        assert all(b <= a + 1e-12 for a, b in zip(accepted, accepted[1:]))
        assert e[result.best] == min(e)


def test_flag_aggregator_zero_inputs_get_no_weight():
    x = torch.randn(6, 50, dtype=torch.float64)
    with_zero = torch.cat([x, torch.zeros(2, 50, dtype=torch.float64)])
    out = A.flag_aggregate(with_zero, m=3)
    assert torch.isfinite(out).all()
    assert torch.allclose(out, A.flag_aggregate(x, m=3), atol=1e-12)
    assert torch.equal(A.flag_aggregate(torch.zeros(4, 10)), torch.zeros(10))


# ------------------------------------------------------------------------------------------------ §8.1 harness checks

def relative_error(out: torch.Tensor, mu: torch.Tensor) -> float:
    return float((out - mu).norm() / mu.norm())


def test_harness_sanity_on_hs13():
    """Qualitative expectations of algorithms.md §8.1 (observed relative errors on HS13)."""
    for seed in range(5):
        h, mu = hs13(seed)
        flip = attacks.make_inputs(h, 3, "sign_flip")
        assert relative_error(A.mean(flip), mu) > 100  # observed 253
        assert relative_error(A.multi_krum(flip, f=3), mu) < 1e-9
        assert relative_error(A.centered_clip(flip, tau=10), mu) < 0.5  # observed 0.23
        gauss = attacks.make_inputs(h, 3, "gaussian", generator=torch.Generator().manual_seed(seed))
        assert relative_error(A.mean(gauss), mu) > 10  # observed 25.6
        assert relative_error(A.multi_krum(gauss, f=3), mu) < 1e-9
        ipm_small = attacks.make_inputs(h, 3, "ipm")
        assert relative_error(A.krum(ipm_small, f=3), mu) > 1.0  # Krum picks the attacker (observed 1.10)
        ipm_large = attacks.make_inputs(h, 3, "ipm_large")
        assert relative_error(A.mean(ipm_large), mu) > 10  # observed 23.3
        assert relative_error(A.geometric_median(ipm_large), mu) < 0.5  # observed 0.29
        alie = attacks.make_inputs(h, 3, "alie")
        # ALIE is built to slip under robust rules: the median is worse than the mean
        assert relative_error(A.median(alie), mu) > relative_error(A.mean(alie), mu)


# ------------------------------------------------------------------------------------------------ properties

def sample(seed: int, n: int, d: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) * scale + torch.randn(d, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("name", NAMES)
@PROPERTY
@given(seed=st.integers(0, 10**6), n=st.integers(1, 9), d=st.integers(1, 12))
def test_permutation_invariance(name, seed, n, d):
    assume(n >= min_n(name))
    x = sample(seed, n, d)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    w = torch.rand(n, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64) + 0.5
    f = A.get(name)
    assert torch.allclose(f(x[perm]), f(x), rtol=1e-7, atol=1e-9)
    assert torch.allclose(f(x[perm], w[perm]), f(x, w), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("name", TRANSLATION_EQUIVARIANT)
@PROPERTY
@given(seed=st.integers(0, 10**6), n=st.integers(1, 9), d=st.integers(1, 12), shift=st.floats(-1e3, 1e3))
def test_translation_equivariance(name, seed, n, d, shift):
    assume(n >= min_n(name))
    x = sample(seed, n, d)
    c = torch.linspace(-1, 1, d, dtype=torch.float64) * shift
    f = A.get(name)
    assert torch.allclose(f(x + c), f(x) + c, rtol=1e-7, atol=1e-7 * (1 + abs(shift)))


@pytest.mark.parametrize("name", NAMES)
@PROPERTY
@given(seed=st.integers(0, 10**6), n=st.integers(1, 9), d=st.integers(1, 12),
       scale=st.one_of(st.floats(1e-3, 1e3), st.floats(-1e3, -1e-3)))
def test_scale_equivariance(name, seed, n, d, scale):
    """agg(c x) = c agg(x) for c != 0 (with the adaptive thresholds: tau, c, nu are relative)."""
    assume(n >= min_n(name))
    x = sample(seed, n, d)
    f = A.get(name)
    assert torch.allclose(f(scale * x), scale * f(x), rtol=1e-7, atol=1e-9 * abs(scale))


@pytest.mark.parametrize("name", NAMES)
@PROPERTY
@given(seed=st.integers(0, 10**6), n=st.integers(1, 9), d=st.integers(1, 12))
def test_identical_inputs_give_that_input(name, seed, n, d):
    assume(n >= min_n(name))
    row = sample(seed, 1, d, scale=10)[0]
    x = row.expand(n, -1).contiguous()
    assert torch.allclose(A.get(name)(x), row, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", sorted(REPLICATION))
@PROPERTY
@given(seed=st.integers(0, 10**6), n=st.integers(1, 6), d=st.integers(1, 10),
       counts=st.lists(st.integers(1, 4), min_size=6, max_size=6))
def test_integer_weights_are_replication(name, seed, n, d, counts):
    x = sample(seed, n, d)
    counts = counts[:n]
    replicated = torch.cat([x[i:i + 1].expand(c, -1) for i, c in enumerate(counts)])
    f = A.get(name, **REPLICATION[name])
    weighted = f(x, torch.tensor(counts, dtype=torch.float64))
    assert torch.allclose(weighted, f(replicated), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", NAMES)
def test_a_zero_input_gives_no_nan_and_runs_are_deterministic(name):
    x = sample(7, 8, 30)
    x[2] = 0
    out = A.get(name)(x)
    assert torch.isfinite(out).all()
    assert torch.equal(out, A.get(name)(x.clone()))
    assert torch.isfinite(A.get(name)(torch.zeros(5, 4))).all()


def test_zero_weight_rows_are_ignored():
    x = sample(3, 6, 10)
    w = torch.tensor([1.0, 0.0, 2.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    keep = w > 0
    for name in NAMES:
        f = A.get(name)
        assert torch.allclose(f(x, w), f(x[keep], w[keep]), atol=1e-12), name


# breakdown: f attackers at growing magnitude; robust rules stay bounded, the mean does not
BREAKDOWN = {  # name -> (largest f for n honest + f inputs, bound as a multiple of the honest radius)
    "median": (lambda n: (n - 1) // 2, None), "trimmed_mean": (lambda n: int(0.25 * n), None),
    "geometric_median": (lambda n: (n - 1) // 2, "geomedian"), "krum": (lambda n: (n - 3) // 2, 1.0),
    "multi_krum": (lambda n: (n - 3) // 2, 1.0), "bulyan": (lambda n: (n - 3) // 4, 1.0),
    "centered_clip": (lambda n: (n - 1) // 2, 6.0), "clipped_mean": (lambda n: (n - 1) // 2, "norm"),
    "flag_aggregate": (lambda n: (n - 1) // 2, "norm"),
}


@pytest.mark.parametrize("name", sorted(BREAKDOWN))
@PROPERTY
@given(seed=st.integers(0, 10**6), n=st.integers(3, 15), d=st.integers(1, 20),
       magnitude=st.floats(1e2, 1e12), collude=st.booleans())
def test_breakdown_bounded_below_the_breakdown_point(name, seed, n, d, magnitude, collude):
    max_f, bound = BREAKDOWN[name]
    f = max_f(n)
    assume(f >= 1)
    g = torch.Generator().manual_seed(seed)
    honest = torch.randn(n - f, d, generator=g, dtype=torch.float64) + 3
    direction = torch.randn(1 if collude else f, d, generator=g, dtype=torch.float64)
    bad = magnitude * direction / direction.norm(dim=1, keepdim=True) * torch.ones(f, 1, dtype=torch.float64)
    x = torch.cat([honest, bad])
    out = A.get(name)(x)
    mu = honest.mean(0)
    radius = float((honest - mu).norm(dim=1).max())
    if bound is None:  # coordinate-wise rules: inside the honest range in every coordinate
        assert (out >= honest.min(0).values - 1e-9).all() and (out <= honest.max(0).values + 1e-9).all()
    elif bound == "geomedian":  # ‖gm - z‖ <= 2(1 - δ)/(1 - 2δ) max_H ‖x_i - z‖
        delta = f / n
        assert float((out - mu).norm()) <= 2 * (1 - delta) / (1 - 2 * delta) * radius * (1 + 1e-4) + 1e-9
    elif bound == "norm":  # outputs no longer than the median norm <= the largest honest norm
        assert float(out.norm()) <= float(honest.norm(dim=1).max()) * (1 + 1e-9)
    else:
        assert float((out - mu).norm()) <= bound * radius + 1e-9


def test_the_mean_breaks_down():
    honest = sample(0, 10, 5)
    for magnitude in (1e3, 1e6):
        x = torch.cat([honest, torch.full((1, 5), magnitude, dtype=torch.float64)])
        assert float((A.mean(x) - honest.mean(0)).norm()) > magnitude / 20


# ------------------------------------------------------------------------------------------------ definitions

def test_median_and_trimmed_mean_definitions():
    x = torch.tensor([[1.0], [5.0], [2.0], [10.0]])
    assert float(A.median(x)) == 3.5  # even n: average of the two middle values
    assert float(A.median(x[:3])) == 2.0
    assert float(A.median(x, torch.tensor([3.0, 1.0, 1.0, 1.0]))) == 1.5  # weighted: 1,1,1,2,5,10
    assert float(A.trimmed_mean(x, b=1)) == 3.5
    assert float(A.trimmed_mean(x, beta=0.0)) == float(A.mean(x))
    assert float(A.trimmed_mean(x, beta=0.125)) == pytest.approx((0.5 * 1 + 2 + 5 + 0.5 * 10) / 3)


def test_bulyan_averages_the_values_closest_to_the_median():
    rng = np.random.default_rng(5)
    x = torch.tensor(rng.standard_normal((11, 40)))  # f = 2: θ = 7, β = 3
    from averaging.aggregators import _bulyan_select
    selected = x[_bulyan_select(x, 2)]
    med = selected.median(0).values
    closest = (selected - med).abs().argsort(0)[:3]
    assert torch.allclose(A.bulyan(x, f=2), selected.gather(0, closest).mean(0), atol=1e-12)


def test_clipped_mean_bounds_each_input():
    x = torch.tensor([[3.0, 4.0], [0.6, 0.8], [30.0, 40.0]], dtype=torch.float64)  # norms 5, 1, 50
    assert torch.allclose(A.clipped_mean(x), (x[0] + x[1] + x[2] / 10) / 3)  # c = median norm = 5
    assert torch.allclose(A.clipped_mean(x, c=1.0), (x[0] / 5 + x[1] + x[2] / 50) / 3)


def test_float32_input_and_output():
    x = torch.randn(6, 100)
    for name in NAMES:
        out = A.get(name)(x)
        assert out.dtype == torch.float32 and out.shape == (100,), name
        assert torch.allclose(out.double(), A.get(name)(x.double()), atol=1e-4), name


# ------------------------------------------------------------------------------------------------ errors

@pytest.mark.parametrize("name", NAMES)
def test_bad_inputs_raise(name):
    f = A.get(name)
    x = torch.randn(5, 4)
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[1, 2] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            f(y)
    for shape in [(4,), (2, 3, 4), (0, 4), (3, 0)]:
        with pytest.raises(ValueError, match="shape"):
            f(torch.randn(shape))
    with pytest.raises(ValueError, match="floating"):
        f(torch.ones(5, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="weights"):
        f(x, torch.ones(4))
    with pytest.raises(ValueError, match="weights"):
        f(x, torch.tensor([1.0, -1.0, 1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="weights"):
        f(x, torch.tensor([1.0, float("nan"), 1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="zero"):
        f(x, torch.zeros(5))


def test_too_few_inputs_and_bad_parameters():
    x = torch.randn(6, 4)
    with pytest.raises(TooFewInputs, match="2f"):
        A.krum(x, f=2)
    with pytest.raises(TooFewInputs):
        A.krum(x[:2])
    with pytest.raises(TooFewInputs, match="4f"):
        A.bulyan(x, f=1)
    with pytest.raises(TooFewInputs):
        A.multi_krum(x, f=3)
    with pytest.raises(TooFewInputs, match="2b"):
        A.trimmed_mean(x, b=3)
    with pytest.raises(ValueError, match="beta"):
        A.trimmed_mean(x, beta=0.5)
    with pytest.raises(ValueError, match="m must"):
        A.multi_krum(x, f=1, m=7)
    with pytest.raises(ValueError, match="tau"):
        A.centered_clip(x, tau=0)
    with pytest.raises(ValueError, match="tau"):
        A.centered_clip(x, tau=float("nan"))
    with pytest.raises(ValueError, match="solver"):
        A.centered_clip(x, solver="fast")
    with pytest.raises(ValueError, match="mode"):
        A.flag_aggregate(x, mode="other")
    with pytest.raises(ValueError, match="m must"):
        A.flag_aggregate(x, m=0)
    with pytest.raises(ValueError, match="lam"):
        A.flag_aggregate(x, lam=-1)
    with pytest.raises(ValueError, match="c must"):
        A.clipped_mean(x, c=-1)


def test_get_binds_parameters_and_rejects_unknown_ones():
    f = A.get("centered_clip", tau=2.5)
    assert f.__name__ == "centered_clip"
    x = torch.randn(7, 20)
    assert torch.equal(f(x), A.centered_clip(x, tau=2.5))
    assert A.get("median") is A.median
    with pytest.raises(ValueError, match="unknown aggregator"):
        A.get("average")
    with pytest.raises(ValueError, match="unknown parameters"):
        A.get("median", tau=1)
    assert set(NAMES) == {"mean", "median", "trimmed_mean", "geometric_median", "krum", "multi_krum", "bulyan",
                          "clipped_mean", "centered_clip", "flag_aggregate"}


# ------------------------------------------------------------------------------------------------ robust mode

def test_cap_weights():
    assert A.cap_weights(torch.tensor([1.0, 2.0, 3.0, 1e6])).tolist() == [1.0, 2.0, 2.5, 2.5]
    assert A.cap_weights(torch.tensor([1.0, 2.0, 3.0, 1e6]), max_weight_ratio=2).tolist() == [1.0, 2.0, 3.0, 5.0]
    assert A.cap_weights(torch.tensor([0.0, 4.0, 4.0])).tolist() == [0.0, 4.0, 4.0]
    with pytest.raises(ValueError):
        A.cap_weights(torch.ones(3), max_weight_ratio=0)


def test_reducer_caps_a_huge_claimed_weight():
    honest = torch.randn(4, 50) + 1
    x = torch.cat([honest, -100 * honest[:1]])
    w = torch.tensor([1.0, 1.0, 1.0, 1.0, 1e6])
    for name in ("median", "trimmed_mean", "centered_clip", "geometric_median"):
        out = A.as_reducer(A.get(name))(x, w)
        assert float((out - honest.mean(0)).norm()) < float((honest - honest.mean(0)).norm(dim=1).max()), name
        uncapped = A.get(name)(x, w.double())  # without the cap the liar wins
        assert float((uncapped - x[4]).norm()) < 1e-2 * float(x[4].norm()), name


def test_reducer_falls_back_to_the_median_for_small_groups(caplog):
    x = torch.randn(2, 10)
    reducer = A.as_reducer(A.get("krum"))
    with caplog.at_level(logging.WARNING, logger="averaging.aggregators"):
        out = reducer(x, torch.ones(2))
    assert torch.allclose(out, x.mean(0)) and "krum" in caplog.text
    with pytest.raises(TooFewInputs):
        A.as_reducer(A.krum, fallback=None)(x, torch.ones(2))


def test_reducer_chunkwise_only_for_coordinatewise_rules():
    assert A.as_reducer(A.get("median")).chunkwise
    assert A.as_reducer(A.get("trimmed_mean", beta=0.1)).chunkwise
    assert not A.as_reducer(A.get("centered_clip")).chunkwise
    assert A.as_reducer(A.get("flag_aggregate")).__name__ == "flag_aggregate"


def test_averager_resolves_names():
    from averaging.averager import _resolve_reducer
    name, reducer = _resolve_reducer("centered_clip")
    assert name == "centered_clip"
    x = torch.randn(5, 30)
    assert torch.allclose(reducer(x, torch.ones(5)), A.centered_clip(x), atol=1e-6)
    with pytest.raises(ValueError, match="unknown aggregator"):
        _resolve_reducer("nonsense")


# ------------------------------------------------------------------------------------------------ attacks

def test_attack_parameters_of_the_catalogue():
    assert attacks.alie_z(16, 7) == pytest.approx(1.150, abs=1e-3)
    assert attacks.alie_z(13, 3) == pytest.approx(0.502, abs=1e-3)
    h = torch.randn(5, 30, dtype=torch.float64)
    own = h[torch.arange(3) % 5]
    assert torch.equal(attacks.sign_flip(h, 3), -1000 * own)
    assert torch.equal(attacks.get("sign_flip", scale=10)(h, 3), -10 * own)
    assert torch.equal(attacks.scaling(h, 3), 1000 * own)
    assert torch.equal(attacks.large_constant(h, 2), torch.full((2, 30), 1000.0, dtype=torch.float64))
    assert torch.allclose(attacks.ipm(h, 2), -0.1 * h.mean(0).expand(2, -1))
    assert torch.allclose(attacks.get("ipm_large")(h, 2), -100 * h.mean(0).expand(2, -1))
    mu, sigma = h.mean(0), h.std(0)
    assert torch.allclose(attacks.alie(h, 3), (mu - attacks.alie_z(8, 3) * sigma).expand(3, -1))
    assert torch.allclose(attacks.alie(h, 3, z=0.21), (mu - 0.21 * sigma).expand(3, -1))


def test_random_attacks():
    h = torch.randn(4, 2000, dtype=torch.float64)
    r = attacks.random_direction(h, 6)
    directions = r / r.norm(dim=1, keepdim=True)
    assert torch.allclose(directions, directions[:1].expand(6, -1))  # one shared direction
    assert torch.allclose(r.norm(dim=1), 1000 * h[torch.arange(6) % 4].norm(dim=1))
    gauss = attacks.gaussian(h, 3)
    assert 190 < float(gauss.std()) < 210
    assert torch.equal(gauss, attacks.gaussian(h, 3))  # deterministic by default
    assert not torch.equal(gauss, attacks.gaussian(h, 3, generator=torch.Generator().manual_seed(1)))
    u = attacks.uniform(h, 2)
    assert float(u.min()) >= 0 and float(u.max()) < 1
    dropped = attacks.drop(h, 4)
    zeroed = float((dropped == 0).double().mean())
    assert 0.08 < zeroed < 0.12
    assert torch.isnan(attacks.nan(h, 2)).all() and torch.isinf(attacks.inf(h, 2)).all()
    assert torch.equal(attacks.zero(h, 2), torch.zeros(2, 2000, dtype=torch.float64))
    assert torch.equal(attacks.mimic(h, 2, target=3), h[3].expand(2, -1))


def test_stale_and_delayed_updates():
    h = torch.randn(3, 8)
    past = torch.randn(2, 8)
    assert torch.equal(attacks.stale(h, 3, past=past), past[[0, 1, 0]])
    with pytest.raises(ValueError, match="past"):
        attacks.stale(h, 2)
    with pytest.raises(ValueError, match="past"):
        attacks.stale(h, 2, past=torch.randn(2, 7))
    buffer = attacks.DelayedUpdates(delay=2)
    outs = [float(buffer.push(torch.tensor([float(i)]))) for i in range(5)]
    assert outs == [0.0, 0.0, 0.0, 1.0, 2.0]


def test_min_max_and_adaptive_attacks_respect_their_constraints():
    h = torch.randn(10, 100, dtype=torch.float64) + 2
    bad = attacks.min_max(h, 2)
    assert float(torch.cdist(bad[:1], h).max()) <= float(torch.cdist(h, h).max()) + 1e-6
    assert float((bad[0] - h.mean(0)).norm()) > 1.0  # it did move away from the mean
    cc = attacks.centered_clip_adaptive(h, 3, tau=2.0)
    assert torch.allclose((cc - h.mean(0)).norm(dim=1), torch.full((3,), 1.98, dtype=torch.float64))


def test_colluding_on_one_part():
    h = torch.randn(6, 100, dtype=torch.float64)
    parts = attacks.part_ranges(100, 4)
    assert parts == [(0, 25), (25, 50), (50, 75), (75, 100)]
    bad = attacks.collude_on_part(h, 2, part=parts[2], inner="sign_flip", scale=50.0)
    assert torch.equal(bad[:, :50], h[:2, :50]) and torch.equal(bad[:, 75:], h[:2, 75:])
    assert torch.equal(bad[:, 50:75], -50 * h[:2, 50:75])
    with pytest.raises(ValueError, match="part"):
        attacks.collude_on_part(h, 2, part=(90, 120))
    x = attacks.make_inputs(h, 2, "collude_on_part", part=parts[0], inner="gaussian", sigma=3.0)
    assert x.shape == (8, 100) and torch.equal(x[6:, 25:], h[:2, 25:])


def test_label_flipping():
    y = torch.tensor([0, 3, 9, 5])
    assert attacks.flip_labels(y, 10).tolist() == [9, 6, 0, 4]
    with pytest.raises(ValueError):
        attacks.flip_labels(torch.tensor([0, 10]), 10)
    with pytest.raises(ValueError):
        attacks.flip_labels(torch.tensor([0.5]), 10)


def test_attack_registry_and_inputs():
    h = torch.randn(8, 16)
    for name in attacks.names():
        params = {"past": h[:2]} if name == "stale" else {}
        x = attacks.make_inputs(h, 3, name, **params)
        assert x.shape == (11, 16) and torch.equal(x[:8], h), name
        assert attacks.make_inputs(h, 0, name, **params).shape == (8, 16)
    with pytest.raises(ValueError, match="unknown attack"):
        attacks.get("teleport")
    with pytest.raises(ValueError, match="unknown parameters"):
        attacks.get("sign_flip", sigma=3)
    with pytest.raises(ValueError, match="honest"):
        attacks.sign_flip(torch.randn(5), 2)
    with pytest.raises(ValueError, match="attackers"):
        attacks.sign_flip(h, -1)


def test_nan_contributions_are_what_the_all_reduce_excludes():
    """Called directly, aggregators refuse NaN/Inf attackers; once the senders are excluded (what
    the all-reduce does) the robust rules see only honest rows."""
    h, mu = hs13(0)
    x = attacks.make_inputs(h, 3, "nan")
    with pytest.raises(ValueError, match="NaN"):
        A.centered_clip(x)
    finite = x[torch.isfinite(x).all(dim=1)]
    assert relative_error(A.centered_clip(finite), mu) < 0.2
    assert math.isfinite(relative_error(A.flag_aggregate(finite), mu))
