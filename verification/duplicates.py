"""Duplicate-microbatch checks for pipelines: the same stage input sent to two servers of one stage
must give (nearly) the same output; a server returning wrong activations or gradients (x10 scaling,
random values, zeros: algorithms.md §8.2) shows as a low cosine similarity or a magnitude ratio far
from 1. Two honest servers of a stage may hold slightly different parameters between their stage
averaging rounds, hence tolerances rather than equality.

>>> check = compare_outputs(first_server_output, second_server_output)
>>> check.ok, check.cosine, check.ratio

(The trainer side, sending a random fraction of microbatches to a second server, belongs to
:class:`swarm.pipeline.client.PipelineClient`; this is the comparison it would run.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["DuplicateCheck", "compare_outputs", "MIN_COSINE", "MAX_RATIO"]

MIN_COSINE = 0.99  # honest replicas of a stage agree to ~1e-3 relative: cosine > 0.999
MAX_RATIO = 1.1  # ‖a‖ / ‖b‖ within [1 / MAX_RATIO, MAX_RATIO]


@dataclass(frozen=True)
class DuplicateCheck:
    """``cosine`` of the two outputs (flattened, float64), ``ratio`` ``‖a‖ / ‖b‖``, ``ok`` both in bounds."""

    cosine: float
    ratio: float
    ok: bool


def compare_outputs(a: torch.Tensor, b: torch.Tensor, min_cosine: float = MIN_COSINE,
                    max_ratio: float = MAX_RATIO) -> DuplicateCheck:
    """Compare two servers' outputs for one input: not ok if the shapes differ, a value is not finite,
    the cosine is below ``min_cosine`` or the magnitude ratio is outside ``[1/max_ratio, max_ratio]``
    (two all-zero outputs agree)."""
    if a.shape != b.shape:
        return DuplicateCheck(float("nan"), float("nan"), False)
    x, y = a.detach().to(torch.float64).reshape(-1), b.detach().to(torch.float64).reshape(-1)
    if not (bool(torch.isfinite(x).all()) and bool(torch.isfinite(y).all())):
        return DuplicateCheck(float("nan"), float("nan"), False)
    nx, ny = float(x.norm()), float(y.norm())
    if nx == 0.0 or ny == 0.0:
        same = nx == ny
        return DuplicateCheck(1.0 if same else 0.0, 1.0 if same else math.inf, same)
    cosine, ratio = float(x @ y) / (nx * ny), nx / ny
    return DuplicateCheck(cosine, ratio, cosine >= min_cosine and 1 / max_ratio <= ratio <= max_ratio)
