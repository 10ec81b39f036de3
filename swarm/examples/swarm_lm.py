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
