"""Low-bandwidth codecs for DiLoCo pseudo-gradients: sparse top-k (SparseLoCo, DeMo) and 4-bit dense.

Registered in :data:`averaging.compression.CODECS` (so ``Optimizer(compression=name)`` and
``Averager(compression=name)`` take them by name):

==============  =============================================================  ====================
name            what is sent per chunk                                          bytes per value
==============  =============================================================  ====================
``sparseloco``  SparseLoCo: per tile of ``chunk`` (4096) consecutive values     0.0171 (1/234 of
                the ``topk`` (48) largest |values| of input + error-feedback    float32) with the
                residual; indices Elias-Fano coded per tile (6 low bits + ~2    defaults
                upper bits each), values in 2 bits: sign + one of two levels
                per tile (the mean |value| of the smaller and of the larger
                half of the kept values, two float32 per tile)
``demo``        DeMo: orthonormal DCT-II of each tensor in tiles of r x c        0.0244 (1/164) for
                (r, c: the largest divisors <= ``chunk`` = 64 of the tensor's   2-D tensors; 1-D
                dimensions, algorithms.md 7.3; 1-D tensors in 1-D tiles), the   tensors (biases)
                ``topk`` (32) largest |coefficients| per tile with error        keep 32 of 64
                feedback; Elias-Fano indices, bfloat16 values
``uniform4``    dense, for Streaming DiLoCo: blocks of 64 values as int4 in      0.5625 (4 bits +
                [-7, 7] times the block's absmax / 7 (float32 scale);           a float32 per 64)
                optional error feedback (``error_feedback=True``)
==============  =============================================================  ====================

``sparseloco`` and ``demo`` have ``sparse = True``: :class:`~averaging.averager.AsyncAverager`
averages them with the all-gather of :mod:`averaging.sparse_allgather` (every member decodes every
contribution, deterministic order) instead of the butterfly; their residual is an
:class:`~averaging.error_feedback.ErrorFeedback` (``codec.feedback``; ``codec.state_dict()`` /
``codec.load_state_dict()`` checkpoint it). Parameters: ``topk``, ``chunk``, ``decay`` (EF decay,
1.0). Bytes per value above are a contribution's; in an all-gather each member sends its
contribution to each of the other ``n - 1`` members.

Tuning (measured: a simulated 4-peer DiLoCo on examples/charlm.py, 8 outer steps of H = 16, held-out
loss; dense float32 mean with outer Nesterov lr 0.7, momentum 0.9: 2.288): with that outer optimizer
sparse modes lag (sparseloco 2.62-2.65, demo 2.55), because error feedback already acts as momentum
and a mean of sparse contributions is smaller than the dense mean. Use **outer SGD without momentum
and lr 2-3** for them (SparseLoCo's recipe): sparseloco topk 48 with lr 3.0: 2.337 (+2.1 %), lr 2.0:
2.348 (+2.6 %); topk 32, lr 3.0: 2.387 (+4.3 %); topk 64, lr 2.0: 2.330 (+1.8 %, but 93x less than
a float32 butterfly with 4 peers, below 100x); demo, lr 2.0: 2.358 (+3.1 %). EF ``decay`` 0.95 did
not help (topk 64, lr 1.0: 2.449 vs 2.423).

``demo`` learns the tensor shapes from ``bind(shapes)`` (the averager calls it); unbound, or for a
chunk that does not cover whole bands of ``r`` rows, it treats the values as one 1-D tensor. A
message names its own tiling (``"g"``: ``[[rows, cols, r, c, k], ...]``), so a receiver needs no
shapes. Decoding rejects (CodecError) anything inconsistent: sizes, tilings, duplicated or
out-of-range indices, non-finite scales. A NaN/Inf input reaches the receiver as NaN/Inf or a
CodecError (never as finite values). Averaged results (``result=True``, only used if a sparse codec
runs in the butterfly) travel exactly, as float32 (index, value) pairs or dense.
"""

from __future__ import annotations

import math
import threading
from typing import Any, Sequence

import numpy as np
import torch

from .compression import Codec, CodecError, _bytes, _frombuffer
from .error_feedback import ErrorFeedback

__all__ = ["SparseLoCo", "DCTTopK", "Uniform4", "chunk_length", "dct_matrix", "SPARSE_CODECS"]

MAX_TILE = 1 << 16  # values per tile a message may name
MAX_DCT = 1024  # largest DCT dimension a message may name (decode cost per value grows with it)


def chunk_length(n: int, limit: int = 64) -> int:
    """The DeMo chunk length of a dimension of size ``n``: its largest divisor <= ``limit`` (``n``
    itself when ``n <= limit``); algorithms.md 7.3: 4096 -> 64, 1000 -> 50, 50257 -> 29, 17 -> 17."""
    if n <= limit:
        return max(n, 1)
    return next(d for d in range(limit, 0, -1) if n % d == 0)


_DCT_CACHE: dict[int, torch.Tensor] = {}


def dct_matrix(n: int) -> torch.Tensor:
    """The orthonormal DCT-II matrix ``D`` [n, n] (float32; ``D @ x`` transforms, ``D.T @ y`` inverts)."""
    matrix = _DCT_CACHE.get(n)
    if matrix is None:
        k = torch.arange(n, dtype=torch.float64)[:, None]
        i = torch.arange(n, dtype=torch.float64)[None, :]
        d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
        d[0] /= math.sqrt(2.0)
        matrix = _DCT_CACHE[n] = d.to(torch.float32)
    return matrix


# ---- bits -------------------------------------------------------------------------------------

def _bits_of(values: np.ndarray, width: int) -> np.ndarray:
    """The ``width`` low bits of each value, least significant first, as a flat uint8 0/1 array."""
    if width == 0 or values.size == 0:
        return np.zeros(0, np.uint8)
    shifts = np.arange(width, dtype=np.int64)
    return ((values.astype(np.int64).reshape(-1, 1) >> shifts) & 1).astype(np.uint8).reshape(-1)


def _pack(bits: np.ndarray) -> bytes:
    return np.packbits(bits, bitorder="little").tobytes() if bits.size else b""


def _unpack(msg: Any, key: str, count: int) -> np.ndarray:
    """``count`` bits of field ``key`` (exactly ceil(count / 8) bytes, zero padding)."""
    data = _bytes(msg, key, (count + 7) // 8)
    if count == 0:
        return np.zeros(0, np.uint8)
    bits = np.unpackbits(np.frombuffer(bytes(data), np.uint8), bitorder="little")
    if bits[count:].any():
        raise CodecError(f"field {key!r}: non-zero padding bits")
    return bits[:count]


def _values_of(bits: np.ndarray, width: int, count: int) -> np.ndarray:
    """``count`` values of ``width`` bits each from ``bits`` (as made by :func:`_bits_of`)."""
    if width == 0:
        return np.zeros(count, np.int64)
    return bits.reshape(-1, width).astype(np.int64) @ (np.int64(1) << np.arange(width, dtype=np.int64))


def _low_width(length: int, k: int) -> int:
    """Elias-Fano low bits for ``k`` sorted indices below ``length``: floor(log2(length / k))."""
    return max(0, (length // k).bit_length() - 1) if k else 0


def _upper_width(length: int, k: int) -> int:
    return k + ((length - 1) >> _low_width(length, k)) + 1 if k else 0


# ---- tiles ------------------------------------------------------------------------------------

Segment = tuple[int, int, int, int, int]  # rows, cols, r, c, k: rows x cols values in r x c tiles, k kept per tile


def _segments(msg: Any, length: int, transform: bool) -> list[Segment]:
    raw = msg.get("g") if isinstance(msg, dict) else None
    if not isinstance(raw, list) or len(raw) > length + 1:
        raise CodecError("field 'g': expected a list of tilings")
    segments, total = [], 0
    limit = MAX_DCT if transform else MAX_TILE
    for entry in raw:
        if (not isinstance(entry, list) or len(entry) != 5
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in entry)):
            raise CodecError("field 'g': each tiling is [rows, cols, r, c, k] (ints)")
        rows, cols, r, c, k = entry
        if not (1 <= r <= min(rows, limit) and 1 <= c <= min(cols, limit if transform else MAX_TILE)
                and r * c <= MAX_TILE and rows % r == 0 and cols % c == 0 and 1 <= k <= r * c):
            raise CodecError("field 'g': inconsistent tiling")
        total += rows * cols
        if total > length:
            break
        segments.append((rows, cols, r, c, k))
    if total != length:
        raise CodecError(f"field 'g': tilings cover {total} values, expected {length}")
    return segments


def _tiles(values: torch.Tensor, rows: int, cols: int, r: int, c: int) -> torch.Tensor:
    """[rows * cols] -> [tiles, r, c] (row-major tiles of the rows x cols matrix)."""
    return values.view(rows // r, r, cols // c, c).permute(0, 2, 1, 3).reshape(-1, r, c)


def _untile(tiles: torch.Tensor, rows: int, cols: int, r: int, c: int) -> torch.Tensor:
    return tiles.view(rows // r, cols // c, r, c).permute(0, 2, 1, 3).reshape(-1)


def _exact_result(x: torch.Tensor) -> dict:
    """An averaged chunk sent exactly: float32 (index, value) pairs of its non-zeros, or dense."""
    nonzero = torch.nonzero(x, as_tuple=True)[0].to(torch.int32)
    if nonzero.numel() * 8 >= x.numel() * 4:
        return {"d": x.contiguous().numpy().tobytes()}
    return {"i": nonzero.numpy().tobytes(), "v": x[nonzero.long()].contiguous().numpy().tobytes()}


def _decode_exact(msg: dict, length: int) -> torch.Tensor:
    if "d" in msg:
        return _frombuffer(_bytes(msg, "d", 4 * length), torch.float32)
    raw = msg.get("i")
    if not isinstance(raw, (bytes, bytearray)) or len(raw) % 4 or len(raw) // 4 > length:
        raise CodecError("bad result indices")
    index = _frombuffer(raw, torch.int32).long()
    if index.numel() and (int(index[0]) < 0 or int(index[-1]) >= length or not bool((index[1:] > index[:-1]).all())):
        raise CodecError("result indices out of range, unsorted or duplicated")
    values = _frombuffer(_bytes(msg, "v", 4 * index.numel()), torch.float32)
    out = torch.zeros(length, dtype=torch.float32)
    out[index] = values
    return out


class _TopKTiles(Codec):
    """Shared machinery: per tile, the ``topk`` largest |coefficients| (of the values themselves, or
    of their 2-D DCT) of input + EF residual; Elias-Fano indices; values in 2 bits or bfloat16."""

    sparse = True
    transform = False  # True: tiles go through the orthonormal 2-D DCT-II
    two_bit = True  # False: values as bfloat16

    def __init__(self, topk: int, chunk: int, decay: float = 1.0):
        if not (isinstance(topk, int) and topk >= 1) or not (isinstance(chunk, int) and chunk >= 1):
            raise ValueError("topk and chunk must be positive integers")
        self.topk, self.chunk = topk, chunk
        self.feedback = ErrorFeedback(decay)

    # ---- checkpointing ----
    def state_dict(self) -> dict[str, Any]:
        """The error-feedback state (see :class:`ErrorFeedback`)."""
        return self.feedback.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.feedback.load_state_dict(state)

    # ---- layout ----
    def plan(self, start: int, n: int) -> list[Segment]:
        """The tilings of the chunk ``[start, start + n)``."""
        raise NotImplementedError

    # ---- encoding ----
    def _forward(self, tiles: torch.Tensor) -> torch.Tensor:
        if not self.transform:
            return tiles
        r, c = tiles.shape[1], tiles.shape[2]
        return dct_matrix(r) @ tiles @ dct_matrix(c).T

    def _inverse(self, coefficients: torch.Tensor) -> torch.Tensor:
        if not self.transform:
            return coefficients
        r, c = coefficients.shape[1], coefficients.shape[2]
        return dct_matrix(r).T @ coefficients @ dct_matrix(c)

    def encode(self, x: torch.Tensor, start: int = 0, result: bool = False) -> dict:
        if result:
            return _exact_result(x)
        with self.feedback.lock:
            corrected = self.feedback.corrected(x, start)
            message, decoded = self.compress(corrected, start)
            self.feedback.update(start, corrected, decoded)
        return message

    def compress(self, x: torch.Tensor, start: int = 0) -> tuple[dict, torch.Tensor]:
        """(message, what the receivers decode) for ``x`` (no error feedback)."""
        segments = self.plan(start, x.numel())
        decoded = torch.empty_like(x)
        upper, low, codes, scales, halves = [], [], [], [], []
        offset = 0
        for rows, cols, r, c, k in segments:
            size = rows * cols
            tiles = self._forward(_tiles(x[offset:offset + size], rows, cols, r, c)).reshape(-1, r * c)
            finite = torch.isfinite(tiles).all(dim=1)
            magnitude = tiles.abs().nan_to_num_(nan=math.inf)
            index = torch.topk(magnitude, k, dim=1, sorted=False).indices.sort(dim=1).values
            kept = torch.gather(tiles, 1, index)
            if self.two_bit:
                sent, code, scale = _two_bit(kept, finite)
                codes.append(code)
                scales.append(scale)
            else:
                kept = torch.where(finite[:, None], kept, torch.full_like(kept, math.nan))
                half = kept.to(torch.bfloat16)
                halves.append(half.view(torch.int16).reshape(-1))
                sent = half.float()
            coefficients = torch.zeros_like(tiles).scatter_(1, index, sent)
            decoded[offset:offset + size] = _untile(self._inverse(coefficients.view(-1, r, c)), rows, cols, r, c)
            idx = index.numpy()
            width = _low_width(r * c, k)
            low.append(_bits_of(idx & ((1 << width) - 1), width))
            bitmap = np.zeros((idx.shape[0], _upper_width(r * c, k)), np.uint8)
            np.put_along_axis(bitmap, (idx >> width) + np.arange(k), 1, axis=1)
            upper.append(bitmap.reshape(-1))
            offset += size
        message: dict[str, Any] = {"g": [list(s) for s in segments],
                                   "e": _pack(np.concatenate(upper) if upper else np.zeros(0, np.uint8)),
                                   "l": _pack(np.concatenate(low) if low else np.zeros(0, np.uint8))}
        if self.two_bit:
            message["c"] = _pack(_bits_of(torch.cat(codes).numpy() if codes else np.zeros(0, np.int64), 2))
            message["s"] = (torch.cat(scales) if scales else torch.zeros(0)).numpy().tobytes()
        else:
            message["v"] = (torch.cat(halves) if halves else torch.zeros(0, dtype=torch.int16)).numpy().tobytes()
        return message, decoded

    # ---- decoding ----
    def decode(self, msg: Any, length: int) -> torch.Tensor:
        if not isinstance(msg, dict):
            raise CodecError(f"{self.name} chunk must be a map")
        if "d" in msg or "i" in msg:
            return _decode_exact(msg, length)
        segments = _segments(msg, length, self.transform)
        tiles_of = [(rows // r) * (cols // c) for rows, cols, r, c, _ in segments]
        kept_total = sum(t * s[4] for t, s in zip(tiles_of, segments))
        upper = _unpack(msg, "e", sum(t * _upper_width(s[2] * s[3], s[4]) for t, s in zip(tiles_of, segments)))
        low = _unpack(msg, "l", sum(t * s[4] * _low_width(s[2] * s[3], s[4]) for t, s in zip(tiles_of, segments)))
        if self.two_bit:
            codes = torch.from_numpy(_values_of(_unpack(msg, "c", 2 * kept_total), 2, kept_total))
            scales = _frombuffer(_bytes(msg, "s", 8 * sum(tiles_of)), torch.float32).view(-1, 2)
            if not (bool(torch.isfinite(scales).all()) and bool((scales >= 0).all())):
                raise CodecError("non-finite or negative scale")
        else:
            values = _frombuffer(_bytes(msg, "v", 2 * kept_total), torch.int16).view(torch.bfloat16).float()
        out = torch.empty(length, dtype=torch.float32)
        offset = upper_at = low_at = kept_at = tile_at = 0
        for (rows, cols, r, c, k), count in zip(segments, tiles_of):
            size, width, span = rows * cols, _low_width(r * c, k), _upper_width(r * c, k)
            bitmap = upper[upper_at:upper_at + count * span].reshape(count, span)
            if bool((bitmap.sum(axis=1) != k).any()):
                raise CodecError("field 'e': a tile does not hold exactly k indices")
            high = np.nonzero(bitmap)[1].reshape(count, k) - np.arange(k)
            lows = _values_of(low[low_at:low_at + count * k * width], width, count * k).reshape(count, k)
            index = (high << width) | lows
            if index.size and (int(index.max()) >= r * c or bool((np.diff(index, axis=1) <= 0).any())):
                raise CodecError("indices out of range or duplicated")
            if self.two_bit:
                code = codes[kept_at:kept_at + count * k].view(count, k)
                scale = scales[tile_at:tile_at + count]
                sent = torch.where(code & 1 == 1, scale[:, 1:2], scale[:, 0:1])
                sent = torch.where(code & 2 == 2, -sent, sent)
            else:
                sent = values[kept_at:kept_at + count * k].view(count, k)
            coefficients = torch.zeros(count, r * c).scatter_(1, torch.from_numpy(index), sent)
            out[offset:offset + size] = _untile(self._inverse(coefficients.view(-1, r, c)), rows, cols, r, c)
            offset += size
            upper_at += count * span
            low_at += count * k * width
            kept_at += count * k
            tile_at += count
        return out

    def bytes_per_value(self, n: int, start: int = 0) -> float:
        """Bytes on the wire per value for a chunk of ``n`` values at ``start`` (payload fields)."""
        message, _ = self.compress(torch.zeros(n), start)
        return sum(len(v) for v in message.values() if isinstance(v, bytes)) / max(n, 1)


def _two_bit(kept: torch.Tensor, finite: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """2-bit values of each row of ``kept`` [tiles, k]: (dequantized, codes, scales [tiles, 2]).
    Code = sign (2) | level (1); level 1 for the larger half of the magnitudes (ranks >= k // 2),
    each level the mean magnitude of its half (float64 sums), so the sum of |values| per tile is
    kept. A kept 0 (a tile with fewer than k non-zeros) is sent as +level (error feedback takes it
    back next round). A tile with a non-finite value gets NaN scales (the receiver rejects it)."""
    tiles, k = kept.shape
    magnitude = kept.abs()
    rank = torch.empty_like(magnitude, dtype=torch.long)
    order = magnitude.argsort(dim=1, stable=True)
    rank.scatter_(1, order, torch.arange(k).expand(tiles, k).contiguous())
    level = rank >= k // 2
    m64 = magnitude.double()
    high = (m64 * level).sum(dim=1) / max(k - k // 2, 1)
    low = (m64 * ~level).sum(dim=1) / max(k // 2, 1) if k // 2 else high
    scales = torch.stack([low, high], dim=1).to(torch.float32)
    scales[~finite] = math.nan
    sent = torch.where(level, scales[:, 1:2], scales[:, 0:1])
    negative = kept < 0
    sent = torch.where(negative, -sent, sent)
    codes = (negative.long() << 1) | level.long()
    return sent, codes.reshape(-1), scales


class SparseLoCo(_TopKTiles):
    """SparseLoCo (Templar): top-``topk`` per tile of ``chunk`` consecutive values of input + EF
    residual, 2-bit values (sign + two levels per tile), Elias-Fano indices. A chunk's last, shorter
    tile keeps ``round(topk * len / chunk)`` values (at least 1)."""

    name = "sparseloco"

    def __init__(self, topk: int = 48, chunk: int = 4096, decay: float = 1.0):
        if chunk > MAX_TILE:
            raise ValueError(f"chunk must be at most {MAX_TILE}")
        super().__init__(min(topk, chunk), chunk, decay)

    def plan(self, start: int, n: int) -> list[Segment]:
        full = n // self.chunk * self.chunk
        segments: list[Segment] = [(1, full, 1, self.chunk, self.topk)] if full else []
        if n > full:
            tail = n - full
            segments.append((1, tail, 1, tail, min(tail, max(1, round(self.topk * tail / self.chunk)))))
        return segments

    def chunk_ranges(self, total: int, chunk_elems: int) -> list[tuple[int, int]]:
        """Chunks of the flat vector for the collective: whole tiles (the last one may be shorter)."""
        step = max(self.chunk, chunk_elems // self.chunk * self.chunk)
        return [(lo, min(lo + step, total)) for lo in range(0, total, step)]

    def __repr__(self) -> str:
        return f"SparseLoCo(topk={self.topk}, chunk={self.chunk}, decay={self.feedback.decay})"


class DCTTopK(_TopKTiles):
    """DeMo (Peng et al.): orthonormal 2-D DCT-II of each tensor in r x c tiles (r, c: the largest
    divisors <= ``chunk`` of its dimensions; tensors of 3+ dimensions as [shape[0], rest]; 1-D
    tensors in 1-D tiles), top-``topk`` coefficients per tile of input + EF residual, bfloat16
    values, Elias-Fano indices. The average of the decoded contributions is taken in parameter
    space (unsent coefficients count as 0), a plain mean: DeMo's sign step is the optimizer's."""

    name = "demo"
    transform = True
    two_bit = False

    def __init__(self, topk: int = 32, chunk: int = 64, decay: float = 1.0):
        if chunk > MAX_DCT:
            raise ValueError(f"chunk must be at most {MAX_DCT}")
        super().__init__(topk, chunk, decay)
        self._layout: list[tuple[int, int, int, int, int]] = []  # offset, rows, cols, r, c per tensor
        self._lock = threading.Lock()

    def bind(self, shapes: Sequence[Sequence[int]]) -> None:
        """The shapes of the averaged tensors, in flat order (the averager calls this)."""
        layout, offset = [], 0
        for shape in shapes:
            dims = [int(d) for d in shape]
            size = math.prod(dims)
            if size == 0:
                continue
            rows, cols = (1, size) if len(dims) <= 1 else (dims[0], size // dims[0])
            r = 1 if rows == 1 else chunk_length(rows, self.chunk)
            layout.append((offset, rows, cols, r, chunk_length(cols, self.chunk)))
            offset += size
        self._layout = layout

    def _flat_piece(self, n: int) -> Segment:
        c = chunk_length(n, self.chunk)
        return (1, n, 1, c, min(self.topk, c))

    def plan(self, start: int, n: int) -> list[Segment]:
        segments: list[Segment] = []
        end, position = start + n, start
        for offset, rows, cols, r, c in self._layout:
            lo, hi = max(position, offset), min(end, offset + rows * cols)
            if lo >= hi:
                continue
            band = r * cols
            if (lo - offset) % band == 0 and ((hi - offset) % band == 0):
                segments.append(((hi - lo) // cols, cols, r, c, min(self.topk, r * c)))
            else:
                segments.append(self._flat_piece(hi - lo))
            position = hi
        if position < end:
            segments.append(self._flat_piece(end - position))
        return segments

    def chunk_ranges(self, total: int, chunk_elems: int) -> list[tuple[int, int]]:
        """Chunks of the flat vector for the collective: whole bands of r rows of each tensor, small
        tensors packed together, at most ``chunk_elems`` values unless one band is bigger."""
        pieces: list[tuple[int, int]] = []
        covered = 0
        for offset, rows, cols, r, _ in self._layout:
            if offset >= total:
                break
            band = r * cols
            step = max(band, chunk_elems // band * band)
            end = min(offset + rows * cols, total)
            pieces += [(lo, min(lo + step, end)) for lo in range(offset, end, step)]
            covered = end
        pieces += [(lo, min(lo + chunk_elems, total)) for lo in range(covered, total, chunk_elems)]
        chunks: list[tuple[int, int]] = []
        for lo, hi in pieces:
            if chunks and hi - chunks[-1][0] <= chunk_elems:
                chunks[-1] = (chunks[-1][0], hi)
            else:
                chunks.append((lo, hi))
        return chunks

    def __repr__(self) -> str:
        return f"DCTTopK(topk={self.topk}, chunk={self.chunk}, decay={self.feedback.decay})"


class Uniform4(Codec):
    """Dense 4-bit: blocks of ``block`` (64) values as int4 in [-7, 7] times absmax / 7 (a float32
    per block; two values per byte). Error: at most half a level (absmax / 14) per value.
    ``error_feedback=True`` keeps what rounding dropped for the next round (contributions only)."""

    name = "uniform4"
    block = 64

    def __init__(self, error_feedback: bool = False, decay: float = 1.0):
        self.feedback = ErrorFeedback(decay) if error_feedback else None

    def state_dict(self) -> dict[str, Any]:
        return self.feedback.state_dict() if self.feedback is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.feedback is not None:
            self.feedback.load_state_dict(state)

    def quantize(self, x: torch.Tensor) -> tuple[dict, torch.Tensor]:
        """(message, what the receiver decodes) for ``x``."""
        n = x.numel()
        padded = torch.nn.functional.pad(x.to(torch.float32), (0, (-n) % self.block)).view(-1, self.block)
        scales = padded.abs().amax(dim=1).clamp_min_(torch.finfo(torch.float32).tiny) / 7
        q = (padded / scales[:, None]).round_().clamp_(-7, 7).to(torch.int8)
        decoded = (q.float() * scales[:, None]).view(-1)[:n]
        nibbles = (q.view(-1)[:n] + 8).to(torch.uint8).numpy()
        if n % 2:
            nibbles = np.append(nibbles, np.uint8(8))
        packed = (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8)
        return {"d": packed.tobytes(), "s": scales.numpy().tobytes()}, decoded

    def encode(self, x, start=0, result=False):
        if result or self.feedback is None:
            return self.quantize(x)[0]
        with self.feedback.lock:
            corrected = self.feedback.corrected(x, start)
            message, decoded = self.quantize(corrected)
            self.feedback.update(start, corrected, decoded)
        return message

    def decode(self, msg, length):
        blocks = -(-length // self.block)
        packed = np.frombuffer(bytes(_bytes(msg, "d", (length + 1) // 2)), np.uint8)
        scales = _frombuffer(_bytes(msg, "s", 4 * blocks), torch.float32)
        if not bool(torch.isfinite(scales).all()):
            raise CodecError("non-finite block scale")
        nibbles = np.empty(2 * packed.size, np.uint8)
        nibbles[0::2], nibbles[1::2] = packed & 15, packed >> 4
        if nibbles.size and (nibbles == 0).any():
            raise CodecError("field 'd': a 4-bit code outside [-7, 7]")
        if length % 2 and nibbles[-1] != 8:
            raise CodecError("field 'd': non-zero padding")
        q = torch.from_numpy(nibbles[:length].astype(np.float32) - 8)
        q = torch.nn.functional.pad(q, (0, blocks * self.block - length)).view(blocks, self.block)
        return (q * scales[:, None]).reshape(-1)[:length].contiguous()

    def __repr__(self) -> str:
        return f"Uniform4(error_feedback={self.feedback is not None})"


SPARSE_CODECS: tuple[type[Codec], ...] = (SparseLoCo, DCTTopK, Uniform4)
