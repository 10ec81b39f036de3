"""Exit codes of the ``swarm`` commands, and one clear line for what went wrong when a peer starts.

====  =========================================================================================
code  meaning
====  =========================================================================================
0     success
1     the command ran but did not succeed (``swarm ping``: no reply; ``swarm demo``: target not
      reached or a peer failed)
2     bad arguments, or the task does not load / fails its check (argparse's usage errors are 2 too)
3     the run differs from this peer (task code, optimizer options, hyperparameters)
4     network: could not reach or join the swarm (no initial peer answered)
5     unusable checkpoint
6     local setup: cannot listen (port in use, no such address), identity file unusable (a
      directory, not a key, unreadable) or in use by another swarm process
130   interrupted (Ctrl-C, SIGTERM or SIGHUP); the peer left the swarm cleanly
====  =========================================================================================

Imports nothing heavy: ``swarm dht`` uses it without importing torch.
"""

from __future__ import annotations

import errno

__all__ = ["EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "EXIT_RUN", "EXIT_NETWORK", "EXIT_CHECKPOINT", "EXIT_LOCAL",
           "EXIT_INTERRUPTED", "EXIT_CODES_HELP", "startup_error"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_RUN, EXIT_NETWORK, EXIT_CHECKPOINT, EXIT_LOCAL = 0, 1, 2, 3, 4, 5, 6
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = ("exit codes: 0 success; 1 did not succeed (ping: no reply, demo: target not reached); "
                   "2 bad arguments or task; 3 the run differs from this peer; 4 network (could not join the "
                   "swarm); 5 unusable checkpoint; 6 local setup (port in use, identity file unusable or in use); "
                   "130 interrupted")


def startup_error(e: BaseException, host: str = "", port: int = 0, identity: object = None) -> tuple[int, str]:
    """(exit code, one-line message) for an exception raised while a peer starts (``P2P.create``,
    ``DHTNode.create``, ``DHT(...)``): local problems get :data:`EXIT_LOCAL`, the network
    :data:`EXIT_NETWORK`, anything else :data:`EXIT_USAGE`."""
    from dht import IdentityError, P2PError

    if isinstance(e, TimeoutError):  # an OSError since Python 3.11, but a network matter
        return EXIT_NETWORK, f"could not join the swarm: timed out ({e or 'no answer'})"
    if isinstance(e, IdentityError):
        return EXIT_LOCAL, f"unusable identity file: {e} (give another --identity PATH, or move this file away)"
    if isinstance(e, OSError) and e.filename is not None:  # the identity file or its directory
        where = e.filename if identity is None else identity
        return EXIT_LOCAL, f"unusable identity file {where}: {e.strerror or e}"
    if isinstance(e, OSError):
        where = f"{host or '0.0.0.0'}:{port}"
        if e.errno == errno.EADDRINUSE:
            return EXIT_LOCAL, (f"cannot listen on {where}: the port is in use (choose another --port, or "
                                "--port 0 for any free port)")
        if e.errno == errno.EADDRNOTAVAIL:
            return EXIT_LOCAL, f"cannot listen on {where}: this machine has no such address (check --host)"
        if e.errno in (errno.EACCES, errno.EPERM):
            return EXIT_LOCAL, f"cannot listen on {where}: permission denied (ports below 1024 need privileges)"
        return EXIT_LOCAL, f"cannot listen on {where}: {e.strerror or e}"
    if isinstance(e, P2PError):
        return EXIT_NETWORK, f"could not join the swarm: {e}"
    if isinstance(e, ValueError):  # e.g. a malformed --announce-addr
        return EXIT_USAGE, str(e)
    return EXIT_USAGE, f"{type(e).__name__}: {e}"
