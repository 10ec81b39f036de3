"""How much of the vector each group member reduces, from the members' bandwidths (algorithms.md §5.3).

Peer i sends and receives ``D·(1 + (N − 2)·f_i)`` values in a butterfly round, so the round lasts
``max_i (1 + (N − 2) f_i) / b_i``. The optimum (the LP hivemind solves with scipy) has a closed form:
sort by bandwidth; for the largest k with ``ξ_k = (N − 2 + k) / Σ_{top k} b`` and ``ξ_k · b_(k) ≥ 1``,
give ``f_i = (ξ_k b_i − 1)/(N − 2)`` to the top k and 0 to the rest. Client-mode peers (bandwidth 0)
own nothing; unknown bandwidths (None) count as the mean of the known ones.
"""

from __future__ import annotations

import math
from typing import Sequence

__all__ = ["optimal_fractions", "hagenbach_bischoff", "part_sizes"]


def optimal_fractions(bandwidths: Sequence[float | None]) -> list[float]:
    """Fractions of the vector each peer reduces (sum 1); 0 for client peers (bandwidth 0)."""
    n = len(bandwidths)
    known = [b for b in bandwidths if b is not None and b > 0]
    default = sum(known) / len(known) if known else 1.0
    bw = [default if b is None else max(float(b), 0.0) for b in bandwidths]
    if not any(b > 0 for b in bw):
        raise ValueError("at least one member must accept inbound connections (bandwidth > 0)")
    if n <= 2:
        total = sum(bw)
        return [b / total for b in bw]
    order = sorted(range(n), key=lambda i: -bw[i])
    best_k, xi = 1, 0.0
    running = 0.0
    for k in range(1, n + 1):
        b_k = bw[order[k - 1]]
        if b_k <= 0:
            break
        running += b_k
        xi_k = (n - 2 + k) / running
        if xi_k * b_k >= 1 - 1e-12:
            best_k, xi = k, xi_k
    fractions = [0.0] * n
    for i in order[:best_k]:
        fractions[i] = max((xi * bw[i] - 1) / (n - 2), 0.0)
    total = sum(fractions)
    if total <= 0:  # degenerate: one peer takes all
        fractions[order[0]] = 1.0
        return fractions
    return [f / total for f in fractions]


def hagenbach_bischoff(total: int, scores: Sequence[float]) -> list[int]:
    """Integer allocation of ``total`` items proportional to ``scores`` (largest-averages rule)."""
    if total < 0 or any(s < 0 for s in scores) or not any(s > 0 for s in scores):
        raise ValueError("need a non-negative total and non-negative scores, not all zero")
    score_sum = sum(scores)
    alloc = [math.floor(total * s / score_sum) for s in scores]
    remaining = total - sum(alloc)
    for _ in range(remaining):
        best = max(range(len(scores)), key=lambda i: (scores[i] / (alloc[i] + 1), -i))
        alloc[best] += 1
    return alloc


def part_sizes(total: int, bandwidths: Sequence[float | None], min_part: int = 0) -> list[int]:
    """Elements each member reduces; members whose share would be under ``min_part`` get none."""
    fractions = optimal_fractions(bandwidths)
    if min_part > 0 and max(fractions) * total > min_part:
        fractions = [f if f * total >= min_part else 0.0 for f in fractions]
    return hagenbach_bischoff(total, fractions)
