"""Concurrency budgets for handlers: at most ``per_key`` calls at once per key (a peer id) and
``total`` in all, taken before any work or allocation and always given back.

>>> slots = Slots(per_key=2, total=8, what="state requests")
>>> with slots.hold(ctx.peer_id):   # OverloadedError (the caller gets "overloaded") when spent
...     await serve(...)

The table holds an entry only for keys that hold a slot now, so it returns to its size however a
call ends (success, error, cancellation, disconnect).
"""

from __future__ import annotations

import contextlib
from typing import Hashable, Iterator

from .errors import OverloadedError

__all__ = ["Slots"]


class Slots:
    """At most ``per_key`` slots per key and ``total`` slots in all (both >= 1)."""

    def __init__(self, per_key: int, total: int, what: str = "calls"):
        if per_key < 1 or total < 1:
            raise ValueError("per_key and total must be at least 1")
        self.per_key, self.total, self.what = int(per_key), int(total), what
        self._held: dict[Hashable, int] = {}
        self._in_use = 0
        self.refused = 0  # calls refused so far (for tests and statistics)

    def __len__(self) -> int:
        """Slots in use now."""
        return self._in_use

    def held(self, key: Hashable) -> int:
        """Slots ``key`` holds now."""
        return self._held.get(key, 0)

    @property
    def keys(self) -> int:
        """Keys holding at least one slot (the size of the table)."""
        return len(self._held)

    def try_acquire(self, key: Hashable) -> bool:
        """Take a slot for ``key`` if both budgets allow; pair with :meth:`release`."""
        held = self._held.get(key, 0)
        if held >= self.per_key or self._in_use >= self.total:
            self.refused += 1
            return False
        self._held[key] = held + 1
        self._in_use += 1
        return True

    def release(self, key: Hashable) -> None:
        held = self._held.get(key, 0)
        if held <= 0:
            return
        if held == 1:
            del self._held[key]
        else:
            self._held[key] = held - 1
        self._in_use -= 1

    @contextlib.contextmanager
    def hold(self, key: Hashable) -> Iterator[None]:
        """A slot for ``key`` for the ``with`` block; OverloadedError when no slot is free."""
        if not self.try_acquire(key):
            scope = "from this peer" if self._held.get(key, 0) >= self.per_key else "in total"
            limit = self.per_key if scope == "from this peer" else self.total
            raise OverloadedError(f"too many concurrent {self.what} {scope} (limit {limit}); retry later")
        try:
            yield
        finally:
            self.release(key)
