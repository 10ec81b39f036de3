#!/usr/bin/env python3
"""Wall time of every aggregator of :mod:`averaging.aggregators` on one ``[n, d]`` float32 input.

    .venv/bin/python benchmarks/aggregators_cost.py [--n 16] [--d 10000000] [--repeats 1] [--threads 0]
        [--aggregators mean,median,...]

Input: honest rows ``N(0, 1)`` plus ``n // 5`` sign-flipped rows (x -1000), so the iterative solvers
do real work. Prints seconds per call (best of ``--repeats``) and the time relative to the plain mean;
the target in issue 6 is at most 10 s each at n = 16, d = 10M on the 2-core dev machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from averaging import aggregators  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--d", type=int, default=10_000_000)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--aggregators", default=",".join(aggregators.names()))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.n, args.d, generator=generator)
    bad = args.n // 5
    if bad:
        x[:bad] *= -1000.0
    print(f"n={args.n} d={args.d} float32 ({x.numel() * 4 / 1e6:.0f} MB), {bad} sign-flipped rows, "
          f"torch threads {torch.get_num_threads()}, best of {args.repeats}")
    print(f"{'aggregator':18}{'seconds':>10}{'x mean':>10}")
    reference = None
    for name in args.aggregators.split(","):
        f = aggregators.get(name)
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = f(x)
            best = min(best, time.perf_counter() - start)
        assert out.shape == (args.d,) and bool(torch.isfinite(out).all())
        reference = best if name == "mean" else reference
        ratio = f"{best / reference:10.0f}" if reference else f"{'':>10}"
        print(f"{name:18}{best:10.2f}{ratio}", flush=True)


if __name__ == "__main__":
    main()
