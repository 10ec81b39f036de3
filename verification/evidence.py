"""Accusations that carry their own proof, and the check every peer runs before acting on one.

An :class:`Accusation` names the run (the ban list's scope: its commitments' prefixes are the run id
or under it, e.g. an averager's ``f"{run_id}.grads"``), the accused peer, the kind of lie, the round,
and its evidence: signed
commitments (:class:`~verification.commitments.Commitment`), the tensors they commit to, and a small
kind-specific ``detail`` map; the accuser signs the whole. :func:`verify_accusation` rebuilds the
disputed fact from the evidence alone and rules who lied: ``"accused"`` if the evidence proves it,
``"accuser"`` otherwise (a false or unprovable accusation is itself the accuser's lie). Kinds:

==========================  ============================================================================
kind                        evidence and what is checked
==========================  ============================================================================
``equivocation``            two commitments of the accused for the same slot (run, round, phase, part,
                            role, group) with different digests or weights.
``commitment_mismatch``     the accused's commitment ``c`` and a tensor that is *also* signed by the
                            accused (a second commitment of the same slot covering it) but does not
                            match ``c``. Data that merely arrived on a stream is not signed, so a plain
                            mismatch proves nothing to a third party: the all-reduce excludes such a
                            part (:class:`averaging.transcript.Mismatch`) and nobody publishes it.
``wrong_gradient``          the accused's ``input`` commitment and the part it covers (the digest must
                            match), plus ``detail`` for the caller-supplied ``recompute(acc)`` (e.g. the
                            accused's signed data claim): True if the accused's values are right.
``wrong_aggregate``         the accused owner's ``result`` commitment and its averaged part, the
                            ``input`` commitment and part of every member it names (each signed by that
                            member, same round, phase, part and group), ``detail["members"]``: the
                            group's PeerIDs in order (their :func:`group_digest` must be the one signed)
                            and ``detail["aggregator"]``: a name of :mod:`averaging.aggregators` or
                            ``"mean"``. The aggregate is recomputed from the inputs with their signed
                            weights; it must equal the result within a relative tolerance: the larger of
                            ``detail["tolerance"]`` (at most 0.1) and the floor of the codec the owner
                            signed (what its result's precision allows: 1e-3 for exact results, 2e-3
                            for float16 ones, 0.05 for 8-bit ones, 0.1 for others), so an accuser
                            cannot frame an honest owner with a tolerance of 0; CenteredClip: or its
                            fixed-point residual is small.
``bad_opening``             the accused's signed seed commitment and signed opening that does not match
                            it (:mod:`verification.randomness`), in ``detail``.
==========================  ============================================================================

Wire form (msgpack map; at most MAX_ACCUSATION_BYTES=15 MiB packed, one P2P message; up to
MAX_INLINE_BYTES=224 KiB it fits a DHT value, a bigger one is published by reference, see
:mod:`verification.banlist`):
``{"v": 1, "kind": str, "run": str (at most 512), "accused": PeerID bytes, "round": bytes (1 to 64),
"c": [full commitments] (at most 4097), "t": [[index of a commitment (int), {"dtype": "float32" |
"float16" | "bfloat16" | "float64", "shape": [int] (at most 4 dims), "data": little-endian bytes}]],
"detail": map, "time": float (DHT time), "k": accuser's key (32 bytes), "s": signature (64 bytes)}``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import msgpack
import torch

from dht.peer.errors import BadRequestError
from dht.peer.identity import Identity, PeerID, verify_signature
from dht.peer.untrusted import brief

from .commitments import ROLE_INPUT, ROLE_RESULT, Commitment, group_digest, tensor_digest

__all__ = ["KINDS", "MAX_ACCUSATION_BYTES", "MAX_INLINE_BYTES", "Accusation", "Verdict", "CannotVerify",
           "verify_accusation", "in_run",
           "encode_tensor", "decode_tensor", "DEFAULT_AGGREGATE_TOLERANCE"]

KINDS = ("commitment_mismatch", "equivocation", "wrong_aggregate", "wrong_gradient", "bad_opening")
MAX_ACCUSATION_BYTES = 15 << 20  # one P2P message (16 MiB) with room to spare
MAX_INLINE_BYTES = 224 << 10  # fits a DHT value (256 KiB, signature included)
MAX_COMMITMENTS = 4097
MAX_DETAIL_BYTES = 32 << 10
MAX_RUN_CHARS = 512
DEFAULT_AGGREGATE_TOLERANCE = 1e-3  # relative; float32 reductions in another order differ by ~1e-7
MAX_AGGREGATE_TOLERANCE = 0.1
# the least tolerance for a result sent with each codec (its quantization: float16 2**-11 per value, 8-bit
# levels about 1% of a value's scale); an owner may bias its results by this much undetected
RESULT_TOLERANCE = {"": DEFAULT_AGGREGATE_TOLERANCE, "none": DEFAULT_AGGREGATE_TOLERANCE,
                    "topk": DEFAULT_AGGREGATE_TOLERANCE, "float16": 2e-3, "powersgd": 2e-3, "uint8": 0.05,
                    "blockwise8": 0.05, "quantile8": 0.05}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
_DOMAIN = "swarm.accusation/1"


class CannotVerify(Exception):
    """The accusation cannot be judged here (e.g. ``wrong_gradient`` without a recompute function):
    nobody is blamed for it."""


def _refuse(what: str, value: Any = None) -> BadRequestError:
    return BadRequestError(what if value is None else f"{what} (got {brief(value)})")


def encode_tensor(tensor: torch.Tensor) -> dict:
    """A tensor as ``{"dtype", "shape", "data"}`` (little-endian bytes; CPU copy)."""
    tensor = tensor.detach().cpu().contiguous()
    name = str(tensor.dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"unsupported dtype {name}")
    return {"dtype": name, "shape": list(tensor.shape), "data": tensor.reshape(-1).view(torch.uint8).numpy().tobytes()}


def decode_tensor(message: Any) -> torch.Tensor:
    """The tensor of :func:`encode_tensor`'s map; BadRequestError if malformed."""
    if not isinstance(message, dict):
        raise _refuse("a tensor must be a map", message)
    dtype, shape, data = _DTYPES.get(message.get("dtype")), message.get("shape"), message.get("data")  # type: ignore[arg-type]
    if dtype is None:
        raise _refuse(f"'dtype' must be one of {sorted(_DTYPES)}", message.get("dtype"))
    if (not isinstance(shape, list) or len(shape) > 4
            or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 1 << 31 for s in shape)):
        raise _refuse("'shape' must be at most 4 non-negative ints", shape)
    size = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    if not isinstance(data, bytes) or len(data) != size:
        raise _refuse(f"'data' must be {size} bytes")
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape) if size else torch.empty(shape, dtype=dtype)


@dataclass(frozen=True)
class Verdict:
    """Who lied: ``"accused"`` (the evidence proves it) or ``"accuser"`` (it does not); ``reason``: why."""

    guilty: str
    reason: str

    @property
    def holds(self) -> bool:
        return self.guilty == "accused"


@dataclass(frozen=True)
class Accusation:
    """A signed accusation (see the module docstring); build with :meth:`make`."""

    kind: str
    run_id: str
    accused: PeerID
    round_id: bytes
    commitments: tuple[Commitment, ...]
    tensors: Mapping[int, torch.Tensor] = field(hash=False)  # commitment index -> the data it covers
    detail: Mapping[str, Any] = field(hash=False)
    time: float
    public_key: bytes  # the accuser's
    signature: bytes

    @property
    def accuser(self) -> PeerID:
        return PeerID.from_public_key(self.public_key)

    def _body(self) -> dict:
        return {"v": 1, "kind": self.kind, "run": self.run_id, "accused": self.accused.raw, "round": self.round_id,
                "c": [c.to_wire() for c in self.commitments],
                "t": [[int(i), encode_tensor(t)] for i, t in sorted(self.tensors.items())],
                "detail": dict(self.detail), "time": float(self.time)}

    def payload(self) -> bytes:
        """The bytes the accuser signs."""
        return msgpack.packb([_DOMAIN, self._body()], use_bin_type=True)

    @classmethod
    def make(cls, identity: Identity, kind: str, run_id: str, accused: PeerID, round_id: bytes,
             commitments: Sequence[Commitment] = (), tensors: Mapping[int, torch.Tensor] | None = None,
             detail: Mapping[str, Any] | None = None, time: float = 0.0) -> "Accusation":
        """``identity``'s signed accusation; ValueError if it breaks a bound (kind, sizes)."""
        accusation = cls(kind, run_id, accused, round_id, tuple(commitments), dict(tensors or {}), dict(detail or {}),
                         float(time), identity.public_key, b"")
        problem = accusation._problem()
        if problem is not None:
            raise ValueError(problem)
        accusation = dataclasses.replace(accusation, signature=identity.sign(accusation.payload()))
        if len(msgpack.packb(accusation.to_wire(), use_bin_type=True)) > MAX_ACCUSATION_BYTES:
            raise ValueError(f"the accusation packs to more than {MAX_ACCUSATION_BYTES} bytes")
        return accusation

    def signed_by_accuser(self) -> bool:
        return verify_signature(self.public_key, self.signature, self.payload())

    @property
    def evidence_id(self) -> str:
        """A short stable name of this accusation (hex of SHA-256 over its signed bytes)."""
        return hashlib.sha256(self.payload()).hexdigest()[:32]

    def to_wire(self) -> dict:
        return {**self._body(), "k": self.public_key, "s": self.signature}

    @classmethod
    def from_wire(cls, message: Any) -> "Accusation":
        """An accusation checked against the bounds (signatures are checked by :func:`verify_accusation`);
        BadRequestError otherwise."""
        if not isinstance(message, dict) or message.get("v") != 1:
            raise _refuse("an accusation must be a map with 'v': 1", message)
        commitments, tensors, detail = message.get("c"), message.get("t"), message.get("detail")
        if not isinstance(commitments, list) or len(commitments) > MAX_COMMITMENTS:
            raise _refuse(f"'c' must be a list of at most {MAX_COMMITMENTS} commitments")
        if (not isinstance(tensors, list) or len(tensors) > len(commitments)
                or not all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], int) and not isinstance(p[0], bool)
                           and 0 <= p[0] < len(commitments) for p in tensors)
                or len({p[0] for p in tensors}) != len(tensors)):
            raise _refuse("'t' must be a list of [commitment index, tensor] pairs")
        if not isinstance(detail, dict):
            raise _refuse("'detail' must be a map", detail)
        try:
            accused = PeerID(message.get("accused"))  # type: ignore[arg-type]
        except (ValueError, TypeError):
            raise _refuse("'accused' must be a PeerID") from None
        time = message.get("time")
        if isinstance(time, bool) or not isinstance(time, (int, float)) or not math.isfinite(time):
            raise _refuse("'time' must be a finite number", time)
        accusation = cls(message.get("kind"), message.get("run"), accused, message.get("round"),  # type: ignore[arg-type]
                         tuple(Commitment.from_wire(c) for c in commitments),
                         {int(i): decode_tensor(t) for i, t in tensors}, detail, float(time),
                         message.get("k"), message.get("s"))  # type: ignore[arg-type]
        problem = accusation._problem()
        if problem is not None:
            raise _refuse(f"malformed accusation: {problem}")
        if not isinstance(accusation.signature, bytes) or len(accusation.signature) != 64:
            raise _refuse("'s' must be a 64-byte signature")
        return accusation

    def _problem(self) -> str | None:
        if self.kind not in KINDS:
            return f"the kind must be one of {KINDS}"
        if not isinstance(self.run_id, str) or len(self.run_id) > MAX_RUN_CHARS:
            return f"the run id must be a string of at most {MAX_RUN_CHARS} characters"
        if not isinstance(self.round_id, bytes) or not 0 < len(self.round_id) <= 64:
            return "the round id must be 1 to 64 bytes"
        if len(self.commitments) > MAX_COMMITMENTS:
            return "too many commitments"
        if not all(0 <= i < len(self.commitments) for i in self.tensors):
            return "a tensor refers to no commitment"
        if not isinstance(self.public_key, bytes) or len(self.public_key) != 32:
            return "the accuser's key must be 32 bytes"
        packed = msgpack.packb(dict(self.detail), use_bin_type=True) if isinstance(self.detail, Mapping) else None
        if packed is None or len(packed) > MAX_DETAIL_BYTES:
            return f"the detail must be a map of at most {MAX_DETAIL_BYTES} bytes"
        return None


Recompute = Callable[[Accusation], "bool | None"]


def verify_accusation(accusation: Accusation, recompute: Recompute | None = None) -> Verdict:
    """Rule on ``accusation`` from its evidence alone (see the module docstring). ``recompute``: for
    ``wrong_gradient``, ``f(accusation) -> True`` if the accused's committed values are right, False
    if they are wrong, None if it cannot tell. Raises :class:`CannotVerify` when the accusation
    cannot be judged here (not signed by its accuser: it is nobody's; ``wrong_gradient`` without a
    verdict from ``recompute``); never blames anyone for that. Heavy: O(evidence) hashing, an
    aggregation for ``wrong_aggregate``; run it off the event loop."""
    if not accusation.signed_by_accuser():
        raise CannotVerify("the accusation is not signed by its accuser")
    if accusation.accused == accusation.accuser:
        return Verdict("accuser", "a peer accusing itself")
    for index, commitment in enumerate(accusation.commitments):
        if not commitment.verify():
            return Verdict("accuser", f"commitment {index} of the evidence has a bad signature")
        if not in_run(commitment.prefix, accusation.run_id) or commitment.round_id != accusation.round_id:
            return Verdict("accuser", f"commitment {index} is of another run or round")
    for index, tensor in accusation.tensors.items():
        if tensor_digest(tensor) != accusation.commitments[index].digest and accusation.kind != "commitment_mismatch":
            return Verdict("accuser", f"tensor {index} does not match its commitment")
    check = _CHECKS[accusation.kind]
    return check(accusation, recompute)


def in_run(prefix: str, run_id: str) -> bool:
    """Whether a commitment's (or seed message's) ``prefix`` belongs to run ``run_id``: the run id itself
    or a prefix under it (``f"{run_id}.grads"``, ``f"{run_id}/..."``)."""
    return prefix == run_id or prefix.startswith(run_id + ".") or prefix.startswith(run_id + "/")


def _by_accused(accusation: Accusation) -> list[Commitment]:
    return [c for c in accusation.commitments if c.sender == accusation.accused]


def _check_equivocation(accusation: Accusation, recompute: Recompute | None) -> Verdict:
    mine = _by_accused(accusation)
    for i, a in enumerate(mine):
        for b in mine[i + 1:]:
            if a.conflicts(b):
                return Verdict("accused", f"two different signed digests for {a.role} of part {a.part} "
                                          f"(phase {a.phase})")
    return Verdict("accuser", "no two conflicting commitments of the accused")


def _check_mismatch(accusation: Accusation, recompute: Recompute | None) -> Verdict:
    commitments = accusation.commitments
    for index, tensor in accusation.tensors.items():
        digest = tensor_digest(tensor)
        claimed = commitments[index]
        if claimed.sender != accusation.accused or digest == claimed.digest:
            continue
        attested = [c for c in _by_accused(accusation) if c.slot == claimed.slot and c.digest == digest]
        if attested:
            return Verdict("accused", "its signed digest does not match data it also signed")
    return Verdict("accuser", "no data signed by the accused that contradicts its commitment (unsigned data proves "
                              "nothing)")


def _check_gradient(accusation: Accusation, recompute: Recompute | None) -> Verdict:
    targets = [i for i in accusation.tensors if accusation.commitments[i].sender == accusation.accused
               and accusation.commitments[i].role == ROLE_INPUT]
    if not targets:
        return Verdict("accuser", "no committed input of the accused in the evidence")
    if recompute is None:
        raise CannotVerify("wrong_gradient needs a recompute function")
    right = recompute(accusation)
    if right is None:
        raise CannotVerify("the recompute function cannot tell")
    return Verdict("accuser", "the recomputed gradient matches") if right else Verdict(
        "accused", "its committed values differ from the recomputed gradient")


def _reducer(name: Any) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    from averaging import aggregators
    from averaging.allreduce import weighted_mean

    if name in ("mean", "weighted_mean"):
        return weighted_mean
    if not isinstance(name, str) or name not in aggregators.names():
        return None
    return aggregators.as_reducer(aggregators.get(name))


def _check_aggregate(accusation: Accusation, recompute: Recompute | None) -> Verdict:
    detail, commitments = accusation.detail, accusation.commitments
    results = [i for i, c in enumerate(commitments) if c.role == ROLE_RESULT and c.sender == accusation.accused
               and i in accusation.tensors]
    if len(results) != 1:
        return Verdict("accuser", "the evidence must hold exactly one result of the accused with its data")
    result = commitments[results[0]]
    raw_members = detail.get("members")
    try:
        members = [PeerID(m) for m in raw_members] if isinstance(raw_members, list) else None
    except (ValueError, TypeError):
        members = None
    if members is None or group_digest(members) != result.group or not result.group:
        return Verdict("accuser", "'members' is not the group the accused signed for")
    if result.part >= len(members) or members[result.part] != accusation.accused:
        return Verdict("accuser", "the accused does not own that part")
    reducer = _reducer(detail.get("aggregator"))
    if reducer is None:
        return Verdict("accuser", f"unknown aggregator {brief(detail.get('aggregator'))}")
    tolerance = detail.get("tolerance", DEFAULT_AGGREGATE_TOLERANCE)
    if (isinstance(tolerance, bool) or not isinstance(tolerance, (int, float))
            or not 0 <= tolerance <= MAX_AGGREGATE_TOLERANCE):
        return Verdict("accuser", "bad tolerance")
    tolerance = max(float(tolerance), RESULT_TOLERANCE.get(result.codec, MAX_AGGREGATE_TOLERANCE))
    inputs: dict[int, tuple[Commitment, torch.Tensor]] = {}
    for index, commitment in enumerate(commitments):
        if commitment.role != ROLE_INPUT or index not in accusation.tensors:
            continue
        same = ((commitment.phase, commitment.part, commitment.group, commitment.ranges)
                == (result.phase, result.part, result.group, result.ranges))
        sender = members.index(commitment.sender) if commitment.sender in members else -1
        if same and sender in result.members:
            inputs[sender] = (commitment, accusation.tensors[index])
    if sorted(inputs) != sorted(result.members) or not inputs:
        return Verdict("accuser", "the evidence lacks the committed input of some member of the result")
    order = sorted(inputs)
    x = torch.stack([inputs[m][1].reshape(-1).to(torch.float32) for m in order])
    weights = torch.tensor([inputs[m][0].weight for m in order], dtype=torch.float32)
    claimed = accusation.tensors[results[0]].reshape(-1).to(torch.float32)
    if claimed.numel() != x.shape[1]:
        return Verdict("accused", "its result has another length than its inputs")
    if not bool(torch.isfinite(claimed).all()):
        return Verdict("accused", "its result is not finite")
    try:
        expected = reducer(x, weights).to(torch.float32)
    except ValueError as e:
        return Verdict("accuser", f"the aggregator refuses the inputs: {brief(str(e), 100)}")
    error = float((claimed.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30))
    if error <= tolerance:
        return Verdict("accuser", f"the recomputed aggregate matches (relative error {error:.2e})")
    if detail.get("aggregator") == "centered_clip" and _is_centered_clip_fixed_point(x, weights, claimed, tolerance):
        return Verdict("accuser", "the result is a CenteredClip fixed point")
    return Verdict("accused", f"its result is off the recomputed aggregate by {error:.2e} (relative)")


def _is_centered_clip_fixed_point(x: torch.Tensor, weights: torch.Tensor, v: torch.Tensor, tolerance: float) -> bool:
    """The CenteredClip condition (algorithms.md §2.1): ``‖Σ w_i clip_τ(x_i − v)‖ / W <= tolerance · τ``,
    with the weights capped as the all-reduce caps them and the adaptive ``τ`` of
    :func:`averaging.aggregators.centered_clip` (the weighted median distance of the inputs to their
    coordinate-wise median)."""
    from averaging import aggregators

    w = aggregators.cap_weights(weights).double()
    start = aggregators.median(x, w)
    distances = (x.double() - start.double()).norm(dim=1)
    order = torch.argsort(distances)
    cumulative = torch.cumsum(w[order], 0)
    tau = float(distances[order][int(torch.searchsorted(cumulative, cumulative[-1] / 2))])
    if tau <= 0:
        return bool(torch.equal(v, start.to(v.dtype)))
    d = x.double() - v.double()
    scale = torch.clamp(tau / d.norm(dim=1).clamp_min(1e-300), max=1.0)
    residual = float((w[:, None] * scale[:, None] * d).sum(0).norm() / w.sum())
    return residual <= tolerance * tau


def _check_opening(accusation: Accusation, recompute: Recompute | None) -> Verdict:
    from .randomness import SeedCommitment, SeedOpening

    try:
        commitment = SeedCommitment.from_wire(accusation.detail.get("commit"))
        opening = SeedOpening.from_wire(accusation.detail.get("open"))
    except BadRequestError as e:
        return Verdict("accuser", f"malformed seed messages: {e}")
    if commitment.sender != accusation.accused or opening.sender != accusation.accused:
        return Verdict("accuser", "the seed messages are not the accused's")
    if not (commitment.verify() and opening.verify()):
        return Verdict("accuser", "a seed message has a bad signature")
    if not (in_run(commitment.run_id, accusation.run_id) and commitment.round_id == accusation.round_id):
        return Verdict("accuser", "the seed messages are of another run or round")
    if commitment.opened_by(opening):
        return Verdict("accuser", "the opening matches the commitment")
    return Verdict("accused", "its signed opening does not match its signed seed commitment")


_CHECKS: dict[str, Callable[[Accusation, Recompute | None], Verdict]] = {
    "equivocation": _check_equivocation,
    "commitment_mismatch": _check_mismatch,
    "wrong_gradient": _check_gradient,
    "wrong_aggregate": _check_aggregate,
    "bad_opening": _check_opening,
}
