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
import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from averaging.transcript import RoundTranscript
from dht.peer.identity import Identity, PeerID
from dht.peer.untrusted import brief

from .recompute import (
    BLOCK_DIGEST_BYTES,
    DEFAULT_TOLERANCE,
    ClaimError,
    DataClaim,
    EpochBatches,
    SignedClaim,
    block_digests,
    covered_blocks,
    recompute_gradient,
    relative_error,
)

__all__ = ["DEFAULT_PROBABILITY", "GUILTY", "INNOCENT", "UNKNOWN", "ParameterHistory", "GradientEvidence",
           "GradientChecker", "CheckOutcome", "TrainingVerifier", "MAX_EVIDENCE_VALUES"]

logger = logging.getLogger(__name__)

DEFAULT_PROBABILITY = 1 / 16  # a member is checked this often: the expected extra compute per peer is 1/16
MAX_EVIDENCE_VALUES = 1 << 22  # float32 values an accusation's blocks may carry (16 MiB)
GUILTY, INNOCENT, UNKNOWN = "guilty", "innocent", "unknown"


class ParameterHistory:
    """The parameters of the last ``keep`` shared states, by state hash (copies, on the CPU): what a
    checker needs to recompute a gradient claimed at one of them."""

    def __init__(self, keep: int = 32):
        self.keep = keep
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
            while len(self._states) > self.keep:
                self._states.popitem(last=False)

    def get(self, state_hash: str) -> list[torch.Tensor] | None:
        with self._lock:
            return self._states.get(state_hash)

    def __contains__(self, state_hash: str) -> bool:
        with self._lock:
            return state_hash in self._states


@dataclass(frozen=True)
class GradientEvidence:
    """What a "wrong_gradient" accusation carries: the accused's signed claim and blocks of its
    contribution (``(k, values)``: block ``k``'s float32 values, which hash to the claim's digest k)."""

    claim: SignedClaim
    blocks: tuple[tuple[int, torch.Tensor], ...]

    def to_wire(self) -> dict:
        return {"claim": self.claim.to_wire(),
                "blocks": [[k, v.detach().to(torch.float32).contiguous().numpy().astype("<f4").tobytes()]
                           for k, v in self.blocks]}

    @classmethod
    def from_wire(cls, value: Any) -> "GradientEvidence":
        """Parse untrusted evidence (ClaimError if malformed; the digests are checked by the checker)."""
        if not isinstance(value, dict) or set(value) != {"claim", "blocks"}:
            raise ClaimError("gradient evidence must be a dict with the keys claim, blocks")
        claim = SignedClaim.from_wire(value["claim"])
        blocks = value["blocks"]
        if not isinstance(blocks, list) or not 0 < len(blocks) <= len(claim.claim.digests):
            raise ClaimError("gradient evidence: blocks must be a non-empty list, at most one per claimed block")
        parsed, seen, total = [], set(), 0
        for item in blocks:
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], int)
                    and not isinstance(item[0], bool) and isinstance(item[1], bytes)):
                raise ClaimError(f"gradient evidence: a block must be [index, float32 bytes], got {brief(item)}")
            k, data = item
            if not 0 <= k < len(claim.claim.digests) or k in seen:
                raise ClaimError(f"gradient evidence: bad or repeated block index {brief(k)}")
            lo, hi = claim.claim.block_range(k)
            if len(data) != 4 * (hi - lo):
                raise ClaimError(f"gradient evidence: block {k} must hold {hi - lo} float32 values")
            total += hi - lo
            if total > MAX_EVIDENCE_VALUES:
                raise ClaimError("gradient evidence: too many values")
            seen.add(k)
            parsed.append((k, torch.frombuffer(bytearray(data), dtype=torch.float32)))
        return cls(claim, tuple(parsed))

    def values(self) -> torch.Tensor:
        return torch.cat([v for _, v in self.blocks])

    def digests_hold(self) -> bool:
        """Whether every block's values hash to the claim's digest for it."""
        claim = self.claim.claim
        return all(block_digests(v, claim.block)[0] == claim.digests[k] for k, v in self.blocks)


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

    def check(self, evidence: GradientEvidence) -> CheckOutcome:
        claim = evidence.claim.claim
        if self.run_id is not None and claim.run_id != self.run_id:
            return CheckOutcome(UNKNOWN, "the claim is for another run")
        if not evidence.digests_hold():
            return CheckOutcome(UNKNOWN, "the values do not hash to the claim's digests")
        try:
            recomputed = self.recompute(claim)
        except Exception as e:  # noqa: BLE001 - e.g. the claimed batches cannot be built (task code)
            return CheckOutcome(GUILTY if isinstance(e, ValueError) else UNKNOWN,
                                f"the claimed batches cannot be rebuilt: {type(e).__name__}: {brief(str(e), 120)}")
        if recomputed is None:
            return CheckOutcome(UNKNOWN, f"this peer does not hold the parameters of state {claim.state_hash[:12]}")
        return self.compare(claim, evidence.blocks, recomputed)


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
        self.stats = collections.Counter()  # rounds, consistency_checks, inconsistent, validations, accusations

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
                 ) -> tuple[CheckOutcome, GradientEvidence | None]:
        """Step 2 for one target (expensive: one recomputation of the target's gradient): the outcome,
        and the evidence for an accusation when the target is guilty."""
        claim = signed.claim
        if target not in transcript.members:
            return CheckOutcome(UNKNOWN, "not a member of the round"), None
        blocks = self.held_blocks(transcript, claim, transcript.members.index(target))
        if not blocks:
            return CheckOutcome(UNKNOWN, "this peer holds no whole block of the target's values"), None
        if not self._blocks_hold(transcript, claim, transcript.members.index(target)):
            return CheckOutcome(UNKNOWN, "inconsistent with its claim (distrusted, not provable)"), None
        self.stats["validations"] += 1
        try:
            recomputed = self.checker.recompute(claim)
        except ValueError as e:
            outcome = CheckOutcome(GUILTY, f"the claimed batches do not fit: {brief(str(e), 120)}")
        else:
            if recomputed is None:
                return CheckOutcome(UNKNOWN, f"no parameters for state {claim.state_hash[:12]}"), None
            outcome = self.checker.compare(claim, blocks, recomputed)
        if outcome.verdict != GUILTY:
            return outcome, None
        self.stats["guilty"] += 1
        return outcome, GradientEvidence(signed, tuple((k, v.clone()) for k, v in blocks))

    def check_evidence(self, evidence_wire: Any) -> CheckOutcome:
        """Check a "wrong_gradient" accusation's evidence (wire form) by recomputing it."""
        try:
            evidence = GradientEvidence.from_wire(evidence_wire)
        except ClaimError as e:
            return CheckOutcome(UNKNOWN, f"malformed evidence: {e}")
        return self.checker.check(evidence)

