"""The live dashboard every ``swarm join`` and ``swarm dht`` serves (issue 18): a web page drawn from
:func:`swarm.status.collect_status`, its JSON API and the peer's Prometheus metrics.

>>> server = await start_dashboard(node, view, metrics, host="127.0.0.1", port=0)   # on the DHT's loop
>>> server.url
'http://127.0.0.1:43117/'
>>> await server.close()

Routes: ``/`` (the page), ``/static/...`` (its JS and CSS, shipped in the package), ``/api/status``
(the status JSON, schema version 1 in :mod:`swarm.status`), ``/events`` (server-sent events: one
status JSON a second) and ``/metrics`` (Prometheus text). :mod:`swarm.dashboard.server` has the
details; :mod:`swarm.dashboard.options` the command-line flags. Attributes load lazily, so the flags
do not import aiohttp.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["DEFAULT_PORT", "PORT_FALLBACKS", "DashboardError", "DashboardServer", "StatusCache",
           "add_dashboard_arguments", "parse_dashboard_port", "start_dashboard", "serve_for", "close_for"]

_LAZY = {"DEFAULT_PORT": "options", "PORT_FALLBACKS": "options", "add_dashboard_arguments": "options",
         "parse_dashboard_port": "options", "DashboardError": "server", "DashboardServer": "server",
         "StatusCache": "server", "start_dashboard": "server", "serve_for": "server",
         "close_for": "server"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
