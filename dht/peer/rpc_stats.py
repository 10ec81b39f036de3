"""Per-method RPC counters of a peer: plain ints and floats, updated by the multiplexer on every
message, read at scrape time (``swarm.metrics`` turns them into Prometheus series).

One :class:`MethodStats` per (method, side): bytes of messages sent and received on its streams
(msgpack payloads, without frame headers and encryption overhead), calls finished and failed, their
total duration and a histogram over :data:`SECONDS_BUCKETS` (seconds from opening the stream to its
close: a unary call's round trip on the calling side, the handler's time on the serving side).

The method label is bounded, so a hostile caller cannot make the table grow: inbound calls are
counted under the method's name only once the peer found a handler for it (calls of unknown methods
count as :data:`OTHER`), outbound calls under the methods this peer's own code calls; each side keeps
at most ``max_methods`` names, the rest count as :data:`OTHER` too.

Counting can be switched off for a whole process with ``SWARM_METRICS=0`` in the environment (only
to measure what it costs: ``benchmarks/metrics.py``); :func:`enabled` reads it.
"""

from __future__ import annotations

import bisect
import os

__all__ = ["MethodStats", "RpcStats", "SECONDS_BUCKETS", "OTHER", "enabled"]

OTHER = "other"
SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.01, 0.025, 0.1, 0.25, 1.0, 2.5, 10.0, 60.0)  # histogram bounds, s


def enabled() -> bool:
    """False when ``SWARM_METRICS=0`` is set (no counting at all; for overhead measurements)."""
    return os.environ.get("SWARM_METRICS", "1") != "0"


class MethodStats:
    """Counters of one method on one side. ``buckets[i]``: calls that took at most
    ``SECONDS_BUCKETS[i]`` seconds and more than the bound before (not cumulative); the last one
    counts the calls longer than the largest bound."""

    __slots__ = ("bytes_sent", "bytes_received", "calls", "failures", "seconds", "buckets")

    def __init__(self) -> None:
        self.bytes_sent = 0
        self.bytes_received = 0
        self.calls = 0
        self.failures = 0
        self.seconds = 0.0
        self.buckets = [0] * (len(SECONDS_BUCKETS) + 1)

    def observe(self, seconds: float, failed: bool) -> None:
        """One finished call of ``seconds`` (failed: ended by an error or a cancellation)."""
        self.calls += 1
        if failed:
            self.failures += 1
        self.seconds += seconds
        self.buckets[bisect.bisect_left(SECONDS_BUCKETS, seconds)] += 1


class RpcStats:
    """The counters of one peer: ``outbound`` and ``inbound`` map a method name to its
    :class:`MethodStats` (at most ``max_methods`` names each, plus :data:`OTHER`)."""

    def __init__(self, max_methods: int = 128):
        self.max_methods = max_methods
        self.outbound: dict[str, MethodStats] = {}
        self.inbound: dict[str, MethodStats] = {}

    def entry(self, method: str, inbound: bool) -> MethodStats:
        """The counters of ``method`` on one side (created on first use, :data:`OTHER` past the cap).
        Inbound: call it only for a method this peer serves."""
        table = self.inbound if inbound else self.outbound
        stats = table.get(method)
        if stats is None:
            if len(table) >= self.max_methods:
                method = OTHER
                stats = table.get(method)
            if stats is None:
                stats = table[method] = MethodStats()
        return stats

    def unknown_call(self, nbytes: int) -> None:
        """An inbound call of a method this peer does not serve (its OPEN frame's bytes)."""
        stats = self.entry(OTHER, True)
        stats.bytes_received += nbytes
        stats.observe(0.0, True)

    def methods(self) -> set[str]:
        return set(self.outbound) | set(self.inbound)
