#!/usr/bin/env python3
"""Convergence evidence: collaborative training reaches what one process reaches on the same samples.

    .venv/bin/python benchmarks/convergence.py [--seeds 0,1,2,3,4] [--peers 4] [--budget 16384]
        [--global-batch 256] [--batch 32] [--diloco-batch 2048] [--outer-lr 0.7] [--outer-momentum 0.5]

Task: scikit-learn's digits (``examples/digits.py``: its CNN, Adam lr 2e-3, its data split); the
figure is the held-out loss at a fixed sample budget. Per seed, every run starts from the same
initial parameters (``torch.manual_seed(seed)`` before building the model):

- **sync**: ``--peers`` peers, each with its own :class:`dht.DHT` (TCP on 127.0.0.1) and its own
  :class:`swarm.Optimizer` (mode ``"sync"``, ``target_batch_size = global_batch``), each on its own
  shard of the training set with local batches of ``--batch``, for ``budget / global_batch`` epochs.
  A swarm epoch ends when the peers' progress records say the swarm has ``target_batch_size``
  samples; the records are refreshed twice a second, so an epoch's actual global batch is close to,
  not exactly, the target (digits epochs take ~20 ms of compute). Every peer's averaging weight (its
  samples in the epoch) is recorded, so the realized global batch of every epoch is known.
- **single**: one process, plain torch, the task's optimizer, one step per sync epoch on the union of
  the samples the peers averaged in that epoch: the same samples, the same global batches, in the
  same order of steps. Any difference to sync is the distributed machinery's (progress, matchmaking,
  weighted all-reduce, state agreement, float summation order).
- **single-indep** (a control, not a check): one process on the same global batch sizes, but drawn
  from the whole training set in its own order: the seed-to-seed noise of this figure (~5 %).
- **diloco**: the same peers in mode ``"diloco"`` (the task's Adam as the inner optimizer on local
  batches of ``--batch``; outer Nesterov SGD; float16 pseudo-gradients),
  ``target_batch_size = --diloco-batch`` (16 inner steps per peer per round by default), stopped at
  the round end nearest to the sync run's sample count (the same budget); its global parameters are
  evaluated. Outer momentum 0.5 by default rather than DiLoCo's 0.9: this budget is only ~8 outer
  rounds, too few for a 0.9 momentum to settle (``--outer-momentum 0.9`` shows it).

The peers run as threads of this process (seeds x 2 modes x 4 peers fit on a 2-core machine this
way), but each has its own DHT node, and everything between them (progress records, matchmaking,
all-reduce, state downloads) goes over real TCP sockets on loopback. Bytes are the averaging traffic
(all-reduce payload on the wire, sent + received, summed over peers); DHT traffic is not counted.

Pass: mean over seeds of ``sync / single`` within 2 % (|ratio - 1| <= 0.02) and ``diloco / single``
<= 1.05 (lower is better), with sync's bytes >= 10x DiLoCo's. Exit code 0 only if all three hold.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import logging
import math
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dht import DHT  # noqa: E402
from swarm.optimizer import Optimizer  # noqa: E402
from swarm.task import Task, load_task  # noqa: E402


@dataclass
class RunResult:
    loss: float
    accuracy: float
    samples: int  # samples whose gradients made it into the model (all peers)
    epochs: int
    bytes: int = 0  # averaging bytes sent + received, all peers
    seconds: float = 0.0
    computed: int = 0  # samples the peers computed gradients on (includes any the swarm discarded)
    batches: list[int] = field(default_factory=list)  # realized global batch per epoch
    replay: list = field(default_factory=list)  # per epoch: the samples of all peers that went into it
    identical: bool = True  # every peer ended with bit-identical (global) parameters
    failed_rounds: int = 0  # averaging rounds that failed (counted per peer)


class RecordingOptimizer(Optimizer):
    """swarm.Optimizer that records, per epoch, its averaging weight (= its samples) and the batches
    behind it (``pending``: the batches of the current epoch, appended by the training loop)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.weights: dict[int, int] = {}
        self.contributions: dict[int, list] = {}
        self.pending: list = []

    def averaging_weight(self) -> float:
        weight = super().averaging_weight()
        self.weights[self.local_epoch] = int(self.local_samples)
        self.contributions[self.local_epoch], self.pending = self.pending, []
        return weight


def _collate(parts: list) -> Any:
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    return type(first)(_collate(list(column)) for column in zip(*parts))


def _sample_stream(task: Task, seed: int) -> Iterator[Any]:
    """Single-sample batches of the whole training set, reshuffled every pass (seeded)."""
    return task.batches(0, 1, 1, seed)


def single_process(task: Task, seed: int, batches: list[int] | list[Any]) -> RunResult:
    """Plain torch: one step of the task's optimizer per entry of ``batches``: a batch, or a batch size
    (then drawn from the whole training set, shuffled by ``seed``)."""
    started = time.monotonic()
    torch.manual_seed(seed)
    model = task.model()
    opt = task.optimizer(model.parameters())
    stream = _sample_stream(task, seed)
    sizes = []
    for entry in batches:
        batch = _collate([next(stream) for _ in range(entry)]) if isinstance(entry, int) else entry
        sizes.append(task.samples_in(batch))
        loss = task.loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
    metrics = task.evaluate(model.eval())
    return RunResult(metrics["loss"], metrics.get("accuracy", math.nan), sum(sizes), len(sizes),
                     seconds=time.monotonic() - started, batches=sizes)


def _fingerprint(tensors: list[torch.Tensor]) -> str:
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
    return hashlib.sha256(flat.numpy().tobytes()).hexdigest()


def collaborative(task: Task, seed: int, peers: int, batch: int, target_batch_size: int, mode: str,
                  timeout: float, epochs: int | None = None, sample_budget: int | None = None,
                  outer_lr: float = 0.7, outer_momentum: float = 0.9) -> RunResult:
    """``peers`` threads, each a DHT node + swarm.Optimizer on its shard; stops after ``epochs``
    epochs, or at the epoch end nearest to ``sample_budget`` samples in the model."""
    dhts = [DHT(host="127.0.0.1")]
    dhts += [DHT(initial_peers=dhts[0].get_visible_addresses(), host="127.0.0.1") for _ in range(peers - 1)]
    run_id = f"convergence-{mode}-{seed}-{time.time_ns()}"
    computed, failures = [0] * peers, [0] * peers
    models: list[torch.nn.Module | None] = [None] * peers
    opts: list[RecordingOptimizer | None] = [None] * peers
    errors: list[BaseException] = []
    ready = threading.Barrier(peers)
    lock = threading.Lock()
    stop_epoch = [epochs]  # set once by the first peer that sees the budget reached
    options = dict(mode="diloco", outer_lr=outer_lr, outer_momentum=outer_momentum) if mode == "diloco" else {}

    def in_model(upto: int) -> int:
        return sum(w for o in opts if o is not None for e, w in o.weights.items() if e < upto)

    torch.manual_seed(seed)  # the same initial parameters as the single process; built here, not in the
    initial = task.model().state_dict()  # threads: they would share (and interleave on) torch's global RNG

    def peer(i: int) -> None:
        try:
            model = task.model()
            model.load_state_dict(initial)
            batches = task.batches(i, peers, batch, seed * 1000 + i)
            opt = RecordingOptimizer(dht=dhts[i], run_id=run_id, optimizer=task.optimizer, params=model.parameters(),
                                     target_batch_size=target_batch_size, batch_size_per_step=batch,
                                     matchmaking_time=1.0, averaging_timeout=30, **options)
            models[i], opts[i] = model, opt
            deadline = time.monotonic() + 20
            while opt.tracker.refresh().num_peers < peers and time.monotonic() < deadline:
                time.sleep(0.1)
            ready.wait(30)
            stop_at = time.monotonic() + timeout
            last_failure = None
            while (stop_epoch[0] is None or opt.local_epoch < stop_epoch[0]) and time.monotonic() < stop_at:
                x = next(batches)
                loss = task.loss(model, x)
                loss.backward()
                opt.pending.append(x)
                ended = opt.step(batch_size=task.samples_in(x), loss=loss)
                opt.zero_grad()
                if ended:
                    opt.pending = []  # not averaged (the peer caught up by downloading): not in the model
                computed[i] += task.samples_in(x)
                if ended and isinstance(opt.last_averaging, Exception) and opt.last_averaging is not last_failure:
                    last_failure = opt.last_averaging
                    failures[i] += 1
                if ended and sample_budget is not None:
                    with lock:  # stop at the round end nearest to the budget
                        if stop_epoch[0] is None and in_model(opt.local_epoch) >= sample_budget - target_batch_size // 2:
                            stop_epoch[0] = opt.local_epoch
        except BaseException as e:  # noqa: BLE001 - reported by the caller
            errors.append(e)

    started = time.monotonic()
    threads = [threading.Thread(target=peer, args=(i,), daemon=True) for i in range(peers)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout + 60)
        seconds = time.monotonic() - started
        if errors:
            raise errors[0]
        done = [o for o in opts if o is not None]
        last = min(o.local_epoch for o in done)
        if mode == "diloco":  # evaluate the global parameters (the local ones drift with inner steps)
            with torch.no_grad():
                for p, g in zip(models[0].parameters(), done[0].global_params):
                    p.copy_(g)
            finals = [o.global_params for o in done]
        else:
            finals = [list(m.parameters()) for m in models]
        metrics = task.evaluate(models[0].eval())
        per_epoch: dict[int, int] = collections.Counter()
        replay: dict[int, list] = collections.defaultdict(list)
        for o in done:
            for e, w in o.weights.items():
                if e < last:
                    per_epoch[e] += w
                    replay[e].extend(o.contributions[e])
        return RunResult(metrics["loss"], metrics.get("accuracy", math.nan), sum(per_epoch.values()), last,
                         sum(o.bytes_sent + o.bytes_received for o in done), seconds, sum(computed),
                         [per_epoch[e] for e in range(last)], [_collate(replay[e]) for e in range(last)],
                         len({_fingerprint(t) for t in finals}) == 1, sum(failures))
    finally:
        for o in opts:
            if o is not None:
                o.shutdown()
        for d in dhts:
            d.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--budget", type=int, default=16384, help="training samples per run, all peers (default 16384)")
    parser.add_argument("--global-batch", type=int, default=256, help="sync: samples per epoch (default 256)")
    parser.add_argument("--batch", type=int, default=32, help="samples per local step of a peer (default 32)")
    parser.add_argument("--diloco-batch", type=int, default=2048,
                        help="DiLoCo: samples per outer round, all peers (default 2048 = 16 inner steps x 4 peers x 32)")
    parser.add_argument("--outer-lr", type=float, default=0.7)
    parser.add_argument("--outer-momentum", type=float, default=0.5)
    parser.add_argument("--timeout", type=float, default=150.0, help="seconds per collaborative run at most")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(1)
    task = load_task(str(Path(__file__).resolve().parent.parent / "examples" / "digits.py"))
    seeds = [int(s) for s in args.seeds.split(",")]
    epochs = args.budget // args.global_batch
    print(f"digits: held-out loss after ~{args.budget} training samples. sync: {args.peers} peers x local batch "
          f"{args.batch}, {epochs} epochs of {args.global_batch}; single: plain torch on the samples of each sync "
          f"epoch; DiLoCo: {args.diloco_batch} samples per round "
          f"({args.diloco_batch // (args.peers * args.batch)} inner steps per peer), outer lr {args.outer_lr}, "
          f"momentum {args.outer_momentum}, to the same budget", flush=True)
    rows = []
    for seed in seeds:
        sync = collaborative(task, seed, args.peers, args.batch, args.global_batch, "sync", args.timeout, epochs=epochs)
        single = single_process(task, seed, sync.replay)
        independent = single_process(task, seed, sync.batches)
        sync.replay = []
        diloco = collaborative(task, seed, args.peers, args.batch, args.diloco_batch, "diloco", args.timeout,
                               sample_budget=sync.samples, outer_lr=args.outer_lr, outer_momentum=args.outer_momentum)
        rows.append((seed, single, sync, diloco, independent))
        for name, r in (("single", single), ("sync", sync), ("diloco", diloco), ("single-indep", independent)):
            batches = f"global batch {statistics.fmean(r.batches):6.1f} [{min(r.batches)}-{max(r.batches)}]" \
                if r.batches else ""
            print(f"  seed {seed} {name:12}: loss {r.loss:.4f}  accuracy {r.accuracy:.4f}  epochs {r.epochs:3d}  "
                  f"samples {r.samples:6d}  {batches}  bytes {r.bytes:>11,d}  {r.seconds:5.1f} s"
                  + (f"  (computed {r.computed})" if r.computed else "")
                  + ("" if r.identical else "  (peers' parameters differ)")
                  + (f"  ({r.failed_rounds} failed rounds)" if r.failed_rounds else ""), flush=True)

    print()
    print(f"{'seed':>6} {'single':>8} {'sync':>8} {'diloco':>8} {'sync/single':>12} {'diloco/single':>14} "
          f"{'samples sync':>13} {'samples diloco':>15} {'bytes sync':>12} {'bytes diloco':>13} {'bytes ratio':>12}")
    for seed, single, sync, diloco, _ in rows:
        print(f"{seed:>6} {single.loss:8.4f} {sync.loss:8.4f} {diloco.loss:8.4f} {sync.loss / single.loss:12.4f} "
              f"{diloco.loss / single.loss:14.4f} {sync.samples:13d} {diloco.samples:15d} {sync.bytes:12,d} "
              f"{diloco.bytes:13,d} {sync.bytes / max(diloco.bytes, 1):12.1f}")

    def mean(index: int, attr: str) -> float:
        return statistics.fmean(getattr(r[index], attr) for r in rows)

    single_loss, sync_loss, diloco_loss = mean(1, "loss"), mean(2, "loss"), mean(3, "loss")
    sync_bytes, diloco_bytes = mean(2, "bytes"), mean(3, "bytes")
    sync_ratio, diloco_ratio = sync_loss / single_loss, diloco_loss / single_loss
    bytes_ratio = sync_bytes / max(diloco_bytes, 1)
    print(f"{'mean':>6} {single_loss:8.4f} {sync_loss:8.4f} {diloco_loss:8.4f} {sync_ratio:12.4f} {diloco_ratio:14.4f} "
          f"{mean(2, 'samples'):13.0f} {mean(3, 'samples'):15.0f} {sync_bytes:12,.0f} {diloco_bytes:13,.0f} "
          f"{bytes_ratio:12.1f}")
    print(f"(control: single-indep, same batch sizes, its own data order: mean loss {mean(4, 'loss'):.4f}, "
          f"sync / single-indep {sync_loss / mean(4, 'loss'):.4f}; sync's realized global batch: mean "
          f"{statistics.fmean(b for r in rows for b in r[2].batches):.1f} for a target of {args.global_batch})")
    print()
    checks = [(f"sync within 2% of single (mean loss ratio {sync_ratio:.4f})", abs(sync_ratio - 1) <= 0.02),
              (f"diloco within 5% of single (mean loss ratio {diloco_ratio:.4f}; lower is better)", diloco_ratio <= 1.05),
              (f"diloco exchanges >= 10x fewer bytes than sync ({sync_bytes:,.0f} vs {diloco_bytes:,.0f} bytes, "
               f"{bytes_ratio:.1f}x)", bytes_ratio >= 10)]
    for text, ok in checks:
        print(f"  [{'pass' if ok else 'FAIL'}] {text}")
    sys.exit(0 if all(ok for _, ok in checks) else 1)


if __name__ == "__main__":
    main()
