"""Gradient validation after an averaging round: who lied about its gradient, with proof.

Every member of a verified round publishes, with its round (the matchmaking ``gather``), a
:class:`~verification.recompute.SignedClaim`: the batches its contribution was computed from, the
parameters' state hash, and the block digests of the contribution itself. After the round, from the
member's :class:`~averaging.transcript.RoundTranscript`:

1. **Consistency** (every owner, every member, every round; cost: hashing one part): the values a
   member sent for this owner's part must hash to that member's claimed block digests. A member
   whose values do not, or who sent no valid claim, is *distrusted* locally (never grouped with
   again by this peer: :meth:`TrainingVerifier.is_distrusted`); it is not provable to others (the
   group's layout is not signed), so it is not published.
2. **Recomputation** (the pairs the shared randomness picks, :func:`choose_checks` of C's
   :mod:`verification.randomness`): the validator rebuilds the target's batches
   (:mod:`verification.recompute`), recomputes its gradient at the agreed parameters and compares the
   blocks it holds with a relative tolerance (1e-3). A mismatch is provable: the evidence
   (:class:`GradientEvidence`) is the target's signed claim and the blocks' values, which hash to the
   claim's digests; anyone holding the parameters of that state (:class:`ParameterHistory`) checks
   it with :class:`GradientChecker` (a recomputation of their own): guilty target, or false accuser.

A validator checks a target only when the target claims the validator's own state hash (a peer whose
state diverged re-downloads it; its gradient is not checkable meanwhile, robust aggregation bounds it).
"""

from __future__ import annotations

import collections
import hashlib
import logging
import math
import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from averaging.transcript import RoundTranscript
from dht.peer.identity import Identity, PeerID
from dht.peer.untrusted import brief

from .evidence import Accusation
from .recompute import (
    BLOCK_DIGEST_BYTES,
    DEFAULT_TOLERANCE,
    ClaimError,
    DataClaim,
    EpochBatches,
    SignedClaim,
    covered_blocks,
    recompute_gradient,
    relative_error,
)

__all__ = ["DEFAULT_PROBABILITY", "DIRECTED", "GUILTY", "INNOCENT", "UNKNOWN", "ParameterHistory", "GradientChecker",
           "CheckOutcome", "TrainingVerifier", "blocks_of"]

logger = logging.getLogger(__name__)

DEFAULT_PROBABILITY = 1 / 16  # a member is checked this often: the expected extra compute per peer is 1/16
DIRECTED = 0.75  # share of a validator's checks aimed at the most suspicious member (the rest: the drawn target)
GUILTY, INNOCENT, UNKNOWN = "guilty", "innocent", "unknown"


class ParameterHistory:
    """The parameters of the last ``keep`` (32) shared states, by state hash (copies, on the CPU), at
    most ``max_bytes`` (1 GiB) of them: what a checker needs to recompute a gradient claimed there."""

    def __init__(self, keep: int = 32, max_bytes: int = 1 << 30):
        self.keep, self.max_bytes = keep, max_bytes  # at least the newest state is kept, whatever its size
        self._states: collections.OrderedDict[str, list[torch.Tensor]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def remember(self, state_hash: str | None, params: Sequence[torch.Tensor]) -> None:
        if not state_hash:
            return
        with self._lock:
            if state_hash in self._states:
                self._states.move_to_end(state_hash)
                return
        copies = [p.detach().to("cpu", copy=True) for p in params]
        with self._lock:
            self._states[state_hash] = copies
            size = sum(t.numel() * t.element_size() for t in copies)
            while len(self._states) > max(1, min(self.keep, self.max_bytes // max(size, 1))):
                self._states.popitem(last=False)

    def get(self, state_hash: str) -> list[torch.Tensor] | None:
        with self._lock:
            return self._states.get(state_hash)

    def __contains__(self, state_hash: str) -> bool:
        with self._lock:
            return state_hash in self._states


@dataclass
class CheckOutcome:
    """A check's result: ``verdict`` GUILTY (the accused's values are not its claimed gradient),
    INNOCENT (they are) or UNKNOWN (the checker cannot tell: it lacks the claimed parameters, or the
    evidence does not hold together); ``error`` the relative error (NaN if not computed)."""

    verdict: str
    reason: str
    error: float = float("nan")


class GradientChecker:
    """Checks :class:`GradientEvidence` by recomputing the claimed gradient: the function a checker of a
    "wrong_gradient" accusation calls (``task``: the run's task; ``model_factory``: a fresh model of
    its architecture, used as scratch; ``history``: the parameters of recent states)."""

    def __init__(self, task: Any, model_factory: Callable[[], torch.nn.Module], history: ParameterHistory,
                 tolerance: float = DEFAULT_TOLERANCE, run_id: str | None = None):
        self.task, self.history, self.tolerance, self.run_id = task, history, tolerance, run_id
        self._model_factory = model_factory
        self._model: torch.nn.Module | None = None
        self._lock = threading.Lock()  # one recomputation at a time (the scratch model is shared)
        self.recomputations = 0
        self.recompute_seconds = 0.0

    def recompute(self, claim: DataClaim) -> torch.Tensor | None:
        """The claimed gradient (flat float32), None if this checker lacks the claimed parameters."""
        import time

        params = self.history.get(claim.state_hash)
        if params is None:
            return None
        with self._lock:
            if self._model is None:
                self._model = self._model_factory()
            started = time.perf_counter()
            try:
                return recompute_gradient(self.task, self._model, claim, params)
            finally:
                self.recomputations += 1
                self.recompute_seconds += time.perf_counter() - started

    def compare(self, claim: DataClaim, blocks: Sequence[tuple[int, torch.Tensor]],
                recomputed: torch.Tensor) -> CheckOutcome:
        if recomputed.numel() != claim.size:
            return CheckOutcome(GUILTY, f"the claim names {claim.size} values, the model has {recomputed.numel()}")
        sent = torch.cat([v for _, v in blocks])
        expected = torch.cat([recomputed[slice(*claim.block_range(k))] for k, _ in blocks])
        error = relative_error(sent, expected)
        if error <= self.tolerance:
            return CheckOutcome(INNOCENT, f"the values are the claimed gradient (relative error {error:.2e})", error)
        return CheckOutcome(GUILTY, f"the values are not the claimed gradient (relative error {error:.3g} > "
                                    f"{self.tolerance:g})", error)

    def check(self, claim: DataClaim, blocks: Sequence[tuple[int, torch.Tensor]]) -> CheckOutcome:
        """Whether ``blocks`` (``(k, values)``, each hashing to the claim's digest k: checked here) are
        the claimed gradient."""
        if self.run_id is not None and claim.run_id != self.run_id:
            return CheckOutcome(UNKNOWN, "the claim is for another run")
        if not blocks:
            return CheckOutcome(UNKNOWN, "no whole block of the claimed contribution")
        if any(_digest(v) != claim.digests[k] for k, v in blocks):
            return CheckOutcome(UNKNOWN, "the values do not hash to the claim's digests")
        try:
            recomputed = self.recompute(claim)
        except ValueError as e:  # the claimed batches do not hold the claimed samples: the claim is false
            return CheckOutcome(GUILTY, f"the claimed batches do not fit the claim: {brief(str(e), 120)}")
        except Exception as e:  # noqa: BLE001 - task code failing here proves nothing about the accused
            return CheckOutcome(UNKNOWN, f"the claimed batches cannot be rebuilt: {type(e).__name__}: "
                                         f"{brief(str(e), 120)}")
        if recomputed is None:
            return CheckOutcome(UNKNOWN, f"this peer does not hold the parameters of state {claim.state_hash[:12]}")
        return self.compare(claim, blocks, recomputed)


def _digest(values: torch.Tensor) -> bytes:
    data = values.detach().to(torch.float32).contiguous().numpy().astype("<f4", copy=False).tobytes()
    return hashlib.sha256(data).digest()[:BLOCK_DIGEST_BYTES]


def _valid_ranges(ranges: Any) -> bool:
    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    return isinstance(ranges, list) and len(ranges) <= 4096 and all(
        isinstance(r, list) and len(r) == 2 and is_int(r[0]) and is_int(r[1]) and 0 <= r[0] <= r[1] for r in ranges)


def blocks_of(claim: DataClaim, ranges: Sequence[tuple[int, int]], values: torch.Tensor
              ) -> list[tuple[int, torch.Tensor]]:
    """The whole blocks of ``claim``'s contribution inside ``values`` (a part: the concatenation of
    ``ranges`` of the flat vector)."""
    out = []
    for k, offset in covered_blocks(claim, ranges):
        lo, hi = claim.block_range(k)
        if offset + hi - lo <= values.numel():
            out.append((k, values.reshape(-1)[offset:offset + hi - lo]))
    return out


class TrainingVerifier:
    """One peer's side of gradient verification (thread-safe; the heavy work runs where it is called,
    e.g. in a background thread). ``identity`` signs this peer's claims."""

    def __init__(self, task: Any, run_id: str, identity: Identity, model_factory: Callable[[], torch.nn.Module],
                 *, probability: float = DEFAULT_PROBABILITY, tolerance: float = DEFAULT_TOLERANCE,
                 keep_states: int = 32):
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"the check probability must be in [0, 1], got {probability!r}")
        self.task, self.run_id, self.identity = task, run_id, identity
        self.probability, self.tolerance = float(probability), float(tolerance)
        self.history = ParameterHistory(keep_states)
        self.checker = GradientChecker(task, model_factory, self.history, tolerance, run_id=run_id)
        self._distrusted: dict[PeerID, str] = {}
        self._lock = threading.Lock()
        self.stats: collections.Counter[str] = collections.Counter()  # rounds, consistency checks, validations...

    # ---- the trainer's side

    def claim(self, source: EpochBatches, state_hash: str | None, contribution: torch.Tensor) -> dict:
        """This peer's signed claim (wire form, for the round's ``gather``)."""
        return SignedClaim.sign(self.identity, source.claim(state_hash or "", contribution)).to_wire()

    # ---- local distrust (inconsistent members)

    def distrust(self, peer_id: PeerID, reason: str) -> None:
        with self._lock:
            if peer_id not in self._distrusted:
                logger.warning("verification: distrusting %s: %s", peer_id.short(), reason)
                self._distrusted[peer_id] = reason[:200]
                self.stats["distrusted"] += 1

    def is_distrusted(self, peer_id: PeerID) -> bool:
        return peer_id in self._distrusted

    def distrusted(self) -> dict[PeerID, str]:
        with self._lock:
            return dict(self._distrusted)

    # ---- after a round

    def parse_claims(self, gathered: dict[PeerID, Any], key: str = "claim") -> dict[PeerID, SignedClaim]:
        """The members' valid signed claims for this run, by member (a member's ``gather`` dict holds
        its claim under ``key``, or the gathered value is the claim itself)."""
        out: dict[PeerID, SignedClaim] = {}
        for peer_id, value in gathered.items():
            wire = value.get(key) if isinstance(value, dict) and key in value else value
            try:
                signed = SignedClaim.from_wire(wire)
            except ClaimError as e:
                logger.debug("verification: %s sent no valid claim: %s", peer_id.short(), e)
                continue
            if signed.claim.peer_id == str(peer_id) and signed.claim.run_id == self.run_id:
                out[peer_id] = signed
        return out

    def held_blocks(self, transcript: RoundTranscript, claim: DataClaim, member: int
                    ) -> list[tuple[int, torch.Tensor]]:
        """The blocks of ``member``'s claimed contribution that this peer received whole, as owner."""
        out = []
        for phase in transcript.phases:
            values = phase.received.get(member)
            if values is None or transcript.me >= len(phase.ranges):
                continue
            for k, offset in covered_blocks(claim, phase.ranges[transcript.me]):
                lo, hi = claim.block_range(k)
                out.append((k, values[offset:offset + hi - lo]))
        return out

    def check_consistency(self, transcript: RoundTranscript, claims: dict[PeerID, SignedClaim]) -> list[PeerID]:
        """Step 1: every member whose values for this peer's part do not hash to its claimed blocks (or
        that sent no claim while its values are here) is distrusted; returns them."""
        self.stats["rounds"] += 1
        bad = []
        for member, peer_id in enumerate(transcript.members):
            if member == transcript.me or not any(member in p.received for p in transcript.phases):
                continue
            signed = claims.get(peer_id)
            if signed is None:
                self.distrust(peer_id, "it sent values without a valid signed claim")
                bad.append(peer_id)
                continue
            claim = signed.claim
            size = sum(hi - lo for ranges in transcript.phases[0].ranges for lo, hi in ranges)
            if claim.size != size:
                self.distrust(peer_id, f"its claim names {claim.size} values, the round averages {size}")
                bad.append(peer_id)
                continue
            if not self._blocks_hold(transcript, claim, member):
                self.distrust(peer_id, "its values are not the ones it claimed (block digests differ)")
                self.stats["inconsistent"] += 1
                bad.append(peer_id)
        return bad

    def suspicion(self, transcript: RoundTranscript, member: int) -> float:
        """How far ``member``'s values for this peer's part stray from the round's result there:
        ``(1 - cos) + |ln(‖x‖ / median ‖x_k‖)|`` (0 for a typical honest member, about 2 for a sign flip,
        ``ln 10`` more for x10 scaling, inf for zeros). 0 when this peer holds none of its values."""
        phase = transcript.phases[0]
        values = phase.received.get(member)
        if values is None or transcript.result is None or transcript.me >= len(phase.ranges):
            return 0.0
        result = phase.part_values(transcript.result, transcript.me).to(torch.float64)
        x = values.to(torch.float64).reshape(-1)
        norms = [float(v.to(torch.float64).norm()) for v in phase.received.values()]
        typical = sorted(norms)[len(norms) // 2] if norms else 0.0
        nx, nr = float(x.norm()), float(result.norm())
        if nx == 0.0 or typical == 0.0:
            return math.inf if nx == 0.0 and typical > 0.0 else 0.0
        cos = float(x @ result) / (nx * nr) if nr > 0 else 0.0
        return (1.0 - cos) + abs(math.log(nx / typical))

    def choose_target(self, transcript: RoundTranscript, randomness: bytes, drawn: PeerID,
                      excluded: Callable[[PeerID], bool] = lambda _: False) -> PeerID:
        """The member this peer validates when the shared randomness picked it as a validator (with
        ``drawn`` as its target): with probability :data:`DIRECTED` (decided by ``randomness``, so it
        is the same at every honest peer) the most suspicious member (:meth:`suspicion`) not
        ``excluded``, else ``drawn``. Directed checks reach blatant attackers within a few rounds;
        the drawn ones reach the subtle ones, which cannot tell which kind of check comes."""
        h = hashlib.sha256(b"swarm.verify.directed/1" + randomness + self.identity.peer_id.raw).digest()
        if int.from_bytes(h[:8], "little") / 2 ** 64 >= DIRECTED:
            return drawn
        me = transcript.members[transcript.me]
        scored = [(self.suspicion(transcript, i), str(p), p) for i, p in enumerate(transcript.members)
                  if p != me and not excluded(p)]
        scored = [s for s in scored if s[0] > 0.0]
        return max(scored)[2] if scored else drawn

    def owner_suspicion(self, transcript: RoundTranscript, owner: int) -> float:
        """How far ``owner``'s result for its part strays from this peer's own input there, relative to
        the other owners' (``‖r_j - x_j‖ / ‖x_j‖`` over its median across owners; 0 if unknown)."""
        phase = transcript.phases[0]
        mine, result = transcript.contribution, transcript.result
        if mine is None or result is None or owner >= len(phase.ranges) or not phase.ranges[owner]:
            return 0.0

        def distance(j: int) -> float:
            x = phase.part_values(mine, j).to(torch.float64)
            r = phase.part_values(result, j).to(torch.float64)
            norm = float(x.norm())
            return float((r - x).norm()) / norm if norm > 0 else 0.0

        distances = [distance(j) for j in range(len(phase.ranges)) if phase.ranges[j]]
        typical = sorted(distances)[len(distances) // 2] if distances else 0.0
        return distance(owner) / typical if typical > 0 else 0.0

    def choose_owner(self, transcript: RoundTranscript, randomness: bytes, drawn: PeerID,
                     excluded: Callable[[PeerID], bool] = lambda _: False) -> int | None:
        """The part owner whose result this peer audits when drawn as a validator: the drawn target's
        part, or (with probability :data:`DIRECTED`, from ``randomness``) the owner whose result strays
        most from this peer's input (:meth:`owner_suspicion`); None when it owns no part."""
        phase = transcript.phases[0]
        h = hashlib.sha256(b"swarm.verify.owner/1" + randomness + self.identity.peer_id.raw).digest()
        candidates = [j for j, p in enumerate(transcript.members) if j != transcript.me and j < len(phase.ranges)
                      and phase.ranges[j] and j in phase.results and not excluded(p)]
        if not candidates:
            return None
        if int.from_bytes(h[:8], "little") / 2 ** 64 < DIRECTED:
            return max(candidates, key=lambda j: (self.owner_suspicion(transcript, j), j))
        index = transcript.members.index(drawn) if drawn in transcript.members else -1
        return index if index in candidates else None

    def _blocks_hold(self, transcript: RoundTranscript, claim: DataClaim, member: int) -> bool:
        """Whether every whole block of ``member``'s values held here hashes to its claimed digest (one
        bytes conversion per phase, then a hash per block)."""
        for phase in transcript.phases:
            values = phase.received.get(member)
            if values is None or transcript.me >= len(phase.ranges):
                continue
            data = values.detach().to(torch.float32).contiguous().numpy().astype("<f4", copy=False).tobytes()
            for k, offset in covered_blocks(claim, phase.ranges[transcript.me]):
                lo, hi = claim.block_range(k)
                self.stats["consistency_checks"] += 1
                digest = hashlib.sha256(data[4 * offset:4 * (offset + hi - lo)]).digest()[:BLOCK_DIGEST_BYTES]
                if digest != claim.digests[k]:
                    return False
        return True

    def validate(self, transcript: RoundTranscript, target: PeerID, signed: SignedClaim
                 ) -> tuple[CheckOutcome, Accusation | None]:
        """Step 2 for one target (expensive: one recomputation of the target's gradient): the outcome,
        and a signed ``wrong_gradient`` accusation when the target is guilty: the target's input
        commitment and part as this owner received them, its signed claim and the part's ranges
        (detail), for :meth:`recompute` at every checker."""
        claim = signed.claim
        if target not in transcript.members:
            return CheckOutcome(UNKNOWN, "not a member of the round"), None
        member = transcript.members.index(target)
        for phase in transcript.phases:
            values, commitment = phase.received.get(member), phase.inputs.get(member)
            if values is None or commitment is None or transcript.me >= len(phase.ranges):
                continue
            ranges = [(int(lo), int(hi)) for lo, hi in phase.ranges[transcript.me]]
            blocks = blocks_of(claim, ranges, values)
            if not blocks:
                continue
            if not self._blocks_hold(transcript, claim, member):
                return CheckOutcome(UNKNOWN, "inconsistent with its claim (distrusted, not provable)"), None
            self.stats["validations"] += 1
            if commitment.weight != claim.samples:
                outcome = CheckOutcome(GUILTY, f"it committed weight {commitment.weight:g} but claims "
                                               f"{claim.samples} samples")
            else:
                outcome = self.checker.check(claim, blocks)
            if outcome.verdict != GUILTY:
                return outcome, None
            self.stats["guilty"] += 1
            accusation = Accusation.make(
                self.identity, "wrong_gradient", transcript.prefix, target, transcript.group_id, [commitment],
                {0: values.detach().clone()},
                {"claim": signed.to_wire(), "ranges": [list(r) for r in ranges], "reason": outcome.reason[:200]})
            return outcome, accusation
        return CheckOutcome(UNKNOWN, "this peer holds no whole block of the target's values"), None

    def recompute(self, accusation: Accusation) -> bool | None:
        """The ``recompute`` of :func:`verification.evidence.verify_accusation` for ``wrong_gradient``:
        True if the accused's committed part is its claimed gradient, False if not (or if its committed
        weight is not its claimed sample count), None if this peer cannot tell (it lacks the claimed
        parameters, or the evidence does not tie the part to the claim)."""
        try:
            signed = SignedClaim.from_wire(accusation.detail.get("claim"))
        except ClaimError:
            return None
        claim = signed.claim
        ranges = accusation.detail.get("ranges")
        if claim.peer_id != str(accusation.accused) or not _valid_ranges(ranges):
            return None
        inputs = [i for i in accusation.tensors if accusation.commitments[i].sender == accusation.accused
                  and accusation.commitments[i].role == "input"]
        if not inputs:
            return None
        commitment, values = accusation.commitments[inputs[0]], accusation.tensors[inputs[0]]
        assert isinstance(ranges, list)  # _valid_ranges
        blocks = blocks_of(claim, [(int(a), int(b)) for a, b in ranges], values.reshape(-1).to(torch.float32))
        outcome = self.checker.check(claim, blocks)
        if outcome.verdict == UNKNOWN:
            return None
        if commitment.weight != claim.samples:
            return False
        return outcome.verdict == INNOCENT

