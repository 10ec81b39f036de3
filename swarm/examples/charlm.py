"""Task: a small byte-level transformer language model on text files (runs offline anywhere).

    swarm join swarm.examples.charlm:task --initial-peers /ip4/127.0.0.1/tcp/PORT/p2p/PEER --shard 0/4
    swarm demo --task swarm.examples.charlm:task
    SWARM_CHARLM_DATA=~/my-texts swarm join swarm.examples.charlm:task ...

(in a clone, ``examples/charlm.py`` is this file).

Data: ``$SWARM_CHARLM_DATA``, a text file or a directory (its files, recursively, skipping hidden
directories, ``__pycache__``, ``site-packages`` and binary files); default: the ``*.py`` files at the
top of the Python standard library's own source directory (``sysconfig.get_paths()["stdlib"]``).
Files are read in sorted path order until ``$SWARM_CHARLM_MAX_BYTES`` (default 4 000 000) bytes, so
every peer with the same files sees the same corpus. Every 10th file is held out for evaluation;
the others are sharded *by file* across peers (file i belongs to shard i mod num_shards; with fewer
files than shards, the bytes are split into contiguous ranges instead).

Model: 2 pre-norm transformer blocks, width 128, 4 heads, context 64 bytes, ~0.47 M parameters; a
local step (16 sequences x 64 bytes, forward + backward + AdamW) takes ~40 ms on one CPU thread here.
``evaluate`` reports the held-out loss (nats per byte, on fixed windows) and bits per byte.
"""

from __future__ import annotations

import functools
import math
import os
import sysconfig
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from swarm import Task

CONTEXT = 64  # bytes per training sequence
WIDTH, HEADS, LAYERS = 128, 4, 2
HOLDOUT_EVERY = 10  # every 10th file is held out
EVAL_WINDOWS = 128  # held-out windows of CONTEXT bytes per evaluation (fixed positions)
SKIP_DIRS = {"__pycache__", "site-packages", "dist-packages"}


def _data_path() -> tuple[Path, str]:
    """(path, glob pattern) of the corpus."""
    custom = os.environ.get("SWARM_CHARLM_DATA")
    if custom:
        path = Path(custom).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"SWARM_CHARLM_DATA={custom}: no such file or directory")
        return path, "**/*"
    return Path(sysconfig.get_paths()["stdlib"]), "*.py"


def _max_bytes() -> int:
    value = os.environ.get("SWARM_CHARLM_MAX_BYTES", "4000000")
    try:
        limit = int(value)
    except ValueError:
        raise ValueError(f"SWARM_CHARLM_MAX_BYTES must be an integer, got {value!r}") from None
    if limit < 4 * CONTEXT:
        raise ValueError(f"SWARM_CHARLM_MAX_BYTES must be at least {4 * CONTEXT}")
    return limit


@functools.lru_cache(maxsize=4)
def _corpus(path: Path, pattern: str, max_bytes: int) -> tuple[bytes, ...]:
    """The files' bytes, in sorted path order, until ``max_bytes`` (the last file is truncated)."""
    if path.is_file():
        candidates = [path]
    else:
        candidates = sorted(p for p in path.glob(pattern) if p.is_file() and not any(
            part in SKIP_DIRS or part.startswith(".") for part in p.relative_to(path).parts))
    files, total = [], 0
    for p in candidates:
        try:
            data = p.read_bytes()
        except OSError:
            continue  # unreadable: skipped (the same on every peer with the same files)
        if not data or b"\0" in data[:4096]:
            continue  # empty or binary
        data = data[:max_bytes - total]
        files.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if total < 4 * CONTEXT:
        raise ValueError(f"charlm: {path} holds only {total} bytes of text; need at least {4 * CONTEXT}")
    return tuple(files)


def _source() -> tuple[Path, str, int]:
    """What the corpus is read from (the cache key): (path, glob pattern, byte limit)."""
    return (*_data_path(), _max_bytes())


def _split(source: tuple[Path, str, int]) -> tuple[list[bytes], bytes]:
    """(training files, held-out bytes)."""
    files = list(_corpus(*source))
    if len(files) >= 2 * HOLDOUT_EVERY:
        held = b"".join(f for i, f in enumerate(files) if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1)
        train = [f for i, f in enumerate(files) if i % HOLDOUT_EVERY != HOLDOUT_EVERY - 1]
    else:  # too few files to hold some out: the last 10% of the bytes
        everything = b"".join(files)
        cut = len(everything) - max(len(everything) // HOLDOUT_EVERY, 2 * CONTEXT)
        train, held = [everything[:cut]], everything[cut:]
    return train, held


def _to_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)


def shard_bytes(shard: int, num_shards: int) -> torch.Tensor:
    """This shard's training bytes as an int64 tensor: files i with i % num_shards == shard, joined by
    a newline (contiguous byte ranges when there are fewer files than shards)."""
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard must be in [0, {num_shards}), got {shard}")
    return _shard_bytes(_source(), shard, num_shards)


@functools.lru_cache(maxsize=16)
def _shard_bytes(source: tuple[Path, str, int], shard: int, num_shards: int) -> torch.Tensor:
    train, _ = _split(source)
    if len(train) >= num_shards:
        data = b"\n".join(f for i, f in enumerate(train) if i % num_shards == shard)
    else:
        everything = b"\n".join(train)
        size = len(everything) // num_shards
        data = everything[shard * size:(shard + 1) * size]
    if len(data) < CONTEXT + 2:
        raise ValueError(f"charlm: shard {shard}/{num_shards} holds only {len(data)} bytes; use fewer shards")
    return _to_tensor(data)


def heldout_windows() -> torch.Tensor:
    """``EVAL_WINDOWS`` fixed windows of ``CONTEXT + 1`` held-out bytes, evenly spaced: [n, CONTEXT + 1]."""
    return _heldout_windows(_source())


@functools.lru_cache(maxsize=4)
def _heldout_windows(source: tuple[Path, str, int]) -> torch.Tensor:
    _, held = _split(source)
    data = _to_tensor(held)
    last = len(data) - (CONTEXT + 1)
    n = min(EVAL_WINDOWS, last + 1)
    starts = torch.linspace(0, last, n).long()
    return torch.stack([data[s:s + CONTEXT + 1] for s in starts.tolist()])


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and a 4x MLP."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.norm2(x))


class ByteLM(nn.Module):
    """Byte-level (vocabulary 256) causal transformer: [batch, time] int64 -> [batch, time, 256] logits."""

    def __init__(self, width: int = WIDTH, heads: int = HEADS, layers: int = LAYERS, context: int = CONTEXT) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, width)
        self.position = nn.Parameter(torch.randn(context, width) * 0.02)
        self.blocks = nn.Sequential(*(Block(width, heads) for _ in range(layers)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 256, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position[:tokens.shape[1]]
        return self.head(self.norm(self.blocks(x)))


def batches(shard: int, num_shards: int, batch_size: int, seed: int):
    """Random windows of this peer's shard: about one pass over its bytes, windows drawn by ``seed``.
    A batch is ``(inputs, targets)``, both [batch_size, CONTEXT] int64 (targets = inputs shifted by one)."""
    data = shard_bytes(shard, num_shards)
    g = torch.Generator().manual_seed(seed)
    count = max(1, len(data) // (batch_size * CONTEXT))
    for _ in range(count):
        starts = torch.randint(0, len(data) - CONTEXT - 1, (batch_size,), generator=g)
        window = torch.stack([data[s:s + CONTEXT + 1] for s in starts.tolist()])
        yield window[:, :-1], window[:, 1:]


def loss(model: nn.Module, batch) -> torch.Tensor:
    """Mean cross-entropy per byte (nats)."""
    inputs, targets = batch
    return F.cross_entropy(model(inputs).reshape(-1, 256), targets.reshape(-1))


@torch.no_grad()
def evaluate(model: nn.Module) -> dict:
    """Held-out loss (nats per byte) and bits per byte, on the same fixed windows every time."""
    windows = heldout_windows()
    total = 0.0
    for chunk in windows.split(32):
        total += float(loss(model, (chunk[:, :-1], chunk[:, 1:]))) * len(chunk)
    value = total / len(windows)
    return {"loss": value, "bits_per_byte": value / math.log(2)}


task = Task(
    name="charlm",
    model=ByteLM,
    optimizer=lambda params: torch.optim.AdamW(params, lr=2e-3, betas=(0.9, 0.95), weight_decay=0.01),
    data=batches,
    loss=loss,
    evaluate=evaluate,
    eval_every=5,
    batch_size=16,
    target_batch_size=256,
    target=("bits_per_byte", 3.0),
    hyperparameters={"lr": 2e-3, "optimizer": "adamw", "model": f"byte-transformer-{LAYERS}x{WIDTH}",
                     "context": CONTEXT},
)

# The same job in DiLoCo mode: 16 local AdamW steps per peer between averagings (x4 peers = 1024 samples).
diloco = Task(**{**task.__dict__, "name": "charlm-diloco", "target_batch_size": 1024,
                 "optimizer_options": {"mode": "diloco", "outer_lr": 0.7, "outer_momentum": 0.9}})
