"""``--dashboard-port`` and ``--dashboard-host`` of ``swarm join`` and ``swarm dht`` (no aiohttp import:
``swarm --help`` stays fast)."""

from __future__ import annotations

import argparse

__all__ = ["DEFAULT_PORT", "PORT_FALLBACKS", "OFF", "parse_dashboard_port", "add_dashboard_arguments"]

DEFAULT_PORT = 7780  # the first peer on a machine; the next ones take 7781, 7782, ...
PORT_FALLBACKS = 20  # ports tried after DEFAULT_PORT before any free port is taken
OFF = -1  # parse_dashboard_port("off")


def parse_dashboard_port(value: str) -> int | None:
    """``--dashboard-port`` values: ``off`` (returns :data:`OFF`: no dashboard), ``auto`` (None: 7780 or
    the next free port), or a port number 0-65535 (0: any free port). Raises ValueError naming the forms."""
    text = str(value).strip().lower()
    if text in ("off", "no", "none"):
        return OFF
    if text == "auto":
        return None
    if text.isdigit() and 0 <= int(text) < 65536:
        return int(text)
    raise ValueError(f"--dashboard-port must be a port 0-65535, 'auto' or 'off', got {str(value)[:40]!r}")


def _port_argument(value: str) -> int | None:
    try:
        return parse_dashboard_port(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_dashboard_arguments(p: argparse.ArgumentParser) -> None:
    """Add ``--dashboard-port`` (default auto) and ``--dashboard-host`` (default 127.0.0.1) to ``p``."""
    p.add_argument("--dashboard-port", type=_port_argument, default=None, metavar="PORT",
                   help=f"serve the live dashboard (web page, /api/status, /metrics) on this port; default auto: "
                        f"{DEFAULT_PORT}, or the next free one up to {DEFAULT_PORT + PORT_FALLBACKS} when other "
                        "peers on this machine hold it, else any free port (the URL is printed at start); "
                        "0: any free port; off: no dashboard")
    p.add_argument("--dashboard-host", default="127.0.0.1", metavar="HOST",
                   help="address the dashboard listens on (default 127.0.0.1: this machine only; 0.0.0.0 shows "
                        "it to the network, unauthenticated)")
