"""Tensors on the wire: the one-message codec, its validation, and chunked streaming over real sockets."""

import asyncio
import math
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dht import P2P, MessageTooLargeError, ProtocolError, RemoteError
from averaging.tensor_wire import DTYPES, MAX_DIMS, recv_tensor, send_tensor, tensor_from_wire, tensor_to_wire


def _bytes_of(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_bit_exact(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype
    assert tuple(a.shape) == tuple(b.shape)
    assert _bytes_of(a) == _bytes_of(b)


def _tensor_from_bytes(dtype: torch.dtype, shape: list[int], data: bytes) -> torch.Tensor:
    if math.prod(shape) == 0:
        return torch.empty(shape, dtype=dtype)
    flat = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype)
    return flat.reshape(shape)


@st.composite
def tensors(draw):
    name = draw(st.sampled_from(sorted(DTYPES)))
    dtype = DTYPES[name]
    ndim = draw(st.integers(0, 4))
    shape = draw(st.lists(st.integers(0, 5), min_size=ndim, max_size=ndim))
    numel = math.prod(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if dtype == torch.bool:
        data = bytes(draw(st.lists(st.integers(0, 1), min_size=numel, max_size=numel)))
    else:
        # arbitrary bit patterns: NaNs with payloads, infinities, subnormals, negative zero
        data = draw(st.binary(min_size=numel * itemsize, max_size=numel * itemsize))
    return _tensor_from_bytes(dtype, shape, data)


@settings(max_examples=400, deadline=None)
@given(tensors())
def test_roundtrip_bit_exact(tensor):
    message = tensor_to_wire(tensor)
    assert set(message) == {"dtype", "shape", "data"}
    assert DTYPES[message["dtype"]] == tensor.dtype
    assert message["shape"] == list(tensor.shape)
    assert isinstance(message["data"], bytes) and len(message["data"]) == tensor.numel() * tensor.element_size()
    out = tensor_from_wire(message)
    assert_bit_exact(out, tensor)
    assert out.is_contiguous()
    # the result owns its memory: changing it does not touch the input
    if out.numel():
        out.reshape(-1).view(torch.uint8)[0] ^= 1
        assert _bytes_of(out) != _bytes_of(tensor)


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_every_dtype_scalar_and_empty(name):
    dtype = DTYPES[name]
    scalar = torch.ones((), dtype=dtype)
    assert_bit_exact(tensor_from_wire(tensor_to_wire(scalar)), scalar)
    for shape in [(0,), (3, 0), (0, 2, 0), (1, 1, 1, 0)]:
        empty = torch.empty(shape, dtype=dtype)
        message = tensor_to_wire(empty)
        assert message["data"] == b""
        assert_bit_exact(tensor_from_wire(message), empty)


@pytest.mark.parametrize("name", ["float16", "bfloat16", "float32", "float64"])
def test_nan_payloads_survive(name):
    dtype = DTYPES[name]
    itemsize = torch.empty((), dtype=dtype).element_size()
    patterns = {
        2: [0x7E01, 0xFE55, 0x7C01, 0x7FFF, 0x7F81, 0xFFC1, 0x8000, 0x0001],
        4: [0x7FC00001, 0xFFBFFFFF, 0x7F800001, 0x80000000, 0x00000001],
        8: [0x7FF8000000000001, 0xFFF0000000000001, 0x7FF7FFFFFFFFFFFF, 0x8000000000000000],
    }[itemsize]
    fmt = {2: "<H", 4: "<I", 8: "<Q"}[itemsize]
    data = b"".join(struct.pack(fmt, p) for p in patterns)
    tensor = _tensor_from_bytes(dtype, [len(patterns)], data)
    assert tensor.isnan().any()
    out = tensor_from_wire(tensor_to_wire(tensor))
    assert _bytes_of(out) == data


def test_non_contiguous_inputs():
    base = torch.arange(4 * 6 * 5, dtype=torch.float32).reshape(4, 6, 5)
    cases = [
        base.transpose(0, 2),
        base[:, ::2, 1:4],
        base[..., 3],
        base.permute(2, 0, 1)[1:],
        torch.arange(10, dtype=torch.int16)[::3],
        torch.tensor([1.5, -2.0], dtype=torch.bfloat16).expand(3, 2),  # stride 0
        torch.ones(2, 3, dtype=torch.bool).t(),
        torch.randn(3, 4, requires_grad=True)[:, 1:],
    ]
    for tensor in cases:
        assert not tensor.is_contiguous()
        out = tensor_from_wire(tensor_to_wire(tensor))
        assert out.is_contiguous()
        assert out.dtype == tensor.dtype and out.shape == tensor.shape
        assert torch.equal(out, tensor.detach())


def _message(**overrides):
    message = {"dtype": "float32", "shape": [2, 3], "data": b"\0" * 24}
    message.update(overrides)
    return message


@pytest.mark.parametrize("dtype", ["object", "float128", "complex64", "Float32", "", None, 5, 1.5, b"float32", True])
def test_refuses_unknown_dtype(dtype):
    with pytest.raises(ProtocolError, match="unsupported tensor dtype"):
        tensor_from_wire(_message(dtype=dtype))


@pytest.mark.parametrize("dtype", [["float32"], {"x": 1}])
def test_refuses_unhashable_dtype(dtype):
    with pytest.raises(ProtocolError):
        tensor_from_wire(_message(dtype=dtype))


@pytest.mark.parametrize("shape", [
    [-1, 3], [2, -3], [1.5], [2.0, 3], ["2", 3], [None], [[2], 3], [True], [2, False], [2 ** 48],
    [1] * (MAX_DIMS + 1), (2, 3), "2,3", None, 6, {"0": 2},
])
def test_refuses_bad_shape(shape):
    with pytest.raises(ProtocolError, match="bad tensor shape"):
        tensor_from_wire(_message(shape=shape, data=b""))


def test_accepts_max_dims():
    tensor = torch.ones([1] * MAX_DIMS, dtype=torch.int8)
    assert_bit_exact(tensor_from_wire(tensor_to_wire(tensor)), tensor)


@pytest.mark.parametrize("data", [b"\0" * 23, b"\0" * 25, b"", bytearray(b"\0" * 20)])
def test_refuses_data_length_mismatch(data):
    with pytest.raises(ProtocolError, match=rf"tensor data has {len(data)} bytes, expected 24"):
        tensor_from_wire(_message(data=data))


@pytest.mark.parametrize("data", [None, "x" * 24, [0] * 24, 24])
def test_refuses_missing_or_non_bytes_data(data):
    message = _message()
    if data is None:
        del message["data"]
    else:
        message["data"] = data
    with pytest.raises(ProtocolError, match="tensor data has no bytes"):
        tensor_from_wire(message)


@pytest.mark.parametrize("message", [None, [], "float32", b"", 5])
def test_refuses_non_map(message):
    with pytest.raises(ProtocolError, match="must be a map"):
        tensor_from_wire(message)


def test_max_bytes():
    tensor = torch.zeros(10, dtype=torch.float64)  # 80 bytes
    message = tensor_to_wire(tensor)
    assert_bit_exact(tensor_from_wire(message, max_bytes=80), tensor)
    with pytest.raises(MessageTooLargeError, match="80 bytes exceeds the limit of 79"):
        tensor_from_wire(message, max_bytes=79)
    # the size check uses the header alone: a huge declared shape is refused before looking at the data
    with pytest.raises(MessageTooLargeError):
        tensor_from_wire({"dtype": "float32", "shape": [1 << 40], "data": b""}, max_bytes=1 << 30)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128, torch.uint16, torch.float8_e4m3fn])
def test_unsupported_torch_dtype_on_send(dtype):
    tensor = torch.zeros(2, dtype=dtype)
    with pytest.raises(TypeError, match="cannot be sent"):
        tensor_to_wire(tensor)


# ---- over real sockets ------------------------------------------------------------------------


@pytest.fixture
async def peers():
    created = []
    try:
        for _ in range(2):
            created.append(await P2P.create(host="127.0.0.1"))
        yield created
    finally:
        await asyncio.gather(*(p.shutdown() for p in created), return_exceptions=True)


def _install_sum_handler(server: P2P, outcomes: list):
    async def tensor_sum(stream, ctx):
        future = asyncio.get_running_loop().create_future()
        outcomes.append(future)
        try:
            tensor = await recv_tensor(stream, max_bytes=64 << 20)
        except BaseException as e:
            future.set_exception(e)
            raise
        future.set_result(tensor)
        await stream.send({"sum": float(tensor.double().sum()), "nbytes": tensor.numel() * tensor.element_size(),
                           "dtype": str(tensor.dtype), "shape": list(tensor.shape)}, end=True)

    server.add_stream_handler("tensor.sum", tensor_sum)


async def _send_and_sum(client: P2P, server: P2P, tensor: torch.Tensor, chunk_bytes: int) -> dict:
    stream = await client.open_stream(server.get_visible_addresses()[0], "tensor.sum", timeout=30)
    async with stream:
        sent = await send_tensor(stream, tensor, chunk_bytes=chunk_bytes)
        assert sent == tensor.numel() * tensor.element_size()
        await stream.end()
        return await stream.recv()


async def test_stream_large_float32(peers):
    client, server = peers
    outcomes: list[asyncio.Future] = []
    _install_sum_handler(server, outcomes)
    tensor = torch.randn(5 * 1024 * 1024 + 3, generator=torch.Generator().manual_seed(0))  # ~20 MB
    reply = await _send_and_sum(client, server, tensor, chunk_bytes=1 << 20)
    assert reply["nbytes"] == tensor.numel() * 4
    assert reply["shape"] == [tensor.numel()]
    assert reply["sum"] == pytest.approx(float(tensor.double().sum()), rel=1e-9, abs=1e-6)
    received = await outcomes[0]
    assert_bit_exact(received, tensor)


async def test_stream_bfloat16_and_small_chunks(peers):
    client, server = peers
    outcomes: list[asyncio.Future] = []
    _install_sum_handler(server, outcomes)
    tensor = torch.randn(257, 33, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16).t()
    reply = await _send_and_sum(client, server, tensor, chunk_bytes=1000)  # chunks split elements
    assert reply["nbytes"] == tensor.numel() * 2
    assert reply["dtype"] == "torch.bfloat16" and reply["shape"] == [33, 257]
    assert reply["sum"] == pytest.approx(float(tensor.double().sum()), rel=1e-9, abs=1e-6)
    assert_bit_exact(await outcomes[0], tensor)


async def test_stream_empty_and_scalar(peers):
    client, server = peers
    outcomes: list[asyncio.Future] = []
    _install_sum_handler(server, outcomes)
    for tensor in (torch.empty(0, 4, dtype=torch.int64), torch.tensor(7, dtype=torch.int32)):
        reply = await _send_and_sum(client, server, tensor, chunk_bytes=4)
        assert reply["nbytes"] == tensor.numel() * tensor.element_size()
        assert reply["sum"] == float(tensor.double().sum())
        assert_bit_exact(await outcomes[-1], tensor)


@pytest.mark.parametrize("attack", ["overflow", "bad_header", "too_large", "non_bytes_chunk", "empty_chunk"])
async def test_malicious_sender_is_refused_and_server_keeps_serving(peers, attack):
    client, server = peers
    outcomes: list[asyncio.Future] = []
    _install_sum_handler(server, outcomes)
    address = server.get_visible_addresses()[0]
    stream = await client.open_stream(address, "tensor.sum", timeout=10)
    async with stream:
        if attack == "bad_header":
            await stream.send({"dtype": "float32", "shape": [-4]})
        elif attack == "too_large":
            await stream.send({"dtype": "float64", "shape": [1 << 30]})  # 8 GiB > max_bytes
        else:
            await stream.send({"dtype": "float32", "shape": [4], "chunk": 8})  # declares 16 bytes
            await stream.send(b"\0" * 8)
            if attack == "overflow":
                await stream.send(b"\0" * 9)  # 8 + 9 > 16
            elif attack == "non_bytes_chunk":
                await stream.send([1, 2, 3])
            else:
                await stream.send(b"")
        with pytest.raises(RemoteError) as info:
            await stream.recv()
    expected = MessageTooLargeError if attack == "too_large" else ProtocolError
    assert info.value.code == "handler_error"
    assert expected.__name__ in str(info.value)
    with pytest.raises(expected):
        await asyncio.wait_for(outcomes[0], 5)
    # the same connection and the server keep working
    tensor = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    reply = await _send_and_sum(client, server, tensor, chunk_bytes=16)
    assert reply == {"sum": 66.0, "nbytes": 48, "dtype": "torch.float32", "shape": [3, 4]}
    assert await client.ping(address) >= 0


@pytest.mark.parametrize("cipher", ["aes256gcm", "chacha20poly1305"])
@pytest.mark.parametrize("size", [0, 100, (64 << 10) - 1, 64 << 10, (1 << 20) + 5])
@pytest.mark.parametrize("head", [b"", b"\x01\x00\x00\x00\x00\x07", b"\x01\x00\x00\x00\x00\x07\xc6\x00\x10\x00\x00"])
def test_bulk_sealing_matches_one_shot_aead(cipher, size, head):
    import os

    from dht.peer.handshake import CIPHERS, _FrameCipher

    key, nonce, aad = os.urandom(32), os.urandom(12), b"\x00\x10\x00\x20"
    data = memoryview(os.urandom(size))
    out = bytearray(len(head) + size + 16)
    _FrameCipher(cipher, key).seal_into(nonce, head, data, aad, memoryview(out))
    assert bytes(out) == CIPHERS[cipher](key).encrypt(nonce, head + bytes(data), aad)


async def test_long_bytes_messages_over_real_sockets(peers):
    """Bytes-like messages of every size class around the bulk path and the frame size arrive intact."""
    client, server = peers

    async def echo_lengths(stream, ctx):
        async for message in stream:
            await stream.send([len(message), hash(bytes(message))])
        await stream.end()

    server.add_stream_handler("bytes.echo", echo_lengths)
    sizes = [1, (64 << 10) - 1, 64 << 10, (1 << 20) - 5, 1 << 20, (1 << 20) + 1, 3 << 20]
    payloads = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(n)).numpy()
                .tobytes() for n in sizes]
    stream = await client.open_stream(server.get_visible_addresses()[0], "bytes.echo", timeout=30)
    async with stream:
        for i, payload in enumerate(payloads):
            message = payload if i % 2 else memoryview(bytearray(payload))  # bytes and views of the caller's memory
            await stream.send(message)
            assert await stream.recv() == [len(payload), hash(payload)]
        await stream.end()


@settings(max_examples=60, deadline=None)
@given(size=st.integers(0, 200_000), others=st.dictionaries(st.sampled_from(["r", "s", "t", 1]),
                                                             st.one_of(st.integers(-2 ** 63, 2 ** 63 - 1), st.floats(allow_nan=False),
                                                                       st.lists(st.floats(allow_nan=False), max_size=2),
                                                                       st.binary(max_size=8)), max_size=3),
       as_view=st.booleans())
def test_bulk_split_is_the_msgpack_encoding(size, others, as_view):
    """prefix || view, as the multiplexer frames a tensor-chunk map, decodes to the same message."""
    import msgpack

    from dht.peer.multiplex import FRAME_SLACK, _split_bulk

    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    value = memoryview(bytearray(data)) if as_view else data
    for message in ({**others, "d": value}, value):
        split = _split_bulk(message)
        if split is None:  # short, or a prefix too long to ride in the first frame: msgpack packs it
            assert size < (64 << 10) or (isinstance(message, dict) and len(msgpack.packb(others)) > FRAME_SLACK - 8)
            continue
        prefix, view = split
        assert len(prefix) <= FRAME_SLACK
        decoded = msgpack.unpackb(prefix + bytes(view), raw=False, strict_map_key=False)
        expected = {**others, "d": data} if isinstance(message, dict) else data
        assert decoded == expected
