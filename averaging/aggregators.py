"""Byzantine-robust aggregators: pure tensor functions ``f(x [n, d], weights [n] | None, **params) -> [d]``.

Rows of ``x`` are the inputs of ``n`` peers (gradients, pseudo-gradients or parameters), ``weights``
their non-negative sample weights (default 1; rows of weight 0 are ignored). float32 and float64 are
kept (float16/bfloat16 are computed and returned as float32); CPU tensors. Every function raises
:class:`ValueError` on NaN/Inf input, a wrong shape or bad parameters, and :class:`TooFewInputs` (a
``ValueError``) when ``n`` is too small for the guarantee asked for. Specs: design notes
``algorithms.md`` sections 2.1 (CenteredClip), 3 (Flag Aggregator) and 4 (the others).

    >>> from averaging import aggregators
    >>> agg = aggregators.get("centered_clip", tau=1.0)   # parameters bound, keeps __name__
    >>> agg(torch.randn(16, 1000)).shape
    torch.Size([1000])

Cheap solvers: rules that need distances between whole vectors (geometric median, CenteredClip,
Krum, Multi-Krum, Bulyan's selection, the Flag Aggregator) compute the ``n x n`` Gram matrix of the
rows once (float64, in column chunks, ``O(n^2 d)``), iterate in coefficient space (``O(n^2)`` or
``O(n^3)`` per iteration, no ``d``-sized work) and write the answer as one combination of the rows.
Coordinate-wise rules sort ``n`` values per coordinate in column chunks. Memory stays ``O(n d)``
plus chunk-sized temporaries.

**Inside the butterfly all-reduce** (``Averager(aggregator=...)``, the partitioned scheme of "Secure
Distributed Training at Scale"): the flat vector of length ``D`` is split into parts, and the owner
of each part calls the aggregator once on ``x`` of shape ``[members, part_length]``. So every rule
sees only *its part* of each peer's vector: norms, distances and thresholds are per part. A part of
length ``L`` of a vector whose coordinates have similar scale has a norm of about
``sqrt(L / D)`` times the full norm, so a threshold ``tau`` chosen for whole vectors should be
scaled to ``tau * sqrt(L / D)`` per part (then an attacker's total influence over all parts is at
most ``w_a / W * tau``, as for the whole vector). The adaptive defaults (``tau=None`` in
CenteredClip, ``c=None`` in clipped_mean: the median distance / norm of the inputs) are computed per
part and rescale themselves. Selection rules (Krum, Bulyan) may select different peers in different
parts; the Flag Aggregator normalises each part separately. Robust mode caps self-reported weights
(:func:`cap_weights`, applied by :func:`as_reducer`) so that a peer cannot win by claiming a huge
batch. NaN/Inf contributions never reach an aggregator there: the all-reduce excludes their sender.
``Averager(aggregator="centered_clip")`` uses the defaults; for other parameters pass
``aggregator=as_reducer(get("centered_clip", tau=0.5))`` (a bare callable gets no weight cap).
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

__all__ = ["mean", "median", "trimmed_mean", "geometric_median", "krum", "multi_krum", "bulyan", "clipped_mean",
           "centered_clip", "flag_aggregate", "get", "as_reducer", "cap_weights", "names", "AGGREGATORS",
           "TooFewInputs", "CenteredClipResult", "FlagResult", "centered_clip_solve", "flag_solve"]

logger = logging.getLogger(__name__)

Aggregator = Callable[..., torch.Tensor]
_F64 = torch.float64
_CHUNK_ELEMS = 1 << 22  # elements of x per column chunk (16 MB of float32)


class TooFewInputs(ValueError):
    """``n`` is too small for the guarantee the aggregator was asked for (e.g. Krum needs n >= 2f + 3)."""


# ----------------------------------------------------------------------------------------------- helpers

def _prepare(x: Any, weights: Any, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate; returns (x [n, d] float32/float64, weights [n] float64 > 0) without rows of weight 0."""
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(x)
        except Exception as e:
            raise ValueError(f"{name}: x must be a float tensor of shape [n, d], got {type(x).__name__}") from e
    if not x.is_floating_point():
        raise ValueError(f"{name}: x must be a floating-point tensor, got {x.dtype}")
    if x.dim() != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"{name}: x must have shape [n, d] with n, d >= 1, got {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    bad = ~(torch.isfinite(x.amax(dim=1)) & torch.isfinite(x.amin(dim=1)))  # amax/amin propagate NaN
    if bad.any():
        raise ValueError(f"{name}: x contains NaN or Inf (rows {bad.nonzero().flatten().tolist()})")
    n = x.shape[0]
    if weights is None:
        return x, torch.ones(n, dtype=_F64)
    w = torch.as_tensor(weights).to(_F64)
    if w.shape != (n,):
        raise ValueError(f"{name}: weights must have shape [{n}] to match x, got {tuple(w.shape)}")
    if not torch.isfinite(w).all() or (w < 0).any():
        raise ValueError(f"{name}: weights must be finite and >= 0, got {w.tolist()}")
    if not (w > 0).any():
        raise ValueError(f"{name}: all weights are zero")
    keep = w > 0
    if not keep.all():
        x, w = x[keep], w[keep]
    return x, w


def _chunks(n: int, d: int) -> Iterator[tuple[int, int]]:
    step = max(1, _CHUNK_ELEMS // max(n, 1))
    for lo in range(0, d, step):
        yield lo, min(d, lo + step)


def _uniform(w: torch.Tensor) -> bool:
    return bool((w == w[0]).all())


def _weighted_median_1d(values: torch.Tensor, w: torch.Tensor) -> float:
    """Weighted median of scalars (average of the lower and upper weighted medians; integer weights
    act as replication, so equal weights give the usual median)."""
    return float(_weighted_median_sorted(*_sort_with_weights(values.to(_F64)[None, :], w)))


def _sort_with_weights(xt: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """xt [C, n]: each row sorted, and the weights in the same order."""
    values, order = torch.sort(xt, dim=1)
    return values, w[order]


def _weighted_median_sorted(values: torch.Tensor, sorted_w: torch.Tensor) -> torch.Tensor:
    cum = sorted_w.cumsum(dim=1)
    total = cum[:, -1:]
    half, tol = total / 2, total * 1e-12
    n = values.shape[1]
    lower = (cum < half - tol).sum(dim=1, keepdim=True).clamp(max=n - 1)
    upper = (cum <= half + tol).sum(dim=1, keepdim=True).clamp(max=n - 1)
    return ((values.gather(1, lower) + values.gather(1, upper)) / 2).squeeze(1)


def _coordinate_median(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    n, d = x.shape
    out = torch.empty(d, dtype=x.dtype)
    uniform = _uniform(w)
    for lo, hi in _chunks(n, d):
        xt = x[:, lo:hi].T.contiguous()
        if uniform:
            values = torch.sort(xt, dim=1).values
            out[lo:hi] = (values[:, (n - 1) // 2] + values[:, n // 2]) / 2
        else:
            values, sw = _sort_with_weights(xt, w)
            out[lo:hi] = _weighted_median_sorted(values, sw).to(x.dtype)
    return out


def _weighted_mean(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (w.to(x.dtype) @ x) / w.sum().to(x.dtype)


def _gram(x: torch.Tensor, center: torch.Tensor | None) -> torch.Tensor:
    """float64 Gram matrix of the rows of ``x - center`` (``center`` None: of ``x``)."""
    n, d = x.shape
    g = torch.zeros(n, n, dtype=_F64)
    for lo, hi in _chunks(n, d):
        y = x[:, lo:hi].to(_F64)
        if center is not None:
            y = y - center[lo:hi].to(_F64)
        g.addmm_(y, y.T)
    return (g + g.T) / 2


def _anchor(x: torch.Tensor) -> torch.Tensor:
    """A central input row to centre Gram matrices at (numerical conditioning only: with far-away
    attackers, distances between nearby rows computed from a Gram centred elsewhere lose all their
    digits). Chosen on at most ~4096 evenly spaced coordinates: the row whose median distance to the
    others is smallest."""
    n, d = x.shape
    sample = x[:, ::max(1, d // 4096)].to(_F64)
    scores = torch.cdist(sample, sample).median(dim=1).values
    return x[int(torch.argmin(scores))]


def _combine(x: torch.Tensor, alpha: torch.Tensor, center: torch.Tensor | None = None) -> torch.Tensor:
    """``center + Σ alpha_i (x_i - center)`` (``center`` None: ``Σ alpha_i x_i``) in x's dtype."""
    out = alpha.to(x.dtype) @ x
    if center is not None:
        out += (1.0 - float(alpha.sum())) * center.to(x.dtype)
    return out


def _distances2(g: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``‖y_i - Σ alpha_k y_k‖²`` for all i from the Gram matrix of the y's."""
    ga = g @ alpha
    return (g.diagonal() - 2 * ga + alpha @ ga).clamp(min=0)


def _pairwise2(g: torch.Tensor) -> torch.Tensor:
    diag = g.diagonal()
    return (diag[:, None] + diag[None, :] - 2 * g).clamp(min=0)


def _check_int(name: str, param: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}: {param} must be an integer >= {low}, got {value!r}")
    return value


def _check_positive(name: str, param: str, value: Any, allow_zero: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: {param} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{name}: {param} must be {'>= 0' if allow_zero else '> 0'} and finite, got {value!r}")
    return v


# ----------------------------------------------------------------------------------------------- aggregators

def mean(x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted mean ``Σ w_i x_i / Σ w_i``.

    Breakdown point 0 (one input can move it arbitrarily far). Cost O(n d). No parameters.
    """
    x, w = _prepare(x, weights, "mean")
    return _weighted_mean(x, w)


mean.coordinatewise = True  # type: ignore[attr-defined]


def median(x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Coordinate-wise (weighted) median; even total weight: the average of the two middle values.

    Breakdown point 1/2 (of the weight). Cost O(n d log n) (a sort of n values per coordinate).
    Weak against ALIE (small coordinated shifts). No parameters.
    """
    x, w = _prepare(x, weights, "median")
    return _coordinate_median(x, w)


median.coordinatewise = True  # type: ignore[attr-defined]


def trimmed_mean(x: torch.Tensor, weights: torch.Tensor | None = None, beta: float = 0.25,
                 b: int | None = None) -> torch.Tensor:
    """Coordinate-wise trimmed mean (Yin et al. 2018): per coordinate drop the smallest and the largest
    values carrying weight ``t`` each and average the rest (weighted; a row at the boundary is cut
    fractionally, so integer weights act as replication).

    - ``beta`` (0.25): ``t = beta * W`` (fraction of the total weight W trimmed on each side), 0 <= beta < 1/2.
    - ``b`` (None): instead trim ``b`` rows per side (``t = b * W / n``; with unit weights exactly the
      ``b`` smallest and ``b`` largest values); needs ``n > 2b``.

    Breakdown point ``t / W`` (``beta``, or ``b / n``). Cost O(n d log n). ``beta = 0`` is the mean.
    """
    x, w = _prepare(x, weights, "trimmed_mean")
    n, d = x.shape
    total = float(w.sum())
    if b is not None:
        b = _check_int("trimmed_mean", "b", b, 0)
        if n <= 2 * b:
            raise TooFewInputs(f"trimmed_mean: needs n > 2b, got n={n}, b={b}")
        t = b * total / n
    else:
        beta = float(beta)
        if not 0 <= beta < 0.5:
            raise ValueError(f"trimmed_mean: beta must be in [0, 0.5), got {beta}")
        t = beta * total
    out = torch.empty(d, dtype=x.dtype)
    unit = float(w[0])
    k = round(t / unit)
    fast = _uniform(w) and abs(k * unit - t) <= 1e-9 * total and n > 2 * k
    for lo, hi in _chunks(n, d):
        xt = x[:, lo:hi].T.contiguous()
        if fast:
            out[lo:hi] = torch.sort(xt, dim=1).values[:, k:n - k].mean(dim=1)
        else:
            values, sw = _sort_with_weights(xt, w)
            cum = sw.cumsum(dim=1)
            kept = (torch.minimum(cum, torch.full_like(cum, total - t))
                    - torch.maximum(cum - sw, torch.full_like(cum, t))).clamp(min=0)
            out[lo:hi] = ((kept * values.to(_F64)).sum(dim=1) / (total - 2 * t)).to(x.dtype)
    return out


trimmed_mean.coordinatewise = True  # type: ignore[attr-defined]


def geometric_median(x: torch.Tensor, weights: torch.Tensor | None = None, nu: float = 1e-6,
                     max_iters: int = 1000, tol: float = 1e-10) -> torch.Tensor:
    """Geometric median ``argmin_v Σ w_i ‖x_i - v‖`` by smoothed Weiszfeld (RFA):
    ``v <- Σ β_i x_i / Σ β_i``, ``β_i = w_i / max(nu * s, ‖x_i - v‖)``, started at the weighted mean.

    - ``nu`` (1e-6): smoothing, relative to the robust scale ``s`` (weighted median over inputs of their
      weighted median distance to the others), so the result is scale-equivariant and a minority of
      attackers cannot inflate it.
    - ``max_iters`` (1000), ``tol`` (1e-10): stop when a step moves less than ``tol * s`` (iterations are
      O(n^2): from far-away attackers Weiszfeld needs tens of them).

    Breakdown point 1/2. Cost O(n^2 d) once (Gram matrix) + O(n^2) per iteration + O(n d).
    """
    x, w = _prepare(x, weights, "geometric_median")
    nu = _check_positive("geometric_median", "nu", nu)
    _check_int("geometric_median", "max_iters", max_iters, 1)
    center = _anchor(x)
    g = _gram(x, center)
    # robust scale: weighted median over rows of each row's weighted median distance to the others
    pairwise = _pairwise2(g).sqrt()
    row_scale = _weighted_median_sorted(*_sort_with_weights(pairwise, w))
    spread = _weighted_median_1d(row_scale, w)
    if spread == 0:  # more than half of the weight sits on one point: that point
        return x[int((row_scale == 0).nonzero()[0])].clone()
    alpha = w / w.sum()  # start at the weighted mean
    for _ in range(max_iters):
        beta = w / _distances2(g, alpha).sqrt().clamp(min=nu * spread)
        new = beta / beta.sum()
        step = new - alpha
        alpha = new
        if float(step @ g @ step) <= (tol * spread) ** 2:
            break
    return _combine(x, alpha, center)


def _krum_scores(d2: torch.Tensor, neighbours: int) -> torch.Tensor:
    r = d2.shape[0]
    if r == 1:
        return torch.zeros(1, dtype=_F64)
    masked = d2 + torch.diag(torch.full((r,), float("inf"), dtype=_F64))
    k = min(max(neighbours, 1), r - 1)
    return torch.sort(masked, dim=1).values[:, :k].sum(dim=1)


def _krum_order(x: torch.Tensor, rows: list[int], d2: torch.Tensor, neighbours: int) -> list[int]:
    """``rows`` by increasing Krum score (``d2``: their squared distances). Scores equal up to rounding
    (e.g. two mutual nearest neighbours with one neighbour each) are ordered by the sum of all
    distances, then by a fixed random projection of the rows: never by position, so the choice does
    not depend on the order of the inputs."""
    scores = _krum_scores(d2, neighbours).tolist()
    totals = d2.sum(dim=1).tolist()
    projection: list[float] = []

    def project(i: int) -> float:
        if not projection:
            r = torch.randn(x.shape[1], generator=torch.Generator().manual_seed(0), dtype=_F64)
            projection.extend((x[rows].to(_F64) @ r).tolist())
        return projection[i]

    def close(a: float, b: float) -> bool:
        return abs(a - b) <= 1e-9 * max(abs(a), abs(b), 1e-300)

    def compare(i: int, j: int) -> int:
        for a, b in ((scores[i], scores[j]), (totals[i], totals[j])):
            if not close(a, b):
                return -1 if a < b else 1
        a, b = project(i), project(j)
        return -1 if a < b else (1 if a > b else 0)

    return [rows[i] for i in sorted(range(len(rows)), key=functools.cmp_to_key(compare))]


def _default_f(name: str, f: int | None, n: int, need: Callable[[int], int], formula: str) -> int:
    """f given: check ``n >= need(f)``; None: the largest f with ``n >= need(f)``."""
    if f is None:
        f = 0
        while need(f + 1) <= n:
            f += 1
    else:
        f = _check_int(name, "f", f, 0)
    if n < need(f):
        raise TooFewInputs(f"{name}: needs n >= {formula} = {need(f)} for f={f}, got n={n}")
    return f


def krum(x: torch.Tensor, weights: torch.Tensor | None = None, f: int | None = None) -> torch.Tensor:
    """Krum (Blanchard et al. 2017): the input with the smallest sum of squared distances to its
    ``n - f - 2`` nearest other inputs (ties broken independently of the input order).

    - ``f`` (None: the largest allowed, ``(n - 3) // 2``): number of Byzantine inputs tolerated; needs
      ``n >= 2f + 3``.

    Breakdown point ``f / n < 1/2``. Cost O(n^2 d) (Gram matrix) + O(n^2 log n). ``weights`` are ignored
    (a peer cannot buy selection by claiming weight).
    """
    x, _ = _prepare(x, weights, "krum")
    n = x.shape[0]
    f = _default_f("krum", f, n, lambda f: 2 * f + 3, "2f + 3")
    d2 = _pairwise2(_gram(x, _anchor(x)))
    return x[_krum_order(x, list(range(n)), d2, n - f - 2)[0]].clone()


def multi_krum(x: torch.Tensor, weights: torch.Tensor | None = None, f: int | None = None,
               m: int | None = None) -> torch.Tensor:
    """Multi-Krum: the weighted mean of the ``m`` inputs with the lowest Krum scores (neighbours
    ``n - f - 2``; ties broken independently of the input order).

    - ``f`` (None: ``(n - 3) // 2``): Byzantine inputs tolerated, needs ``n >= 2f + 3``.
    - ``m`` (None: ``n - f``): inputs averaged, ``1 <= m <= n``.

    Breakdown point ``f / n < 1/2``. Cost O(n^2 d). Weights are used only in the final mean.
    """
    x, w = _prepare(x, weights, "multi_krum")
    n = x.shape[0]
    f = _default_f("multi_krum", f, n, lambda f: 2 * f + 3, "2f + 3")
    m = n - f if m is None else _check_int("multi_krum", "m", m, 1)
    if m > n:
        raise ValueError(f"multi_krum: m must be at most n={n}, got {m}")
    d2 = _pairwise2(_gram(x, _anchor(x)))
    selected = torch.tensor(sorted(_krum_order(x, list(range(n)), d2, n - f - 2)[:m]))
    return _weighted_mean(x[selected], w[selected])


def _bulyan_select(x: torch.Tensor, f: int) -> list[int]:
    """Bulyan's first phase: θ = n - 2f rows chosen by repeated Krum, in row order."""
    n = x.shape[0]
    if f == 0:
        return list(range(n))
    d2 = _pairwise2(_gram(x, _anchor(x)))
    remaining = list(range(n))
    selected: list[int] = []
    while len(selected) < n - 2 * f:
        winner = _krum_order(x, remaining, d2[remaining][:, remaining], n - f - 2)[0]
        selected.append(winner)
        remaining.remove(winner)
    return sorted(selected)


def bulyan(x: torch.Tensor, weights: torch.Tensor | None = None, f: int | None = None) -> torch.Tensor:
    """Bulyan (El Mhamdi et al. 2018): select ``θ = n - 2f`` inputs by repeated Krum on the remaining
    inputs (removing each winner), then per coordinate average the ``β = θ - 2f`` selected values
    closest to the selected values' median. Krum's neighbour count stays ``n - f - 2`` (at most all
    remaining others): shrinking it with the remaining set lets ``f`` identical attackers, at distance
    0 from each other, win the last rounds.

    - ``f`` (None: the largest allowed, ``(n - 3) // 4``): needs ``n >= 4f + 3``.

    Breakdown point ``f / n < 1/4``. Cost O(n^2 d) + O(n d log n). ``weights`` are ignored.
    """
    x, _ = _prepare(x, weights, "bulyan")
    n, d = x.shape
    f = _default_f("bulyan", f, n, lambda f: 4 * f + 3, "4f + 3")
    theta, beta = n - 2 * f, n - 4 * f
    selected = _bulyan_select(x, f)
    xs = x[selected]
    out = torch.empty(d, dtype=x.dtype)
    for lo, hi in _chunks(theta, d):
        values = torch.sort(xs[:, lo:hi].T.contiguous(), dim=1).values  # [C, θ]
        med = (values[:, (theta - 1) // 2] + values[:, theta // 2]) / 2
        # the β values closest to the median form a window of the sorted values: pick the tightest
        starts = torch.arange(theta - beta + 1)
        spread = torch.maximum(med[:, None] - values[:, starts], values[:, starts + beta - 1] - med[:, None])
        first = torch.argmin(spread, dim=1)
        cum = torch.nn.functional.pad(values.to(_F64).cumsum(dim=1), (1, 0))
        out[lo:hi] = ((cum.gather(1, (first + beta)[:, None]) - cum.gather(1, first[:, None])).squeeze(1)
                      / beta).to(x.dtype)
    return out


def clipped_mean(x: torch.Tensor, weights: torch.Tensor | None = None, c: float | None = None) -> torch.Tensor:
    """Norm clipping ("bounded-norm mean"): ``Σ w_i clip_c(x_i) / W`` with
    ``clip_c(v) = v min(1, c / ‖v‖)``.

    - ``c`` (None: the weighted median of the input norms, computed per call, i.e. per part in the
      butterfly).

    No breakdown in the exclusion sense, bounded influence: an input moves the result by at most
    ``w_i c / W``. Cost O(n d). Not translation-equivariant (clips around 0).
    """
    x, w = _prepare(x, weights, "clipped_mean")
    norms = torch.linalg.vector_norm(x, dim=1, dtype=_F64)
    c = _weighted_median_1d(norms, w) if c is None else _check_positive("clipped_mean", "c", c, allow_zero=True)
    scale = torch.where(norms > c, c / norms.clamp(min=1e-300), torch.ones_like(norms))
    return _combine(x, w * scale / w.sum())


@dataclass
class CenteredClipResult:
    """What :func:`centered_clip_solve` found: the aggregate, the threshold used, iterations run, the final
    CenteredClip residual ``‖Σ w_i clip_tau(x_i - v)‖ / W``, the residual aimed at and whether it got there."""

    value: torch.Tensor
    tau: float
    iterations: int
    residual: float
    target: float
    converged: bool


def centered_clip_solve(x: torch.Tensor, weights: torch.Tensor | None = None, tau: float | None = None,
                        max_iters: int = 100, eps: float = 1e-6, solver: str = "irls",
                        init: str | torch.Tensor = "median") -> CenteredClipResult:
    """CenteredClip with diagnostics; see :func:`centered_clip` for the parameters."""
    x, w = _prepare(x, weights, "centered_clip")
    n, d = x.shape
    _check_int("centered_clip", "max_iters", max_iters, 1)
    eps = _check_positive("centered_clip", "eps", eps)
    if solver not in ("irls", "plain"):
        raise ValueError(f"centered_clip: solver must be 'irls' or 'plain', got {solver!r}")
    if isinstance(init, torch.Tensor):
        if init.shape != (d,) or not torch.isfinite(init).all():
            raise ValueError(f"centered_clip: init must be a finite tensor of shape [{d}], got {tuple(init.shape)}")
        v0 = init.to(x.dtype)
    elif init == "median":
        v0 = _coordinate_median(x, w)
    elif init == "mean":
        v0 = _weighted_mean(x, w)
    else:
        raise ValueError(f"centered_clip: init must be 'median', 'mean' or a tensor, got {init!r}")
    g = _gram(x, v0)
    total = w.sum()
    alpha = torch.zeros(n, dtype=_F64)
    dist = g.diagonal().clamp(min=0).sqrt()
    if tau is None:
        tau = _weighted_median_1d(dist, w)
        if tau == 0:  # at least half of the weight sits exactly at the start: that is the answer
            return CenteredClipResult(v0.clone(), 0.0, 0, 0.0, 0.0, True)
    else:
        tau = _check_positive("centered_clip", "tau", tau)

    def clip_factors(dist: torch.Tensor) -> torch.Tensor:
        return torch.where(dist > tau, tau / dist.clamp(min=1e-300), torch.ones_like(dist))

    def residual(alpha: torch.Tensor, s: torch.Tensor) -> float:
        c = w * s / total  # Σ_i c_i (y_i - a) with a = Σ alpha_k y_k
        gamma = c - alpha * c.sum()
        return math.sqrt(max(float(gamma @ g @ gamma), 0.0))

    target = eps * min(tau, float(torch.sqrt((w * dist ** 2).sum() / total)))
    s = clip_factors(dist)
    r = residual(alpha, s)
    iterations = 0
    while r > target and iterations < max_iters:
        if solver == "irls":
            c = w * s
            alpha = c / c.sum()
        else:
            c = w * s / total
            alpha = alpha + c - alpha * c.sum()
        iterations += 1
        s = clip_factors(_distances2(g, alpha).sqrt())
        r = residual(alpha, s)
    return CenteredClipResult(_combine(x, alpha, v0), float(tau), iterations, r, target, r <= target)


def centered_clip(x: torch.Tensor, weights: torch.Tensor | None = None, tau: float | None = None,
                  max_iters: int = 100, eps: float = 1e-6, solver: str = "irls",
                  init: str | torch.Tensor = "median") -> torch.Tensor:
    """CenteredClip ("Secure Distributed Training at Scale", Gorbunov et al. 2022): the fixed point of
    ``v <- v + Σ w_i clip_tau(x_i - v) / W``, started at the coordinate-wise median.

    - ``tau`` (None: the weighted median of the inputs' distances to the start, per call, i.e. per part
      in the butterfly; the paper uses 1 or 10 for ResNet-18 and 0.125 for ALBERT): clipping radius.
    - ``max_iters`` (100), ``eps`` (1e-6): stop when the residual ``‖Σ w_i clip_tau(x_i - v)‖ / W``
      is at most ``eps * min(tau, s)``, s = RMS distance of the inputs to the start (scale-free). If it
      never gets there, a warning is logged and the last iterate returned.
    - ``solver`` (``"irls"``): ``v <- Σ c_i x_i / Σ c_i`` with ``c_i = w_i min(1, tau / ‖x_i - v‖)``
      (same fixed points, ~5 iterations) or ``"plain"`` (the paper's iteration, steps of at most tau).
    - ``init`` (``"median"``): start point, ``"median"``, ``"mean"`` (not robust: far attackers need
      ``‖v_0 - v*‖ / tau`` plain iterations) or a tensor ``[d]`` (e.g. the previous aggregate).

    Breakdown point: analysed for small fractions (Karimireddy et al.); each input moves the fixed point
    by a bounded amount (``<= w_i tau / W`` per step); tau -> inf gives the mean, tau -> 0 the geometric
    median. Cost O(n d log n) (median start) + O(n^2 d) (Gram matrix) + O(n^2) per iteration.
    """
    result = centered_clip_solve(x, weights, tau, max_iters, eps, solver, init)
    if not result.converged:
        logger.warning("centered_clip did not converge in %d iterations: residual %.3g > %.3g",
                       result.iterations, result.residual, result.target)
    return result.value


@dataclass
class FlagResult:
    """What :func:`flag_solve` found: the aggregate, the coefficients ``c`` (aggregate = ``Σ c_i x_i``),
    the energies ``E_k = Σ w_i sin θ_i`` after each iteration (``E_0 = W``, the random start), the
    index of the returned subspace in that list and the subspace's rank."""

    value: torch.Tensor
    coefficients: torch.Tensor
    energies: list[float]
    best: int
    rank: int


def flag_solve(x: torch.Tensor, weights: torch.Tensor | None = None, m: int | None = None, lam: float = 0.0,
               iters: int = 5, eps: float = 1e-7, mode: str = "rescaled") -> FlagResult:
    """The Flag Aggregator with diagnostics; see :func:`flag_aggregate` for the parameters."""
    x, w = _prepare(x, weights, "flag_aggregate")
    n, d = x.shape
    _check_int("flag_aggregate", "iters", iters, 1)
    lam = _check_positive("flag_aggregate", "lam", lam, allow_zero=True)
    eps = _check_positive("flag_aggregate", "eps", eps)
    if mode not in ("rescaled", "reference"):
        raise ValueError(f"flag_aggregate: mode must be 'rescaled' or 'reference', got {mode!r}")
    gram = _gram(x, None)
    norms = gram.diagonal().clamp(min=0).sqrt()
    active = (norms > 0).nonzero().flatten()  # zero inputs get weight 0
    p = len(active)
    m = (p + 2) // 2 if m is None else _check_int("flag_aggregate", "m", m, 1)
    coefficients = torch.zeros(n, dtype=_F64)
    if p == 0:
        return FlagResult(torch.zeros(d, dtype=x.dtype), coefficients, [0.0], 0, 0)
    wa, na = w[active], norms[active]
    gh = gram[active][:, active] / (na[:, None] * na[None, :])
    gh = (gh + gh.T) / 2
    gh.diagonal().fill_(1.0)
    # pairwise term: ordered pairs (i, j) and (j, i) both add b_ij² (e_i - e_j)(e_i - e_j)ᵀ, with
    # b_ij = lam / (p (p - 1)) (|1 - ‖Yᵀ(x̂_i - x̂_j)‖²| + eps)^(-1/4) (the difference is not renormalised)
    pair_scale = lam / (p * (p - 1)) if p > 1 and lam > 0 else 0.0
    a2 = torch.ones(p, dtype=_F64)  # Y_0 random: ‖Y_0ᵀ x̂‖² ≈ m/d ≈ 0, so the first weights are uniform
    c2 = torch.full((p, p), 2 * pair_scale ** 2 * (1 + eps) ** -0.5, dtype=_F64) if pair_scale else None
    energies, best, best_t, rank = [float(wa.sum())], 0, None, 0
    for k in range(1, iters + 1):
        mm = torch.diag(wa * a2)
        if c2 is not None:
            c2.diagonal().zero_()
            mm = mm + torch.diag(c2.sum(dim=1)) - c2  # Σ_{i<j} c2_ij (e_i - e_j)(e_i - e_j)ᵀ
        evals_m, evecs_m = torch.linalg.eigh(mm)
        root = evecs_m @ torch.diag(evals_m.clamp(min=0).sqrt()) @ evecs_m.T
        kk = root @ gh @ root
        evals, evecs = torch.linalg.eigh((kk + kk.T) / 2)
        evals, evecs = evals.flip(0), evecs.flip(1)
        r = min(m, int((evals > 1e-10 * max(float(evals[0]), 1e-300)).sum()))
        u = evecs[:, :r]
        t = root @ u @ torch.diag(1 / evals[:r]) @ u.T @ root  # Y Yᵀ = X̂ᵀ T X̂
        proj = gh @ t @ gh  # proj[i, j] = x̂_iᵀ Y Yᵀ x̂_j
        v = proj.diagonal()
        energy = float((wa * (1 - v).clamp(min=0).sqrt()).sum())
        previous = energies[-1]
        energies.append(energy)
        if k > 1 and energy > previous:
            break  # keep the previous subspace
        best, best_t, rank = k, t, r
        if previous - energy <= 1e-10 or energy <= 1e-10:
            break
        a2 = ((1 - v).abs() + eps) ** -0.5
        if c2 is not None:
            diff = v[:, None] + v[None, :] - 2 * proj
            c2 = 2 * pair_scale ** 2 * ((1 - diff).abs() + eps) ** -0.5
    assert best_t is not None  # iters >= 1 and the first iteration always keeps its subspace
    c_hat = best_t @ gh @ wa / m  # aggregate = (1/m) Σ_i w_i Y Yᵀ x̂_i = X̂ᵀ c_hat
    if mode == "rescaled":
        c_hat = c_hat * (m / float(wa.sum())) * _weighted_median_1d(na, wa)
    coefficients[active] = c_hat / na
    return FlagResult(_combine(x, coefficients), coefficients, energies, best, rank)


def flag_aggregate(x: torch.Tensor, weights: torch.Tensor | None = None, m: int | None = None, lam: float = 0.0,
                   iters: int = 5, eps: float = 1e-7, mode: str = "rescaled") -> torch.Tensor:
    """Flag Aggregator (Almasi et al., ICLR 2024): find the m-dimensional subspace Y minimising
    ``Σ w_i sin θ_i`` (θ_i: angle between the unit input ``x̂_i = x_i / ‖x_i‖`` and Y) by IRLS
    (column weights ``(|1 - ‖Yᵀx̂_i‖²| + eps)^(-1/4)``, first iteration uniform), and return
    ``(1/m) Σ w_i Y Yᵀ x̂_i``. Computed in coefficient space from the n x n Gram matrix (design §3.5).

    - ``m`` (None: ``ceil((p + 1) / 2)``, p = number of non-zero inputs): subspace dimension.
    - ``lam`` (0.0): weight of the pairwise regulariser on the differences ``x̂_i - x̂_j``.
    - ``iters`` (5): IRLS iterations K (the released reference hard-codes 1); stops early when the energy
      decreases by at most 1e-10, and never returns a subspace worse than the previous one.
    - ``eps`` (1e-7): IRLS smoothing.
    - ``mode`` (``"rescaled"``): multiply by ``(m / W) * median_i ‖x_i‖`` so that equal inputs give that
      input back; ``"reference"``: the paper's output on unit vectors (norm <= W / m, scale discarded).

    ``weights``: ``w_i`` multiplies input i's IRLS column weight ``a_i²`` and its share of the aggregate
    (integer weights act as replication when ``m`` is given; the pairwise terms are unweighted).
    Zero inputs get weight 0. Breakdown: bounded influence, each input contributes at most ``w_i / m``
    in normalised units. Cost O(n^2 d) (Gram) + O(iters n^3) + O(n d). Not translation-equivariant.
    """
    return flag_solve(x, weights, m, lam, iters, eps, mode).value


# ----------------------------------------------------------------------------------------------- registry

AGGREGATORS: dict[str, Aggregator] = {
    f.__name__: f for f in (mean, median, trimmed_mean, geometric_median, krum, multi_krum, bulyan, clipped_mean,
                            centered_clip, flag_aggregate)
}


def names() -> list[str]:
    """Names accepted by :func:`get` (and by ``Averager(aggregator=...)``)."""
    return list(AGGREGATORS)


def get(name: str, **params: Any) -> Aggregator:
    """The aggregator called ``name`` with ``params`` bound (a functools.partial keeping ``__name__``)."""
    if name not in AGGREGATORS:
        raise ValueError(f"unknown aggregator {name!r}; known: {', '.join(AGGREGATORS)}")
    f = AGGREGATORS[name]
    accepted = set(inspect.signature(f).parameters) - {"x", "weights"}
    unknown = set(params) - accepted
    if unknown:
        raise ValueError(f"{name}: unknown parameters {sorted(unknown)}; accepted: {sorted(accepted)}")
    if not params:
        return f
    return functools.update_wrapper(functools.partial(f, **params), f)


def cap_weights(weights: torch.Tensor, max_weight_ratio: float = 1.0) -> torch.Tensor:
    """Clip every weight to at most ``max_weight_ratio`` times the median of the positive weights.

    With the default 1.0 a peer claiming a huge batch counts as a median peer (peers with smaller
    batches keep their smaller weight); with ratio r a liar counts as at most r median peers, which
    multiplies its share of the weight (e.g. r = 2 lets one attacker among 4 peers hold 40% of the
    weight: enough to break a trimmed mean with beta = 0.25). Weights <= 0 stay 0 (ignored).
    """
    ratio = _check_positive("cap_weights", "max_weight_ratio", max_weight_ratio)
    w = torch.as_tensor(weights, dtype=_F64).clamp(min=0)
    positive = w[w > 0]
    if len(positive) == 0:
        return w
    cap = ratio * float(torch.quantile(positive, 0.5))
    return w.clamp(max=cap)


def as_reducer(f: Aggregator, max_weight_ratio: float = 1.0,
               fallback: Aggregator | None = median) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Adapt an aggregator to the all-reduce's reducer ``(x [n, len] float32, weights [n]) -> [len]``
    (robust mode): weights are capped with :func:`cap_weights` first. If the group is too small for
    ``f``'s guarantee (:class:`TooFewInputs`, e.g. Krum with 2 peers), ``fallback`` (the coordinate-wise
    median) is used and a warning logged; ``fallback=None`` re-raises. Coordinate-wise aggregators
    (median, trimmed mean) are marked ``chunkwise`` so the all-reduce may pipeline them chunk by chunk."""
    _check_positive("as_reducer", "max_weight_ratio", max_weight_ratio)
    name = getattr(f, "__name__", "custom")

    def reducer(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        w = cap_weights(weights, max_weight_ratio)
        try:
            return f(x, w)
        except TooFewInputs as e:
            if fallback is None:
                raise
            logger.warning("%s; using %s instead", e, getattr(fallback, "__name__", "the fallback"))
            return fallback(x, w)

    reducer.__name__ = name
    reducer.chunkwise = bool(getattr(f, "coordinatewise", False))  # type: ignore[attr-defined]
    return reducer
