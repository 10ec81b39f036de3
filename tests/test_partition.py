"""The flat vector of a round (averaging/partition.py): flatten/unflatten, chunks, layouts."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from averaging.load_balancing import part_sizes
from averaging.partition import Layout, chunk_ranges, flatten, unflatten_into

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]

shapes = st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple)


@st.composite
def tensor_lists(draw):
    tensors = []
    for _ in range(draw(st.integers(1, 6))):
        shape = draw(shapes)
        dtype = draw(st.sampled_from(DTYPES))
        seed = draw(st.integers(0, 2 ** 31 - 1))
        t = (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 100).to(dtype)
        if len(shape) >= 2 and draw(st.booleans()):
            t = t.transpose(0, 1)  # non-contiguous
        tensors.append(t)
    return tensors


@settings(max_examples=200, deadline=None)
@given(tensor_lists())
def test_flatten_unflatten_roundtrip(tensors):
    """flatten concatenates in order as float32; writing it back restores every tensor exactly for
    dtypes of at most 32 bits (float64 passes through float32), in place, shapes and dtypes kept."""
    flat = flatten(tensors)
    assert flat.dtype == torch.float32 and flat.dim() == 1
    assert flat.numel() == sum(t.numel() for t in tensors)
    expected = torch.cat([t.reshape(-1).float() for t in tensors]) if tensors else torch.empty(0)
    assert torch.equal(flat, expected)
    targets = [torch.zeros_like(t) for t in tensors]
    storages = [t.data_ptr() for t in targets]
    unflatten_into(flat, targets)
    for original, target, pointer in zip(tensors, targets, storages):
        assert target.shape == original.shape and target.dtype == original.dtype
        assert target.data_ptr() == pointer  # written in place
        assert torch.equal(target, original.float().to(original.dtype))


def test_flatten_is_a_snapshot():
    a, b = torch.ones(3), torch.full((2, 2), 2.0)
    flat = flatten([a, b])
    a.zero_()
    b.zero_()
    assert flat.tolist() == [1, 1, 1, 2, 2, 2, 2]


def test_unflatten_into_non_contiguous_and_zero_dim():
    matrix = torch.zeros(3, 4).t()  # non-contiguous view
    scalar = torch.tensor(0.0, dtype=torch.float64)
    unflatten_into(torch.arange(13, dtype=torch.float32), [matrix, scalar])
    assert torch.equal(matrix, torch.arange(12, dtype=torch.float32).view(4, 3))
    assert scalar.item() == 12.0 and scalar.dtype == torch.float64


ranges_strategy = st.lists(st.tuples(st.integers(0, 5000), st.integers(0, 600)), max_size=8).map(
    lambda pairs: [(s, s + n) for s, n in pairs])


@settings(max_examples=300, deadline=None)
@given(ranges_strategy, st.integers(1, 700))
def test_chunk_ranges_cover_each_range_in_order(ranges, chunk_elems):
    chunks = chunk_ranges(ranges, chunk_elems)
    assert all(0 < hi - lo <= chunk_elems for lo, hi in chunks)
    position = 0
    for start, end in ranges:  # each range is covered by consecutive chunks, none across ranges
        covered = start
        while covered < end:
            lo, hi = chunks[position]
            assert lo == covered and hi <= end
            covered = hi
            position += 1
        # all but the last chunk of a range are full
    assert position == len(chunks)
    expected = sum(-(-(e - s) // chunk_elems) for s, e in ranges)
    assert len(chunks) == expected


def covered(ranges: list[tuple[int, int]]) -> list[int]:
    return [i for lo, hi in ranges for i in range(lo, hi)]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 300), min_size=1, max_size=10))
def test_contiguous_layout(sizes):
    layout = Layout.contiguous(sizes)
    assert [layout.size_of(i) for i in range(len(sizes))] == sizes
    assert list(layout.owners()) == [i for i, s in enumerate(sizes) if s]
    assert covered([r for member in layout.ranges for r in member]) == list(range(sum(sizes)))
    for member, size in zip(layout.ranges, sizes):
        assert len(member) == (1 if size else 0)


@st.composite
def spans_and_sizes(draw):
    """Disjoint spans of a vector (failed members' parts) and sizes (summing to their length)."""
    cuts = sorted(draw(st.lists(st.integers(0, 2000), max_size=10, unique=True)))
    spans = [(cuts[i], cuts[i + 1]) for i in range(0, len(cuts) - 1, 2)]
    total = sum(e - s for s, e in spans)
    bandwidths = draw(st.lists(st.one_of(st.just(0.0), st.floats(1, 100)), min_size=1, max_size=8)
                      .filter(lambda bs: any(b > 0 for b in bs)))
    return spans, part_sizes(total, bandwidths)


@settings(max_examples=300, deadline=None)
@given(spans_and_sizes())
def test_layout_over_spans(spans_sizes):
    """Recovery layout: the spans' concatenation is split among members by size, in order, every index
    of every span exactly once, nothing outside the spans."""
    spans, sizes = spans_sizes
    layout = Layout.over(spans, sizes)
    assert [layout.size_of(i) for i in range(len(sizes))] == sizes
    assert covered([r for member in layout.ranges for r in member]) == covered(spans)
    assert all(lo < hi for member in layout.ranges for lo, hi in member)
    assert list(layout.owners()) == [i for i, s in enumerate(sizes) if s]


def test_layout_over_example():
    layout = Layout.over([(10, 20), (50, 55), (70, 80)], [0, 12, 8, 5])
    assert layout.ranges == [[], [(10, 20), (50, 52)], [(52, 55), (70, 75)], [(75, 80)]]


@pytest.mark.parametrize("sizes", [[5, 6], [20], [0, 0, 16], [3, 3], [11, -1]])
def test_layout_over_rejects_sizes_that_do_not_match_the_spans(sizes):
    with pytest.raises(ValueError, match="sizes"):
        Layout.over([(0, 5), (10, 15)], sizes)
