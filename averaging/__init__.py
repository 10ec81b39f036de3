"""Averaging layer: DHT matchmaking, butterfly all-reduce with exact recovery, gossip, compression.

:class:`Averager` (synchronous, over a :class:`dht.DHT`) is the facade of :class:`AsyncAverager`
(asyncio, over a :class:`dht.DHTNode` on the caller's loop, e.g. in simulations on the virtual clock)."""

from .averager import AsyncAverager, Averager, StepResult
from .errors import AveragingError, MatchmakingError
from .gossip import Gossip

__all__ = ["AsyncAverager", "Averager", "StepResult", "Gossip", "AveragingError", "MatchmakingError"]
