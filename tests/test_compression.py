"""Property tests of every codec in averaging/compression.py.

Each codec's reconstruction error is bounded by what its design promises (the bounds are stated per
test). Messages travel through msgpack exactly as on the wire. Decoding validates the message: a
malformed or wrongly sized message raises CodecError, anything else decodes to a float32 vector of
exactly the expected length. Non-finite inputs are never turned into finite garbage: the receiver
either sees NaN/Inf (and the all-reduce excludes the sender) or gets a CodecError; stateful codecs
(topk, powersgd) do not carry a non-finite value into later rounds through their error feedback.
"""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from averaging import compression
from averaging.compression import FP16_MAX, CodecError

EPS32 = float(np.finfo(np.float32).eps)
LIMIT = 1e30  # magnitudes tested: the span of a chunk (max - min) must stay representable in float32
ALL = sorted(compression.CODECS)
STATELESS = ["none", "float16", "uint8", "blockwise8", "quantile8"]

fast = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def wire(message: dict) -> dict:
    """What the receiver gets: the message through msgpack as dht.peer.multiplex sends it."""
    return msgpack.unpackb(msgpack.packb(message, use_bin_type=True), raw=False, strict_map_key=False)


def roundtrip(codec, x: torch.Tensor, start: int = 0, result: bool = False, decoder=None) -> torch.Tensor:
    decoded = (decoder or codec).decode(wire(codec.encode(x, start, result)), x.numel())
    assert decoded.dtype == torch.float32 and decoded.shape == (x.numel(),)
    return decoded


def chunks(min_size: int = 0, max_size: int = 700, limit: float = LIMIT):
    """1-D float32 chunks of finite values, including heavy-tailed ones and repeated values."""
    limit = float(np.float32(limit))
    tiny = float(np.float32(1e-40))  # a float32 subnormal
    elements = st.one_of(st.floats(-limit, limit, width=32), st.sampled_from([0.0, -0.0, 1.0, -1.0, tiny]))
    return hnp.arrays(np.float32, st.integers(min_size, max_size), elements=elements).map(torch.from_numpy)


# ---------------------------------------------------------------------------------------------
# reconstruction error, codec by codec
# ---------------------------------------------------------------------------------------------

@fast
@given(chunks())
def test_none_is_exact(x):
    assert torch.equal(roundtrip(compression.get("none"), x).view(torch.int32), x.view(torch.int32))


@fast
@given(chunks())
def test_float16_error_is_half_an_ulp_of_half_precision(x):
    """Round to nearest float16: relative error <= 2^-11 in the normal range, absolute <= 2^-25 among
    subnormals (|x| < 2^-14); values beyond ±65504 are clamped to ±65504."""
    decoded = roundtrip(compression.get("float16"), x)
    clamped = x.double().clamp(-FP16_MAX, FP16_MAX)
    error = (decoded.double() - clamped).abs()
    bound = torch.maximum(clamped.abs() * 2.0 ** -11, torch.full_like(clamped, 2.0 ** -25))
    assert (error <= bound).all()
    assert (decoded.abs() <= FP16_MAX).all()


@fast
@given(chunks())
def test_uint8_error_is_half_a_level(x):
    """256 uniform levels between the chunk's min and max: error <= (max - min)/510, plus float32
    rounding of the arithmetic (relative, and absolute where the level size is subnormal: float32
    holds no step finer than 2**-149, so each of the 255 levels may be off by one such step; hypothesis
    found [1.4e-45, 0], whose level size underflows to 0); a constant chunk is exact."""
    decoded = roundtrip(compression.get("uint8"), x)
    if x.numel() == 0:
        return
    lo, hi = float(x.min()), float(x.max())
    bound = (hi - lo) / 510 + 4 * EPS32 * (abs(lo) + abs(hi)) + 255 * 2.0 ** -149
    assert float((decoded.double() - x.double()).abs().max()) <= bound
    if lo == hi:
        assert torch.equal(decoded, x)


@fast
@given(chunks())
def test_blockwise8_error_is_half_a_level_of_each_block(x):
    """int8 levels ±127 scaled by each 256-value block's absmax: error <= absmax/254 within the block
    (plus float32 rounding); an all-zero block is exact."""
    decoded = roundtrip(compression.get("blockwise8"), x)
    for lo in range(0, x.numel(), 256):
        block, out = x[lo:lo + 256].double(), decoded[lo:lo + 256].double()
        absmax = float(block.abs().max())
        assert float((out - block).abs().max()) <= absmax / 254 + 4 * EPS32 * absmax + 1e-37
        if absmax == 0:
            assert (out == 0).all()


@fast
@given(chunks(min_size=1, max_size=2000))
def test_quantile8_sends_each_value_as_the_mean_of_its_bucket(x):
    """256 sorted centroids; the values sent as one index form an interval of the sorted chunk (a
    bucket), and its centroid is the mean of those values (the least-squares reconstruction), so every
    decoded value lies within [min, max] of the chunk."""
    codec = compression.get("quantile8")
    message = wire(codec.encode(x))
    decoded = codec.decode(message, x.numel()).double()
    codebook = torch.frombuffer(bytearray(message["c"]), dtype=torch.float32).double()
    index = torch.frombuffer(bytearray(message["d"]), dtype=torch.uint8).long()
    assert (codebook[1:] >= codebook[:-1]).all()
    xd = x.double()
    assert torch.equal(decoded, codebook[index])
    slack = 4 * EPS32 * float(xd.abs().max())
    assert float(decoded.min()) >= float(xd.min()) - slack and float(decoded.max()) <= float(xd.max()) + slack
    used = index.unique()
    for i in used.tolist():
        members = xd[index == i]
        assert abs(float(codebook[i]) - float(members.mean())) <= slack + 1e-37
    highs = torch.stack([xd[index == i].max() for i in used.tolist()])
    lows = torch.stack([xd[index == i].min() for i in used.tolist()])
    assert (highs[:-1] <= lows[1:]).all()  # buckets are intervals, in index order


@pytest.mark.parametrize("n", [1000, 300_000])
def test_quantile8_error_on_a_gaussian_chunk(n):
    """Statistical bound for a N(0, 1) chunk (codebook fitted on a sample above 65536 values): the bulk
    is fine (median error < 0.005) and the Lloyd steps widen the inner buckets toward the tails, so the
    RMS error is about 0.02 (< 0.03; equal-mass buckets gave 0.035)."""
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    codec = compression.get("quantile8")
    error = (roundtrip(codec, x) - x).abs()
    assert float(error.median()) < 0.005
    assert float(error.pow(2).mean().sqrt()) < 0.03


@fast
@given(chunks(min_size=1, max_size=600, limit=1e4), st.sampled_from([0.001, 0.01, 0.1, 0.5, 1.0]))
def test_topk_sends_the_k_largest_in_half_precision(x, fraction):
    """First round (empty residual): exactly k = max(1, floor(n·fraction)) distinct positions, holding
    values at least as large in magnitude as every position not sent, each rounded to float16; zeros
    elsewhere."""
    codec = compression.get("topk", fraction=fraction)
    message = wire(codec.encode(x))
    decoded = codec.decode(message, x.numel())
    index = torch.frombuffer(bytearray(message["i"]), dtype=torch.int32).long()
    k = max(1, int(x.numel() * fraction))
    assert index.numel() == k and index.unique().numel() == k
    sent = torch.zeros(x.numel(), dtype=torch.bool)
    sent[index] = True
    if (~sent).any():
        assert float(x[sent].abs().min()) >= float(x[~sent].abs().max())
    assert torch.equal(decoded[sent], x[sent].half().float())
    assert (decoded[~sent] == 0).all()
    assert len(message["h"]) + len(message["i"]) == 6 * k  # 6 bytes per sent value


def low_rank(rows: int, cols: int, rank: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, rank, generator=g) @ torch.randn(rank, cols, generator=g)).reshape(-1)


@fast
@given(st.integers(64, 1600), st.integers(1, 4), st.integers(0, 2 ** 31 - 1))
def test_powersgd_reconstructs_a_matrix_of_rank_at_most_r(n, true_rank, seed):
    """A chunk viewed as a rows x cols matrix of rank <= r is reproduced by one power iteration
    (P spans its column space): relative error within float32 accuracy."""
    codec = compression.get("powersgd", rank=4)
    rows, cols = codec._shape(n)
    assume(4 * (rows + cols) < n)  # otherwise the chunk travels exactly
    x = low_rank(rows, cols, true_rank, seed)
    message = wire(codec.encode(x))
    assert "p" in message
    decoded = codec.decode(message, n)
    assert float((decoded - x).norm()) <= 1e-3 * float(x.norm())


@fast
@given(chunks(min_size=1, max_size=3000, limit=1e6), st.integers(1, 6))
def test_powersgd_error_never_exceeds_the_input(x, rank):
    """PᵀP = I makes the approximation P Pᵀ M an orthogonal projection: ‖M − PPᵀM‖ <= ‖M‖ and
    ‖PPᵀM‖ <= ‖M‖ (Frobenius); chunks too small to gain anything travel exactly."""
    codec = compression.get("powersgd", rank=rank)
    message = wire(codec.encode(x))
    decoded = codec.decode(message, x.numel()).double()
    xd = x.double()
    norm = float(xd.norm())
    slack = 1e-4 * norm + 1e-30
    if "d" in message:
        assert torch.equal(decoded, xd)
        assert len(message["d"]) == 4 * x.numel()
    else:
        rows, cols = codec._shape(x.numel())
        assert len(message["p"]) + len(message["q"]) == 4 * message["r"] * (rows + cols) < 4 * x.numel()
        assert float((decoded - xd).norm()) <= norm + slack
        assert float(decoded.norm()) <= norm + slack


# ---------------------------------------------------------------------------------------------
# properties shared by all codecs
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("n", [0, 1, 2, 255, 256, 257, 1021, 4096])
def test_sizes_and_dtype_preserved(name, n):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    codec = compression.get(name)
    for result in (False, True):
        decoded = roundtrip(codec, x, result=result)
        assert decoded.dtype == torch.float32 and decoded.shape == (n,) and decoded.is_contiguous()
        assert torch.isfinite(decoded).all()


@pytest.mark.parametrize("name", ALL)
def test_get_returns_fresh_instances_and_rejects_unknown_names(name):
    assert compression.get(name).name == name
    codec = compression.get(name)
    assert compression.get(codec) is codec
    assert compression.get(name) is not compression.get(name)
    assert compression.get(None).name == "none"
    with pytest.raises(ValueError, match="unknown compression"):
        compression.get("zip")
    with pytest.raises(ValueError):
        compression.get("topk", fraction=0)
    with pytest.raises(ValueError):
        compression.get("powersgd", rank=0)


@pytest.mark.parametrize("name", ALL)
@settings(max_examples=30, deadline=None)
@given(x=chunks(max_size=1500, limit=1e4))
def test_results_decode_bit_identically_at_every_member(name, x):
    """An owner encodes an averaged chunk once (result=True) and every member decodes that message:
    fresh codec instances (other members) and repeated decoding give the same bits, the encoding is
    deterministic, and it leaves the codec's error-feedback state alone."""
    owner = compression.get(name)
    if name in ("topk", "powersgd"):
        owner.encode(torch.randn(x.numel()), 0)  # a residual exists: result encoding must not touch it
    residual = None if getattr(owner, "_residual", None) is None else owner._residual.clone()
    message = wire(owner.encode(x, 0, result=True))
    decoded = owner.decode(message, x.numel())
    for member in (compression.get(name), compression.get(name)):
        assert torch.equal(member.decode(message, x.numel()).view(torch.int32), decoded.view(torch.int32))
    if name != "quantile8" or x.numel() <= compression.Quantile8.sample:
        again = wire(owner.encode(x, 0, result=True))
        assert torch.equal(owner.decode(again, x.numel()).view(torch.int32), decoded.view(torch.int32))
    if residual is not None:
        assert torch.equal(owner._residual, residual)
    if name == "topk":  # results travel exactly (sparse pairs or dense float32)
        assert torch.equal(decoded, x)
    if name == "powersgd":  # results travel as float16
        assert torch.equal(decoded, compression.get("float16").decode(compression.get("float16").encode(x), x.numel()))


# ---------------------------------------------------------------------------------------------
# error feedback
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,params", [("topk", {"fraction": 1 / 64}), ("topk", {"fraction": 0.1}),
                                         ("powersgd", {"rank": 1}), ("powersgd", {"rank": 2})])
def test_error_feedback_sends_everything_eventually(name, params):
    """What is not sent is kept and added to the next round: sum(decoded over rounds) + residual equals
    sum(inputs) (float32 accuracy), so for a constant input the running mean of what was sent converges
    to it (the gap stays bounded while the number of rounds grows)."""
    g = torch.Generator().manual_seed(1)
    n, start = 1024, 4096  # a chunk at an offset of the flat vector
    x = torch.randn(n, generator=g)
    codec = compression.get(name, **params)
    total_sent = torch.zeros(n, dtype=torch.float64)
    gaps = {}
    for t in range(1, 1601):
        total_sent += roundtrip(codec, x, start).double()
        if t in (400, 1600):
            gaps[t] = float((total_sent - t * x.double()).abs().max())
            residual = codec._residual[start:start + n].double()
            assert torch.allclose(total_sent + residual, t * x.double(), rtol=0, atol=1e-4 * t)
    scale = float(x.abs().max())
    assert gaps[1600] <= 1.5 * gaps[400] + 1e-3  # bounded, not growing with the rounds
    assert gaps[1600] / 1600 < 0.02 * scale  # the mean of what was sent is within 2 % of the input


def test_error_feedback_is_kept_per_flat_position():
    """Chunks at different offsets have separate residuals; a chunk seen again at the same offset gets
    its own residual back."""
    codec = compression.get("topk", fraction=0.01)
    a, b = torch.ones(200), -torch.ones(200)
    first_a = codec.decode(codec.encode(a, 0), 200)
    codec.decode(codec.encode(b, 200), 200)
    assert float(codec._residual[:200].sum()) == pytest.approx(200 - float(first_a.sum()))
    assert float(codec._residual[200:].sum()) == pytest.approx(-198)
    second_a = codec.decode(codec.encode(torch.zeros(200), 0), 200)
    assert (second_a >= 0).all() and second_a.sum() > 0  # what was owed to offset 0, not offset 200


# ---------------------------------------------------------------------------------------------
# NaN / Inf
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("n", [1000, 100_000])  # 100 000: above quantile8's sample size
def test_non_finite_input_never_decodes_to_finite_garbage(name, bad, n):
    """The all-reduce excludes a member whose decoded values are not finite, and one whose message
    fails to decode; so a non-finite input must lead to one of the two, never to finite values.
    Stateful codecs then recover: the next finite round decodes to finite values."""
    codec = compression.get(name)
    for position in (7, n - 1):
        x = torch.randn(n, generator=torch.Generator().manual_seed(position))
        x[position] = bad
        try:
            decoded = codec.decode(wire(codec.encode(x, 0)), n)
        except CodecError:
            pass
        else:
            assert not torch.isfinite(decoded).all(), f"{name} turned {bad} into finite values"
        clean = torch.randn(n)
        assert torch.isfinite(roundtrip(codec, clean)).all()


# ---------------------------------------------------------------------------------------------
# validation of what is decoded
# ---------------------------------------------------------------------------------------------

wire_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2 ** 63, 2 ** 64 - 1), st.floats(), st.text(max_size=5),
              st.binary(max_size=80)),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=2), inner, max_size=3),
    max_leaves=8)
field_names = st.sampled_from(["d", "r", "s", "c", "i", "h", "v", "p", "q"])


@pytest.mark.parametrize("name", ALL)
@settings(max_examples=150, deadline=None)
@given(message=st.one_of(wire_values, st.dictionaries(field_names, wire_values, max_size=4)),
       length=st.integers(0, 40))
def test_garbage_messages_raise_codec_error_or_decode_to_the_right_size(name, message, length):
    codec = compression.get(name)
    try:
        decoded = codec.decode(wire(message), length)
    except CodecError:
        return
    assert decoded.dtype == torch.float32 and decoded.shape == (length,)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("n", [1, 300, 1024])
def test_wrongly_sized_messages_raise_codec_error(name, n):
    """A valid message for n values, decoded as n ± 1 values, or with any field grown or truncated by
    a byte or doubled, raises CodecError (never a wrongly sized result)."""
    codec = compression.get(name)
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 1000
    message = wire(codec.encode(x, 0))
    for length in (n - 1, n + 1, 2 * n):
        if name in STATELESS:  # fixed size per value: a different length cannot match
            with pytest.raises(CodecError):
                codec.decode(message, length)
        else:  # sparse pairs / factors do not fix the length: they must still decode to `length` values
            try:
                assert codec.decode(message, length).shape == (length,)
            except CodecError:
                pass
    for key, value in message.items():
        if not isinstance(value, bytes):
            continue
        for broken in (value[:-1], value + b"\0", value + value, b""):
            if broken == value:
                continue
            with pytest.raises(CodecError):
                codec.decode({**message, key: broken}, n)
    with pytest.raises(CodecError):
        codec.decode([message], n)
    with pytest.raises(CodecError):
        codec.decode({}, n)


def test_field_specific_validation():
    with pytest.raises(CodecError, match="finite"):
        compression.get("uint8").decode({"d": b"\0" * 4, "r": [0.0, math.inf]}, 4)
    with pytest.raises(CodecError, match="finite"):
        compression.get("uint8").decode({"d": b"\0" * 4, "r": [math.nan, 1.0]}, 4)
    with pytest.raises(CodecError, match="scale"):
        compression.get("blockwise8").decode({"d": b"\0" * 4, "s": np.float32([np.inf]).tobytes()}, 4)
    with pytest.raises(CodecError, match="codebook"):
        bad = np.zeros(256, np.float32)
        bad[3] = np.nan
        compression.get("quantile8").decode({"d": b"\0" * 4, "c": bad.tobytes()}, 4)
    topk = compression.get("topk")
    with pytest.raises(CodecError, match="range"):
        topk.decode({"i": np.int32([4]).tobytes(), "h": np.float16([1]).tobytes()}, 4)
    with pytest.raises(CodecError, match="range"):
        topk.decode({"i": np.int32([-1]).tobytes(), "h": np.float16([1]).tobytes()}, 4)
    with pytest.raises(CodecError):
        topk.decode({"i": np.int32([0, 1, 2, 3, 0]).tobytes(), "h": np.float16([1] * 5).tobytes()}, 4)
    powersgd = compression.get("powersgd", rank=2)
    rows, cols = powersgd._shape(400)
    good = {"p": np.zeros(rows * 2, np.float32).tobytes(), "q": np.zeros(cols * 2, np.float32).tobytes(), "r": 2}
    assert torch.equal(powersgd.decode(good, 400), torch.zeros(400))
    for rank in (0, -1, 21, 2.0, "2", None):
        with pytest.raises(CodecError, match="rank"):
            powersgd.decode({**good, "r": rank}, 400)
    with pytest.raises(CodecError, match="finite"):
        powersgd.decode({**good, "p": np.full(rows * 2, np.inf, np.float32).tobytes()}, 400)


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.one_of(st.floats(width=32), st.sampled_from([3e38, -3e38, float("inf"), float("nan")])),
                       min_size=0, max_size=64))
def test_all_finite_matches_elementwise_check(values):
    """The all-reduce's fast finiteness check (a sum first) agrees with isfinite().all(), overflow included."""
    from averaging.allreduce import all_finite

    x = torch.tensor(values, dtype=torch.float32)
    assert all_finite(x) == bool(torch.isfinite(x).all())


def test_weighted_mean_matches_float64_reference():
    from averaging.allreduce import weighted_mean

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(7, 1001, generator=g), torch.rand(7, generator=g) + 0.1
    expected = (w.double()[:, None] * x.double()).sum(0) / w.double().sum()
    assert torch.allclose(weighted_mean(x, w).double(), expected, rtol=1e-5, atol=1e-6)
