#!/usr/bin/env python3
"""End-to-end robustness: collaborative training on scikit-learn's digits with a Byzantine peer.

    .venv/bin/python benchmarks/robust_training.py [--peers 5] [--attackers 1] [--seeds 0,1,2]
        [--aggregators mean,centered_clip,flag_aggregate] [--attacks none,sign_flip,...] [--epochs 30]

Real peers on loopback: every peer has its own :class:`dht.DHT` (TCP on 127.0.0.1) and its own
:class:`swarm.Optimizer` in sync mode with ``aggregator=...``; they run as threads of this process
(to fit 3 seeds x aggregators x attacks on a 2-core machine), but everything between them goes
over the real transport. ``--attackers`` of the ``--peers`` (default 1 of 5 = 20%) are Byzantine:
they compute an honest gradient on their own data and send what the attack makes of it (hook
:meth:`swarm.Optimizer.before_averaging`), while reducing their own part honestly (a lying part
owner is the verification layer's problem, not the aggregator's). Attacks, with the parameters of
algorithms.md section 8.1 where they fit this setting:

- ``sign_flip``: ``-1000 g``; ``scaling``: ``+1000 g``; ``random``: ``N(0, 200^2)``; ``nan``: all NaN;
- ``label_flip``: the attacker trains on ``y -> 9 - y`` and sends that honest-looking gradient;
- ``ipm``: ``-eps * mu`` with eps = 100 (vs mean-like rules); ``alie``: ``mu - z * sigma`` with
  z = Phi^-1((n - s) / n), s = floor(n/2 + 1) - f. The attacker estimates mu and sigma from 4
  sub-batch gradients of its own data (not omniscient: a weaker, realistic ALIE/IPM);
- ``stale``: its own honest gradient from 10 epochs earlier; ``weight``: an honest gradient sent with
  a claimed batch of 10^6 samples (tests the weight cap of robust mode).

Printed: final held-out accuracy of an honest peer per (aggregator, attack), mean over seeds, and
the drop versus the attack-free run of the same aggregator.
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
import threading
import time
from collections import deque
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dht import DHT  # noqa: E402
from swarm.optimizer import Optimizer  # noqa: E402
from swarm.task import load_task  # noqa: E402

ATTACKS = ["none", "sign_flip", "scaling", "random", "nan", "label_flip", "ipm", "alie", "stale", "weight"]


class ByzantineOptimizer(Optimizer):
    """A peer that sends ``attack(its honest contribution)`` instead of its contribution."""

    def __init__(self, *args, attack: str, n: int, f: int, estimate=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.attack, self.n, self.f = attack, n, f
        self.estimate = estimate  # callable -> (mu, sigma) lists per tensor, from sub-batches
        self.history: deque[list[torch.Tensor]] = deque(maxlen=10)

    def before_averaging(self, tensors: list[torch.Tensor]) -> None:
        honest = [t.clone() for t in tensors]
        self.history.append(honest)
        if self.attack == "sign_flip":
            for t in tensors:
                t.mul_(-1000.0)
        elif self.attack == "scaling":
            for t in tensors:
                t.mul_(1000.0)
        elif self.attack == "random":
            for t in tensors:
                t.copy_(torch.randn_like(t) * 200.0)
        elif self.attack == "nan":
            for t in tensors:
                t.fill_(float("nan"))
        elif self.attack == "stale" and len(self.history) == self.history.maxlen:
            for t, old in zip(tensors, self.history[0]):
                t.copy_(old)
        elif self.attack in ("ipm", "alie") and self.estimate is not None:
            mu, sigma = self.estimate()
            if self.attack == "ipm":
                for t, m in zip(tensors, mu):
                    t.copy_(-100.0 * m)
            else:
                s = math.floor(self.n / 2 + 1) - self.f
                z = statistics.NormalDist().inv_cdf((self.n - s) / self.n)
                for t, m, sd in zip(tensors, mu, sigma):
                    t.copy_(m - z * sd)

    def averaging_weight(self) -> float:
        return 1e6 if self.attack == "weight" else super().averaging_weight()


def run_once(task, aggregator: str, attack: str, seed: int, peers: int, attackers: int, epochs: int,
             timeout: float) -> float:
    """Train; returns the held-out accuracy of honest peer 0 (NaN if it never got there)."""
    dhts = [DHT(host="127.0.0.1")]
    dhts += [DHT(initial_peers=dhts[0].get_visible_addresses(), host="127.0.0.1") for _ in range(peers - 1)]
    run_id = f"robust-{aggregator}-{attack}-{seed}-{time.time_ns()}"
    results: dict[int, float] = {}
    ready = threading.Barrier(peers)
    torch.manual_seed(seed)  # one initial model for all peers (the global RNG is not per thread)
    initial_state = task.model().state_dict()

    def peer(i: int) -> None:
        byzantine = attack != "none" and i >= peers - attackers
        model = task.model()
        model.load_state_dict(initial_state)
        batches = task.batches(i, peers, 32, seed * 100 + i)
        flip = byzantine and attack == "label_flip"

        @torch.enable_grad()  # called from the optimizer's step, which runs under no_grad
        def estimate():
            xb, yb = next(batches)
            grads = []
            for part in range(4):
                model.zero_grad()
                sl = slice(part * 8, (part + 1) * 8)
                F.cross_entropy(model(xb[sl]), yb[sl]).backward()
                grads.append([p.grad.detach().clone() for p in model.parameters()])
            model.zero_grad()
            stacked = [torch.stack(g) for g in zip(*grads)]
            return [s.mean(0) for s in stacked], [s.std(0) for s in stacked]

        cls = ByzantineOptimizer if byzantine else Optimizer
        extra = dict(attack=attack, n=peers, f=attackers, estimate=estimate) if byzantine else {}
        opt = cls(dht=dhts[i], run_id=run_id, optimizer=task.optimizer, params=model.parameters(),
                  target_batch_size=32 * 2 * peers, batch_size_per_step=32, aggregator=aggregator,
                  matchmaking_time=1.0, averaging_timeout=30, share_state=True, **extra)
        try:
            deadline = time.monotonic() + 15
            while opt.tracker.refresh().num_peers < peers and time.monotonic() < deadline:
                time.sleep(0.1)
            ready.wait(30)
            stop_at = time.monotonic() + timeout
            while opt.local_epoch < epochs and time.monotonic() < stop_at:
                x, y = next(batches)
                if flip:
                    y = 9 - y
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                opt.step(loss=loss)
                opt.zero_grad()
            if not byzantine:
                results[i] = task.evaluate(model)["accuracy"]
        finally:
            opt.shutdown()

    threads = [threading.Thread(target=peer, args=(i,), daemon=True) for i in range(peers)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout + 60)
    finally:
        for d in dhts:
            d.shutdown()
    return results.get(0, float("nan"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=5)
    parser.add_argument("--attackers", type=int, default=1)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--aggregators", default="mean,centered_clip,flag_aggregate")
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--epochs", type=int, default=30, help="collaborative epochs per run (default 30)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per run at most (default 120)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(1)
    task = load_task(str(Path(__file__).resolve().parent.parent / "examples" / "digits.py"))
    seeds = [int(s) for s in args.seeds.split(",")]
    aggregators, attacks = args.aggregators.split(","), args.attacks.split(",")
    print(f"digits, {args.peers} peers, {args.attackers} Byzantine ({100 * args.attackers / args.peers:.0f}%), "
          f"{args.epochs} epochs of {64 * args.peers} samples, seeds {seeds}; held-out accuracy of an honest peer",
          flush=True)
    table: dict[tuple[str, str], list[float]] = {}
    for aggregator in aggregators:
        for attack in attacks:
            accs = []
            for seed in seeds:
                started = time.monotonic()
                accs.append(run_once(task, aggregator, attack, seed, args.peers, args.attackers, args.epochs,
                                     args.timeout))
                print(f"  {aggregator:15} {attack:10} seed {seed}: accuracy {accs[-1]:.4f} "
                      f"({time.monotonic() - started:.0f} s)", flush=True)
            table[aggregator, attack] = accs
    print()
    print(f"{'attack':12}" + "".join(f"{a:>24}" for a in aggregators))
    for attack in attacks:
        row = f"{attack:12}"
        for aggregator in aggregators:
            accs = table[aggregator, attack]
            mean = statistics.fmean(accs)
            base = statistics.fmean(table.get((aggregator, "none"), accs))
            row += f"{mean:>15.4f} ({100 * (mean - base):+5.1f})"
        print(row)
    print("\n(in parentheses: accuracy points versus the same aggregator without attack)")


if __name__ == "__main__":
    main()
