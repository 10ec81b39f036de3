"""What a newcomer hits first (issue 20, points 2, 9, 10): the packaged demo from any directory, missing
extras, exit codes and one-line errors, SIGHUP, Ctrl-C of the demo, ``--version``, ``--announce-addr``
and ``swarm runs`` for dead runs. Every command is a real process on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.processes import ROOT, ProcessGroup

pytestmark = pytest.mark.slow

DEAD_PEER = "/ip4/127.0.0.1/tcp/1/p2p/QmZvbzr4Agjw5sBQpbhPKa3M6CDoRSsHDnHSi5xYJHMHLr"


def swarm(args: list[str], cwd: Path | str = ROOT, timeout: float = 120, env: dict | None = None
          ) -> subprocess.CompletedProcess:
    """``python -m swarm ARGS`` to completion, this checkout's code (PYTHONPATH), from ``cwd``."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "swarm", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def one_line_error(done: subprocess.CompletedProcess) -> str:
    """The single stderr line of a failed command (no traceback, no log lines)."""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    return lines[0]


@contextlib.contextmanager
def busy_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def block_modules(directory: Path, *names: str) -> dict:
    """An environment in which ``import NAME`` fails as if NAME were not installed."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sitecustomize.py").write_text(
        "import sys\n"
        f"BLOCKED = {set(names)!r}\n"
        "class _Blocker:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in BLOCKED:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "        return None\n"
        "sys.meta_path.insert(0, _Blocker())\n")
    return {"PYTHONPATH": f"{directory}{os.pathsep}{ROOT}"}


# ---- point 2: the packaged demo, the extras


def test_demo_runs_from_any_directory_with_the_packaged_example(tmp_path):
    """From a directory without examples/, `swarm demo` finds its task in the package (the old code
    said 'examples/digits.py not found' and exited 2). A short run: it starts, trains and reports."""
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = swarm(["demo", "--peers", "2", "--out", "out", "--max-seconds", "12"], cwd=elsewhere, timeout=240)
    assert done.returncode in (0, 1), (done.returncode, done.stdout[-2000:], done.stderr[-2000:])
    assert "2 peers training digits" in done.stdout, done.stdout[-2000:]
    assert "summary" in done.stdout and (elsewhere / "out" / "loss_curves.png").exists()
    logs = [(elsewhere / "out" / f"peer{i}.log").read_text() for i in range(2)]
    assert any("created it" in log for log in logs), logs[0][-2000:]
    # expected events of a healthy run (a peer ahead or behind, nobody left to average with) are INFO
    for log in logs:
        for line in log.splitlines():
            if " WARNING " in line:
                assert not re.search(r"no other peer is at epoch|every other peer left|no group", line), line


def test_demo_without_the_extras_says_how_to_install_them(tmp_path):
    env = block_modules(tmp_path / "blocker", "matplotlib", "sklearn")
    started = time.monotonic()
    done = swarm(["demo", "--out", str(tmp_path / "out")], cwd=tmp_path, env=env, timeout=60)
    assert done.returncode == 2
    line = one_line_error(done)
    assert "matplotlib" in line and "scikit-learn" in line and "pip install 'swarm-training[demo]'" in line, line
    assert not (tmp_path / "out" / "bootstrap.log").exists()  # nothing was started
    assert time.monotonic() - started < 60


def test_join_of_the_digits_example_without_sklearn_says_install_the_extras(tmp_path):
    env = block_modules(tmp_path / "blocker", "sklearn")
    done = swarm(["join", "swarm.examples.digits:task", "--identity", str(tmp_path / "id.key")], cwd=tmp_path,
                 env=env, timeout=60)
    assert done.returncode == 2, done.stderr[-2000:]
    line = one_line_error(done)
    assert "pip install 'swarm-training[demo]'" in line, line


def test_demo_rejects_bad_arguments_with_one_line():
    for peers in ("0", "-1"):
        done = swarm(["demo", "--peers", peers], timeout=60)
        assert done.returncode == 2 and "--peers must be at least 1" in one_line_error(done)


# ---- point 9: exit codes, one line each


@pytest.mark.parametrize("command", ["peer", "dht"])
def test_a_busy_port_is_a_local_problem_not_the_network(command):
    with busy_port() as port:
        done = swarm([command, "--host", "127.0.0.1", "--port", str(port)], timeout=60)
    assert done.returncode == 6, (done.returncode, done.stderr[-2000:])
    line = one_line_error(done)
    assert f"cannot listen on 127.0.0.1:{port}: the port is in use" in line and "could not join" not in line, line


def test_swarm_join_on_a_busy_port_exits_6(tmp_path):
    pytest.importorskip("sklearn")
    with busy_port() as port:
        done = swarm(["join", "examples/digits.py", "--host", "127.0.0.1", "--port", str(port), "--identity",
                      str(tmp_path / "id.key")], timeout=120)
    assert done.returncode == 6, (done.returncode, done.stderr[-2000:])
    assert "the port is in use" in done.stderr and "could not join the swarm" not in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("problem", ["directory", "garbage"])
@pytest.mark.parametrize("command", ["dht", "peer", "identity"])
def test_an_unusable_identity_file_is_a_local_problem(tmp_path, problem, command):
    path = tmp_path / "identity.key"
    if problem == "directory":
        path.mkdir()
    else:
        path.write_bytes(b"\x00not a key\xff" * 10)
    args = ["identity", str(path)] if command == "identity" else [command, "--host", "127.0.0.1", "--identity", str(path)]
    done = swarm(args, timeout=60)
    assert done.returncode == 6, (done.returncode, done.stderr[-2000:])
    line = one_line_error(done)
    assert "unusable identity file" in line and str(path) in line and "could not join" not in line, line


def test_swarm_dht_network_failure_exits_with_the_network_code():
    done = swarm(["dht", "--host", "127.0.0.1", "--initial-peers", DEAD_PEER], timeout=120)
    assert done.returncode == 4, (done.returncode, done.stderr[-2000:])
    assert one_line_error(done).startswith("error: could not join the swarm: ")


def test_swarm_runs_network_failure_exits_4():
    done = swarm(["runs", "--initial-peers", DEAD_PEER], timeout=120)
    assert done.returncode == 4 and "could not join the swarm" in one_line_error(done)


@pytest.mark.parametrize("command", ["dht", "peer"])
def test_sighup_stops_a_peer_cleanly_like_sigterm(tmp_path, command):
    with ProcessGroup(tmp_path) as group:
        proc = group.spawn(command, ["-m", "swarm", command, "--host", "127.0.0.1", "--ping-interval", "60"]
                           if command == "peer" else ["-m", "swarm", command, "--host", "127.0.0.1"])
        group.wait_for(command, r"/ip4/127\.0\.0\.1/tcp/\d+/p2p/", timeout=60)
        os.kill(proc.pid, signal.SIGHUP)
        assert proc.wait(timeout=30) == 0, group.log(command)[-2000:]
        assert "stopped" in group.log(command)  # it left through its clean path, not killed by the signal


def _wait_until(condition, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)


@pytest.mark.parametrize("how", ["ctrl-c of the terminal", "SIGHUP to the demo"])
def test_an_interrupted_demo_says_interrupted_and_exits_130(tmp_path, how):
    """Ctrl-C reaches the demo and its peers (one process group): the old demo reported 'peer N exited
    with an error' for every peer and exited 1."""
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    out, log_path = tmp_path / "out", tmp_path / "demo.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "swarm", "demo", "--peers", "2", "--out", str(out),
                             "--max-seconds", "120"], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        def peers_joined() -> bool:
            logs = [out / f"peer{i}.log" for i in range(2)]
            return all(p.exists() and re.search(r"created it|joining run", p.read_text()) for p in logs)

        _wait_until(peers_joined, 120, "the demo's peers did not join their run", log_path)
        if how.startswith("ctrl-c"):
            os.killpg(proc.pid, signal.SIGINT)  # the demo's own session: only processes this test started
        else:
            os.kill(proc.pid, signal.SIGHUP)
        code = proc.wait(timeout=60)
        text = log_path.read_text()
        assert code == 130, (code, text[-3000:])
        assert "interrupted" in text and "exited with an error" not in text, text[-3000:]
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()


# ---- point 10: --version, --announce-addr, swarm runs


def test_version():
    done = swarm(["--version"], timeout=60)
    assert done.returncode == 0 and re.fullmatch(r"swarm \S+\n", done.stdout), done.stdout


def test_help_lists_every_command_and_the_exit_codes():
    done = swarm(["--help"], timeout=60)
    for command in ("peer", "ping", "dht", "join", "runs", "demo", "export", "identity"):
        assert command in done.stdout
    assert "exit codes" in done.stdout and "6 local setup" in done.stdout
    join = " ".join(swarm(["join", "--help"], timeout=60).stdout.split())
    assert "MB/s, not Mbit/s" in join and "--announce-addr" in join


class _Forwarder:
    """A TCP port forwarder on loopback (what a router does for a host behind port forwarding)."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def pipe(reader, writer):
            try:
                while data := await reader.read(1 << 16):
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                writer.close()

        async def handle(reader, writer):
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            except OSError:
                writer.close()
                return
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

        async def start():
            self.server = await asyncio.start_server(handle, "127.0.0.1", 0)
            self.port = self.server.sockets[0].getsockname()[1]
            self.ready.set()

        self.loop.run_until_complete(start())
        self.loop.run_forever()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def test_announce_addr_is_what_the_others_dial(tmp_path):
    """`swarm dht --port P --announce-addr 127.0.0.1:F` behind a forwarder F -> P: it prints (and tells
    others) F, and a peer joins through the printed address, i.e. through the forwarder."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    forwarder = _Forwarder(port)
    try:
        with ProcessGroup(tmp_path) as group:
            group.spawn("dht", ["-m", "swarm", "dht", "--host", "127.0.0.1", "--port", str(port),
                                "--announce-addr", f"127.0.0.1:{forwarder.port}"])
            address = group.wait_for("dht", r"--initial-peers (/ip4/\S+)", timeout=60).group(1)
            assert address.startswith(f"/ip4/127.0.0.1/tcp/{forwarder.port}/p2p/"), address
            from dht import DHT, get_dht_time
            # joining needs an authenticated answer from the peer id in the address, through the forwarder
            with DHT(initial_peers=[address], host="127.0.0.1") as joiner:
                assert joiner.store("announced", 1, get_dht_time() + 60)
        bad = swarm(["dht", "--host", "127.0.0.1", "--announce-addr", "nonsense"], timeout=60)
        assert bad.returncode == 2 and "--announce-addr 'nonsense'" in one_line_error(bad)
    finally:
        forwarder.close()


def test_swarm_runs_shows_a_dead_runs_last_epoch_and_hides_long_dead_runs(tmp_path):
    """A run whose only peer died 30 s ago (its progress record is 30 s old, epoch 7) is listed with 0
    peers, epoch 7 and 'dead, 30 s ago' (the old listing counted the dead peer as online); with
    --hide-after 10 it is hidden unless --all; a live run is listed as 'now'."""
    from dht import DHT, get_dht_time
    from swarm.progress import progress_key
    from swarm.runs import RunAnnouncement, announce_run

    with DHT(host="127.0.0.1") as dht:
        now = get_dht_time()
        for run_id, age, epoch in (("dead-run", 30.0, 7), ("live-run", 0.0, 3)):
            assert announce_run(dht, RunAnnouncement(run_id, "examples/digits.py", "ab" * 32, str(dht.peer_id),
                                                     now - 600, 256, {}))
            record = {"peer_id": f"peer-of-{run_id}", "epoch": epoch, "samples": 10, "samples_per_second": 50.0,
                      "loss": 0.5, "time": now - age}
            assert dht.store(progress_key(run_id), record, now + 600, subkey=f"peer-of-{run_id}")
        address = dht.get_visible_addresses()[0]
        shown = swarm(["runs", "--initial-peers", address], timeout=60)
        assert shown.returncode == 0, shown.stderr[-2000:]
        rows = {line.split()[0]: line for line in shown.stdout.splitlines()[1:] if line.strip()}
        dead = rows["dead-run"].split()
        assert dead[1] == "0" and dead[3] == "7", rows["dead-run"]
        assert re.search(r"dead, (29|30|31|3\d) s ago", rows["dead-run"]), rows["dead-run"]
        assert rows["live-run"].split()[1] == "1" and " now " in rows["live-run"], rows["live-run"]
        hidden = swarm(["runs", "--initial-peers", address, "--hide-after", "10"], timeout=60)
        assert "dead-run" not in hidden.stdout and "live-run" in hidden.stdout
        assert "1 run dead for over 10 s hidden: --all shows them" in hidden.stdout
        everything = swarm(["runs", "--initial-peers", address, "--hide-after", "10", "--all"], timeout=60)
        assert "dead-run" in everything.stdout and "live-run" in everything.stdout


def test_the_wheel_ships_the_examples(tmp_path):
    """`pip install .` must bring the example tasks along, or `swarm demo` outside a clone has no task."""
    import shutil

    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info next to the sources
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".bench-venv", "build", "dist", "*.egg-info", "__pycache__", ".hypothesis", "demo-output"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                            "-q", "-w", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    if built.returncode != 0 and "No module named" in built.stderr:
        pytest.skip(f"cannot build a wheel here: {built.stderr[-300:]}")
    assert built.returncode == 0, built.stderr[-2000:]
    import zipfile

    wheel, = tmp_path.glob("swarm_training-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("swarm/examples/__init__.py", "swarm/examples/digits.py", "swarm/examples/charlm.py",
                 "swarm/exitcodes.py", "swarm/export.py"):
        assert name in names, sorted(n for n in names if n.startswith("swarm/"))


def test_swarm_join_announces_the_announce_addr(tmp_path):
    pytest.importorskip("sklearn")
    done = swarm(["join", "examples/digits.py", "--host", "127.0.0.1", "--announce-addr", "127.0.0.1:45999",
                  "--identity", str(tmp_path / "id.key"), "--max-seconds", "1", "--quiet"], timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.search(r"^  /ip4/127\.0\.0\.1/tcp/45999/p2p/Qm\w+$", done.stdout, re.MULTILINE), done.stdout[-2000:]
