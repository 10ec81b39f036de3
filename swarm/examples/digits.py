"""Task: a small CNN on scikit-learn's handwritten digits (8x8 images, 10 classes; ships with
scikit-learn, so it runs offline).

    swarm join swarm.examples.digits:task --initial-peers /ip4/127.0.0.1/tcp/PORT/p2p/PEER --shard 0/4
    swarm demo                      # trains this task (swarm demo --task swarm.examples.digits:diloco)

(in a clone, ``examples/digits.py`` is this file).

The 1797 images are split once (fixed seed) into 1437 for training and 360 held out; each peer trains
on its own shard of the training images (``shard`` of ``num_shards``), and ``evaluate`` reports the
held-out loss and accuracy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from swarm import Task

DEMO_EXTRAS = "install the demo extras: pip install 'swarm-training[demo]'"
try:
    from sklearn.datasets import load_digits
except ImportError as e:
    raise ImportError(f"the digits example needs scikit-learn (its data set ships with it): {DEMO_EXTRAS}") from e


def _dataset() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [n, 1, 8, 8] in [0, 1]
    y = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    test, train = order[:360], order[360:]
    return x[train], y[train], x[test], y[test]


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.head = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.head(x.flatten(1))


def batches(shard: int, num_shards: int, batch_size: int, seed: int):
    """One pass over this peer's shard of the training images, shuffled by ``seed``."""
    x, y, _, _ = _dataset()
    mine = torch.arange(shard % num_shards, len(y), num_shards)
    order = mine[torch.randperm(len(mine), generator=torch.Generator().manual_seed(seed))]
    for start in range(0, len(order) - batch_size + 1, batch_size):
        index = order[start:start + batch_size]
        yield x[index], y[index]


def loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


@torch.no_grad()
def evaluate(model: nn.Module) -> dict:
    _, _, x, y = _dataset()
    logits = model(x)
    return {"loss": float(F.cross_entropy(logits, y)), "accuracy": float((logits.argmax(1) == y).float().mean())}


task = Task(
    name="digits",
    model=DigitsCNN,
    optimizer=lambda params: torch.optim.Adam(params, lr=2e-3),
    data=batches,
    loss=loss,
    evaluate=evaluate,
    eval_every=2,
    batch_size=32,
    target_batch_size=256,
    target=("accuracy", 0.95),
    hyperparameters={"lr": 2e-3, "optimizer": "adam", "model": "cnn-16-32"},
)

# The same job in DiLoCo mode: 8 local Adam steps per peer between averagings (x4 peers = 1024 samples).
diloco = Task(**{**task.__dict__, "name": "digits-diloco", "target_batch_size": 1024,
                 "optimizer_options": {"mode": "diloco", "outer_lr": 0.7, "outer_momentum": 0.9}})
