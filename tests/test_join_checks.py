"""``swarm join`` checks what it can before it touches the network, pins more than the task code, says
why a silent bootstrap peer fails, honours Ctrl+C while bootstrapping, and shares the machine's
cores with the other local peers (issue 20, points 3, 5, 7 and 8). Real processes on loopback.

The "before any networking" tests point ``--initial-peers`` at a TCP server that accepts and never
answers (:class:`SilentServer`): a daemon that dialled it first would hang there for the bootstrap
timeout and exit with the network code 4 instead of 2, and the server counts the connections.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from dht import Identity
from swarm.local_peers import LocalPeers, available_cores, default_threads

from .processes import ROOT, ProcessGroup, run_swarm

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX processes and signals")

TINY = textwrap.dedent("""
    import torch
    from swarm import Task

    def data(shard, num_shards, batch_size, seed):
        g = torch.Generator().manual_seed(seed)
        for _ in range(8):
            x = torch.randn(batch_size, 4, generator=g)
            yield x, x.sum(-1)

    def loss(model, batch):
        return torch.nn.functional.mse_loss(model(batch[0]).sum(-1), batch[1])

    task = Task(name="tiny-checks", model=lambda: torch.nn.Linear(4, 1),
                optimizer=lambda p: torch.optim.SGD(p, lr=0.05), data=data, loss=loss,
                batch_size=16, target_batch_size=64)
""")


def _task(directory: Path, extra: str = "", name: str = "tiny_checks.py") -> str:
    path = directory / name
    path.write_text(TINY + textwrap.dedent(extra))
    return str(path)


def _args(task: str, tmp_path: Path, name: str, *extra: str, peers: list[str] = ()) -> list[str]:
    args = ["join", task, "--host", "127.0.0.1", "--identity", str(tmp_path / f"{name}.key"), "--quiet",
            "--matchmaking-time", "0.5"]
    if peers:
        args += ["--initial-peers", *peers]
    return args + list(extra)


def _assert_failure(result: subprocess.CompletedProcess, code: int, *phrases: str) -> None:
    assert result.returncode == code, f"exit code {result.returncode}, expected {code}:\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    assert result.stderr.startswith("error: ") or "\nerror: " in result.stderr, result.stderr
    for phrase in phrases:
        assert phrase in result.stderr, f"{phrase!r} not in:\n{result.stderr}"


class SilentServer:
    """Accepts TCP connections on loopback and never sends a byte (not a swarm peer)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.address = f"/ip4/127.0.0.1/tcp/{self.port}/p2p/{Identity().peer_id}"
        self.accepted = threading.Event()
        self.connections: list[socket.socket] = []
        self._closed = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            self.connections.append(conn)
            self.accepted.set()

    def __enter__(self) -> "SilentServer":
        return self

    def __exit__(self, *exc_info) -> None:
        self._closed = True
        self._thread.join(timeout=5)
        for conn in self.connections:
            conn.close()
        self.sock.close()


# ---------------------------------------------------------------- point 8: checks before networking

@pytest.mark.parametrize("extra, phrase", [
    (["--shard", "3/2"], "--shard must be I/N with 0 <= I < N, got '3/2'"),
    (["--shard", "one/2"], "--shard must be I/N with 0 <= I < N, got 'one/2'"),
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--threads", "0"], "--threads must be at least 1, got 0"),
    (["--max-seconds", "-1"], "--max-seconds must be positive"),
])
def test_bad_arguments_are_refused_before_any_networking(tmp_path, extra, phrase):
    with SilentServer() as silent:
        started = time.monotonic()
        result = run_swarm(_args(_task(tmp_path), tmp_path, "p", *extra, peers=[silent.address]), timeout=60)
        _assert_failure(result, 2, phrase)
        assert not silent.connections, "the daemon dialled the network before checking its arguments"
        assert time.monotonic() - started < 30


@pytest.mark.parametrize("extra, phrase", [
    ("""
     def loss(model, batch):
         raise RuntimeError("labels are missing")
     task.loss = loss
     """, "task error in loss(): RuntimeError: labels are missing"),
    ("""
     def loss(model, batch):
         return model(batch[0])  # not a scalar
     task.loss = loss
     """, "task error in loss(): TypeError: loss() must return a scalar tensor, got a tensor of shape (16, 1)"),
    ("""
     def data(shard, num_shards, batch_size, seed):
         raise FileNotFoundError("digits.csv")
         yield
     task.data = data
     """, "task error in data(): FileNotFoundError: digits.csv"),
    ("""
     def data(shard, num_shards, batch_size, seed):
         return iter(())
     task.data = data
     """, "task error in data(): data(0, 1, 16, seed) yielded no batch"),
    ("""
     def model():
         raise ValueError("no such layer")
     task.model = model
     """, "task error in model(): ValueError: no such layer"),
    ("""
     task.model = lambda: torch.nn.Linear(5, 1)  # does not fit the data
     """, "task error in loss(): RuntimeError"),
    ("""
     task.optimizer_options = {"mdoe": "diloco"}
     """, "task error in optimizer_options: unknown optimizer option(s) 'mdoe'"),
])
def test_a_broken_task_is_reported_before_any_networking(tmp_path, extra, phrase):
    with SilentServer() as silent:
        result = run_swarm(_args(_task(tmp_path, extra), tmp_path, "p", peers=[silent.address]), timeout=60)
        _assert_failure(result, 2, phrase)
        assert not silent.connections, "the daemon dialled the network before trying the task"


# ---------------------------------------------------------------- point 7: a silent bootstrap peer

@pytest.mark.slow
def test_a_bootstrap_peer_that_never_answers_is_named_with_the_reason(tmp_path):
    with SilentServer() as silent:
        result = run_swarm(_args(_task(tmp_path), tmp_path, "p", "--threads", "1", peers=[silent.address]),
                           timeout=90)
        _assert_failure(result, 4, "could not join the swarm", silent.address,
                        "waiting for the handshake (is this a swarm peer? is the port right?)")
        assert "timed out after" in result.stderr and silent.connections


def test_ctrl_c_is_honoured_at_once_during_bootstrap(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    with SilentServer() as silent:
        proc = subprocess.Popen([sys.executable, "-m", "swarm", *_args(_task(tmp_path), tmp_path, "p", "--threads", "1",
                                                                        peers=[silent.address])],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                stdin=subprocess.DEVNULL)
        try:
            assert silent.accepted.wait(60), "the daemon never dialled the bootstrap peer"
            time.sleep(0.3)  # well inside the bootstrap's 6 s handshake timeout
            interrupted = time.monotonic()
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=30)
            waited = time.monotonic() - interrupted
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=10)
        assert proc.returncode == 130, (proc.returncode, out, err)
        assert "interrupted" in out and "Traceback" not in err, (out, err)
        assert waited < 5.0, f"Ctrl+C took {waited:.1f} s (the bootstrap timeout is 6 s)"


# ---------------------------------------------------------------- point 3: what a run pins

PINNING = """
from dataclasses import replace
other = replace(task, optimizer_options={"mode": "diloco", "outer_lr": 0.5}, target_batch_size=128)
other_lr = replace(task, optimizer_options={"compression": "float16"}, hyperparameters={"lr": 0.1})
"""


@pytest.mark.slow
def test_a_run_pins_the_task_attribute_optimizer_options_and_sizes(tmp_path):
    task = _task(tmp_path, PINNING)
    with ProcessGroup(tmp_path / "logs") as group:
        address = group.bootstrap()
        creator = run_swarm(_args(task, tmp_path, "a", "--threads", "1", "--run-id", "pinned", "--max-epochs", "1",
                                  peers=[address]))
        assert creator.returncode == 0, creator.stderr
        assert "run 'pinned' is new: this peer created it" in creator.stdout

        # the same file, so the same code hash, but another attribute with other options
        result = run_swarm(_args(task + ":other", tmp_path, "b", "--threads", "1", "--run-id", "pinned",
                                 "--max-epochs", "1", peers=[address]))
        _assert_failure(result, 3, "refusing to join run 'pinned'",
                        "\n  task attribute: the run has 'task', this peer 'other'",
                        "\n  optimizer mode: the run has 'sync', this peer 'diloco'",
                        "\n  optimizer outer_lr: the run has 0.7, this peer 0.5",
                        "\n  optimizer compression: the run has None, this peer 'float16'",  # DiLoCo's default
                        "\n  target_batch_size: the run has 64, this peer 128")
        assert "task code" not in result.stderr  # the code is the same: only what differs is listed
        assert result.stderr.count("\n  ") == 5, result.stderr
        assert "this peer created it" not in result.stdout

        result = run_swarm(_args(task + ":other_lr", tmp_path, "c", "--threads", "1", "--run-id", "pinned",
                                 "--max-epochs", "1", peers=[address]))
        _assert_failure(result, 3, "optimizer compression: the run has None, this peer 'float16'",
                        "hyperparameters['lr']: the run has '(not set)', this peer 0.1",
                        "task attribute: the run has 'task', this peer 'other_lr'")

        # the same task and settings join (the per-peer --batch-size and --matchmaking-time may differ)
        same = run_swarm(_args(task, tmp_path, "d", "--threads", "1", "--run-id", "pinned", "--max-epochs", "2",
                               "--batch-size", "8", peers=[address]))
        assert same.returncode == 0, same.stderr
        assert "joining run 'pinned' created by" in same.stdout and "pinned settings" in same.stdout


def test_settings_differences_bound_what_an_announcement_holds():
    from swarm.runs import RunAnnouncement, settings_differences

    base = {"run_id": "r", "task": "t.py", "task_hash": "a" * 64, "creator": "Qm", "created": 1.0}
    assert RunAnnouncement.parse({**base, "settings": {"x": [1, 2]}}) is None  # not a scalar: ignored
    assert RunAnnouncement.parse({**base, "settings": {f"k{i}": i for i in range(65)}}) is None
    assert RunAnnouncement.parse({**base, "settings": {"x": "y" * 201}}) is None
    old = RunAnnouncement.parse(base)  # an announcement of an older version pins only the code
    assert old is not None and old.settings == {}
    assert settings_differences(old, "t.py", "a" * 64, {"optimizer mode": "sync"}, {}) == []
    new = RunAnnouncement.parse({**base, "settings": {"optimizer mode": "sync", "batch_size": 16}})
    assert settings_differences(new, "t.py", "a" * 64, {"optimizer mode": "sync", "batch_size": 16}, {}) == []
    lines = settings_differences(new, "t.py", "b" * 64, {"optimizer mode": "diloco", "batch_size": 16.0}, {})
    assert len(lines) == 3 and lines[0].startswith("task code: ") and "'sync'" in lines[2], lines
    assert lines[1] == "batch_size: the run has 16, this peer 16.0"


# ---------------------------------------------------------------- point 5: cores shared by local peers

def test_the_local_peer_registry_counts_live_processes_only(tmp_path):
    directory = tmp_path / "peers"
    me = LocalPeers(directory)
    try:
        assert me.count() == 1
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        (directory / str(dead.pid)).write_text("12345.0")  # a crashed peer's file
        (directory / "junk").write_text("x")
        sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            import psutil

            (directory / str(sleeper.pid)).write_text(repr(psutil.Process(sleeper.pid).create_time()))
            assert me.count() == 2
            assert not (directory / str(dead.pid)).exists()
            (directory / str(sleeper.pid)).write_text("1.0")  # the PID belongs to another program now
            assert me.count() == 1
        finally:
            sleeper.kill()
            sleeper.wait()
    finally:
        me.close()
    assert not me.path.exists()
    assert default_threads(2, cores=2) == 1 and default_threads(3, cores=16) == 5 and default_threads(4, cores=2) == 1


@pytest.mark.slow
def test_local_peers_divide_the_cores_by_default(tmp_path, monkeypatch):
    monkeypatch.setenv("SWARM_HOME", str(tmp_path / "home"))  # this test's own registry of local peers
    cores = available_cores()
    task = _task(tmp_path)
    with ProcessGroup(tmp_path / "logs") as group:
        group.spawn("a", ["-m", "swarm", "--log-level", "INFO", *_args(task, tmp_path, "a", "--run-id", "solo-a",
                                                                       "--max-seconds", "150")])
        first = group.wait_for("a", r"torch threads: (\d+) \((\d+) CPU cores shared by (\d+) local swarm peer", 60)
        assert first.groups() == (str(default_threads(1, cores)), str(cores), "1"), first.group(0)
        group.wait_for("a", r"this peer created it", 60)
        group.spawn("b", ["-m", "swarm", *_args(task, tmp_path, "b", "--run-id", "solo-b", "--max-seconds", "150")])
        second = group.wait_for("b", r"torch threads: (\d+) \((\d+) CPU cores shared by (\d+) local swarm peers", 60)
        assert second.groups() == (str(default_threads(2, cores)), str(cores), "2"), second.group(0)
        if default_threads(1, cores) != default_threads(2, cores):  # the first peer follows while it trains
            group.wait_for("a", rf"torch threads: {default_threads(1, cores)} -> {default_threads(2, cores)} "
                                r"\(2 local swarm peers now\)", 40)
        group.spawn("c", ["-m", "swarm", *_args(task, tmp_path, "c", "--run-id", "solo-c", "--threads", "3",
                                                "--max-epochs", "1")])
        group.wait_for("c", r"torch threads: 3 \(--threads\)", 60)
        group.procs["c"].wait(timeout=60)
        for name in ("a", "b"):
            assert group.stop(name) in (0, 130), group.log(name)[-2000:]
    assert not [p for p in (tmp_path / "home" / "peers").iterdir()], "a peer left its registry entry behind"
