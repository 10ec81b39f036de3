"""Codecs for chunks of the flat vector on the wire, in both directions of the butterfly.

Every codec turns a 1-D float32 chunk into a msgpack-able map and back, and validates what it
decodes (sizes, finiteness of scales), raising :class:`CodecError` on anything inconsistent.
A chunk holding NaN or Inf never decodes to finite values: the receiver gets NaN/Inf or a
CodecError (and the all-reduce excludes the sender); error feedback forgets non-finite values.

=============  ========================================================  =====================
name           what is sent                                               bytes per value
=============  ========================================================  =====================
``none``       float32                                                    4
``float16``    float16 (finite values beyond ±65504 are clamped);         2
               results as 16-bit residues against the receiver's own
               values, bit-identical at every member (see Float16)
``uint8``      8-bit uniform levels between the chunk's min and max       1 (+8 per chunk)
``blockwise8`` int8 per block of 256 values with a float32 absmax scale   1 (+4/256)
``quantile8``  index into 256 centroids fitted to the chunk (Lloyd-Max)  1 (+1 KiB per chunk)
``topk``       the k largest |values| (float16) and their int32 indices;  6·k/n
               the rest is kept as a residual and added to the next
               round's contribution (error feedback). Results are sent
               exactly as sparse (index, value) pairs, or dense float32
               when that is smaller.
``powersgd``   each chunk viewed as an m x n matrix M ~ P Q^T of rank r   ≈ 4r(m+n)/(mn)
               (one power iteration, warm-started from the last round's
               Q at the same position; error feedback as for topk).
               Results travel as float16.
``sparseloco``, ``demo``, ``uniform4``: low-bandwidth codecs for DiLoCo (top-k + 2-bit, DCT top-k,
               dense 4-bit), in :mod:`averaging.sparse_codecs`
=============  ========================================================  =====================

Stateless codecs can be shared; ``topk`` and ``powersgd`` keep a residual per flat position (and
PowerSGD its warm-start factors), so each averager needs its own instance (:func:`get` makes one).
"""

from __future__ import annotations

import math
import threading
import warnings
from typing import Any

import numpy as np
import torch

__all__ = ["Codec", "CodecError", "get", "CODECS"]

FP16_MAX = 65504.0


class CodecError(ValueError):
    """A compressed chunk is malformed or does not match its expected size."""


def _bytes(msg: Any, key: str, expected: int) -> bytes | bytearray | memoryview:
    data = msg.get(key) if isinstance(msg, dict) else None
    if isinstance(data, memoryview):  # a message encoded here (see _raw), not one from the wire
        data = data.cast("B") if data.format != "B" or data.ndim != 1 else data
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) != expected:
        raise CodecError(f"field {key!r}: expected {expected} bytes, got "
                         f"{len(data) if isinstance(data, (bytes, bytearray, memoryview)) else type(data).__name__}")
    return data


def _raw(x: torch.Tensor) -> memoryview:
    """The bytes of a contiguous tensor without copying them (the message keeps the tensor alive)."""
    # numpy's stubs declare ndarray.__buffer__ only for Python >= 3.12
    return memoryview(x.contiguous().numpy()).cast("B")  # type: ignore[arg-type]


def _floats(msg: Any, key: str, count: int) -> list[float]:
    values = msg.get(key) if isinstance(msg, dict) else None
    if (not isinstance(values, list) or len(values) != count
            or not all(isinstance(v, (int, float)) and np.isfinite(v) for v in values)):
        raise CodecError(f"field {key!r}: expected {count} finite numbers")
    return [float(v) for v in values]


def _half(x: torch.Tensor) -> torch.Tensor:
    """``x`` as float16, finite values clamped to ±65504 (±Inf and NaN stay what they are). When every
    value is within ±65504 (one min/max pass says so) this is a plain conversion (~10x cheaper)."""
    if x.numel():
        lo, hi = torch.aminmax(x)
        if -FP16_MAX <= float(lo) and float(hi) <= FP16_MAX:  # False for NaN
            return x.to(torch.float16)
    return torch.where(torch.isinf(x), x, x.clamp(-FP16_MAX, FP16_MAX)).to(torch.float16)


def _rows_min_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position (min, max) over the rows of a 2-D ``x`` (NaN propagates): ``amin`` and ``amax``,
    ~15x cheaper here than ``torch.aminmax(x, dim=0)``."""
    return torch.amin(x, dim=0), torch.amax(x, dim=0)


# torch warns (once) that a tensor over bytes could be written through; decoded tensors are only read.
# A filter scoped to this module: warnings.catch_warnings() around the call is not thread-safe.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning,
                        module=__name__)


def _frombuffer(data: bytes | bytearray | memoryview, dtype: torch.dtype) -> torch.Tensor:
    """A tensor over ``data`` without copying it (read-only bytes included: see Codec.decode)."""
    if not data:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(data, dtype=dtype)


class Codec:
    """Base class: ``encode(x, start, result)`` -> map; ``decode(map, length)`` -> float32 tensor.

    ``start`` is the chunk's offset in the flat vector (used by stateful codecs); ``result`` is True
    for averaged results sent back by a part's owner, False for a member's own contribution. A map's
    byte fields may be memoryviews of tensors (no copy; the transport frames them as they are), so
    the tensor given to ``encode`` must not change until the map is sent; ``decode`` accepts maps
    as ``encode`` made them and as they arrive (bytes), and its result may share memory with the
    map: read it, or ``clone()`` it before changing it in place."""

    name = "abstract"
    lossless = False
    inline = False  # True: encode/decode do no per-value work, so the all-reduce calls them on its event loop

    def encode(self, x: torch.Tensor, start: int = 0, result: bool = False) -> dict:
        raise NotImplementedError

    def decode(self, msg: Any, length: int) -> torch.Tensor:
        raise NotImplementedError

    def encode_result(self, averaged: torch.Tensor, start: int, inputs: torch.Tensor | None) -> dict:
        """The owner's averaged chunk for every member (one message for all). ``inputs`` ([members,
        length]): each member's contribution as the owner holds it (decoded; its own exact), which a
        codec may use to send less or be more accurate (see :class:`Float16`). Default:
        ``encode(averaged, start, result=True)``."""
        return self.encode(averaged, start, result=True)

    def decode_result(self, msg: Any, length: int, own: torch.Tensor | None) -> torch.Tensor:
        """A result chunk from :meth:`encode_result`; ``own``: this member's own values for the chunk
        (what it encoded and sent). Default: ``decode(msg, length)``."""
        return self.decode(msg, length)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class NoCompression(Codec):
    name, lossless, inline = "none", True, True

    def encode(self, x, start=0, result=False):
        return {"d": _raw(x)}  # shares x's memory: x must not change until the message is sent

    def decode(self, msg, length):
        return _frombuffer(_bytes(msg, "d", 4 * length), torch.float32)


class Float16(Codec):
    """float16 contributions; averaged results as 16-bit residues against each receiver's own values.

    A result chunk ``R`` goes to every member as one message, either absolute float16 (``{"d"}``) or,
    when that is more accurate (the usual case), ``{"m": int16 residues, "k": int}``: ``R`` rounded
    to the grid ``g = 2**k`` (``N = round(R / g)``), of which only ``N mod 2**16`` is sent. Each
    member knows its own contribution ``c`` (float16, as the owner received it) and recovers
    ``N = round(c / g) + ((m - round(c / g)) mod 2**16, centered)``: exact integer arithmetic, so
    every member (the owner too) ends with the same float32 ``N * g``, bit-identical. The owner picks
    the smallest ``k`` with ``max |R - c| <= 32766 * g`` over the members' contributions, which
    makes the recovery exact, so the result is off by at most ``g / 2``: 16 bits relative to the
    spread of the contributions instead of 11 relative to the value (hivemind reaches a similar
    accuracy by sending ``R - c`` as float16, which leaves members with different results).
    ``k`` lies in [RESIDUE_MIN_EXP, RESIDUE_MAX_EXP] = [-36, 114] (so ``N`` stays exact in float64)."""

    name = "float16"
    RESIDUE_MIN_EXP, RESIDUE_MAX_EXP = -36, 114
    _SPAN = 32766  # |R - c| / g at most this: |N - round(c / g)| <= 32767 < 2**15

    def encode(self, x, start=0, result=False):
        return {"d": _raw(_half(x))}

    def decode(self, msg, length):
        if isinstance(msg, dict) and "m" in msg:
            raise CodecError("a float16 residue chunk can only be decoded with the receiver's own values")
        return _frombuffer(_bytes(msg, "d", 2 * length), torch.float16).float()

    def encode_result(self, averaged, start, inputs):
        # float32 throughout: a difference is correctly rounded (relative error 2**-24, far inside the
        # margin of _SPAN), R / g and round(R / g) * g are exact (g a power of two, N at most 24 bits)
        half = _half(averaged)
        absolute = {"d": _raw(half)}
        if inputs is None or averaged.numel() == 0:
            return absolute
        # max over members of |_half(own) - R| (each member recomputes _half(own)); _half is monotone
        lowest, highest = _rows_min_max(inputs) if inputs.dim() == 2 else (inputs, inputs)
        spread = max(float((_half(highest).float() - averaged).max()), float((averaged - _half(lowest).float()).max()))
        if not math.isfinite(spread):
            return absolute
        k = max(math.frexp(spread / self._SPAN)[1], self.RESIDUE_MIN_EXP) if spread > 0 else self.RESIDUE_MIN_EXP
        if k > self.RESIDUE_MAX_EXP:
            return absolute
        grid = math.ldexp(1.0, k)
        n = torch.round(averaged / grid)
        error = (n * grid).sub_(averaged)
        half_error = half.float().sub_(averaged)
        if not float(error.dot(error)) < float(half_error.dot(half_error)):
            return absolute
        return {"m": _raw(n.to(torch.int64).to(torch.int16)), "k": k}  # int64 -> int16 keeps the low 16 bits

    def decode_result(self, msg, length, own):
        if not (isinstance(msg, dict) and "m" in msg):
            return self.decode(msg, length)
        k = msg.get("k")
        if type(k) is not int or not self.RESIDUE_MIN_EXP <= k <= self.RESIDUE_MAX_EXP:
            raise CodecError(f"field 'k': expected an int in [{self.RESIDUE_MIN_EXP}, {self.RESIDUE_MAX_EXP}]")
        residues = _frombuffer(_bytes(msg, "m", 2 * length), torch.int16)
        if own is None or own.numel() != length:
            raise CodecError("a float16 residue chunk needs the receiver's own values")
        reference = _half(own).float()
        if not torch.isfinite(reference.sum()):  # |values| <= 65504: the sum of finite ones is finite
            raise CodecError("this member's own values are not finite")
        grid = math.ldexp(1.0, k)
        scaled = torch.round(reference / grid)  # exact, as at the owner (an integer-valued float32)
        # N = near + ((m - near) mod 2**16, centered): an int16 subtraction that wraps around is exactly
        # that centered residue. int32 when |near| leaves room for it (the usual case), else int64.
        wide = torch.int32 if length == 0 or float(scaled.abs().max()) < 2.0 ** 30 else torch.int64
        near = scaled.to(wide)
        n = near.add_(torch.sub(residues, near.to(torch.int16)).to(wide))
        # N * g rounded to float32: N rounded to float32, times the power of two g (exact: |N g| is a
        # normal float32, at least 2**-36 or zero), the same as (N.double() * g).float()
        return n.to(torch.float32).mul_(grid)


class Uniform8(Codec):
    name = "uint8"

    def encode(self, x, start=0, result=False):
        if x.numel() == 0:
            return {"d": b"", "r": [0.0, 0.0]}
        lo, hi = float(x.min()), float(x.max())
        scale = (hi - lo) / 255 or 1.0
        q = ((x - lo) / scale).round_().clamp_(0, 255).to(torch.uint8)
        return {"d": _raw(q), "r": [lo, scale]}

    def decode(self, msg, length):
        lo, scale = _floats(msg, "r", 2)
        q = _frombuffer(_bytes(msg, "d", length), torch.uint8)
        return q.float().mul_(scale).add_(lo)


class Blockwise8(Codec):
    name = "blockwise8"
    block = 256

    def encode(self, x, start=0, result=False):
        n = x.numel()
        padded = torch.nn.functional.pad(x, (0, (-n) % self.block)).view(-1, self.block)
        scales = padded.abs().amax(dim=1).clamp_min_(torch.finfo(torch.float32).tiny)  # tiny blocks keep their values
        q = (padded / scales[:, None] * 127).round_().clamp_(-127, 127).to(torch.int8)
        return {"d": q.view(-1)[:n].numpy().tobytes(), "s": scales.numpy().tobytes()}

    def decode(self, msg, length):
        blocks = -(-length // self.block)
        q = _frombuffer(_bytes(msg, "d", length), torch.int8).float()
        scales = _frombuffer(_bytes(msg, "s", 4 * blocks), torch.float32)
        if not torch.isfinite(scales).all():
            raise CodecError("non-finite block scale")
        q = torch.nn.functional.pad(q, (0, blocks * self.block - length)).view(blocks, self.block)
        return (q * (scales[:, None] / 127)).view(-1)[:length]


class Quantile8(Codec):
    """256 centroids fitted to the chunk (a Lloyd-Max quantizer), one byte per value.

    The centroids start at the quantiles ``(i + 0.5) / 256`` of a sample (at most ``sample`` =
    65536 values, drawn with a generator seeded by the chunk's offset, never the global RNG), are
    refined by ``iterations`` (8) Lloyd steps on that sample (boundaries at midpoints, centroids at
    bucket means), and finally set to the mean of the chunk's own values in each bucket (float64
    sums: a NaN/Inf in the chunk makes its bucket's centroid non-finite, which decode rejects).
    Mean squared error on N(0, 1): about 3.9e-4 (equal-mass buckets with their quantile as value:
    1.3e-3)."""

    name = "quantile8"
    sample = 1 << 16
    iterations = 8

    @staticmethod
    def _fit(values: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One Lloyd step: (bucket of each value, centroids as bucket means; empty buckets keep theirs).
        ``codebook`` is float64, so midpoints of values near ±3.4e38 do not overflow."""
        boundaries = ((codebook[1:] + codebook[:-1]) / 2).to(values.dtype)
        q = torch.bucketize(values, boundaries)
        sums = torch.zeros(256, dtype=torch.float64).index_add_(0, q, values.double())
        counts = torch.bincount(q, minlength=256)
        return q, torch.where(counts > 0, sums / counts.clamp_min(1), codebook)

    def encode(self, x, start=0, result=False):
        n = x.numel()
        if n == 0:
            return {"d": b"", "c": torch.zeros(256).numpy().tobytes()}
        if n <= self.sample:
            sample = x
        else:
            generator = torch.Generator().manual_seed(start * 1_000_003 + n)
            sample = x[torch.randint(0, n, (self.sample,), generator=generator)]
        codebook = torch.quantile(sample.double(), (torch.arange(256, dtype=torch.float64) + 0.5) / 256)
        for _ in range(self.iterations):
            codebook = self._fit(sample, codebook)[1].sort().values  # NaN sorts last: still non-finite
        q, codebook = self._fit(x, codebook)
        return {"d": q.to(torch.uint8).numpy().tobytes(), "c": codebook.float().numpy().tobytes()}

    def decode(self, msg, length):
        codebook = _frombuffer(_bytes(msg, "c", 1024), torch.float32)
        if not torch.isfinite(codebook).all():
            raise CodecError("non-finite codebook")
        q = _frombuffer(_bytes(msg, "d", length), torch.uint8)
        return codebook[q.long()]


class TopK(Codec):
    """Top-k sparsification with error feedback (``fraction`` of the values are sent; default 1%)."""

    name = "topk"

    def __init__(self, fraction: float = 0.01):
        if not 0 < fraction <= 1:
            raise ValueError("fraction must lie in (0, 1]")
        self.fraction = fraction
        self._residual: torch.Tensor | None = None
        self._lock = threading.Lock()  # chunks are encoded in several threads at once; the residual is shared

    def _residual_for(self, start: int, n: int) -> torch.Tensor:
        if self._residual is None or self._residual.numel() < start + n:
            grown = torch.zeros(start + n, dtype=torch.float32)
            if self._residual is not None:
                grown[:self._residual.numel()] = self._residual
            self._residual = grown
        return self._residual[start:start + n]

    def encode(self, x, start=0, result=False):
        n = x.numel()
        if result:
            nonzero = torch.nonzero(x, as_tuple=True)[0].to(torch.int32)
            if nonzero.numel() * 8 >= n * 4:
                return {"d": x.numpy().tobytes()}
            return {"i": nonzero.numpy().tobytes(), "v": x[nonzero.long()].numpy().tobytes()}
        with self._lock:
            return self._encode_contribution(x, start, n)

    def _encode_contribution(self, x: torch.Tensor, start: int, n: int) -> dict:
        residual = self._residual_for(start, n)
        corrected = x + residual
        k = max(1, int(n * self.fraction)) if n else 0
        index = torch.topk(corrected.abs(), k, sorted=False).indices if k else torch.empty(0, dtype=torch.long)
        values = _half(corrected[index])
        residual.copy_(corrected)
        residual[index] -= values.float()
        residual.nan_to_num_(0.0, 0.0, 0.0)  # a NaN/Inf (sent, so the receiver rejects it) is not carried on
        return {"i": index.to(torch.int32).numpy().tobytes(), "h": values.numpy().tobytes()}

    def decode(self, msg, length):
        if not isinstance(msg, dict):
            raise CodecError("topk chunk must be a map")
        if "d" in msg:
            return _frombuffer(_bytes(msg, "d", 4 * length), torch.float32)
        raw_index = msg.get("i")
        if not isinstance(raw_index, (bytes, bytearray)) or len(raw_index) % 4 or len(raw_index) // 4 > length:
            raise CodecError("bad topk indices")
        count = len(raw_index) // 4
        index = _frombuffer(raw_index, torch.int32).long()
        if count and (index.min() < 0 or index.max() >= length):
            raise CodecError("topk index out of range")
        if "h" in msg:
            values = _frombuffer(_bytes(msg, "h", 2 * count), torch.float16).float()
        else:
            values = _frombuffer(_bytes(msg, "v", 4 * count), torch.float32)
        out = torch.zeros(length, dtype=torch.float32)
        out[index] = values
        return out

    def __repr__(self) -> str:
        return f"TopK(fraction={self.fraction})"


class PowerSGD(TopK):
    """Rank-``rank`` PowerSGD compression of each chunk with error feedback (Vogels et al., 2019)."""

    name = "powersgd"

    def __init__(self, rank: int = 4):
        if rank < 1:
            raise ValueError("rank must be at least 1")
        self.rank = rank
        self._residual = None
        self._lock = threading.Lock()
        self._q: dict[int, torch.Tensor] = {}  # warm-start factor per chunk offset
        self._half = Float16()

    @staticmethod
    def _shape(n: int) -> tuple[int, int]:
        rows = max(1, int(math.sqrt(n)))
        while n % rows:
            rows -= 1
        return rows, n // rows

    def encode(self, x, start=0, result=False):
        n = x.numel()
        if result:
            return self._half.encode(x)
        rows, cols = self._shape(n)
        rank = min(self.rank, rows, cols)
        if n == 0 or rank * (rows + cols) >= n:  # too small to gain anything: send it exactly
            return {"d": x.numpy().tobytes()}
        with self._lock:
            return self._encode_factors(x, start, n, rows, cols, rank)

    def _encode_factors(self, x: torch.Tensor, start: int, n: int, rows: int, cols: int, rank: int) -> dict:
        residual = self._residual_for(start, n)
        matrix = (x + residual).view(rows, cols)
        q = self._q.get(start)
        if q is None or q.shape != (cols, rank):
            q = torch.randn(cols, rank, generator=torch.Generator().manual_seed(start))
        p = torch.linalg.qr(matrix @ q).Q  # rows x rank, orthonormal columns
        q = matrix.T @ p  # cols x rank
        approx = p @ q.T
        residual.copy_((matrix - approx).view(-1))
        if torch.isfinite(q).all():
            self._q[start] = q
        else:  # NaN/Inf input: the factors are non-finite (the receiver rejects them); start afresh
            self._q.pop(start, None)
            residual.zero_()
        return {"p": p.contiguous().numpy().tobytes(), "q": q.contiguous().numpy().tobytes(), "r": rank}

    def decode(self, msg, length):
        if not isinstance(msg, dict):
            raise CodecError("powersgd chunk must be a map")
        if "d" in msg:
            data = msg["d"]
            if isinstance(data, (bytes, bytearray, memoryview)) and len(data) == 2 * length:  # float16 (results)
                return self._half.decode(msg, length)
            return _frombuffer(_bytes(msg, "d", 4 * length), torch.float32)
        rank = msg.get("r")
        rows, cols = self._shape(length)
        if not isinstance(rank, int) or not 1 <= rank <= min(rows, cols):
            raise CodecError("bad powersgd rank")
        p = _frombuffer(_bytes(msg, "p", 4 * rows * rank), torch.float32).view(rows, rank)
        q = _frombuffer(_bytes(msg, "q", 4 * cols * rank), torch.float32).view(cols, rank)
        if not (torch.isfinite(p).all() and torch.isfinite(q).all()):
            raise CodecError("non-finite powersgd factors")
        return (p @ q.T).reshape(-1)

    def __repr__(self) -> str:
        return f"PowerSGD(rank={self.rank})"


CODECS: dict[str, type[Codec]] = {c.name: c for c in (NoCompression, Float16, Uniform8, Blockwise8, Quantile8, TopK,
                                                      PowerSGD)}

from .sparse_codecs import SPARSE_CODECS  # noqa: E402 - they build on the classes above

CODECS.update({c.name: c for c in SPARSE_CODECS})


def get(codec: "str | Codec | None" = None, **params: Any) -> Codec:
    """A codec by name (``None`` means ``"none"``) or the instance itself."""
    if codec is None:
        return NoCompression()
    if isinstance(codec, Codec):
        return codec
    try:
        return CODECS[codec](**params)
    except KeyError:
        raise ValueError(f"unknown compression {codec!r}; choose from {', '.join(CODECS)}") from None
