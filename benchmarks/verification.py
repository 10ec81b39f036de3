#!/usr/bin/env python3
"""Verification's cost and effect, in the in-process simulation of the real protocol code
(:mod:`verification.simulation`: 16 peers, the digits task, CenteredClip, in-memory network, virtual clock).

    .venv/bin/python benchmarks/verification.py [--peers 16] [--steps 20] [--probabilities 0,0.0625,0.25]
        [--attacks sign_flip,random_direction,zero,scaling,alie,ipm,label_flip,false_accuser] [--seeds 0,1]
        [--ban-steps 50] [--accuracy-steps 0] [--skip-overhead] [--skip-ban] [--task digits|charlm] [--json]

1. **Overhead against the check probability** (honest peers only, ``--steps`` steps each): every
   figure is a share of the same run's totals. *Step time*: the CPU seconds of verification
   (consistency checks, shared-randomness exchange, recomputations, ban-list reads) over the whole
   step's (training + all-reduce + verification), and separately the all-reduce's extra time with
   commitments against a run without them (``verify off``). *Bytes*: claims (block digests in the
   matchmaking gather), commitments (about 140 B per part header and result) and accusations, over
   the all-reduce's payload bytes. *Recomputation share*: recomputation seconds over training seconds
   (the expected value is the check probability: one recomputation per check); the owners' audits
   (fetching one part from every contributor, recomputing the aggregate) as a share of step time and
   of bytes.
2. **Steps to ban per attack**: one attacker among ``--peers`` at the default check probability
   (1/16), until every honest peer bans (or distrusts) it or ``--ban-steps`` steps; per seed.
3. With ``--accuracy-steps N``: held-out accuracy after N steps, clean and with one attacker per
   attack, in points against the clean run.

Wall times are of one process simulating all peers (so "seconds" add up every peer's CPU time);
shares are what matters. ``--json`` prints one JSON object instead of the tables.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from swarm.task import load_task
from verification.simulation import SimConfig, run
from verification.validator import DEFAULT_PROBABILITY

VERIFY_PARTS = ("consistency", "randomness", "validation", "banlist")


def _task(name: str = "digits"):
    task = load_task(str(Path(__file__).resolve().parent.parent / "examples" / f"{name}.py"))
    module = task._module
    if hasattr(module, "_dataset"):  # digits reads its data set from disk at every data() call
        module._dataset = functools.lru_cache(maxsize=1)(module._dataset)  # the same data, read once
    return task


def overhead(task, peers: int, steps: int, probabilities: list[float], seed: int,
             progress: bool = False) -> list[dict]:
    rows = []
    base = run(task, SimConfig(peers=peers, steps=steps, verify=False, eval_every=0, seed=seed))
    base_allreduce = base.seconds.get("allreduce", 0.0)
    for p in probabilities:
        started = time.perf_counter()
        r = run(task, SimConfig(peers=peers, steps=steps, probability=p, eval_every=0, seed=seed))
        s, b = r.seconds, r.bytes
        verify = sum(s.get(k, 0.0) for k in VERIFY_PARTS)
        step = s.get("train", 0.0) + s.get("allreduce", 0.0) + verify
        commit_extra = max(s.get("allreduce", 0.0) - base_allreduce, 0.0)
        payload = max(b.get("allreduce", 0), 1)
        rows.append({
            "probability": p, "steps": r.steps, "wall_seconds": round(time.perf_counter() - started, 1),
            "verification_share_of_step": verify / step if step else 0.0,
            "commitment_share_of_step": commit_extra / (step + commit_extra) if step else 0.0,
            "seconds": {k: round(v, 3) for k, v in s.items()},
            "bytes_share": {"claims": b.get("claims", 0) / payload, "commitments": b.get("commitments", 0) / payload,
                            "accusations": b.get("accusations", 0) / payload},
            "recomputation_share": s.get("recompute", 0.0) / s["train"] if s.get("train") else 0.0,
            "audit_share_of_step": s.get("audit", 0.0) / step if step else 0.0,
            "audit_bytes_share": b.get("audits", 0) / payload,
            "validations": r.validations, "false_bans": len(r.false_bans),
        })
        if progress:
            print(f"  p={p:g}: {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
    return rows


def steps_to_ban(task, peers: int, attacks: list[str], seeds: list[int], limit: int) -> list[dict]:
    rows = []
    for attack in attacks:
        found = []
        for seed in seeds:
            r = run(task, SimConfig(peers=peers, attackers={peers - 1: attack}, steps=limit, eval_every=0, seed=seed,
                                    stop_when_banned=True))
            found.append(r.banned_at[peers - 1])
            print(f"  {attack} seed {seed}: banned after {found[-1]} steps", file=sys.stderr, flush=True)
            if r.false_bans:
                rows.append({"attack": attack, "seed": seed, "false_bans": r.false_bans})
        banned = [s for s in found if s is not None]
        rows.append({"attack": attack, "steps_to_ban": found, "banned": f"{len(banned)}/{len(found)}",
                     "mean": statistics.fmean(banned) if banned else None, "max": max(banned) if banned else None})
    return rows


def accuracy(task, peers: int, attacks: list[str], steps: int, seed: int) -> list[dict]:
    """Final held-out accuracy after ``steps`` steps, clean and with one attacker per attack (default
    check probability), and the difference in points."""
    clean = run(task, SimConfig(peers=peers, steps=steps, eval_every=steps, seed=seed)).final_accuracy
    print(f"  clean: accuracy {clean:.4f}", file=sys.stderr, flush=True)
    rows = [{"attack": "none", "accuracy": clean, "points_vs_clean": 0.0, "banned_at": None}]
    for attack in attacks:
        r = run(task, SimConfig(peers=peers, attackers={peers - 1: attack}, steps=steps, eval_every=steps, seed=seed))
        rows.append({"attack": attack, "accuracy": r.final_accuracy,
                     "points_vs_clean": 100 * (r.final_accuracy - clean), "banned_at": r.banned_at[peers - 1]})
        print(f"  {attack}: accuracy {r.final_accuracy:.4f} (banned after {r.banned_at[peers - 1]})",
              file=sys.stderr, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=16)
    parser.add_argument("--task", default="digits", choices=["digits", "charlm"],
                        help="examples/TASK.py (default digits; charlm: 0.47 M parameters, for the overhead)")
    parser.add_argument("--steps", type=int, default=20, help="steps per overhead run (default 20)")
    parser.add_argument("--probabilities", default=f"0,{DEFAULT_PROBABILITY},0.25")
    parser.add_argument("--attacks", default="sign_flip,random_direction,zero,scaling,alie,ipm,label_flip,"
                                             "false_accuser")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--ban-steps", type=int, default=50)
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--skip-ban", action="store_true")
    parser.add_argument("--accuracy-steps", type=int, default=0,
                        help="also train that many steps clean and under each attack, and compare (default 0: no)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    task = _task(args.task)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    out: dict = {"peers": args.peers, "task": args.task, "aggregator": "centered_clip"}
    if not args.skip_overhead:
        out["overhead"] = overhead(task, args.peers, args.steps, [float(p) for p in args.probabilities.split(",")],
                                   seeds[0], progress=True)
        if not args.json:
            print(f"overhead, {args.task}, {args.peers} honest peers, {args.steps} steps (shares of the run's totals)")
            print(f"{'p':>8} {'verify/step':>12} {'commit/step':>12} {'claims B':>9} {'commit B':>9} "
                  f"{'accuse B':>9} {'recompute':>10} {'audit/step':>11} {'audit B':>8} {'checks':>7} "
                  f"{'false bans':>10}")
            for r in out["overhead"]:
                b = r["bytes_share"]
                print(f"{r['probability']:>8.4f} {r['verification_share_of_step']:>12.2%} "
                      f"{r['commitment_share_of_step']:>12.2%} {b['claims']:>9.2%} {b['commitments']:>9.2%} "
                      f"{b['accusations']:>9.2%} {r['recomputation_share']:>10.2%} {r['audit_share_of_step']:>11.2%} "
                      f"{r['audit_bytes_share']:>8.2%} {r['validations']:>7} {r['false_bans']:>10}", flush=True)
    attacks = [a for a in args.attacks.split(",") if a]
    if not args.skip_ban:
        out["steps_to_ban"] = steps_to_ban(task, args.peers, attacks, seeds, args.ban_steps)
    if args.accuracy_steps:
        out["accuracy"] = accuracy(task, args.peers, attacks, args.accuracy_steps, seeds[0])
    if args.json:
        print(json.dumps(out))
        return
    if "accuracy" in out:
        print(f"\nheld-out accuracy after {args.accuracy_steps} steps, 1 attacker of {args.peers}")
        for r in out["accuracy"]:
            print(f"  {r['attack']:18} {r['accuracy']:.4f} ({r['points_vs_clean']:+.1f} points; banned after "
                  f"{r['banned_at']})")
    if "steps_to_ban" not in out:
        return
    print(f"\nsteps to ban, 1 attacker of {args.peers}, check probability {DEFAULT_PROBABILITY:g}, seeds {seeds}")
    for r in out["steps_to_ban"]:
        if "steps_to_ban" in r:
            print(f"  {r['attack']:18} {r['banned']:>5} banned, steps {r['steps_to_ban']} (mean {r['mean']}, "
                  f"max {r['max']})")
        else:
            print(f"  {r['attack']:18} seed {r['seed']}: FALSE BANS {r['false_bans']}")


if __name__ == "__main__":
    main()
