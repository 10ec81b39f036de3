"""Task: a byte-level transformer LM cut into 4 pipeline stages (SWARM parallelism), on text files.

    swarm dht --port 31337                                                       # the bootstrap peer
    swarm join swarm.examples.swarm_lm:task --role server --stage auto --initial-peers ADDR   # x4 (or more)
    swarm join swarm.examples.swarm_lm:task --role trainer --initial-peers ADDR               # x2 (or more)

(in a clone, ``examples/swarm_lm.py`` is this file). Each server holds one stage (``--max-memory``
caps what it may hold: parameters, gradients and optimizer state); trainers own the data and drive
microbatches through a random server of each stage.

Stages (width 128, 4 heads, context 64 bytes, one pre-norm block each; ~0.86 M parameters in all):

- 0: byte embedding + learned positions + block;  1 and 2: a block;  3: block + LayerNorm + LM head.

Data: exactly as :mod:`swarm.examples.charlm` (``$SWARM_CHARLM_DATA``, default the standard
library's ``*.py`` files; every 10th file held out). ``loss(output, batch)`` is the mean cross-entropy
per byte (nats) of the last stage's logits; ``evaluate(forward)`` reports it on fixed held-out
windows, for any callable ``tokens -> logits`` (the unsplit :func:`model`, or a pipeline's forward).
``$SWARM_LM_WIDTH`` (default 128) changes the width of every stage (tests use a small one).
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from swarm import Task
from swarm.examples.charlm import CONTEXT, Block, batches, heldout_windows

NUM_STAGES = 4
HEADS = 4


def _width() -> int:
    value = os.environ.get("SWARM_LM_WIDTH", "128")
    try:
        width = int(value)
    except ValueError:
        raise ValueError(f"SWARM_LM_WIDTH must be an integer, got {value!r}") from None
    if width < HEADS or width % HEADS:
        raise ValueError(f"SWARM_LM_WIDTH must be a positive multiple of {HEADS}, got {width}")
    return width


class Embed(nn.Module):
    """Stage 0: [batch, time] int64 bytes -> [batch, time, width] after one block."""

    def __init__(self, width: int, context: int = CONTEXT) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, width)
        self.position = nn.Parameter(torch.randn(context, width) * 0.02)
        self.block = Block(width, HEADS)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.block(self.embed(tokens) + self.position[:tokens.shape[1]])


class Head(nn.Module):
    """Stage 3: [batch, time, width] -> [batch, time, 256] logits."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.block = Block(width, HEADS)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 256, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.block(x)))


def stage0() -> nn.Module:
    return Embed(_width())


def stage1() -> nn.Module:
    return Block(_width(), HEADS)


def stage2() -> nn.Module:
    return Block(_width(), HEADS)


def stage3() -> nn.Module:
    return Head(_width())


STAGES = [stage0, stage1, stage2, stage3]


def model() -> nn.Module:
    """The unsplit model (the 4 stages in sequence), e.g. for a single-process reference."""
    return nn.Sequential(*(factory() for factory in STAGES))


def loss(output: torch.Tensor, batch: Any) -> torch.Tensor:
    """Mean cross-entropy per byte (nats) of the last stage's logits against the batch's targets."""
    return F.cross_entropy(output.reshape(-1, 256), batch[1].reshape(-1))


@torch.no_grad()
def evaluate(forward: Callable[[torch.Tensor], torch.Tensor]) -> dict:
    """Held-out loss (nats per byte) and bits per byte on the same fixed windows every time;
    ``forward``: tokens [n, CONTEXT] -> logits [n, CONTEXT, 256] (a module or a pipeline's forward)."""
    windows = heldout_windows()
    total = 0.0
    for chunk in windows.split(32):
        total += float(loss(forward(chunk[:, :-1]), (chunk[:, :-1], chunk[:, 1:]))) * len(chunk)
    value = total / len(windows)
    return {"loss": value, "bits_per_byte": value / math.log(2)}


def _costs() -> list[float]:
    """Relative FLOPs per sample: a block each, the LM head adds 2 * width * 256 per byte."""
    width = _width()
    block = 2 * 12 * width * width + 4 * CONTEXT * width
    return [1.0, 1.0, 1.0, 1.0 + 2 * width * 256 / block]


task = Task(
    name="swarm-lm",
    stages=STAGES,
    stage_costs=_costs(),
    optimizer=lambda params: torch.optim.AdamW(params, lr=2e-3, betas=(0.9, 0.95), weight_decay=0.01),
    data=batches,
    loss=loss,
    evaluate=evaluate,
    eval_every=5,
    batch_size=16,
    target_batch_size=256,
    target=("bits_per_byte", 3.0),
    hyperparameters={"lr": 2e-3, "optimizer": "adamw", "model": f"byte-transformer-4-stages-x{_width()}",
                     "context": CONTEXT},
)


# ---------------------------------------------------------------- a local pipeline swarm on loopback

def main(argv: list[str] | None = None) -> int:
    """``python -m swarm.examples.swarm_lm``: a bootstrap peer, ``--servers`` stage servers
    (``--stage auto``, started one after another) and ``--trainers`` trainers on 127.0.0.1, training
    for ``--max-seconds``; prints the held-out loss before and after and the pipeline as ``swarm runs
    --json`` shows it. Logs and the trainers' metrics go to ``--out``. Exit 0 if the held-out loss
    went down, 1 if not (or a peer failed)."""
    import argparse
    import json
    import subprocess
    import sys
    import tempfile
    import time
    from pathlib import Path

    from swarm.demo import _read_metrics, _start, _stop, _wait_for_line

    p = argparse.ArgumentParser(prog="python -m swarm.examples.swarm_lm", description=main.__doc__)
    p.add_argument("--servers", type=int, default=6, help="stage servers (default 6)")
    p.add_argument("--trainers", type=int, default=2, help="trainers (default 2)")
    p.add_argument("--max-seconds", type=float, default=120.0, help="training time (default 120)")
    p.add_argument("--max-epochs", type=int, default=None,
                   help="stop the trainers once every stage took this many steps (default: run --max-seconds)")
    p.add_argument("--max-memory", default="5MB", help="--max-memory of every server (default 5MB: one stage "
                                                        "fits, the whole model with its optimizer state does not)")
    p.add_argument("--rebalance-period", type=float, default=30.0, help="servers' --rebalance-period (default 30)")
    p.add_argument("--out", default=None, help="directory for logs and metrics (default: a new temporary one)")
    args = p.parse_args(argv)
    if args.servers < NUM_STAGES or args.trainers < 1:
        p.error(f"need at least {NUM_STAGES} servers (one per stage) and 1 trainer")
    out = Path(args.out or tempfile.mkdtemp(prefix="swarm-lm-"))
    out.mkdir(parents=True, exist_ok=True)
    swarm = [sys.executable, "-m", "swarm"]
    task_ref = "swarm.examples.swarm_lm:task"
    procs: list[subprocess.Popen] = []
    try:
        boot = _start(swarm + ["dht", "--host", "127.0.0.1", "--report-interval", "3600", "--dashboard-port", "off",
                               "--identity", str(out / "bootstrap.key")], out / "bootstrap.log")
        procs.append(boot)
        address = _wait_for_line(out / "bootstrap.log", "--initial-peers", boot, timeout=60)
        common = ["join", task_ref, "--initial-peers", address, "--host", "127.0.0.1", "--dashboard-port", "off",
                  "--threads", "1", "--matchmaking-time", "1"]
        print(f"bootstrap peer: {address}\nlogs: {out}", flush=True)
        for i in range(args.servers):
            log = out / f"server{i}.log"
            proc = _start(swarm + common + ["--role", "server", "--stage", "auto", "--identity",
                                            str(out / f"server{i}.key"), "--max-memory", args.max_memory,
                                            "--rebalance-period", str(args.rebalance_period)], log)
            procs.append(proc)
            stage = _wait_for_line(log, "serving stage", proc, timeout=120)
            print(f"server {i}: stage {stage.split()[0]}", flush=True)
        trainers = []
        for i in range(args.trainers):
            metrics = out / f"trainer{i}.jsonl"
            proc = _start(swarm + common + ["--role", "trainer", "--identity", str(out / f"trainer{i}.key"),
                                            "--shard", f"{i}/{args.trainers}", "--metrics-file", str(metrics),
                                            "--max-seconds", str(args.max_seconds)]
                          + (["--max-epochs", str(args.max_epochs)] if args.max_epochs is not None else []),
                          out / f"trainer{i}.log")
            procs.append(proc)
            trainers.append(proc)
        print(f"{args.trainers} trainers training for {args.max_seconds:g} s"
              + (f" or {args.max_epochs} stage steps" if args.max_epochs is not None else "") + " ...", flush=True)
        deadline = time.monotonic() + args.max_seconds + 300
        for proc in trainers:
            proc.wait(max(deadline - time.monotonic(), 1))
        runs = subprocess.run(swarm + ["runs", "--initial-peers", address, "--json"], capture_output=True, text=True,
                              timeout=120)
        pipeline = next((r for r in json.loads(runs.stdout or "[]") if r.get("run_id") == task.name), None)
        if pipeline is not None:
            print("stages: " + ", ".join(f"{s['stage']}: {s['servers']} servers, {s['samples_per_s']:.0f} samples/s"
                                         for s in pipeline.get("stages", [])), flush=True)
        evals = [r["eval"]["loss"] for r in _read_metrics(out / "trainer0.jsonl") if "eval" in r]
        failed = [i for i, proc in enumerate(trainers) if proc.returncode != 0]
        if len(evals) < 2:
            print(f"no held-out evaluation recorded (see {out}/trainer0.log)", flush=True)
            return 1
        print(f"held-out loss: {evals[0]:.4f} -> {evals[-1]:.4f} nats/byte", flush=True)
        return 0 if evals[-1] < evals[0] and not failed else 1
    finally:
        _stop(procs)


if __name__ == "__main__":
    raise SystemExit(main())
