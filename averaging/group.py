"""An averaging group as matchmaking agreed on it: the same at every member."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dht import PeerID

__all__ = ["GroupInfo"]


@dataclass
class GroupInfo:
    """A group as agreed in matchmaking (the leader's ``begin`` message, :mod:`.protocol`)."""

    group_id: bytes
    members: list[PeerID]  # ordered; the order decides who owns which part
    part_sizes: list[int]  # values each member reduces (0: client-mode or slow peers)
    bandwidths: list[float | None] = field(default_factory=list)  # MB/s announced (None: unknown)
    client_mode: list[bool] = field(default_factory=list)  # cannot be dialed: it calls the others
    gathered: list[Any] = field(default_factory=list)  # metadata each member contributed

    def is_client(self, member: int) -> bool:
        """Whether ``member`` is in client mode (accepts no connections)."""
        return member < len(self.client_mode) and bool(self.client_mode[member])

    def bandwidth(self, member: int) -> float | None:
        """``member``'s announced bandwidth (None: unknown)."""
        return self.bandwidths[member] if member < len(self.bandwidths) else None
