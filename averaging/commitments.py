"""Signed digests of tensors: what a member commits to before it reveals a part, and what an owner
signs for the result it returns (commit-before-reveal, algorithms.md §2.3 steps 3-5).

A digest is SHA-256 over ``dtype | shape | little-endian bytes`` of a tensor (:func:`tensor_digest`,
incrementally: :class:`TensorHasher`). A :class:`Commitment` binds a digest to its context and is
signed with the sender's Ed25519 identity: the run prefix, the round (group id), the phase (0 the
butterfly, 1 recovery), the group's member list (:func:`group_digest`), the part (owner index), the
role (``"input"``: a member's values for a part; ``"result"``: an owner's aggregate), the sender,
the member's weight, for a result the member indices it aggregates, the codec whose decoded
values the digest covers (a result's precision depends on it) and the ranges of the flat vector the
part is made of. So a signed digest cannot
be replayed into another run, round, part or role, and two different digests signed for the same
slot are provable equivocation (:meth:`Commitment.conflicts`).

Wire forms (msgpack maps, validated by :meth:`Commitment.from_wire` / :meth:`Commitment.from_compact`):

- full (evidence, DHT records): ``{"v": 1, "x": prefix (str, at most MAX_PREFIX_CHARS=512), "g": round
  id (bytes, 1 to 64), "p": phase (int 0..255), "j": part (int 0..65535), "r": "input" | "result", "d":
  digest (32 bytes), "w": weight (finite float), "m": [member indices] (at most 4096, each 0..65535),
  "h": group digest (32 bytes, or empty), "c": codec name (optional, at most 64 characters), "rg":
  [[start, end]] (optional, at most 4096 ranges of the flat vector, in order), "k": Ed25519 public key
  (32 bytes), "s": signature (64 bytes)}``;
- compact (inside an ``avg.part`` header or final message, where the context is known): ``{"d", "k",
  "s"}``: 128 bytes of payload, about 140 packed.

This module is the averaging layer's (it signs inside the all-reduce); :mod:`verification.commitments`
is its public face for the verification layer. Hashing is O(bytes): callers hash big tensors off the
event loop.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import sys
from dataclasses import dataclass
from typing import Any, Sequence

import msgpack
import torch

from dht.peer.errors import BadRequestError
from dht.peer.identity import Identity, PeerID, verify_signature
from dht.peer.untrusted import brief

__all__ = ["DIGEST_BYTES", "ROLES", "ROLE_INPUT", "ROLE_RESULT", "MAX_PREFIX_CHARS", "TensorHasher", "tensor_digest",
           "group_digest", "Commitment"]

DIGEST_BYTES = 32
ROLE_INPUT = "input"  # a member's values for a part, as the owner decodes them
ROLE_RESULT = "result"  # an owner's aggregate of its part, as every member decodes it
ROLES = (ROLE_INPUT, ROLE_RESULT)
MAX_PREFIX_CHARS = 512
MAX_ROUND_ID_BYTES = 64
MAX_PART = 1 << 16
MAX_MEMBERS = 4096
MAX_RANGES = 4096
_DOMAIN = "swarm.commit/1"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class TensorHasher:
    """SHA-256 over ``dtype | shape | bytes`` of a tensor fed in pieces (in order): ``dtype`` and the
    total ``shape`` are fixed up front, :meth:`update` takes consecutive flat pieces of that dtype.
    :meth:`digest` raises ValueError unless exactly ``prod(shape)`` values were fed."""

    def __init__(self, dtype: torch.dtype, shape: Sequence[int]):
        self.dtype, self.expected = dtype, math.prod(shape)
        self.fed = 0
        self._hash = hashlib.sha256(f"{_dtype_name(dtype)}|{','.join(str(int(s)) for s in shape)}|".encode())

    def update(self, piece: torch.Tensor) -> None:
        if piece.dtype != self.dtype:
            raise ValueError(f"expected {_dtype_name(self.dtype)} values, got {_dtype_name(piece.dtype)}")
        flat = piece.detach().reshape(-1)
        if flat.numel():
            data = flat.contiguous().view(torch.uint8).numpy()
            if sys.byteorder != "little" and flat.element_size() > 1:  # the digest is of little-endian bytes
                data = flat.contiguous().numpy().byteswap().view("u1")
            self._hash.update(data.tobytes() if not data.flags.c_contiguous else data.data)
        self.fed += flat.numel()

    def digest(self) -> bytes:
        if self.fed != self.expected:
            raise ValueError(f"fed {self.fed} values, expected {self.expected}")
        return self._hash.digest()


def tensor_digest(tensor: torch.Tensor) -> bytes:
    """SHA-256 (32 bytes) over ``dtype | shape | little-endian bytes`` of ``tensor`` (any device: copied
    to the CPU). Equal tensors of one dtype and shape, and only they, have equal digests."""
    tensor = tensor.detach().cpu()
    hasher = TensorHasher(tensor.dtype, tuple(tensor.shape))
    hasher.update(tensor)
    return hasher.digest()


def _ranges(ranges: Sequence[Sequence[int]]) -> tuple[tuple[int, int], ...]:
    return tuple((int(lo), int(hi)) for lo, hi in ranges)


def group_digest(members: Sequence[PeerID]) -> bytes:
    """SHA-256 of a group's member list in order (what a commitment binds the member indices to)."""
    hasher = hashlib.sha256(b"swarm.group/1|")
    for member in members:
        hasher.update(member.raw)
    return hasher.digest()


def _refuse(what: str, value: Any = None) -> BadRequestError:
    return BadRequestError(what if value is None else f"{what} (got {brief(value)})")


def _is_int(value: Any, upper: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < upper


@dataclass(frozen=True)
class Commitment:
    """A signed digest: ``sender`` (the PeerID of ``public_key``) commits to ``digest`` for ``part`` of
    round ``round_id`` (phase ``phase``) under ``prefix`` in ``role``; ``weight``: the member's weight
    (inputs; 0.0 for results); ``members``: the member indices a result aggregates (() for inputs);
    ``group``: :func:`group_digest` of the group's members (b"": none); ``codec``: the name of the
    codec whose decoded values ``digest`` covers ("": unspecified); ``ranges``: the ``(start, end)``
    ranges of the flat vector whose values, concatenated, it covers (() : unspecified)."""

    prefix: str
    round_id: bytes
    phase: int
    part: int
    role: str
    digest: bytes
    weight: float
    members: tuple[int, ...]
    group: bytes
    public_key: bytes
    signature: bytes
    codec: str = ""
    ranges: tuple[tuple[int, int], ...] = ()

    @property
    def sender(self) -> PeerID:
        return PeerID.from_public_key(self.public_key)

    @property
    def slot(self) -> tuple[str, bytes, int, int, str, bytes]:
        """What may be signed once: two commitments of one slot with different digests equivocate."""
        return self.prefix, self.round_id, self.phase, self.part, self.role, self.public_key

    def payload(self) -> bytes:
        """The bytes that are signed (canonical msgpack of every field but the key and signature)."""
        return msgpack.packb([_DOMAIN, self.prefix, self.round_id, self.phase, self.part, self.role, self.sender.raw,
                              self.digest, float(self.weight), [int(m) for m in self.members], self.group]
                             + ([self.codec] if self.codec or self.ranges else [])
                             + ([[list(r) for r in self.ranges]] if self.ranges else []), use_bin_type=True)

    @classmethod
    def sign(cls, identity: Identity, prefix: str, round_id: bytes, phase: int, part: int, role: str, digest: bytes,
             weight: float = 0.0, members: Sequence[int] = (), group: bytes = b"", codec: str = "",
             ranges: Sequence[tuple[int, int]] = ()) -> "Commitment":
        """``identity``'s commitment to ``digest`` (ValueError for arguments outside the wire bounds)."""
        commitment = cls(prefix, round_id, phase, part, role, digest, float(weight), tuple(int(m) for m in members),
                         group, identity.public_key, b"", codec, _ranges(ranges))
        problem = commitment._problem()
        if problem is not None:
            raise ValueError(problem)
        return dataclasses.replace(commitment, signature=identity.sign(commitment.payload()))

    def verify(self) -> bool:
        """True if the signature is ``sender``'s over this commitment's fields."""
        if self._problem() is not None or not isinstance(self.signature, bytes) or len(self.signature) != 64:
            return False
        return verify_signature(self.public_key, self.signature, self.payload())

    def matches(self, tensor: torch.Tensor) -> bool:
        """True if ``tensor`` is what was committed to (hashes it: O(bytes))."""
        return tensor_digest(tensor) == self.digest

    def conflicts(self, other: "Commitment") -> bool:
        """True if both are validly signed for the same slot (and group) with different digests or
        weights: provable equivocation by the sender. (A result's member list may differ: an honest
        owner that dropped a member after reducing reports fewer contributors to the later streams.)"""
        return (self.slot == other.slot and self.group == other.group
                and (self.digest, self.weight) != (other.digest, other.weight) and self.verify() and other.verify())

    # ---- wire -------------------------------------------------------------------------------------
    def to_wire(self) -> dict:
        """The full, self-contained form (see the module docstring)."""
        return {"v": 1, "x": self.prefix, "g": self.round_id, "p": self.phase, "j": self.part, "r": self.role,
                "d": self.digest, "w": self.weight, "m": list(self.members), "h": self.group, "k": self.public_key,
                "s": self.signature, **({"c": self.codec} if self.codec else {}),
                **({"rg": [list(r) for r in self.ranges]} if self.ranges else {})}

    def compact(self) -> dict:
        """The digest, key and signature only, for a message whose context gives the other fields."""
        return {"d": self.digest, "k": self.public_key, "s": self.signature}

    @classmethod
    def from_wire(cls, message: Any) -> "Commitment":
        """A full wire form checked against the bounds (not the signature: :meth:`verify`);
        BadRequestError with a bounded message otherwise."""
        if not isinstance(message, dict) or message.get("v") != 1:
            raise _refuse("a commitment must be a map with 'v': 1", message)
        members = message.get("m")
        if (not isinstance(members, list) or len(members) > MAX_MEMBERS
                or not all(_is_int(m, MAX_PART) for m in members)):
            raise _refuse("'m' must be a list of member indices", members)
        weight = message.get("w")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise _refuse("'w' must be a number", weight)
        raw_ranges = message.get("rg", [])
        if (not isinstance(raw_ranges, list) or len(raw_ranges) > MAX_RANGES
                or not all(isinstance(r, list) and len(r) == 2 and all(_is_int(v, 1 << 62) for v in r) and r[0] <= r[1]
                           for r in raw_ranges)):
            raise _refuse("'rg' must be a list of [start, end] ranges", raw_ranges)
        commitment = cls(message.get("x"), message.get("g"), message.get("p"), message.get("j"),  # type: ignore[arg-type]
                         message.get("r"), message.get("d"), float(weight), tuple(members),  # type: ignore[arg-type]
                         message.get("h"), message.get("k"), message.get("s"), message.get("c", ""),  # type: ignore[arg-type]
                         _ranges(raw_ranges))
        problem = commitment._problem()
        if problem is not None or not isinstance(commitment.signature, bytes) or len(commitment.signature) != 64:
            raise _refuse(f"malformed commitment: {problem or 'the signature must be 64 bytes'}")
        return commitment

    @classmethod
    def from_compact(cls, message: Any, prefix: str, round_id: bytes, phase: int, part: int, role: str,
                     weight: float = 0.0, members: Sequence[int] = (), group: bytes = b"",
                     sender: PeerID | None = None, codec: str = "", ranges: Sequence[tuple[int, int]] = ()
                     ) -> "Commitment":
        """A compact form completed with its context; BadRequestError if malformed, or if its key is
        not ``sender``'s (when given). The signature is not checked here (:meth:`verify`)."""
        if not isinstance(message, dict):
            raise _refuse("a commitment must be a map", message)
        digest, key, signature = message.get("d"), message.get("k"), message.get("s")
        if not (isinstance(digest, bytes) and len(digest) == DIGEST_BYTES):
            raise _refuse(f"'d' must be a {DIGEST_BYTES}-byte digest", digest)
        if not (isinstance(key, bytes) and len(key) == 32 and isinstance(signature, bytes) and len(signature) == 64):
            raise _refuse("'k' and 's' must be a 32-byte key and a 64-byte signature")
        if sender is not None and not sender.matches(key):
            raise _refuse("the commitment's key is not the sender's")
        return cls(prefix, round_id, phase, part, role, digest, float(weight), tuple(int(m) for m in members), group,
                   key, signature, codec, _ranges(ranges))

    def _problem(self) -> str | None:
        """Why the fields break the wire bounds (None if they do not)."""
        if not isinstance(self.prefix, str) or len(self.prefix) > MAX_PREFIX_CHARS:
            return f"the prefix must be a string of at most {MAX_PREFIX_CHARS} characters"
        if not isinstance(self.round_id, bytes) or not 0 < len(self.round_id) <= MAX_ROUND_ID_BYTES:
            return f"the round id must be 1 to {MAX_ROUND_ID_BYTES} bytes"
        if not _is_int(self.phase, 256) or not _is_int(self.part, MAX_PART):
            return "phase and part must be small non-negative integers"
        if self.role not in ROLES:
            return f"the role must be one of {ROLES}"
        if not isinstance(self.digest, bytes) or len(self.digest) != DIGEST_BYTES:
            return f"the digest must be {DIGEST_BYTES} bytes"
        if not isinstance(self.weight, float) or not math.isfinite(self.weight):
            return "the weight must be finite"
        if not isinstance(self.group, bytes) or len(self.group) not in (0, DIGEST_BYTES):
            return f"the group digest must be {DIGEST_BYTES} bytes or empty"
        if len(self.members) > MAX_MEMBERS:
            return "too many members"
        if not isinstance(self.public_key, bytes) or len(self.public_key) != 32:
            return "the public key must be 32 bytes"
        if not isinstance(self.codec, str) or len(self.codec) > 64:
            return "the codec must be a name of at most 64 characters"
        if len(self.ranges) > MAX_RANGES:
            return "too many ranges"
        return None
