"""Memory of a process tree, from /proc (Linux): shared by the benchmark scripts (stdlib only, so
that the hivemind side, which runs in its own virtualenv, can use it too)."""

from __future__ import annotations

import os

__all__ = ["children", "tree_memory_mb", "tree_pss_mb"]


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (empty if it is gone)."""
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return found


def tree_memory_mb(root: int) -> tuple[float, float]:
    """(PSS, RSS) in MB of ``root`` and all its descendants; PSS splits shared pages fairly."""
    pss_kb = rss_kb = 0
    stack = [root]
    while stack:
        pid = stack.pop()
        stack += children(pid)
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss_kb += int(line.split()[1])
                    elif line.startswith("Pss:"):
                        pss_kb += int(line.split()[1])
                        break
        except OSError:
            pass
    return pss_kb / 1024, rss_kb / 1024


def tree_pss_mb(root: int) -> float:
    """Proportional set size (MB) of ``root`` and all its descendants (shared pages split fairly)."""
    return tree_memory_mb(root)[0]
