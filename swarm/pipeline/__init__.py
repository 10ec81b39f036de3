"""SWARM pipelines (algorithms.md section 1): a model split into stages, each served by a swarm of
interchangeable peers; trainers drive microbatches through them by stochastic wiring.

Data plane: :mod:`.registry` (stage announcements in the DHT), :mod:`.protocol` (``pipe.*`` wire
messages), :mod:`.wiring` (throughput EMA and the virtual-time balancer), :mod:`.server` (a stage
server: forward, stateless backward), :mod:`.client` (a trainer's pipeline client).
"""

from __future__ import annotations

import importlib
from typing import Any

# Lazy re-exports (PEP 562): `swarm join --help` / `swarm dht --help` read the pipeline's arguments from
# .roles without importing torch, which the client and server need.
_EXPORTS = {
    "PipelineClient": "client", "PipelineError": "client",
    "MAX_STAGES": "registry", "StageRecord": "registry", "announce": "registry", "fetch_stages": "registry",
    "stage_key": "registry", "stage_schema": "registry",
    "StageServer": "server",
    "NoServersError": "wiring", "PerformanceEMA": "wiring", "StageBalancer": "wiring",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
