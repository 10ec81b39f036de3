"""Streaming DiLoCo's schedule and fragments (algorithms.md 7.2; torchft's ``local_sgd.py``).

The model's parameters are split into ``P`` fragments; each is averaged once every ``H`` inner steps,
on a staggered schedule: fragment ``p`` has the offset ``o_p = floor((p + 1) * H / P)`` and, at the
inner step ``t`` (counted from 1 since the start of training) with ``(t - o_p) mod H == 0``, its
pseudo-gradient is taken and its averaging round *starts* in the background; ``tau`` inner steps
later (``(t - o_p - tau) mod H == 0``) the round *finishes*: the outer step on the fragment's global
copy, then the merge into the local parameters. ``P <= H`` and ``tau * P < H`` (``tau < H / P``), so
at most one fragment is in flight at a time and the peak traffic is ``1 / P`` of DiLoCo's.

Pure functions (no torch): :func:`offsets`, :func:`events`, :func:`check`, :func:`partition`.
"""

from __future__ import annotations

from typing import Sequence

__all__ = ["offsets", "events", "check", "partition"]


def check(inner_steps: int, fragments: int, delay: int) -> None:
    """ValueError unless ``1 <= fragments <= inner_steps``, ``delay >= 0`` and ``delay * fragments < inner_steps``."""
    if not isinstance(inner_steps, int) or inner_steps < 1:
        raise ValueError(f"inner_steps must be a positive integer, got {inner_steps!r}")
    if not isinstance(fragments, int) or not 1 <= fragments <= inner_steps:
        raise ValueError(f"fragments must be an integer in [1, inner_steps={inner_steps}], got {fragments!r}")
    if not isinstance(delay, int) or delay < 0 or delay * fragments >= inner_steps:
        raise ValueError(f"fragment_overlap must be an integer >= 0 with fragment_overlap * fragments < inner_steps "
                         f"({inner_steps}), got {delay!r} with {fragments} fragments")


def offsets(inner_steps: int, fragments: int) -> list[int]:
    """``o_p = floor((p + 1) * H / P)`` for p in 0..P-1 (the last one is H)."""
    check(inner_steps, fragments, 0)
    return [(p + 1) * inner_steps // fragments for p in range(fragments)]


def events(step: int, inner_steps: int, fragment_offsets: Sequence[int], delay: int) -> tuple[list[int], list[int]]:
    """(fragments whose round finishes at inner step ``step``, fragments whose round starts there).
    Finishes come first (with ``delay`` 0 a fragment starts and finishes at the same step)."""
    finishing = [p for p, o in enumerate(fragment_offsets)
                 if step >= o + delay and (step - o - delay) % inner_steps == 0]
    starting = [p for p, o in enumerate(fragment_offsets) if step >= o and (step - o) % inner_steps == 0]
    return finishing, starting


def partition(sizes: Sequence[int], fragments: int | Sequence[Sequence[int]]) -> list[list[int]]:
    """Indices of the tensors (of ``sizes`` values each) in every fragment.

    An int ``P``: balanced by size, largest tensor first to the lightest fragment (ties: the lower
    index), each fragment's indices sorted; every fragment gets at least one tensor (``P`` at most the
    number of tensors). A sequence of index sequences: used as given once checked to be a partition
    of ``range(len(sizes))`` into non-empty fragments (e.g. the paper's strided blocks: block l in
    fragment l mod P)."""
    n = len(sizes)
    if isinstance(fragments, bool):
        raise TypeError("fragments must be an int or a sequence of index sequences")
    if isinstance(fragments, int):
        if not 1 <= fragments <= n:
            raise ValueError(f"fragments must be in [1, {n}] (the number of parameter tensors), got {fragments}")
        groups: list[list[int]] = [[] for _ in range(fragments)]
        loads = [0] * fragments
        for i in sorted(range(n), key=lambda i: (-sizes[i], i)):
            lightest = min(range(fragments), key=lambda f: (loads[f], len(groups[f]), f))
            groups[lightest].append(i)
            loads[lightest] += sizes[i]
        return [sorted(g) for g in groups]
    try:
        groups = [[int(i) for i in g] for g in fragments]
    except (TypeError, ValueError):
        raise TypeError("fragments must be an int or a sequence of sequences of parameter indices") from None
    flat = sorted(i for g in groups for i in g)
    if not groups or any(not g for g in groups) or flat != list(range(n)):
        raise ValueError(f"fragments must split the parameter indices 0..{n - 1} into non-empty groups, "
                         f"each index exactly once")
    return [sorted(g) for g in groups]
