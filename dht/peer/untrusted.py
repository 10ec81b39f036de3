"""Formatting and logging of values that came from the network, always bounded.

A remote peer chooses what it sends: a string of 64 MiB, a list nested 1,000 deep, an int of a
million digits. ``str()``/``repr()`` of such a value can take seconds, raise ``RecursionError`` or
``ValueError``, or write megabytes into a log. Every message that mentions an untrusted value goes
through :func:`brief`, and every log line a remote peer can trigger goes through a
:class:`LogLimiter` (a token bucket per peer or address, with a bounded table of them).

>>> brief("x" * 1000, limit=12)
"'xxxxxxxxxx…' (1000 chars)"
>>> brief([[[]]])
'list of 1'
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Any, Hashable

__all__ = ["brief", "LogLimiter"]


def brief(value: Any, limit: int = 60) -> str:
    """A short, safe description of ``value``: the repr of a short scalar (strings and bytes cut to
    ``limit`` characters), else the type name and the length. Never raises, never recurses, and
    never returns more than about ``limit + 40`` characters."""
    try:
        if value is None or isinstance(value, (bool, float)):
            return repr(value)[:limit]
        if isinstance(value, int):
            if value.bit_length() > 200:
                return f"int of {value.bit_length()} bits"
            return repr(value)[:limit]
        if isinstance(value, str):
            if len(value) <= limit:
                return repr(value)
            return repr(value[: max(limit - 2, 1)])[:-1] + "…' (" + f"{len(value)} chars)"
        if isinstance(value, (bytes, bytearray, memoryview)):
            n = len(value) if not isinstance(value, memoryview) else value.nbytes
            head = bytes(value[: max(limit // 4, 1)]).hex()
            return f"{type(value).__name__} of {n} bytes ({head}{'…' if n > limit // 4 else ''})"
        if isinstance(value, (list, tuple, dict, set, frozenset)):
            return f"{type(value).__name__} of {len(value)}"
        return f"a {type(value).__name__[:40]}"
    except Exception:  # noqa: BLE001 - a hostile __len__ or __repr__ of some exotic type: never raise
        return "an unprintable value"


class LogLimiter:
    """Rate limit for log lines that remote peers can trigger: at most ``burst`` lines at once and
    ``rate`` lines per second per key (a peer id or an IP address), for at most ``max_keys`` keys
    (least recently used forgotten first). Suppressed lines are counted and the count is reported
    with the next line that passes.

    >>> limiter = LogLimiter(rate=0.1, burst=2)
    >>> limiter.log(logger, logging.WARNING, peer, "bad request from %s: %s", peer, brief(x))
    """

    def __init__(self, rate: float = 0.2, burst: float = 5.0, max_keys: int = 1024):
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self._buckets: collections.OrderedDict[Hashable, list[float]] = collections.OrderedDict()

    def allow(self, key: Hashable, now: float | None = None) -> tuple[bool, int]:
        """``(allowed, suppressed_before)``: whether a line for ``key`` may be written now, and how
        many lines of this key were suppressed since the last one allowed."""
        now = time.monotonic() if now is None else now
        bucket = self._buckets.pop(key, None)
        if bucket is None:
            bucket = [self.burst, now, 0]
            while len(self._buckets) >= self.max_keys:
                self._buckets.popitem(last=False)
        tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
        bucket[1] = now
        allowed = tokens >= 1.0
        suppressed = 0
        if allowed:
            tokens -= 1.0
            suppressed, bucket[2] = int(bucket[2]), 0
        else:
            bucket[2] += 1
        bucket[0] = tokens
        self._buckets[key] = bucket
        return allowed, suppressed

    def log(self, logger: logging.Logger, level: int, key: Hashable, message: str, *args: Any) -> bool:
        """Log ``message % args`` at ``level`` unless ``key`` is over its rate; ``args`` must already
        be bounded (use :func:`brief`). Never logs a traceback. Returns whether it logged."""
        if not logger.isEnabledFor(level):
            return False
        allowed, suppressed = self.allow(key)
        if allowed:
            if suppressed:
                message += f" ({suppressed} similar lines suppressed)"
            logger.log(level, message, *args)
        return allowed
