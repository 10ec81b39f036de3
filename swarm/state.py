"""Training state as bytes: what late joiners download, what checkpoints hold, what the swarm hashes.

A state is ``metadata`` (a msgpack-able dict: epoch, optimizer hyperparameters, tensor layout) plus
named tensors, packed as one blob::

    b"SWST" | u16 format version | u32 metadata length | metadata (msgpack) | tensor bytes ...

Tensor bytes follow in the metadata's ``tensors`` order (``[name, dtype, shape, offset, nbytes]``),
little-endian, no padding. No pickle anywhere: loading someone else's state can only ever produce
tensors of the declared dtypes and shapes. :func:`state_hash` (sha256 hex of the whole blob) is what
peers announce and what a downloaded state is checked against.

Format versions: 1 (the first); 2 adds the LR scheduler's state (metadata ``"scheduler"``: its
``state_dict()`` with tensors replaced by ``{"__tensor__": name}`` of tensors ``sched.*``, or None
without a scheduler). This version writes 2 and reads both (:data:`READABLE_VERSIONS`); a
:class:`TrainingState` says which version it was read from, so that a version-1 state without a
scheduler state is recognisable (the Optimizer then brings a fresh scheduler to the state's epoch).
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import torch

from dht.peer.untrusted import brief

__all__ = ["FORMAT_VERSION", "READABLE_VERSIONS", "StateFormatError", "TrainingState", "pack_state", "unpack_state",
           "state_hash", "optimizer_state_to_tensors", "optimizer_state_from_tensors", "scheduler_state_to_tensors",
           "scheduler_state_from_tensors", "validated_scheduler_state"]

MAGIC = b"SWST"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
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
    version: int = FORMAT_VERSION  # the format version it was read from (pack_state always writes FORMAT_VERSION)


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
    if version not in READABLE_VERSIONS:
        raise StateFormatError(f"state format version {version} is not supported (this swarm reads versions "
                               f"{', '.join(map(str, READABLE_VERSIONS))})")
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
    return TrainingState(metadata, tensors, version)


def state_hash(blob: bytes | memoryview) -> str:
    return hashlib.sha256(blob).hexdigest()


def optimizer_state_to_tensors(optimizer: torch.optim.Optimizer,
                               prefix: str = "opt") -> tuple[dict, dict[str, torch.Tensor]]:
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
        tensor_names = [k for k, v in entry.items() if isinstance(v, torch.Tensor)]
        per_param[str(index)] = {"scalars": scalars, "tensors": tensor_names}
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


MAX_SCHEDULER_DEPTH = 8  # nesting of a scheduler's state_dict (SequentialLR/ChainedScheduler hold their children's)


def scheduler_state_to_tensors(scheduler: Any, prefix: str = "sched") -> tuple[Any, dict[str, torch.Tensor]]:
    """``scheduler.state_dict()`` as msgpack-able metadata (tuples as lists, tensors as
    ``{"__tensor__": name}``) and the named tensors. Raises TypeError naming a value that cannot be
    shared (e.g. a function: LambdaLR keeps only callable objects' attributes, never functions)."""
    tensors: dict[str, torch.Tensor] = {}

    def convert(value: Any, path: str, depth: int) -> Any:
        if depth > MAX_SCHEDULER_DEPTH:
            raise TypeError(f"scheduler state {path} is nested too deeply")
        if isinstance(value, torch.Tensor):
            name = f"{prefix}.{len(tensors)}"
            tensors[name] = value.detach()
            return {"__tensor__": name}
        if isinstance(value, dict):
            if not all(isinstance(k, (str, int)) for k in value):
                raise TypeError(f"scheduler state {path} has keys that are neither str nor int")
            return {k: convert(v, f"{path}.{k}", depth + 1) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [convert(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"scheduler state {path} of type {type(value).__name__} cannot be shared")

    return convert(scheduler.state_dict(), "state_dict", 0), tensors


def scheduler_state_from_tensors(scheduler: Any, metadata: Any, tensors: dict[str, torch.Tensor]) -> None:
    """Load what :func:`scheduler_state_to_tensors` produced into ``scheduler`` (validated first by
    :func:`validated_scheduler_state`)."""
    scheduler.load_state_dict(validated_scheduler_state(scheduler, metadata, tensors))


def validated_scheduler_state(scheduler: Any, metadata: Any, tensors: dict[str, torch.Tensor]) -> dict:
    """The ``state_dict`` for ``scheduler`` that ``metadata`` and ``tensors`` describe. The state may come
    from another peer, and ``load_state_dict`` copies it into the scheduler's attributes, so it must
    have the structure of this scheduler's own ``state_dict()``: the same keys, lists of the same
    lengths, values of the same types (int and float interchangeable, None where this one holds
    None or a number; numbers finite where this one's are), the same strings (they name modes and
    annealing functions: configuration), tensors of the same dtype and shape; anything else raises
    :class:`StateFormatError`. Nothing is changed."""
    mine = scheduler.state_dict()

    def match(theirs: Any, ours: Any, path: str, depth: int) -> Any:
        if depth > MAX_SCHEDULER_DEPTH:
            raise StateFormatError(f"scheduler state {path} is nested too deeply")
        if isinstance(ours, torch.Tensor):
            name = theirs.get("__tensor__") if isinstance(theirs, dict) and len(theirs) == 1 else None
            t = tensors.get(name) if isinstance(name, str) else None
            if t is None or t.dtype != ours.dtype or t.shape != ours.shape:
                raise StateFormatError(f"scheduler state {path}: expected a {ours.dtype} tensor of shape "
                                       f"{tuple(ours.shape)}")
            return t.clone()
        if isinstance(ours, dict):
            if not isinstance(theirs, dict) or set(theirs) != set(ours):
                raise StateFormatError(f"scheduler state {path} has other keys than this peer's scheduler "
                                       f"(a different scheduler?)")
            return {k: match(theirs[k], ours[k], f"{path}.{k}", depth + 1) for k in ours}
        if isinstance(ours, (list, tuple)):
            if not isinstance(theirs, list) or len(theirs) != len(ours):
                raise StateFormatError(f"scheduler state {path}: expected a list of {len(ours)}")
            values = [match(t, o, f"{path}[{i}]", depth + 1) for i, (t, o) in enumerate(zip(theirs, ours))]
            return tuple(values) if isinstance(ours, tuple) else values
        number = (int, float)
        if isinstance(ours, bool) or isinstance(theirs, bool):
            ok = isinstance(ours, bool) and isinstance(theirs, bool)
        elif isinstance(ours, number) or ours is None:
            ok = theirs is None or (isinstance(theirs, number) and (
                math.isfinite(theirs) or not isinstance(ours, number) or not math.isfinite(ours)))
        elif isinstance(ours, str):
            ok = theirs == ours
        else:
            ok = False
        if not ok:
            raise StateFormatError(f"scheduler state {path}: expected {type(ours).__name__}"
                                   f"{' ' + brief(ours) if isinstance(ours, str) else ''}, got {brief(theirs)}")
        return float(theirs) if isinstance(ours, float) and isinstance(theirs, int) else theirs

    return match(metadata, mine, "state_dict", 0)


def _msgpackable(value: Any) -> bool:
    try:
        msgpack.packb(value, use_bin_type=True)
        return True
    except (TypeError, ValueError, OverflowError):
        return False
