"""Tensors on the wire: dtype + shape + raw little-endian bytes, never pickle.

Small tensors travel in one message (:func:`tensor_to_wire` / :func:`tensor_from_wire`). Large ones
stream in chunks (:func:`send_tensor` / :func:`recv_tensor`): the sender slices the tensor's own
memory without copying it whole; the receiver never allocates from a size it was only told: its
buffer grows as the bytes arrive, or, when the caller expects a known tensor (``like=``), the
header must match that tensor's dtype and shape before anything is allocated. Every field is
validated on receipt: unknown dtypes, negative or inconsistent shapes and sizes over ``max_bytes``
are refused (ProtocolError / MessageTooLargeError, texts bounded).
This module imports torch; ``import dht`` does not import it.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import torch

from dht.peer.errors import MessageTooLargeError, ProtocolError
from dht.peer.multiplex import Stream
from dht.peer.untrusted import brief

__all__ = ["tensor_to_wire", "tensor_from_wire", "send_tensor", "recv_tensor", "DTYPES"]

DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8,
    "uint8": torch.uint8, "bool": torch.bool,
}
_NAMES = {v: k for k, v in DTYPES.items()}
MAX_DIMS = 16
DEFAULT_CHUNK_BYTES = 1 << 20
DEFAULT_MAX_BYTES = 1 << 32  # refuse headers announcing more than 4 GiB unless the caller allows it


def _byte_view(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes (little-endian, C order) as a memoryview over its own memory when possible."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if sys.byteorder != "little":  # pragma: no cover - no big-endian CI
        raise NotImplementedError("big-endian hosts are not supported")
    # numpy's stubs declare ndarray.__buffer__ only for Python >= 3.12
    return memoryview(flat.view(torch.uint8).numpy())  # type: ignore[arg-type]


def _dtype_name(tensor: torch.Tensor) -> str:
    try:
        return _NAMES[tensor.dtype]
    except KeyError:
        raise TypeError(f"dtype {tensor.dtype} cannot be sent (supported: {', '.join(DTYPES)})") from None


def _parse_header(message: Any, max_bytes: int | None) -> tuple[torch.dtype, list[int], int]:
    if not isinstance(message, dict):
        raise ProtocolError("tensor header must be a map")
    dtype_name, shape = message.get("dtype"), message.get("shape")
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise ProtocolError(f"unsupported tensor dtype {brief(dtype_name, 32)}")
    if (not isinstance(shape, list) or len(shape) > MAX_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2 ** 48 for d in shape)):
        raise ProtocolError(f"bad tensor shape ({brief(shape)})")
    dtype = DTYPES[dtype_name]
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if max_bytes is not None and nbytes > max_bytes:
        raise MessageTooLargeError(f"tensor of {nbytes} bytes exceeds the limit of {max_bytes} bytes")
    return dtype, shape, nbytes


def tensor_to_wire(tensor: torch.Tensor) -> dict:
    """``{"dtype", "shape", "data"}`` for a tensor small enough for one message."""
    return {"dtype": _dtype_name(tensor), "shape": list(tensor.shape), "data": _byte_view(tensor).tobytes()}


def tensor_from_wire(message: Any, *, max_bytes: int | None = None) -> torch.Tensor:
    """Rebuild a tensor from :func:`tensor_to_wire`'s output; ProtocolError if it is inconsistent."""
    dtype, shape, nbytes = _parse_header(message, max_bytes)
    data = message.get("data")
    if not isinstance(data, (bytes, bytearray)) or len(data) != nbytes:
        raise ProtocolError(f"tensor data has {len(data) if isinstance(data, (bytes, bytearray)) else 'no'} bytes, "
                            f"expected {nbytes} for {list(shape)} {_NAMES[dtype]}")
    out = torch.empty(shape, dtype=dtype)
    if nbytes:
        out.reshape(-1).view(torch.uint8).numpy()[:] = memoryview(data).cast("B")
    return out


async def send_tensor(stream: Stream, tensor: torch.Tensor, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Send a header then the tensor's bytes in chunks of ``chunk_bytes``; returns bytes sent."""
    view = _byte_view(tensor)
    await stream.send({"dtype": _dtype_name(tensor), "shape": list(tensor.shape), "chunk": chunk_bytes})
    for offset in range(0, len(view), chunk_bytes):
        await stream.send(view[offset:offset + chunk_bytes])
    return len(view)


async def recv_tensor(stream: Stream, *, max_bytes: int | None = DEFAULT_MAX_BYTES,
                      like: torch.Tensor | None = None) -> torch.Tensor:
    """Receive what :func:`send_tensor` sent; ProtocolError on any inconsistency.

    ``like``: the tensor the sender must send one like (same dtype and shape; refused before any
    allocation otherwise), received into a tensor allocated once. Without it the buffer grows as the
    bytes arrive, so a header announcing ``max_bytes`` costs nothing until they do."""
    header = await stream.recv()
    dtype, shape, nbytes = _parse_header(header, max_bytes)
    if like is not None and (dtype != like.dtype or tuple(shape) != tuple(like.shape)):
        raise ProtocolError(f"expected a {_NAMES.get(like.dtype, like.dtype)} tensor of shape {list(like.shape)}, "
                            f"got {_NAMES[dtype]} {brief(shape)}")
    if like is not None or not nbytes:
        out = torch.empty(shape, dtype=dtype)
        buffer = out.reshape(-1).view(torch.uint8).numpy() if nbytes else None
    else:
        out, grown = None, bytearray()  # grows with the bytes that arrived (realloc, mostly in place)
    received = 0
    while received < nbytes:
        chunk = await stream.recv()
        if not isinstance(chunk, (bytes, bytearray)) or not chunk or received + len(chunk) > nbytes:
            raise ProtocolError(f"bad tensor chunk after {received} of {nbytes} bytes")
        if out is None:
            grown += chunk
        else:
            assert buffer is not None  # out was allocated for nbytes > 0
            buffer[received:received + len(chunk)] = memoryview(chunk).cast("B")
        received += len(chunk)
    if out is None:
        out = torch.frombuffer(grown, dtype=dtype).reshape(shape)
    return out
