"""What one member saw of an all-reduce round with commitments on, for checks after the round.

A :class:`RoundTranscript` (``StepResult.transcript``, ``AllReduceResult.transcript``) holds, per
phase (0: the butterfly, 1: recovery), the signed digests this member sent and received, the values
it received as a part owner (each verified against its sender's signed digest), the owners' signed
result digests (each verified against the averages this member received) and the mismatches it saw.
Everything signed is a :class:`~averaging.commitments.Commitment`, so a transcript's entries are
evidence a third party can check. The tensors are this member's copies (float32, the part's values
concatenated over the owner's ranges, in order): a transcript holds about one part per member of
the group, i.e. about the size of the averaged vector.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dht.peer.identity import PeerID

from .commitments import Commitment

__all__ = ["Mismatch", "PhaseTranscript", "RoundTranscript"]


@dataclass(frozen=True)
class Mismatch:
    """Data that did not match its signed digest: ``commitment`` (signed by its sender) and the digest
    of what arrived (``received_digest``); the sender was excluded from that part. Not by itself proof
    for a third party (the data is not signed): a round-local fault, like a malformed chunk."""

    member: int
    commitment: Commitment
    received_digest: bytes


@dataclass
class PhaseTranscript:
    """One phase as this member saw it; member indices are the group's."""

    number: int
    tag: bytes
    ranges: list[list[tuple[int, int]]]  # owner -> the ranges of the flat vector it reduced in this phase
    active: tuple[int, ...]
    sent: dict[int, Commitment] = field(default_factory=dict)  # owner -> my signed digest of my values for its part
    inputs: dict[int, Commitment] = field(default_factory=dict)  # member -> its signed digest of its values for my part
    received: dict[int, torch.Tensor] = field(default_factory=dict)  # member -> its values for my part (verified)
    results: dict[int, Commitment] = field(default_factory=dict)  # owner -> its signed result digest (verified)
    contributors: dict[int, list[int]] = field(default_factory=dict)  # owner -> the members in its result
    mismatches: list[Mismatch] = field(default_factory=list)

    def part_values(self, flat: torch.Tensor, owner: int) -> torch.Tensor:
        """``owner``'s part of ``flat`` (its ranges concatenated), as digests cover it."""
        return torch.cat([flat[lo:hi] for lo, hi in self.ranges[owner]]) if self.ranges[owner] else flat[:0]


@dataclass
class RoundTranscript:
    """One round at one member (see the module docstring)."""

    prefix: str
    group_id: bytes
    members: list[PeerID]
    me: int
    weight: float
    aggregator: str
    phases: list[PhaseTranscript] = field(default_factory=list)
    survivors: list[PeerID] = field(default_factory=list)
    result: torch.Tensor | None = None  # the averaged vector this member ended with (a copy)
    contribution: torch.Tensor | None = None  # my values as the owners decoded them (what my digests cover; a copy)

    @property
    def butterfly(self) -> PhaseTranscript:
        """Phase 0."""
        return self.phases[0]

    def commitments(self) -> list[Commitment]:
        """Every signed digest in the transcript (for equivocation checks across members)."""
        return [c for p in self.phases for table in (p.sent, p.inputs, p.results) for c in table.values()] + [
            m.commitment for p in self.phases for m in p.mismatches]
