#!/usr/bin/env python3
"""Robustness table: every aggregator x attack x fraction of attackers, in process.

    .venv/bin/python benchmarks/robustness.py [--n 20] [--d 1000] [--seeds 5] [--fractions 0,0.1,0.2,0.3]
        [--aggregators mean,median,...] [--attacks sign_flip,...] [--noise 1.0] [--parts 20]
        [--training [--training-args "..."]]

Part 1 (whole vectors): ``n`` inputs (default 20), of which ``round(fraction * n)`` are attackers.
Honest inputs are ``m + noise * N(0, I_d)`` with one shared ``m ~ N(0, I_d)`` per seed (the design
notes' high-signal fixture HS, with 20 rows); attackers send what :mod:`averaging.attacks` makes of
the honest inputs (omniscient, parameters of algorithms.md §8.1). Printed: the relative L2 error
``‖agg - μ_H‖ / ‖μ_H‖`` to the honest mean, mean over seeds (so 1.0 is as far as returning 0; the
attack-free noise floor is about ``noise / sqrt(n d)``-ish for the mean and larger for selection
rules). NaN/Inf inputs are dropped before aggregating, as the all-reduce excludes their senders.
``stale`` sends honest-looking updates drawn around an unrelated earlier ``m``. An aggregator that
refuses the input size (e.g. Bulyan needs n >= 4f + 3 only for its own default f, so it never
refuses) prints ``err``.

Part 2 (butterfly): the same at one fraction (20%), but aggregated per part as the butterfly all-reduce
does (``--parts`` contiguous parts, one aggregator call each), plus colluders that attack only one
part (``collude_on_part``; error measured on that part).

Part 3 (end-to-end training): ``--training`` runs ``benchmarks/robust_training.py`` (real peers on
loopback training on scikit-learn's digits, 1 Byzantine peer of 5 = 20%, mean over 3 seeds) for
mean, CenteredClip and the Flag Aggregator; slow (minutes per cell), so skipped by default.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from averaging import aggregators, attacks  # noqa: E402

ATTACKS = ["sign_flip", "scaling", "large_constant", "random_direction", "gaussian", "nan", "alie", "ipm",
           "ipm_large", "min_max", "stale", "mimic", "centered_clip_adaptive"]
HIGHLIGHT = ["mean", "median", "geometric_median", "multi_krum", "centered_clip", "flag_aggregate"]


def honest_inputs(m: int, d: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(honest [m, d], an earlier round's honest [m, d] for the stale attack)."""
    g = torch.Generator().manual_seed(seed)
    signal, old_signal = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    honest = signal + noise * torch.randn(m, d, generator=g, dtype=torch.float64)
    past = old_signal + noise * torch.randn(m, d, generator=g, dtype=torch.float64)
    return honest, past


def attack_inputs(attack: str, honest: torch.Tensor, past: torch.Tensor, b: int, seed: int,
                  part: tuple[int, int] | None = None) -> torch.Tensor:
    params: dict = {"past": past} if attack == "stale" else {}
    if part is not None and attack == "collude_on_part":
        params = {"part": part, "inner": "sign_flip"}
    x = attacks.make_inputs(honest, b, attack, generator=torch.Generator().manual_seed(10_000 + seed), **params)
    return x[torch.isfinite(x).all(dim=1)]  # the all-reduce excludes NaN/Inf senders


def aggregate(name: str, x: torch.Tensor, parts: list[tuple[int, int]] | None = None) -> torch.Tensor:
    f = aggregators.get(name)
    if parts is None:
        return f(x)
    return torch.cat([f(x[:, lo:hi].contiguous()) for lo, hi in parts])


def error(name: str, x: torch.Tensor, mu: torch.Tensor, parts=None, measure: tuple[int, int] | None = None) -> float:
    try:
        out = aggregate(name, x, parts)
    except ValueError:
        return float("nan")
    lo, hi = measure or (0, len(mu))
    return float((out[lo:hi] - mu[lo:hi]).norm() / mu[lo:hi].norm())


def fmt(value: float) -> str:
    if value != value:
        return f"{'err':>9}"
    return f"{value:9.3f}" if value < 1000 else f"{value:9.2e}"


def whole_vector_table(args, names: list[str], attack_names: list[str], fractions: list[float]) -> dict:
    results: dict[tuple[str, str, float], float] = {}
    for attack in attack_names:
        for fraction in fractions:
            b = round(fraction * args.n)
            per_seed: dict[str, list[float]] = {name: [] for name in names}
            for seed in range(args.seeds):
                honest, past = honest_inputs(args.n - b, args.d, args.noise, seed)
                x = attack_inputs(attack, honest, past, b, seed)
                mu = honest.mean(0)
                for name in names:
                    per_seed[name].append(error(name, x, mu))
            for name in names:
                results[attack, name, fraction] = statistics.fmean(per_seed[name])
    print(f"== Part 1: whole vectors. n={args.n} inputs, d={args.d}, honest = m + {args.noise} N(0, I), "
          f"{args.seeds} seeds; relative L2 error to the honest mean")
    header = f"{'aggregator':18}" + "".join(f"{f'{round(100 * f)}% ({round(f * args.n)})':>10}" for f in fractions)
    for attack in attack_names:
        print(f"\n-- attack: {attack}")
        print(header)
        for name in names:
            print(f"{name:18}" + "".join(f" {fmt(results[attack, name, f])}" for f in fractions))
    return results


def summary_at(results: dict, names: list[str], attack_names: list[str], fraction: float, n: int) -> None:
    print(f"\n== Summary at {round(100 * fraction)}% attackers ({round(fraction * n)} of {n}): relative L2 error")
    print(f"{'attack':24}" + "".join(f"{name[:12]:>13}" for name in names))
    for attack in attack_names:
        print(f"{attack:24}" + "".join(f"    {fmt(results[attack, name, fraction])}" for name in names))


def butterfly_table(args, names: list[str], attack_names: list[str], fraction: float) -> None:
    b = round(fraction * args.n)
    parts = attacks.part_ranges(args.d, args.parts)
    target = parts[len(parts) // 2]
    rows = attack_names + ["collude_on_part"]
    print(f"\n== Part 2: butterfly, aggregated per part ({args.parts} parts of ~{args.d // args.parts}), "
          f"{b} of {args.n} attackers; collude_on_part: sign flip x1000 only in part {target}, error on that part")
    print(f"{'attack':24}" + "".join(f"{name[:12]:>13}" for name in names))
    for attack in rows:
        errors: dict[str, list[float]] = {name: [] for name in names}
        for seed in range(args.seeds):
            honest, past = honest_inputs(args.n - b, args.d, args.noise, seed)
            x = attack_inputs(attack, honest, past, b, seed, part=target)
            measure = target if attack == "collude_on_part" else None
            for name in names:
                errors[name].append(error(name, x, honest.mean(0), parts, measure))
        print(f"{attack:24}" + "".join(f"    {fmt(statistics.fmean(errors[name]))}" for name in names))


def training(extra: str) -> None:
    """Part 3: end-to-end collaborative training under attack (benchmarks/robust_training.py)."""
    command = [sys.executable, str(ROOT / "benchmarks" / "robust_training.py"), "--peers", "5", "--attackers", "1",
               "--seeds", "0,1,2", "--aggregators", "mean,centered_clip,flag_aggregate", *shlex.split(extra)]
    print(f"\n== Part 3: end-to-end training, 20% attackers: {' '.join(command[1:])}", flush=True)
    subprocess.run(command, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20, help="inputs per aggregation (default 20)")
    parser.add_argument("--d", type=int, default=1000)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--noise", type=float, default=1.0, help="honest noise scale (signal: N(0, I))")
    parser.add_argument("--fractions", default="0,0.1,0.2,0.3")
    parser.add_argument("--aggregators", default=",".join(aggregators.names()))
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--parts", type=int, default=20, help="butterfly parts in part 2 (0: skip part 2)")
    parser.add_argument("--training", action="store_true", help="also run part 3 (slow: real peers, minutes)")
    parser.add_argument("--skip-training", dest="training", action="store_false", help="(default) skip part 3")
    parser.add_argument("--training-args", default="", help="extra arguments for robust_training.py")
    args = parser.parse_args()
    torch.set_num_threads(1)
    names, attack_names = args.aggregators.split(","), args.attacks.split(",")
    fractions = [float(f) for f in args.fractions.split(",")]
    started = time.monotonic()
    results = whole_vector_table(args, names, attack_names, fractions)
    focus = 0.2 if 0.2 in fractions else fractions[-1]
    summary_at(results, names, attack_names, focus, args.n)
    if args.parts:
        butterfly_table(args, names, attack_names, focus)
    print(f"\n(parts 1-2 took {time.monotonic() - started:.0f} s)")
    if args.training:
        training(args.training_args)
    else:
        print("\n== Part 3: end-to-end training: skipped (--training runs benchmarks/robust_training.py)")


if __name__ == "__main__":
    main()
