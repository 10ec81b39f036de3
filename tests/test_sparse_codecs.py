"""Property tests of the low-bandwidth codecs (averaging/sparse_codecs.py) and error feedback.

(The properties every codec shares, sizes, garbage and wrongly sized messages, NaN/Inf, are in
tests/test_compression.py, which runs them on these codecs too.) Here: what each codec keeps is
reconstructed as promised (sparseloco: the top-k positions of each tile with their signs, two
magnitude levels per tile that keep the tile's sum of |values|; demo: the DCT is orthonormal and
what is sent is the top-k coefficients in bfloat16; uniform4: half a level), error feedback
conserves what it drops (residual + decoded == input + previous residual), the DeMo chunk rule
and tiling (algorithms.md 7.3, D5-D7), bytes per value, and crafted bad messages rejected.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from averaging import compression, sparse_codecs
from averaging.compression import CodecError
from averaging.error_feedback import ErrorFeedback
from averaging.sparse_codecs import DCTTopK, SparseLoCo, Uniform4, chunk_length, dct_matrix

fast = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def wire(message: dict) -> dict:
    return msgpack.unpackb(msgpack.packb(message, use_bin_type=True), raw=False, strict_map_key=False)


def vectors(min_size: int = 1, max_size: int = 3000, limit: float = 1e6):
    limit = float(np.float32(limit))
    elements = st.one_of(st.floats(-limit, limit, width=32), st.sampled_from([0.0, 1.0, -1.0]))
    return hnp.arrays(np.float32, st.integers(min_size, max_size), elements=elements).map(torch.from_numpy)


def crafted(length: int, indices: list[int], codes: list[int] | None = None,
            scales: tuple[float, float] = (1.0, 2.0)) -> dict:
    """A one-tile sparseloco message for ``length`` values naming ``indices`` as given (not checked:
    bad ones on purpose), Elias-Fano coded as the codec does."""
    k = len(indices)
    width = sparse_codecs._low_width(length, k)
    idx = np.array(indices, np.int64)
    bitmap = np.zeros(sparse_codecs._upper_width(length, k), np.uint8)
    bitmap[(idx >> width) + np.arange(k)] = 1
    codes = codes if codes is not None else [1] * k
    return {"g": [[1, length, 1, length, k]], "e": sparse_codecs._pack(bitmap),
            "l": sparse_codecs._pack(sparse_codecs._bits_of(idx & ((1 << width) - 1), width)),
            "c": sparse_codecs._pack(sparse_codecs._bits_of(np.array(codes), 2)),
            "s": np.float32(scales).tobytes()}


# ---------------------------------------------------------------------------------------------
# sparseloco
# ---------------------------------------------------------------------------------------------

@fast
@given(x=vectors(), topk=st.integers(1, 40), chunk=st.sampled_from([16, 64, 100, 4096]))
def test_sparseloco_keeps_the_topk_of_each_tile_with_signs_and_two_levels(x, topk, chunk):
    codec = SparseLoCo(topk=topk, chunk=chunk)
    message, decoded = codec.compress(x)
    assert torch.equal(codec.decode(wire(message), x.numel()), decoded)
    offset = 0
    for rows, cols, _, c, k in codec.plan(0, x.numel()):
        for lo in range(offset, offset + rows * cols, c):
            tile, sent = x[lo:lo + c], decoded[lo:lo + c]
            kept = torch.nonzero(sent, as_tuple=True)[0]
            assert kept.numel() <= k
            if kept.numel():
                others = torch.ones(c, dtype=torch.bool)
                others[kept] = False
                if others.any():  # every kept |value| is at least every dropped one
                    assert float(tile[kept].abs().min()) >= float(tile[others].abs().max())
                nonzero = kept[tile[kept] != 0]  # a kept 0 (fewer than k non-zeros) is sent as +level
                assert torch.equal(torch.sign(sent[nonzero]), torch.sign(tile[nonzero]))
                assert len(set(sent[kept].abs().tolist())) <= 2
            # the k kept magnitudes (zeros included) sum to what the levels give back
            top = tile.abs().double().topk(k).values
            assert math.isclose(float(sent.abs().double().sum()), float(top.sum()), rel_tol=1e-5, abs_tol=1e-30)
        offset += rows * cols


def test_sparseloco_levels_are_the_means_of_the_two_halves():
    x = torch.zeros(64)
    x[[3, 9, 20, 41]] = torch.tensor([1.0, -2.0, 5.0, -7.0])
    decoded = SparseLoCo(topk=4, chunk=64).compress(x)[1]
    assert decoded[[3, 9, 20, 41]].tolist() == [1.5, -1.5, 6.0, -6.0]
    assert int((decoded != 0).sum()) == 4


def test_sparseloco_bytes_per_value_on_charlm():
    """The charlm model (examples/charlm.py): a contribution is >= 230x smaller than float32."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import charlm

    model = charlm.ByteLM()
    x = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    codec = SparseLoCo()
    size = 0
    for lo, hi in codec.chunk_ranges(x.numel(), 1 << 18):
        size += len(msgpack.packb(codec.encode(x[lo:hi], lo), use_bin_type=True))
    assert 4 * x.numel() / size >= 230, size
    # per tile of 4096: Elias-Fano (48 + 64 upper bits, 6 low bits each), 2-bit values, two float32 levels
    assert codec.bytes_per_value(4096 * 64) == pytest.approx((48 + 64 + 48 * 6 + 48 * 2 + 64) / 8 / 4096)


# ---------------------------------------------------------------------------------------------
# demo (DCT top-k)
# ---------------------------------------------------------------------------------------------

def test_chunk_length_rule():
    for n, expected in [(4096, 64), (768, 64), (1000, 50), (100, 50), (50257, 29), (17, 17), (64, 64), (1, 1)]:
        assert chunk_length(n) == expected


@pytest.mark.parametrize("n", [64, 50, 29, 1])
def test_dct_is_orthonormal(n):
    d = dct_matrix(n)
    x = torch.randn(n, 7)
    assert torch.allclose(d.T @ (d @ x), x, atol=1e-5)
    assert torch.allclose(d @ d.T, torch.eye(n), atol=1e-6)


@fast
@given(x=vectors(max_size=2000, limit=1e4), topk=st.integers(1, 64))
def test_demo_error_is_what_it_did_not_send(x, topk):
    """Parseval: |x - decoded| is at most the norm of the coefficients not sent plus the bfloat16
    rounding of those sent (2**-8 relative), tile by tile."""
    codec = DCTTopK(topk=topk)
    message, decoded = codec.compress(x)
    assert torch.equal(codec.decode(wire(message), x.numel()), decoded)
    (rows, cols, r, c, k), = codec.plan(0, x.numel())
    coefficients = (dct_matrix(c) @ x.double().view(-1, c).T.float()).T.double()  # [tiles, c]
    top = coefficients.abs().topk(k, dim=1).values
    dropped = (coefficients.pow(2).sum(1) - top.pow(2).sum(1)).clamp_min(0).sqrt()
    error = (x.double() - decoded.double()).view(-1, c).norm(dim=1)
    bound = dropped + 2 ** -8 * top.norm(dim=1) + 1e-5 * coefficients.norm(dim=1) + 1e-30
    assert bool((error <= bound).all()), float((error - bound).max())


def test_demo_sends_a_single_basis_function_exactly():
    """D6: a tile holding one DCT basis function is sent exactly: residual ~0."""
    codec = DCTTopK(topk=4)
    codec.bind([(64, 128)])
    basis = torch.outer(dct_matrix(64)[5], dct_matrix(64)[17])  # coefficient (5, 17) = 1.0
    x = torch.zeros(64, 128)
    x[:, 64:] = basis * 3.0
    decoded = codec.decode(wire(codec.encode(x.reshape(-1), 0)), x.numel())
    assert torch.allclose(decoded, x.reshape(-1), atol=1e-6)
    assert float(codec.feedback.residual.abs().max()) < 1e-6


def test_demo_tiles_2d_tensors_by_the_rule_and_bytes():
    """D7-like: a [256, 128] weight in 64 x 64 tiles (top-32 of 4096 each), a bias in 1-D tiles of 64;
    chunks cover whole bands of 64 rows."""
    codec = DCTTopK()
    codec.bind([(256, 128), (100,), (1000, 30)])
    assert codec.plan(0, 256 * 128) == [(256, 128, 64, 64, 32)]
    assert codec.plan(256 * 128, 100) == [(1, 100, 1, 50, 32)]
    assert codec.plan(256 * 128 + 100, 30_000) == [(1000, 30, 50, 30, 32)]
    assert codec.plan(64, 128) == [(1, 128, 1, 64, 32)]  # not a whole band: 1-D tiles
    ranges = codec.chunk_ranges(256 * 128 + 100 + 30_000, 64 * 128 + 100)
    assert ranges[0] == (0, 64 * 128) and ranges[3] == (3 * 64 * 128, 4 * 64 * 128 + 100)
    assert all(hi - lo <= 64 * 128 + 100 for lo, hi in ranges)
    per_value = codec.bytes_per_value(256 * 128)
    assert per_value == pytest.approx((64 + 32 * 7 + 32 * 16) / 8 / 4096)  # 0.0244: 164x less than float32
    x = torch.randn(256 * 128 + 100 + 30_000)
    out = torch.empty_like(x)
    for lo, hi in ranges:
        out[lo:hi] = DCTTopK().decode(wire(codec.encode(x[lo:hi], lo)), hi - lo)  # a receiver needs no shapes
    assert torch.isfinite(out).all() and float((out - x).norm() / x.norm()) < 1


# ---------------------------------------------------------------------------------------------
# uniform4
# ---------------------------------------------------------------------------------------------

@fast
@given(x=vectors(min_size=0, limit=1e30))
def test_uniform4_error_is_half_a_level(x):
    codec = Uniform4()
    decoded = codec.decode(wire(codec.encode(x)), x.numel())
    n = x.numel()
    blocks = torch.nn.functional.pad(x, (0, (-n) % 64)).view(-1, 64)
    level = (blocks.abs().amax(dim=1).double() / 7).repeat_interleave(64)[:n]
    assert bool(((decoded.double() - x.double()).abs() <= level / 2 * (1 + 1e-6) + 1e-38).all())
    assert len(codec.encode(x)["d"]) == (n + 1) // 2


def test_uniform4_rejects_bad_codes():
    codec = Uniform4()
    message = wire(codec.encode(torch.randn(5)))
    with pytest.raises(CodecError, match="4-bit"):
        codec.decode({**message, "d": b"\x00" + message["d"][1:]}, 5)
    with pytest.raises(CodecError, match="padding"):
        codec.decode({**message, "d": message["d"][:-1] + bytes([message["d"][-1] | 0xF0])}, 5)
    with pytest.raises(CodecError, match="scale"):
        codec.decode({**message, "s": np.float32([np.nan]).tobytes()}, 5)


# ---------------------------------------------------------------------------------------------
# error feedback
# ---------------------------------------------------------------------------------------------

EF_CODECS = [("sparseloco", {"topk": 4, "chunk": 256}), ("demo", {"topk": 4}), ("uniform4", {"error_feedback": True})]


@pytest.mark.parametrize("name,params", EF_CODECS)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(inputs=st.lists(vectors(min_size=700, max_size=700, limit=1e3), min_size=1, max_size=4),
       start=st.sampled_from([0, 300]))
def test_error_feedback_conserves_what_it_drops(name, params, inputs, start):
    """residual + decoded == input + previous residual, round after round (float32 rounding)."""
    codec = compression.get(name, **params)
    for x in inputs:
        before = codec.feedback.residual[start:start + x.numel()].clone() if codec.feedback.residual.numel() else 0
        decoded = codec.decode(wire(codec.encode(x, start)), x.numel())
        after = codec.feedback.residual[start:start + x.numel()]
        scale = float((x.abs() + (before.abs() if isinstance(before, torch.Tensor) else 0)).max()) + 1e-30
        assert torch.allclose((after + decoded).double(), (x + before).double(), rtol=0, atol=4e-6 * scale)


def test_error_feedback_sends_everything_eventually():
    """A constant input: the running mean of what sparseloco sent converges to it."""
    x = torch.randn(4096, generator=torch.Generator().manual_seed(3))
    codec = SparseLoCo(topk=64)
    total = torch.zeros(4096, dtype=torch.float64)
    for _ in range(600):
        total += codec.decode(codec.encode(x), 4096).double()
    assert float((total / 600 - x.double()).abs().max()) < 0.05 * float(x.abs().max())


def test_error_feedback_state_dict_and_decay():
    codec = SparseLoCo(topk=2, chunk=64, decay=0.5)
    codec.encode(torch.arange(64.0))
    state = codec.state_dict()
    assert state["variant"] == "ef" and state["decay"] == 0.5 and state["residual"].shape == (64,)
    other = SparseLoCo(topk=2, chunk=64)
    other.load_state_dict(state)
    assert torch.equal(other.feedback.residual, codec.feedback.residual) and other.feedback.decay == 0.5
    x = torch.ones(64)
    assert torch.equal(other.feedback.corrected(x), x + 0.5 * codec.feedback.residual)
    for bad in ({"variant": "ef21"}, {**state, "residual": torch.full((3,), math.nan)}, {**state, "decay": 2.0},
                {**state, "residual": [1.0]}, None):
        with pytest.raises(ValueError):
            other.load_state_dict(bad)
    assert torch.equal(other.feedback.residual, codec.feedback.residual)  # nothing changed
    with pytest.raises(ValueError):
        ErrorFeedback(decay=0)


def test_non_finite_values_are_not_carried_on():
    codec = SparseLoCo(topk=2, chunk=64)
    x = torch.randn(64)
    x[5] = math.nan
    with pytest.raises(CodecError, match="scale"):
        codec.decode(wire(codec.encode(x)), 64)
    assert torch.isfinite(codec.feedback.residual).all()
    assert torch.isfinite(codec.decode(wire(codec.encode(torch.randn(64))), 64)).all()


# ---------------------------------------------------------------------------------------------
# bad messages
# ---------------------------------------------------------------------------------------------

def test_crafted_messages_are_what_the_codec_makes():
    x = torch.zeros(1808)
    x[[3, 500, 1807]] = torch.tensor([-1.0, 2.0, 2.0])
    message = SparseLoCo(topk=3, chunk=1808).compress(x)[0]
    assert message == crafted(1808, [3, 500, 1807], codes=[2, 1, 1], scales=(1.0, 2.0))
    assert SparseLoCo().decode(crafted(1808, [3, 500, 1807], codes=[2, 1, 1]), 1808)[[3, 500, 1807]].tolist() == \
        [-1.0, 2.0, 2.0]


@pytest.mark.parametrize("indices,error", [([3, 3, 9], "duplicated"), ([9, 3, 20], "duplicated"),
                                           ([3, 9, 1900], "out of range")])
def test_bad_indices_are_rejected(indices, error):
    with pytest.raises(CodecError, match=error):
        SparseLoCo().decode(crafted(1808, indices), 1808)


def test_bad_tilings_and_scales_are_rejected():
    codec, good = SparseLoCo(), crafted(1808, [3, 9, 20])
    for tiling, match in [([[1, 1808, 1, 1808, 0]], "tiling"), ([[1, 1808, 1, 1807, 3]], "tiling"),
                          ([[1, 1807, 1, 1807, 3]], "cover"), ([[1, 1808, 1, 1808, 3]] * 2, "cover"),
                          ([[1, 1808, 1, 1808, True]], "ints"), ("x", "tilings"),
                          ([[1, 1808, 1, 1808, 1809]], "tiling"), ([[1, 1808, 1, 2 ** 17, 3]], "tiling")]:
        with pytest.raises(CodecError, match=match):
            codec.decode({**good, "g": tiling}, 1808)
    for scales in [(math.inf, 1.0), (1.0, math.nan), (-1.0, 1.0)]:
        with pytest.raises(CodecError, match="scale"):
            codec.decode(crafted(1808, [3, 9, 20], scales=scales), 1808)
    with pytest.raises(CodecError, match="padding"):
        codec.decode({**good, "c": bytes([good["c"][0] | 0xC0]) + good["c"][1:]}, 1808)
    with pytest.raises(CodecError, match="exactly k"):
        bad = bytearray(good["e"])
        bad[0] ^= 1 << 6  # a 4th index bit in the 7-bit upper bitmap
        codec.decode({**good, "e": bytes(bad)}, 1808)
    big = DCTTopK()
    with pytest.raises(CodecError, match="tiling"):  # a DCT of more than MAX_DCT values per dimension
        big.decode({"g": [[1, 4096, 1, 4096, 1]], "e": b"", "l": b"", "v": b""}, 4096)
