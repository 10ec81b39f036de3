"""swarm: peer-to-peer training of PyTorch models over the internet.

User-facing API: :class:`swarm.Task` (a training job), :class:`swarm.Optimizer` (collaborative
optimizer over a :class:`dht.DHT`), :func:`swarm.export_state_dict` (a checkpoint as a plain
``state_dict`` of the task's model), the example tasks in :mod:`swarm.examples`, and the ``swarm``
command line (:mod:`swarm.cli`). Attributes load lazily so that ``swarm dht`` (a bootstrap peer)
never imports torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["Task", "Optimizer", "load_task", "export_state_dict", "__version__"]

_LAZY = {"Task": "swarm.task", "load_task": "swarm.task", "Optimizer": "swarm.optimizer",
         "export_state_dict": "swarm.export"}


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from .cli import _version
        return _version()
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'swarm' has no attribute {name!r}")
