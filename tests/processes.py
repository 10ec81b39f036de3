"""Start helper processes for tests and make sure they die with the test (killed by PID)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
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


class ProcessGroup:
    """The processes of one test: each writes stdout and stderr to ``DIR/NAME.log`` (no pipe to fill
    up); on exit every one still alive is killed by its PID and reaped, even when the test failed.

    >>> with ProcessGroup(tmp_path) as group:
    ...     address = group.bootstrap()
    ...     group.spawn("peer0", ["-m", "swarm", "join", ...])
    ...     group.wait_for("peer0", "created it", timeout=60)
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}
        self._files: list = []

    def spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        """Start ``python ARGS`` (cwd: the repository); output goes to ``NAME.log`` (appended)."""
        if name in self.procs and self.procs[name].poll() is None:
            raise RuntimeError(f"{name} is still running")
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
        log = open(self.path(name), "a")
        self._files.append(log)
        proc = subprocess.Popen([sys.executable, *args], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, text=True, env=env, cwd=ROOT)
        self.procs[name] = proc
        return proc

    def path(self, name: str) -> Path:
        return self.directory / f"{name}.log"

    def log(self, name: str) -> str:
        path = self.path(name)
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_for(self, name: str, pattern: str, timeout: float, start: int = 0) -> "re.Match":
        """Wait until ``NAME.log`` (from character ``start`` on) matches the regex ``pattern``.
        Raises with the log's tail if the process exits first or ``timeout`` seconds pass."""
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.log(name)[start:], re.MULTILINE)
            if match:
                return match
            proc = self.procs[name]
            if proc.poll() is not None:  # one last look: it may have written the line just before exiting
                match = re.search(pattern, self.log(name)[start:], re.MULTILINE)
                if match:
                    return match
                raise AssertionError(f"{name} exited ({proc.returncode}) before printing {pattern!r}:\n"
                                     f"{self.log(name)[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} did not print {pattern!r} within {timeout} s:\n{self.log(name)[-3000:]}")
            time.sleep(0.1)

    def bootstrap(self, name: str = "bootstrap", timeout: float = 30.0) -> str:
        """Start ``swarm dht --host 127.0.0.1`` and return its address for ``--initial-peers``."""
        self.spawn(name, ["-m", "swarm", "dht", "--host", "127.0.0.1", "--report-interval", "3600"])
        return self.wait_for(name, r"--initial-peers (/ip4/127\.0\.0\.1/\S+)", timeout).group(1)

    def kill(self, name: str) -> None:
        """SIGKILL (``kill -9``) the process by its PID and reap it."""
        proc = self.procs[name]
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def stop(self, name: str, grace: float = 15.0) -> int | None:
        """SIGTERM by PID (a clean leave), SIGKILL after ``grace`` seconds; returns the exit code."""
        proc = self.procs[name]
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.kill(name)
        return proc.returncode

    def __enter__(self) -> "ProcessGroup":
        return self

    def __exit__(self, *exc_info) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGCONT)  # in case a test stopped it
                    os.kill(proc.pid, signal.SIGKILL)
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        for f in self._files:
            f.close()


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The complete JSON lines of ``path`` (a line being written right now is skipped)."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return records


def run_swarm(args: list[str], timeout: float = 120.0) -> subprocess.CompletedProcess:
    """Run ``python -m swarm ARGS`` to completion (killed if it takes longer than ``timeout``)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "swarm", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
