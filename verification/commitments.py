"""Commitments for verification: signed tensor digests (the averaging layer makes and checks them in
its all-reduce, :mod:`averaging.commitments`; this is their public face above it) and the checks that
verification runs on collections of them.

>>> from verification.commitments import tensor_digest, Commitment
>>> c = Commitment.sign(identity, "my-run", round_id, phase=0, part=3, role="input",
...                     digest=tensor_digest(values), weight=32.0)
>>> c.verify() and c.matches(values)                 # signature, then the data (O(bytes))
>>> Commitment.from_wire(c.to_wire()) == c           # full self-contained form, for evidence

A digest is SHA-256 over ``dtype | shape | little-endian bytes``; the signed payload binds the run
prefix, round id, phase, the group's member list (:func:`group_digest`), part index, role (``"input"``
/ ``"result"``), sender, weight, (results) the aggregated member indices, the codec whose decoded
values it covers and the part's ranges of the flat vector (``commitment.ranges``: a check of a part
needs no layout from whoever presents it).
"""

from __future__ import annotations

from typing import Iterable

from averaging.commitments import (
    DIGEST_BYTES,
    ROLE_INPUT,
    ROLE_RESULT,
    ROLES,
    Commitment,
    TensorHasher,
    group_digest,
    tensor_digest,
)

__all__ = ["DIGEST_BYTES", "ROLE_INPUT", "ROLE_RESULT", "ROLES", "Commitment", "TensorHasher", "tensor_digest",
           "group_digest", "find_equivocation"]


def find_equivocation(commitments: Iterable[Commitment]) -> tuple[Commitment, Commitment] | None:
    """The first pair of validly signed commitments for one slot (prefix, round, phase, part, role,
    sender) with different contents, or None: such a pair proves its sender equivocated. Invalid
    signatures are skipped (they prove nothing)."""
    seen: dict[tuple, Commitment] = {}
    for commitment in commitments:
        if not commitment.verify():
            continue
        first = seen.setdefault(commitment.slot, commitment)
        if first is not commitment and first.conflicts(commitment):
            return first, commitment
    return None
