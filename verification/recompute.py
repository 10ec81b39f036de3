"""Named batches and gradient recomputation: anyone can rebuild what a peer trained on and check its gradient.

A peer's batches in one epoch are named by ``(run_id, epoch, peer_id, index)`` (:func:`batch_ref`):
batch ``index`` is the ``index``-th batch of ``task.batches(shard, num_shards, batch_size, seed)``
with ``seed = batch_seed(run_id, epoch, peer_id)`` (the task's own data function, restarted with
``seed + 1, seed + 2, ...`` when it runs out, as :meth:`swarm.Task.batches` does). So a peer's whole
contribution to a round is fixed by a small :class:`DataClaim` (shard, batch size, how many batches,
at which parameters), and any peer holding the task and those parameters rebuilds it
(:func:`recompute_gradient`) exactly as :class:`swarm.Optimizer` accumulates it: the sample-weighted
mean of the batch gradients, skipping batches whose loss is not finite.

Recomputed and sent gradients are compared with a relative tolerance (:func:`relative_error`,
``‖a - b‖ / ‖b‖``, in float64; :data:`DEFAULT_TOLERANCE` 1e-3): float arithmetic is not
reproducible across thread counts, BLAS blockings and summation orders, and
``tests/test_verification_recompute.py`` measures how far that goes on the digits and charlm models
(around 1e-6 relative, three orders of magnitude under the tolerance), while every attack of
:mod:`averaging.attacks` is off by 0.1 or more.

This module never imports ``swarm``: it takes any object with the :class:`swarm.Task` fields it uses
(``data``, ``loss``, ``count_samples``/``samples_in``).
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Sequence

import torch

from dht.peer.identity import Identity, IdentityError, PeerID, verify_signature

__all__ = ["DEFAULT_TOLERANCE", "to_device", "BatchRef", "DataClaim", "SignedClaim", "ClaimError", "batch_seed",
           "batch_ref", "named_batches", "EpochBatches", "recompute_gradient", "relative_error", "gradient_matches",
           "flat_gradient", "find_offset", "block_size", "block_digests", "covered_blocks", "MAX_BLOCKS"]

DEFAULT_TOLERANCE = 1e-3  # relative: honest nondeterminism stays ~1000x below it (measured, see the module doc)
MAX_BATCHES = 1 << 16  # batches one claim may name (a validator's work is bounded by it)
MAX_BATCH_SIZE = 1 << 16
MAX_TEXT = 256  # run id / peer id characters in a claim
MAX_BLOCKS = 256  # block digests in a claim (4 KiB: it travels in the matchmaking gather)
BLOCK_DIGEST_BYTES = 16  # SHA-256 truncated: a claim's block digests
MIN_BLOCK = 16  # values
MIN_BLOCKS = 32  # a contribution has at least this many blocks (so a part of a 16-member group holds a whole one)
VALUES_PER_BLOCK = 4096  # beyond MIN_BLOCKS blocks, about this many values per block (up to MAX_BLOCKS)
_SEED_DOMAIN = b"swarm.verification.batch.v1\0"


class ClaimError(ValueError):
    """A data claim that is malformed or out of bounds (the message says which field)."""


def batch_seed(run_id: str, epoch: int, peer_id: str, randomness: bytes = b"") -> int:
    """The data seed of ``peer_id``'s batches in ``epoch`` of ``run_id`` (a 62-bit integer): SHA-256 of
    the names (and of ``randomness``, e.g. the previous round's shared random value, when the run
    wants batches nobody can choose in advance)."""
    h = hashlib.sha256(_SEED_DOMAIN)
    for part in (run_id.encode(), str(peer_id).encode(), struct.pack("<q", int(epoch)), bytes(randomness)):
        h.update(struct.pack("<I", len(part)))
        h.update(part)
    return int.from_bytes(h.digest()[:8], "little") >> 2


@dataclass(frozen=True)
class BatchRef:
    """The name of one batch: the ``index``-th batch of ``peer_id``'s data stream in ``epoch``."""

    run_id: str
    epoch: int
    peer_id: str
    index: int

    @property
    def seed(self) -> int:
        """The seed of the stream this batch is taken from (:func:`batch_seed`)."""
        return batch_seed(self.run_id, self.epoch, self.peer_id)


def batch_ref(run_id: str, epoch: int, peer_id: Any, index: int) -> BatchRef:
    """Name batch ``index`` of ``peer_id``'s epoch ``epoch`` in ``run_id`` (``peer_id``: a PeerID or its text)."""
    if index < 0 or epoch < 0:
        raise ValueError(f"batch_ref: epoch and index must be >= 0, got epoch={epoch}, index={index}")
    return BatchRef(str(run_id), int(epoch), str(peer_id), int(index))


def named_batches(task: Any, run_id: str, epoch: int, peer_id: Any, shard: int, num_shards: int,
                  batch_size: int) -> Iterator[Any]:
    """The endless stream of ``peer_id``'s batches in ``epoch``: its element ``i`` is the batch that
    ``batch_ref(run_id, epoch, peer_id, i)`` names (the task's ``data`` restarted with seed + 1, + 2, ...
    when it runs out)."""
    seed = batch_seed(run_id, epoch, str(peer_id))
    restart = 0
    while True:
        empty = True
        for batch in task.data(shard, num_shards, batch_size, seed + restart):
            empty = False
            yield batch
        if empty:
            raise ValueError(f"task data({shard}, {num_shards}, {batch_size}, seed) yielded no batch")
        restart += 1


def _check_int(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ClaimError(f"data claim: {name} must be an integer in [{lo}, {hi}], got {_brief(value)}")
    return value


def _check_text(name: str, value: Any) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_TEXT:
        raise ClaimError(f"data claim: {name} must be a string of 1..{MAX_TEXT} characters, got {_brief(value)}")
    return value


def _brief(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True)
class DataClaim:
    """What a peer's contribution to one round was computed from: batches ``0 .. batches - 1`` of its
    named stream (:func:`named_batches`) for ``epoch``, of ``batch_size`` from shard ``shard`` of
    ``num_shards``, ``samples`` samples in all, at the parameters whose shared-state hash is
    ``state_hash`` (hex). A peer publishes it with its round (signed), so a validator knows what to rebuild.

    ``size``, ``block``, ``digests``: the contribution itself, as the digests of its float32 values in
    consecutive blocks of ``block`` values (:func:`block_digests`, at most :data:`MAX_BLOCKS`). They
    tie a part that an owner received to this claim at a known offset without knowing the group's
    layout: values whose block digests are the claim's are the claimed contribution there, so a
    recomputation that disagrees with them proves the claim false, and nobody can pair the claim
    with values from another round or offset."""

    run_id: str
    epoch: int
    peer_id: str
    shard: int
    num_shards: int
    batch_size: int
    batches: int
    samples: int
    state_hash: str = ""
    size: int = 0
    block: int = 0
    digests: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        _check_text("run_id", self.run_id)
        _check_text("peer_id", self.peer_id)
        _check_int("epoch", self.epoch, 0, 2 ** 62)
        _check_int("num_shards", self.num_shards, 1, 1 << 20)
        _check_int("shard", self.shard, 0, self.num_shards - 1)
        _check_int("batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        _check_int("batches", self.batches, 0, MAX_BATCHES)
        _check_int("samples", self.samples, 0, MAX_BATCHES * MAX_BATCH_SIZE)
        if not isinstance(self.state_hash, str) or len(self.state_hash) > 128:
            raise ClaimError(f"data claim: state_hash must be a string of at most 128 characters, "
                             f"got {_brief(self.state_hash)}")
        _check_int("size", self.size, 0, 1 << 40)
        _check_int("block", self.block, 0, 1 << 40)
        if not isinstance(self.digests, tuple) or len(self.digests) > MAX_BLOCKS or not all(
                isinstance(d, bytes) and len(d) == BLOCK_DIGEST_BYTES for d in self.digests):
            raise ClaimError(f"data claim: digests must be at most {MAX_BLOCKS} digests of {BLOCK_DIGEST_BYTES} bytes")
        if self.digests and (self.block < 1 or len(self.digests) != -(-self.size // self.block)):
            raise ClaimError("data claim: digests must cover size values in blocks of block values")

    def block_range(self, k: int) -> tuple[int, int]:
        """The flat range of block ``k``."""
        return k * self.block, min((k + 1) * self.block, self.size)

    def to_wire(self) -> dict:
        """A msgpack-able dict (what :meth:`from_wire` reads back)."""
        wire = asdict(self)
        wire["digests"] = list(self.digests)
        return wire

    @classmethod
    def from_wire(cls, value: Any) -> "DataClaim":
        """Parse an untrusted dict; :class:`ClaimError` names the first bad field."""
        if not isinstance(value, dict):
            raise ClaimError(f"data claim must be a dict, got {type(value).__name__}")
        fields = set(cls.__dataclass_fields__)
        unknown = [k for k in value if k not in fields]
        if unknown:
            raise ClaimError(f"data claim: unknown field {_brief(unknown[0])}")
        missing = [k for k in fields if k not in value and k not in ("state_hash", "size", "block", "digests")]
        if missing:
            raise ClaimError(f"data claim: missing field {missing[0]!r}")
        value = dict(value)
        if "digests" in value:
            if not isinstance(value["digests"], (list, tuple)):
                raise ClaimError("data claim: digests must be a list")
            value["digests"] = tuple(value["digests"])
        return cls(**value)

    def encode(self) -> bytes:
        """Canonical bytes of the claim (what a signature covers): fixed field order, length-prefixed."""
        out = [b"swarm.verification.claim.v1\0"]
        for name in ("run_id", "peer_id", "state_hash"):
            data = getattr(self, name).encode()
            out.append(struct.pack("<I", len(data)) + data)
        out.append(struct.pack("<qqqqqqqqq", self.epoch, self.shard, self.num_shards, self.batch_size, self.batches,
                               self.samples, self.size, self.block, len(self.digests)))
        out.extend(self.digests)
        return b"".join(out)

    def refs(self) -> list[BatchRef]:
        """The names of the claimed batches."""
        return [batch_ref(self.run_id, self.epoch, self.peer_id, i) for i in range(self.batches)]


@dataclass(frozen=True)
class SignedClaim:
    """A :class:`DataClaim` signed by the peer it names (Ed25519 over :meth:`DataClaim.encode`): what
    a validator's accusation carries, so that anyone can check what the accused said it trained on."""

    claim: DataClaim
    public_key: bytes
    signature: bytes

    @classmethod
    def sign(cls, identity: Identity, claim: DataClaim) -> "SignedClaim":
        if str(identity.peer_id) != claim.peer_id:
            raise ValueError("a claim is signed by the peer it names")
        return cls(claim, identity.public_key, identity.sign(claim.encode()))

    def to_wire(self) -> dict:
        return {"c": self.claim.to_wire(), "k": self.public_key, "s": self.signature}

    @classmethod
    def from_wire(cls, value: Any) -> "SignedClaim":
        """Parse and verify an untrusted signed claim (:class:`ClaimError` if malformed, not signed by
        the peer it names, or the signature does not hold)."""
        if not isinstance(value, dict) or set(value) != {"c", "k", "s"}:
            raise ClaimError("signed claim must be a dict with the keys c, k, s")
        key, signature = value["k"], value["s"]
        if not (isinstance(key, bytes) and len(key) == 32 and isinstance(signature, bytes) and len(signature) == 64):
            raise ClaimError("signed claim: k must be 32 bytes and s 64 bytes")
        claim = DataClaim.from_wire(value["c"])
        try:
            named = PeerID.from_base58(claim.peer_id)
        except (IdentityError, ValueError):
            raise ClaimError(f"signed claim: peer_id {_brief(claim.peer_id)} is not a PeerID") from None
        if not named.matches(key):
            raise ClaimError("signed claim: the key is not the named peer's")
        if not verify_signature(key, signature, claim.encode()):
            raise ClaimError("signed claim: bad signature")
        return cls(claim, key, signature)


class EpochBatches:
    """The training side of named batches: hands out a peer's batches of each epoch in order and
    says what it handed out (:meth:`claim`). Call :meth:`reset` whenever the accumulated gradient is
    cleared (a new epoch, a downloaded state); :meth:`next` resets by itself when the epoch changes.

    >>> source = EpochBatches(task, run_id, str(dht.peer_id), shard=0, num_shards=1, batch_size=32)
    >>> batch = source.next(opt.local_epoch)      # batch_ref(run_id, epoch, peer, i) for i = 0, 1, ...
    """

    def __init__(self, task: Any, run_id: str, peer_id: Any, shard: int = 0, num_shards: int = 1,
                 batch_size: int | None = None):
        self.task, self.run_id, self.peer_id = task, str(run_id), str(peer_id)
        self.shard, self.num_shards = shard, num_shards
        self.batch_size = int(batch_size or task.batch_size)
        self.epoch: int | None = None
        self.index = 0  # batches handed out since the last reset
        self.samples = 0  # samples in them that were accumulated (see :meth:`count`)
        self._stream: Iterator[Any] | None = None

    def reset(self, epoch: int) -> None:
        """Start ``epoch``'s stream again at batch 0."""
        self.epoch, self.index, self.samples = int(epoch), 0, 0
        self._stream = named_batches(self.task, self.run_id, self.epoch, self.peer_id, self.shard, self.num_shards,
                                     self.batch_size)

    def next(self, epoch: int) -> Any:
        """The next batch of ``epoch`` (resets first when ``epoch`` differs from the current one)."""
        if self._stream is None or epoch != self.epoch:
            self.reset(epoch)
        assert self._stream is not None
        batch = next(self._stream)
        self.index += 1
        return batch

    def count(self, samples: int) -> None:
        """Record that the latest batch (``samples`` samples) went into the gradient."""
        self.samples += int(samples)

    def claim(self, state_hash: str = "", contribution: torch.Tensor | None = None) -> DataClaim:
        """What the gradient accumulated since the last reset was computed from (with the block
        digests of ``contribution``, the flat vector this peer sends, when given)."""
        if self.epoch is None:
            raise ValueError("EpochBatches.claim: no batch was handed out yet")
        size, block = 0, 0
        digests: tuple[bytes, ...] = ()
        if contribution is not None:
            size = contribution.numel()
            block = block_size(size)
            digests = tuple(block_digests(contribution, block))
        return DataClaim(self.run_id, self.epoch, self.peer_id, self.shard, self.num_shards, self.batch_size,
                         self.index, self.samples, state_hash or "", size, block, digests)


def block_size(size: int) -> int:
    """Values per digest block of a contribution of ``size`` values: about VALUES_PER_BLOCK, with at
    least MIN_BLOCKS and at most MAX_BLOCKS blocks (a claim's digests take 512 B to 4 KiB)."""
    blocks = min(MAX_BLOCKS, max(MIN_BLOCKS, -(-size // VALUES_PER_BLOCK)))
    return max(MIN_BLOCK, -(-size // blocks))


def block_digests(flat: torch.Tensor, block: int) -> list[bytes]:
    """SHA-256 (first 16 bytes) of each block of ``block`` float32 values of ``flat`` (little-endian)."""
    values = flat.detach().to("cpu", torch.float32).reshape(-1).contiguous()
    data = values.numpy().astype("<f4", copy=False).tobytes()
    step = 4 * block
    return [hashlib.sha256(data[i:i + step]).digest()[:BLOCK_DIGEST_BYTES] for i in range(0, len(data), step)]


def covered_blocks(claim: DataClaim, ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """``(block k, offset of its first value in the concatenation of ranges)`` for every block of
    ``claim`` lying wholly inside one of ``ranges``."""
    out: list[tuple[int, int]] = []
    offset = 0
    if claim.block < 1:
        return out
    for lo, hi in ranges:
        first = -(-lo // claim.block)
        k = first
        while k < len(claim.digests):
            start, end = claim.block_range(k)
            if end > hi or start >= hi:
                break
            out.append((k, offset + start - lo))
            k += 1
        offset += hi - lo
    return out


def _samples_in(task: Any, batch: Any) -> int:
    if hasattr(task, "samples_in"):
        return int(task.samples_in(batch))
    first = batch[0] if isinstance(batch, (tuple, list)) else batch
    return len(first)


def flat_gradient(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """The parameters' ``.grad`` as one flat float32 CPU vector (zeros where a gradient is None)."""
    parts = [(p.grad.detach().to("cpu", torch.float32).reshape(-1) if p.grad is not None
              else torch.zeros(p.numel(), dtype=torch.float32)) for p in params]
    return torch.cat(parts) if parts else torch.zeros(0)


@torch.enable_grad()
def recompute_gradient(task: Any, model: torch.nn.Module, claim: DataClaim,
                       parameters: Sequence[torch.Tensor] | None = None, *, device: Any = None,
                       micro_batches: int = 1) -> torch.Tensor:
    """The gradient ``claim`` describes, as :class:`swarm.Optimizer` accumulates it: the flat float32
    vector ``Σ_b n_b ∇loss(b) / Σ_b n_b`` over the claimed batches ``b`` whose loss is finite.

    ``model`` is used as a scratch copy: its parameters are set to ``parameters`` (the agreed ones,
    in ``model.parameters()`` order; None: as they are) and its gradients are overwritten. ``device``
    (None: the model's); ``micro_batches`` > 1 splits each tensor batch into that many slices and sums
    them (another summation order: used to measure honest nondeterminism). Raises ValueError if the
    claimed sample count does not match the rebuilt batches."""
    params = list(model.parameters())
    if parameters is not None:
        if len(parameters) != len(params) or any(a.shape != b.shape for a, b in zip(parameters, params)):
            raise ValueError("recompute_gradient: the parameters do not fit the model")
        with torch.no_grad():
            for p, value in zip(params, parameters):
                p.copy_(value.to(p.device, p.dtype))
    if device is not None:
        model.to(device)
    model.train()
    total = torch.zeros(sum(p.numel() for p in params), dtype=torch.float32)
    samples = 0
    stream = named_batches(task, claim.run_id, claim.epoch, claim.peer_id, claim.shard, claim.num_shards,
                           claim.batch_size)
    for _ in range(claim.batches):
        batch = next(stream)
        if device is not None:
            batch = to_device(batch, device)
        for p in params:
            p.grad = None
        n = _samples_in(task, batch)
        finite = True
        for piece in _split(batch, micro_batches):
            loss = task.loss(model, piece)
            if not torch.isfinite(loss):
                finite = False
                break
            weight = _samples_in(task, piece) / n if micro_batches > 1 else 1.0
            (loss * weight).backward()
        if not finite:
            continue  # the daemon skips such a batch too (nothing accumulated)
        total.add_(flat_gradient(params), alpha=float(n))
        samples += n
    for p in params:
        p.grad = None
    if samples != claim.samples:
        raise ValueError(f"the claimed batches hold {samples} samples with a finite loss, the claim says "
                         f"{claim.samples}")
    return total.div_(max(samples, 1))


def _split(batch: Any, pieces: int) -> list[Any]:
    if pieces <= 1:
        return [batch]
    if isinstance(batch, torch.Tensor):
        return [c for c in torch.tensor_split(batch, pieces) if len(c)]
    if isinstance(batch, (tuple, list)) and batch and all(isinstance(b, torch.Tensor) for b in batch):
        columns = [torch.tensor_split(b, pieces) for b in batch]
        return [type(batch)(col[i] for col in columns) for i in range(pieces) if len(columns[0][i])]
    return [batch]


def to_device(batch: Any, device: Any) -> Any:
    """``batch`` with every tensor in it (nested lists, tuples, dicts) moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """``‖value - reference‖ / ‖reference‖`` in float64 (inf for a shape mismatch or non-finite values;
    a zero reference: 0 if ``value`` is zero too, else inf)."""
    if value.shape != reference.shape:
        return math.inf
    a, b = value.detach().to(torch.float64).reshape(-1), reference.detach().to(torch.float64).reshape(-1)
    if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
        return math.inf
    diff, norm = float((a - b).norm()), float(b.norm())
    if norm == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / norm


def find_offset(part: torch.Tensor, full: torch.Tensor, tolerance: float = DEFAULT_TOLERANCE,
                limit: int = 64) -> int | None:
    """An offset ``o`` at which ``part`` matches ``full[o : o + len(part)]`` within ``tolerance``
    (relative), or None. Candidates are the positions where ``full`` is close to ``part``'s largest
    value (at most ``limit`` of them are tried, nearest first): O(len(full)) plus ``limit`` slice checks.
    Used by an accusation's checker to tell "the accused sent a correct slice at another offset" from
    "the accused sent no correct slice"."""
    part, full = part.detach().to(torch.float64).reshape(-1), full.detach().to(torch.float64).reshape(-1)
    n = part.numel()
    if n == 0 or n > full.numel() or not bool(torch.isfinite(part).all()):
        return None
    k = int(part.abs().argmax())
    windows = full[k:full.numel() - n + k + 1]
    gap = (windows - part[k]).abs()
    close = torch.nonzero(gap <= 2 * max(tolerance, 1e-12) * float(part.norm())).reshape(-1)  # |Δ_k| <= ‖Δ‖
    if close.numel() > limit:
        close = close[gap[close].argsort()[:limit]]
    for start in close.tolist():
        if relative_error(part, full[start:start + n]) <= tolerance:
            return int(start)
    return None


def gradient_matches(sent: torch.Tensor, recomputed: torch.Tensor, tolerance: float = DEFAULT_TOLERANCE) -> bool:
    """Whether ``sent`` is within ``tolerance`` (relative, of the recomputed norm) of ``recomputed``."""
    return relative_error(sent, recomputed) <= tolerance
