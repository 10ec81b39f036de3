"""Start helper processes for tests and make sure they die with the test (killed by PID)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent


def start(args: list[str], ready_prefix: str = "/", timeout: float = 30.0) -> tuple[subprocess.Popen, str]:
    """Start ``python ARGS`` and return (process, first stdout line starting with ``ready_prefix``)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=ROOT)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{args} exited early: {proc.stderr.read()[-2000:]}")
            if line.strip().startswith(ready_prefix):
                return proc, line.strip()
        raise TimeoutError(f"{args} did not get ready in {timeout} s")
    except BaseException:
        stop(proc)
        raise


def stop(proc: subprocess.Popen) -> None:
    """Kill a process we started (by its PID) and reap it."""
    if proc.poll() is None:
        try:
            proc.kill()
        except ProcessLookupError:
            pass
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    for stream in (proc.stdout, proc.stderr):
        if stream:
            stream.close()


@contextlib.contextmanager
def running(args: list[str], ready_prefix: str = "/") -> Iterator[tuple[subprocess.Popen, str]]:
    proc, line = start(args, ready_prefix)
    try:
        yield proc, line
    finally:
        if sys.platform != "win32":
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, 18)  # SIGCONT, in case a test stopped it
        stop(proc)
