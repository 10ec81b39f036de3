"""One peer of lab training: examples/charlm.py with one torch thread, timing compute against wall time.

    python tests/netlab_peers/train_peer.py --host IP --index I --peers N --mode MODE --samples S
        --run-id ID --start FILE --out FILE [--matchmaking-time 1] [--bandwidth MB/S] [INITIAL_PEER ...]

``MODE``: ``single`` (plain AdamW on its own, no DHT, all S samples), ``sync`` (swarm.Optimizer,
target batch 256: runs until the swarm's epoch reaches S / 256), ``diloco`` and ``diloco_overlap``
(swarm.Optimizer mode="diloco", 16 inner steps per outer round, overlap=False / True, float16
pseudo-gradients: each peer takes S / (16 N) local steps, so the rounds are S / (16 N) / 16 and the
swarm sees S samples; with overlap the last round is awaited and applied before the evaluation).
Every peer starts from the same initial model (seed 0) and reads shard I of N (seed 1000 + I).

Prints ``ready`` once built, waits until the unix time in ``--start`` (a file the driver writes),
trains, then writes ``--out``: ``{"mode", "index", "samples", "steps", "epochs", "wall", "drain", "compute",
"compute_cpu", "heldout_loss", "failed_rounds", "bytes"}``. ``compute``: wall seconds in forward,
backward and the wrapped torch optimizer's ``step`` (the inner / local steps; data loading, gradient
accumulation and averaging excluded); ``compute_cpu``: this thread's CPU seconds in those same
sections (``time.thread_time``), which is what the compute would take on a core of its own;
``wall``: from the start to the end of the last step (for the overlap, the steady state: its last
round, which no further step could hide, is awaited after that, and the steps that a round still
under way when the next was due left out get a last round: ``drain`` seconds). The held-out loss
(``task.evaluate``, nats per byte) is of the model the swarm agreed on: the parameters (sync, single)
or DiLoCo's global parameters. Then it stays up (serving its state, heartbeating) until killed.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch

MODES = ("single", "sync", "diloco", "diloco_overlap")
INNER_STEPS = 16
TARGET_BATCH = 256


class _Timer:
    """Wall and thread-CPU seconds spent inside ``with timer:`` blocks."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    def __enter__(self) -> None:
        self._w, self._c = time.perf_counter(), time.thread_time()

    def __exit__(self, *exc: object) -> None:
        self.wall += time.perf_counter() - self._w
        self.cpu += time.thread_time() - self._c


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("initial_peers", nargs="*")
    p.add_argument("--host", required=True)
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--peers", type=int, required=True)
    p.add_argument("--mode", choices=MODES, required=True)
    p.add_argument("--samples", type=int, required=True, help="samples of the whole swarm")
    p.add_argument("--run-id", default="netlab-train")
    p.add_argument("--start", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--matchmaking-time", type=float, default=1.0)
    p.add_argument("--bandwidth", type=float, default=None, help="MB/s announced for load balancing")
    args = p.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    from swarm.examples.charlm import task
    from swarm.optimizer import Optimizer

    torch.manual_seed(0)
    model = task.model()
    batch = task.batch_size
    timer = _Timer()
    dht = opt = None
    if args.mode == "single":
        local = task.optimizer(model.parameters())
        steps_wanted = args.samples // batch
    else:
        from dht import DHT
        dht = DHT(initial_peers=args.initial_peers, host=args.host)
        diloco = args.mode != "sync"
        options = (dict(mode="diloco", target_batch_size=None, inner_steps=INNER_STEPS, outer_lr=0.7,
                        outer_momentum=0.9, overlap=args.mode == "diloco_overlap")
                   if diloco else dict(mode="sync", target_batch_size=TARGET_BATCH))
        opt = Optimizer(dht=dht, run_id=args.run_id, optimizer=task.optimizer, params=model.parameters(),
                        batch_size_per_step=batch, matchmaking_time=args.matchmaking_time, bandwidth=args.bandwidth,
                        target_group_size=args.peers, **options)
        local = opt.opt
        steps_wanted = args.samples // (batch * args.peers)
        epochs_wanted = args.samples // TARGET_BATCH
    inner_step = local.step

    @functools.wraps(inner_step)
    def timed_step(*a, **k):
        with timer:
            return inner_step(*a, **k)

    local.step = timed_step  # the local / inner optimizer step counts as compute, wherever it is called
    batches = task.batches(args.index, args.peers, batch, seed=1000 + args.index)
    next(batches)  # load the data before the clock starts
    print("ready", flush=True)
    deadline = time.monotonic() + 300
    while not os.path.exists(args.start) and time.monotonic() < deadline:
        time.sleep(0.02)
    with open(args.start) as f:
        start = float(f.read())
    while time.time() < start:
        time.sleep(0.005)

    begin = time.perf_counter()
    steps = samples = failed = 0
    last = opt.last_averaging if opt else None
    while True:
        if args.mode == "sync":
            if opt.local_epoch >= epochs_wanted:
                break
        elif steps >= steps_wanted:
            break
        data = next(batches)
        with timer:
            loss = task.loss(model, data)
            loss.backward()
        if opt is None:
            local.step()
            local.zero_grad()
        else:
            opt.step(batch_size=task.samples_in(data), loss=loss)
            opt.zero_grad()
            if opt.last_averaging is not last:
                last = opt.last_averaging
                failed += isinstance(last, Exception)
        steps += 1
        samples += task.samples_in(data)
    wall = time.perf_counter() - begin

    def drain() -> int:
        """Await the overlap's background round and apply it; 1 if it failed."""
        if opt is None or not opt.flush():
            return 0
        return int(isinstance(opt.last_averaging, Exception))

    failed += drain()
    if opt is not None and opt.mode == "diloco" and opt.inner_step_count > 0:
        # overlap: a round still running when the next was due delays that one; its steps get a last round
        opt._outer_round(opt.tracker.global_progress)
        failed += drain()
    drain_s = time.perf_counter() - begin - wall

    if opt is not None and opt.mode == "diloco":
        with torch.no_grad():
            for param, value in zip(opt.params, opt.global_params):
                param.copy_(value)
    metrics = task.evaluate(model)
    result = {"mode": args.mode, "index": args.index, "samples": samples, "steps": steps,
              "epochs": opt.local_epoch if opt else 0, "wall": wall, "drain": drain_s, "compute": timer.wall,
              "compute_cpu": timer.cpu,
              "heldout_loss": metrics["loss"], "failed_rounds": failed,
              "bytes": (opt.bytes_sent + opt.bytes_received) if opt else 0}
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, args.out)
    print("DONE", json.dumps(result), flush=True)
    while True:  # keep serving the state and heartbeating until the driver ends the lab
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main())
