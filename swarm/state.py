"""Training state as bytes: what late joiners download, what checkpoints hold, what the swarm hashes.

A state is ``metadata`` (a msgpack-able dict: epoch, optimizer hyperparameters, tensor layout) plus
named tensors, packed as one blob::

    b"SWST" | u16 format version | u32 metadata length | metadata (msgpack) | tensor bytes ...

Tensor bytes follow in the metadata's ``tensors`` order (``[name, dtype, shape, offset, nbytes]``),
little-endian, no padding. No pickle anywhere: loading someone else's state can only ever produce
tensors of the declared dtypes and shapes. :func:`state_hash` (sha256 hex of the whole blob) is what
peers announce and what a downloaded state is checked against.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import torch

__all__ = ["FORMAT_VERSION", "StateFormatError", "TrainingState", "pack_state", "unpack_state", "state_hash",
           "optimizer_state_to_tensors", "optimizer_state_from_tensors"]

MAGIC = b"SWST"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<4sHI")
_DTYPES = {str(d): d for d in (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64,
                               torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)}
MAX_METADATA_BYTES = 16 << 20


class StateFormatError(ValueError):
    """A state blob is corrupt, truncated, of another format version, or does not fit the model."""


@dataclass
class TrainingState:
    metadata: dict
    tensors: dict[str, torch.Tensor]


def pack_state(state: TrainingState) -> bytes:
    """Serialize ``state`` (tensors are copied to CPU, contiguous)."""
    layout, chunks, offset = [], [], 0
    for name, tensor in state.tensors.items():
        t = tensor.detach().to("cpu").contiguous()
        if str(t.dtype) not in _DTYPES:
            raise TypeError(f"tensor {name}: dtype {t.dtype} is not supported in a state")
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.dtype == torch.bfloat16 else t.numpy().tobytes()
        layout.append([name, str(t.dtype), list(t.shape), offset, len(raw)])
        chunks.append(raw)
        offset += len(raw)
    metadata = dict(state.metadata, tensors=layout)
    meta = msgpack.packb(metadata, use_bin_type=True)
    return b"".join([_HEADER.pack(MAGIC, FORMAT_VERSION, len(meta)), meta, *chunks])


def unpack_state(blob: bytes | memoryview) -> TrainingState:
    """Parse a blob from :func:`pack_state`; raises :class:`StateFormatError` on anything malformed."""
    view = memoryview(blob)
    if len(view) < _HEADER.size:
        raise StateFormatError("state is truncated (no header)")
    magic, version, meta_len = _HEADER.unpack_from(view)
    if magic != MAGIC:
        raise StateFormatError("not a swarm training state (bad magic bytes)")
    if version != FORMAT_VERSION:
        raise StateFormatError(f"state format version {version} is not supported (this swarm reads version "
                               f"{FORMAT_VERSION})")
    if meta_len > MAX_METADATA_BYTES or _HEADER.size + meta_len > len(view):
        raise StateFormatError("state is truncated (metadata)")
    try:
        metadata = msgpack.unpackb(view[_HEADER.size:_HEADER.size + meta_len], raw=False, strict_map_key=False)
    except Exception as e:  # noqa: BLE001 - msgpack raises several types
        raise StateFormatError(f"state metadata is corrupt: {e}") from None
    if not isinstance(metadata, dict) or not isinstance(metadata.get("tensors"), list):
        raise StateFormatError("state metadata has no tensor layout")
    body = view[_HEADER.size + meta_len:]
    tensors = {}
    for entry in metadata.pop("tensors"):
        try:
            name, dtype_name, shape, offset, nbytes = entry
            dtype = _DTYPES[dtype_name]
            shape = [int(s) for s in shape]
        except (ValueError, TypeError, KeyError):
            raise StateFormatError(f"bad tensor entry in state metadata: {entry!r}") from None
        numel = int(np.prod(shape)) if shape else 1
        itemsize = torch.empty((), dtype=dtype).element_size()
        if min(shape, default=0) < 0 or nbytes != numel * itemsize or offset < 0 or offset + nbytes > len(body):
            raise StateFormatError(f"tensor {name} does not fit the state's bytes (truncated or corrupt)")
        raw = bytearray(body[offset:offset + nbytes])
        flat = torch.frombuffer(raw, dtype=torch.uint8) if nbytes else torch.empty(0, dtype=torch.uint8)
        tensors[name] = flat.view(dtype).reshape(shape) if nbytes else torch.empty(shape, dtype=dtype)
    return TrainingState(metadata, tensors)


def state_hash(blob: bytes | memoryview) -> str:
    return hashlib.sha256(blob).hexdigest()


def optimizer_state_to_tensors(optimizer: torch.optim.Optimizer, prefix: str = "opt") -> tuple[dict, dict[str, torch.Tensor]]:
    """Split ``optimizer.state_dict()`` into msgpack-able metadata and named tensors."""
    state_dict = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    per_param: dict[str, dict] = {}
    for index, entry in state_dict["state"].items():
        scalars = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}.{index}.{key}"] = value
            elif isinstance(value, (int, float, bool)) or value is None:
                scalars[key] = value
            else:
                raise TypeError(f"optimizer state {key!r} of type {type(value).__name__} cannot be shared")
        per_param[str(index)] = {"scalars": scalars, "tensors": [k for k, v in entry.items() if isinstance(v, torch.Tensor)]}
    groups = [{k: v for k, v in group.items() if _msgpackable(v)} for group in state_dict["param_groups"]]
    return {"param_groups": groups, "state": per_param}, tensors


def optimizer_state_from_tensors(optimizer: torch.optim.Optimizer, metadata: dict, tensors: dict[str, torch.Tensor],
                                 prefix: str = "opt") -> None:
    """Load what :func:`optimizer_state_to_tensors` produced into ``optimizer`` (same parameters)."""
    current = optimizer.state_dict()
    groups = metadata.get("param_groups", [])
    if len(groups) != len(current["param_groups"]):
        raise StateFormatError("the optimizer state has a different number of parameter groups")
    param_groups = []
    for saved, mine in zip(groups, current["param_groups"]):
        merged = dict(mine)
        merged.update({k: (tuple(v) if isinstance(v, list) and isinstance(mine.get(k), tuple) else v)
                       for k, v in saved.items() if k != "params"})
        param_groups.append(merged)
    state = {}
    for index, entry in metadata.get("state", {}).items():
        values = dict(entry.get("scalars", {}))
        for key in entry.get("tensors", []):
            name = f"{prefix}.{index}.{key}"
            if name not in tensors:
                raise StateFormatError(f"optimizer state tensor {name} is missing")
            values[key] = tensors[name]
        state[int(index)] = values
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


def _msgpackable(value: Any) -> bool:
    try:
        msgpack.packb(value, use_bin_type=True)
        return True
    except (TypeError, ValueError, OverflowError):
        return False
