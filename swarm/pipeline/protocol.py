"""The pipeline wire protocol, sans I/O: ``pipe.forward``, ``pipe.backward`` and ``pipe.info``.

Each message has an encoder next to a validating parser; a parser raises
:class:`~dht.peer.errors.BadRequestError` (the caller gets ``bad_request``) with a bounded message.
Methods are ``{name}.{run_id}`` (:func:`method`), so one peer can serve stages of several runs.
Every message is a msgpack map with ``"v": VERSION`` (1); another version is refused by name.

========================  ==========================================================================
method, direction         message (field: meaning) and limits
========================  ==========================================================================
``pipe.forward`` unary,   ``{"v": 1, "s": stage (int, 0 <= s < MAX_STAGES), "mb": microbatch id (bytes,
trainer -> server         at most MAX_MB_ID_BYTES=32), "x": tensor}``
reply                     ``{"v": 1, "y": tensor}``: the stage's output (computed without autograd)
``pipe.backward`` unary,  ``{"v": 1, "s", "mb" (as above), "x": the stage's inputs (tensor), "g": the
trainer -> server         gradient of the loss w.r.t. the stage's outputs (tensor, floating, the
                          outputs' shape), "gi": whether the inputs' gradient is wanted (bool,
                          optional, default true; the first stage's is not)}``
reply                     ``{"v": 1, "gx": gradient w.r.t. the inputs (tensor), or None for integer
                          inputs or when not wanted}``; the server re-runs the forward with autograd
                          and *adds* the parameter gradients to its accumulators
``pipe.info`` unary       ``{"v": 1}`` -> ``{"v": 1, "stage": int, "samples_per_s": float, "queue": int,
                          "max_elements": int, "codec": str}``
========================  ==========================================================================

A server reads requests of at most :func:`max_request_bytes` of its ``max_elements`` (default
``2**20`` values per tensor: about 12 MiB); a bigger one is refused while it arrives (``too_large``).
Reply parsers raise :class:`~dht.peer.errors.ProtocolError` (the server misbehaved). Byte vectors:
``tests/test_pipeline_wiring.py``.

A **tensor** is ``{"dtype": str (one of averaging.tensor_wire.DTYPES), "shape": [int] (at most
MAX_DIMS=8 dimensions), "codec": str, "c": map}``. Floating tensors are flattened to float32 and sent
through a stateless :mod:`averaging.compression` codec (``"c"`` is the codec's map; ``"none"``:
exact float32, ``"blockwise8"``: int8 per block of 256 values, the default; also ``"float16"``,
``"uint8"``, ``"quantile8"``), then cast back to ``dtype``; other dtypes (token ids) travel exactly
as ``codec: "raw"``, ``"c": {"d": little-endian bytes}``. A receiver refuses a tensor of more than
its ``max_elements`` values (the server's is in ``pipe.info``) and, for floating tensors, any
non-finite value (a NaN gradient would poison the stage's accumulators).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from averaging import compression
from averaging.tensor_wire import DTYPES
from dht.peer.errors import BadRequestError, ProtocolError
from dht.peer.untrusted import brief

from .registry import MAX_STAGES

__all__ = ["VERSION", "FORWARD", "BACKWARD", "INFO", "method", "encode_tensor", "decode_tensor",
           "forward_request", "parse_forward_request", "forward_reply", "parse_forward_reply",
           "backward_request", "parse_backward_request", "backward_reply", "parse_backward_reply",
           "info_request", "parse_info_request", "info_reply", "parse_info_reply", "Request",
           "max_request_bytes", "CODECS", "DEFAULT_CODEC", "DEFAULT_MAX_ELEMENTS"]

VERSION = 1
FORWARD, BACKWARD, INFO = "pipe.forward", "pipe.backward", "pipe.info"
MAX_MB_ID_BYTES = 32
MAX_DIMS = 8
DEFAULT_MAX_ELEMENTS = 1 << 20  # values per tensor a server accepts by default (4 MiB of float32)
DEFAULT_CODEC = "blockwise8"
CODECS = ("none", "float16", "uint8", "blockwise8", "quantile8")  # the stateless ones
RAW = "raw"
_OVERHEAD = 64 << 10  # bytes of a request besides its tensors' data (maps, codec scales, ids)
_FLOATING = {torch.float64, torch.float32, torch.float16, torch.bfloat16}
_NAMES = {v: k for k, v in DTYPES.items()}
_codecs = {name: compression.get(name) for name in CODECS}


def method(name: str, run_id: str) -> str:
    """The method of message family ``name`` (:data:`FORWARD`, ...) for run ``run_id``."""
    return f"{name}.{run_id}"


def max_request_bytes(max_elements: int) -> int:
    """The largest request a server accepting ``max_elements`` values per tensor needs to read: a
    backward's inputs (8 bytes per value at most: raw int64/float64 ids) and output gradient (float32
    per value at most), plus maps and scales."""
    return 12 * max_elements + _OVERHEAD + max_elements // 32


def _refuse(what: str, value: Any = None) -> BadRequestError:
    return BadRequestError(what if value is None else f"{what} (got {brief(value)})")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---- tensors ----------------------------------------------------------------------------------

def encode_tensor(tensor: torch.Tensor, codec: str = DEFAULT_CODEC) -> dict:
    """The wire form of ``tensor`` (see the module docstring); ``codec`` applies to floating tensors."""
    if codec not in _codecs:
        raise ValueError(f"unknown pipeline codec {codec!r}; choose from {', '.join(CODECS)}")
    tensor = tensor.detach().to("cpu")
    if tensor.dtype not in _NAMES:
        raise TypeError(f"dtype {tensor.dtype} cannot be sent (supported: {', '.join(DTYPES)})")
    head = {"dtype": _NAMES[tensor.dtype], "shape": list(tensor.shape)}
    if tensor.dtype in _FLOATING:
        flat = tensor.reshape(-1).to(torch.float32).contiguous()
        return {**head, "codec": codec, "c": _codecs[codec].encode(flat)}
    flat = tensor.reshape(-1).contiguous()
    return {**head, "codec": RAW, "c": {"d": flat.view(torch.uint8).numpy().tobytes()}}


def decode_tensor(message: Any, max_elements: int, name: str = "tensor") -> torch.Tensor:
    """The tensor in ``message`` (untrusted); BadRequestError naming ``name`` if it is malformed, has
    more than ``max_elements`` values, or (floating) holds a non-finite value."""
    if not isinstance(message, dict):
        raise _refuse(f"{name!r} must be a tensor map", message)
    dtype_name, shape, codec = message.get("dtype"), message.get("shape"), message.get("codec")
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise _refuse(f"{name!r}: unsupported dtype", dtype_name)
    if (not isinstance(shape, list) or len(shape) > MAX_DIMS
            or not all(_is_int(d) and 0 <= d < 2 ** 40 for d in shape)):
        raise _refuse(f"{name!r}: shape must be a list of at most {MAX_DIMS} sizes", shape)
    numel = math.prod(shape)
    if numel > max_elements:
        raise _refuse(f"{name!r}: {numel} values exceed this server's limit of {max_elements}")
    dtype = DTYPES[dtype_name]
    body = message.get("c")
    if dtype in _FLOATING:
        if not isinstance(codec, str) or codec not in _codecs:
            raise _refuse(f"{name!r}: codec must be one of {', '.join(CODECS)}", codec)
        try:
            flat = _codecs[codec].decode(body, numel)
        except (compression.CodecError, TypeError, ValueError, RuntimeError) as e:
            raise _refuse(f"{name!r}: bad {codec} data: {str(e)[:200]}") from None
        if not bool(torch.isfinite(flat).all()):
            raise _refuse(f"{name!r}: holds non-finite values")
        if codec == "none" or dtype != torch.float32:  # "none" decodes to a view of the message's bytes
            flat = flat.to(dtype, copy=True)
        return flat.reshape(shape)
    if codec != RAW:
        raise _refuse(f"{name!r}: a {dtype_name} tensor travels as codec 'raw'", codec)
    data = body.get("d") if isinstance(body, dict) else None
    size = numel * torch.empty((), dtype=dtype).element_size()
    if not isinstance(data, (bytes, bytearray)) or len(data) != size:
        raise _refuse(f"{name!r}: expected {size} bytes of {dtype_name} data")
    out = torch.empty(shape, dtype=dtype)
    if size:
        out.reshape(-1).view(torch.uint8).numpy()[:] = memoryview(data).cast("B")
    return out


# ---- requests ---------------------------------------------------------------------------------

@dataclass
class Request:
    """A parsed forward or backward request (``grad`` is None for a forward)."""

    stage: int
    microbatch: bytes
    inputs: torch.Tensor
    grad: torch.Tensor | None = None
    want_grad_inputs: bool = True


def _check_head(request: Any) -> tuple[int, bytes]:
    if not isinstance(request, dict):
        raise _refuse("a pipeline request must be a map", request)
    version = request.get("v")
    if version != VERSION:
        raise _refuse(f"unsupported pipeline protocol version (this server speaks {VERSION})", version)
    stage, mb = request.get("s"), request.get("mb")
    if not isinstance(stage, int) or isinstance(stage, bool) or not 0 <= stage < MAX_STAGES:
        raise _refuse("'s' must be a stage index", stage)
    if not isinstance(mb, bytes) or len(mb) > MAX_MB_ID_BYTES:
        raise _refuse(f"'mb' must be a microbatch id of at most {MAX_MB_ID_BYTES} bytes", mb)
    return stage, mb


def forward_request(stage: int, microbatch: bytes, inputs: torch.Tensor, codec: str = DEFAULT_CODEC) -> dict:
    return {"v": VERSION, "s": stage, "mb": microbatch, "x": encode_tensor(inputs, codec)}


def parse_forward_request(request: Any, max_elements: int) -> Request:
    """Check only the small fields first (cheap), then decode the tensor."""
    stage, mb = _check_head(request)
    return Request(stage, mb, decode_tensor(request.get("x"), max_elements, "x"))


def forward_reply(outputs: torch.Tensor, codec: str = DEFAULT_CODEC) -> dict:
    return {"v": VERSION, "y": encode_tensor(outputs, codec)}


def _check_reply(reply: Any) -> dict:
    if not isinstance(reply, dict) or reply.get("v") != VERSION:
        raise ProtocolError(f"a pipeline reply must be a map of version {VERSION} (got {brief(reply)})")
    return reply


def _reply_tensor(body: Any, max_elements: int, name: str) -> torch.Tensor:
    try:
        return decode_tensor(body, max_elements, name)
    except BadRequestError as e:  # the server sent it: a protocol violation on its side
        raise ProtocolError(f"malformed reply: {e}") from None


def parse_forward_reply(reply: Any, max_elements: int) -> torch.Tensor:
    """The outputs in a forward reply; ProtocolError if it is malformed."""
    return _reply_tensor(_check_reply(reply).get("y"), max_elements, "y")


def backward_request(stage: int, microbatch: bytes, inputs: torch.Tensor, grad_outputs: torch.Tensor,
                     codec: str = DEFAULT_CODEC, want_grad_inputs: bool = True) -> dict:
    request = {"v": VERSION, "s": stage, "mb": microbatch, "x": encode_tensor(inputs, codec),
               "g": encode_tensor(grad_outputs, codec)}
    if not want_grad_inputs:
        request["gi"] = False
    return request


def parse_backward_request(request: Any, max_elements: int) -> Request:
    stage, mb = _check_head(request)
    grad = request.get("g") if isinstance(request, dict) else None
    dtype_name = grad.get("dtype") if isinstance(grad, dict) else None
    if not isinstance(grad, dict) or not isinstance(dtype_name, str) or DTYPES.get(dtype_name) not in _FLOATING:
        raise _refuse("'g' must be a floating tensor", grad.get("dtype") if isinstance(grad, dict) else grad)
    want = request.get("gi", True)
    if not isinstance(want, bool):
        raise _refuse("'gi' must be a bool", want)
    inputs = decode_tensor(request.get("x"), max_elements, "x")
    return Request(stage, mb, inputs, decode_tensor(grad, max_elements, "g"), want)


def backward_reply(grad_inputs: torch.Tensor | None, codec: str = DEFAULT_CODEC) -> dict:
    return {"v": VERSION, "gx": None if grad_inputs is None else encode_tensor(grad_inputs, codec)}


def parse_backward_reply(reply: Any, max_elements: int) -> torch.Tensor | None:
    body = _check_reply(reply).get("gx")
    return None if body is None else _reply_tensor(body, max_elements, "gx")


def info_request() -> dict:
    return {"v": VERSION}


def parse_info_request(request: Any) -> None:
    if not isinstance(request, dict) or request.get("v") != VERSION:
        raise _refuse(f"unsupported pipeline protocol version (this server speaks {VERSION})",
                      request.get("v") if isinstance(request, dict) else request)


def info_reply(stage: int, samples_per_s: float, queue: int, max_elements: int, codec: str) -> dict:
    return {"v": VERSION, "stage": stage, "samples_per_s": float(samples_per_s), "queue": int(queue),
            "max_elements": int(max_elements), "codec": codec}


def parse_info_reply(reply: Any) -> dict:
    reply = _check_reply(reply)
    stage, rate, queue = reply.get("stage"), reply.get("samples_per_s"), reply.get("queue")
    limit, codec = reply.get("max_elements"), reply.get("codec")
    if (not _is_int(stage) or not 0 <= stage < MAX_STAGES or not isinstance(rate, (int, float))
            or isinstance(rate, bool) or not math.isfinite(rate) or rate < 0 or not _is_int(queue) or queue < 0
            or not _is_int(limit) or limit < 0 or codec not in CODECS):
        raise ProtocolError("malformed pipe.info reply")
    return {"stage": stage, "samples_per_s": float(rate), "queue": queue, "max_elements": limit, "codec": codec}
