"""The swarm peers running on this machine, so that they share its CPU cores instead of fighting.

Each ``swarm join`` registers itself as a small file ``PID`` (holding its process start time) in a
registry directory (default: ``peers/`` next to the default identity, i.e. ``$SWARM_HOME/peers`` or
``~/.config/swarm/peers``); :meth:`LocalPeers.count` counts the files whose process is still the same
one (a file left by a crashed peer, or a PID reused by another program, is removed). Without
``--threads`` the daemon gives torch ``max(1, cores // local peers)`` threads and re-checks while it
trains, since peers come and go (2 peers x 2 threads on 2 cores trained 6x slower than 1 thread each).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

__all__ = ["LocalPeers", "available_cores", "default_threads"]

logger = logging.getLogger(__name__)

MAX_ENTRIES = 4096  # a directory full of junk is not read without bound


def available_cores() -> int:
    """CPU cores this process may run on (its affinity where the platform tells, else the CPU count)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except (AttributeError, OSError):
        return max(os.cpu_count() or 1, 1)


def default_threads(local_peers: int, cores: int | None = None) -> int:
    """Torch threads for one of ``local_peers`` peers sharing ``cores`` (default: :func:`available_cores`)."""
    return max(1, (available_cores() if cores is None else cores) // max(local_peers, 1))


def _start_time(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, OSError, ValueError):
        return None


class LocalPeers:
    """This process's entry in the registry of local peers (removed by :meth:`close`)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.pid = os.getpid()
        self.path = self.directory / str(self.pid)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self.path.write_text(repr(_start_time(self.pid)))
            self.registered = True
        except OSError as e:  # a read-only home: count only ourselves
            logger.info("cannot register in %s (%s): assuming no other local peer", self.directory, e)
            self.registered = False

    def count(self) -> int:
        """Live local peers, this one included (at least 1)."""
        if not self.registered:
            return 1
        live = 0
        try:
            entries = list(os.scandir(self.directory))[:MAX_ENTRIES]
        except OSError:
            return 1
        for entry in entries:
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            if pid == self.pid:
                live += 1
                continue
            try:
                with open(entry.path, "rb") as f:
                    recorded = float(f.read(64).decode("ascii"))
            except (OSError, ValueError, UnicodeDecodeError):
                recorded = None
            started = _start_time(pid)
            if started is not None and (recorded is None or abs(started - recorded) < 1.0):
                live += 1  # (no start time readable yet: the file is being written)
            else:  # gone, or the PID now belongs to another program
                try:
                    os.unlink(entry.path)
                except OSError:
                    pass
        return max(live, 1)

    def close(self) -> None:
        if self.registered:
            self.registered = False
            try:
                self.path.unlink()
            except OSError:
                pass
