"""The flat vector of an averaging round and who reduces which ranges of it.

All tensors are concatenated (in order, as float32) into one flat vector. A :class:`Layout` gives
each group member a list of ``(start, end)`` ranges it reduces (one contiguous part in a normal
round; possibly several ranges in a recovery round that re-reduces the parts of failed members).
Ranges are streamed in chunks of at most ``chunk_elems`` values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

__all__ = ["Layout", "flatten", "unflatten_into", "chunk_ranges"]


def flatten(tensors: Sequence[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """A 1-D float32 tensor holding all values of ``tensors`` (a snapshot): ``out`` if given (a
    float32 vector of exactly that length, e.g. a buffer kept from an earlier round), else a new one."""
    total = sum(t.numel() for t in tensors)
    if out is not None and (out.dtype != torch.float32 or out.shape != (total,)):
        raise ValueError(f"out must be a float32 vector of {total} values, got {out.dtype} {tuple(out.shape)}")
    flat = torch.empty(total, dtype=torch.float32) if out is None else out
    offset = 0
    with torch.no_grad():
        for t in tensors:
            n = t.numel()
            flat[offset:offset + n].copy_(t.detach().reshape(-1))
            offset += n
    return flat


def unflatten_into(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    """Write ``flat`` back into ``tensors`` (in place, converting to each tensor's dtype)."""
    offset = 0
    with torch.no_grad():
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view(t.shape))
            offset += n


def chunk_ranges(ranges: Sequence[tuple[int, int]], chunk_elems: int) -> list[tuple[int, int]]:
    """Split ranges into consecutive chunks of at most ``chunk_elems`` values (never across ranges)."""
    chunks = []
    for start, end in ranges:
        for lo in range(start, end, chunk_elems):
            chunks.append((lo, min(lo + chunk_elems, end)))
    return chunks


@dataclass
class Layout:
    """``ranges[i]``: the ranges of the flat vector that member ``i`` reduces (empty: owns nothing)."""

    ranges: list[list[tuple[int, int]]]

    @classmethod
    def contiguous(cls, sizes: Sequence[int]) -> "Layout":
        """One contiguous part per member, in member order, of the given sizes."""
        ranges, offset = [], 0
        for size in sizes:
            ranges.append([(offset, offset + size)] if size else [])
            offset += size
        return cls(ranges)

    @classmethod
    def over(cls, spans: Sequence[tuple[int, int]], sizes: Sequence[int]) -> "Layout":
        """Split the concatenation of ``spans`` among members by ``sizes`` (which sum to its length)."""
        ranges: list[list[tuple[int, int]]] = []
        spans = [s for s in spans if s[1] > s[0]]
        total = sum(end - start for start, end in spans)
        if sum(sizes) != total or any(size < 0 for size in sizes):
            raise ValueError(f"part sizes {list(sizes)} do not split the {total} values of the spans")
        span_index, position = 0, spans[0][0] if spans else 0
        for size in sizes:
            mine: list[tuple[int, int]] = []
            while size > 0:
                start, end = spans[span_index]
                take = min(size, end - position)
                mine.append((position, position + take))
                size -= take
                position += take
                if position == end and span_index + 1 < len(spans):
                    span_index += 1
                    position = spans[span_index][0]
            ranges.append(mine)
        return cls(ranges)

    def size_of(self, member: int) -> int:
        return sum(end - start for start, end in self.ranges[member])

    def owners(self) -> Iterator[int]:
        return (i for i, r in enumerate(self.ranges) if r)
