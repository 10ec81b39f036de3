"""The DHT over real sockets: 32 peers on loopback in 8 OS processes (tests/dht_worker.py, 4 peers each).

Every peer stores and reads every key; subkeys merge; records expire; latest=True finds the newest
value; after kill -9 of a third of the processes every record is still found by every survivor and
by peers that join afterwards. The 32-peer swarm is shared by the tests of this module (the churn
test, which kills part of it, runs last); every process is killed by its PID at the end.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest

from .processes import ROOT, stop

pytestmark = [pytest.mark.slow, pytest.mark.skipif(sys.platform == "win32", reason="POSIX processes and signals")]

WORKERS = 8
PEERS_PER_WORKER = 4
RPC_TIMEOUT = 5.0  # seconds; generous: 40 peers share 2 cores
START_TIMEOUT = 60.0  # seconds for one worker process to print READY
COMMAND_TIMEOUT = 60.0  # seconds for one batch of commands to be answered

_ids = itertools.count()


class WorkerProcess:
    """One tests/dht_worker.py process: its peers' addresses and a JSON command channel."""

    def __init__(self, name: str, initial_peers: list[str], log_dir: Path):
        self.name = name
        self.log_path = log_dir / f"{name}.stderr"
        self.addresses: list[str] = []
        self.answers: dict[int, dict] = {}
        self._lines: queue.Queue[str | None] = queue.Queue()
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
        with open(self.log_path, "w") as log:  # a file, not a pipe: a chatty worker never blocks on stderr
            self.proc = subprocess.Popen(
                [sys.executable, "tests/dht_worker.py", "--peers", str(PEERS_PER_WORKER), "--rpc-timeout",
                 str(RPC_TIMEOUT), "--lifetime", "600", *initial_peers],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, env=env, cwd=ROOT)
        self._reader = threading.Thread(target=self._read, name=f"{name}-stdout", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            for line in self.proc.stdout:
                self._lines.put(line)
        self._lines.put(None)

    def _next_line(self, deadline: float) -> str:
        try:
            line = self._lines.get(timeout=max(deadline - time.monotonic(), 0.0))
        except queue.Empty:
            raise TimeoutError(f"{self.name} did not answer in time{self.stderr_tail()}") from None
        if line is None:
            self._lines.put(None)
            raise RuntimeError(f"{self.name} exited (code {self.proc.poll()}){self.stderr_tail()}")
        return line.strip()

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while (line := self._next_line(deadline)) != "READY":
            if line.startswith("PEER "):
                self.addresses.append(line.split()[2])
        assert len(self.addresses) == PEERS_PER_WORKER, self.addresses

    def send(self, command: dict) -> int:
        command_id = next(_ids)
        try:
            self.proc.stdin.write(json.dumps({**command, "id": command_id}) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError, OSError) as e:
            raise RuntimeError(f"{self.name} is gone ({e}){self.stderr_tail()}") from None
        return command_id

    def answer(self, command_id: int, deadline: float) -> dict:
        while command_id not in self.answers:
            line = self._next_line(deadline)
            answer = json.loads(line)
            self.answers[answer.pop("id", None)] = answer
        return self.answers.pop(command_id)

    def stderr_tail(self) -> str:
        with contextlib.suppress(OSError):
            text = self.log_path.read_text()[-3000:]
            return f"\n--- {self.name} stderr ---\n{text}" if text else ""
        return ""

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """kill -9 by PID, reap, and close our ends of its pipes."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        self._reader.join(timeout=5)  # EOF arrives once the process is dead
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        stop(self.proc)


@dataclass
class Swarm:
    log_dir: Path
    workers: list[WorkerProcess] = field(default_factory=list)
    rng: random.Random = field(default_factory=lambda: random.Random(0))

    @property
    def peers(self) -> list[tuple[WorkerProcess, int]]:
        """Every live peer as (its worker, its index there)."""
        return [(w, i) for w in self.workers if w.alive for i in range(len(w.addresses))]

    def addresses(self, workers: list[WorkerProcess] | None = None) -> list[str]:
        return [a for w in (workers if workers is not None else self.workers) if w.alive for a in w.addresses]

    def start_worker(self, initial_peers: list[str]) -> WorkerProcess:
        worker = WorkerProcess(f"worker{len(self.workers)}", initial_peers, self.log_dir)
        self.workers.append(worker)  # registered before it is ready: close() kills it whatever happens
        worker.wait_ready()
        return worker

    def run(self, commands: list[tuple[WorkerProcess, int | None, dict]], timeout: float = COMMAND_TIMEOUT) -> list[dict]:
        """Send every (worker, peer, command) at once (workers run them concurrently); the answers, in order."""
        sent = [(w, w.send(command if peer is None else {**command, "peer": peer})) for w, peer, command in commands]
        deadline = time.monotonic() + timeout
        answers = [w.answer(command_id, deadline) for w, command_id in sent]
        errors = [a["error"] for a in answers if "error" in a]
        assert not errors, errors[:5]
        return answers

    def close(self) -> None:
        for worker in self.workers:
            worker.kill()


@contextlib.contextmanager
def started_swarm(log_dir: Path) -> Iterator[Swarm]:
    swarm = Swarm(log_dir)
    try:
        start = time.perf_counter()
        swarm.start_worker([])
        for _ in range(WORKERS - 1):  # each process bootstraps from 3 random peers started before it
            known = swarm.addresses()
            swarm.start_worker(swarm.rng.sample(known, min(3, len(known))))
        sizes = [a["size"] for a in swarm.run([(w, i, {"op": "routing"}) for w, i in swarm.peers])]
        print(f"\n{len(swarm.peers)} peers in {len(swarm.workers)} processes started in "
              f"{time.perf_counter() - start:.1f} s; routing table sizes min {min(sizes)} / max {max(sizes)}")
        assert len(swarm.peers) == WORKERS * PEERS_PER_WORKER and min(sizes) > 0
        yield swarm
    finally:
        swarm.close()  # kill -9 by PID, every process, whatever happened


@pytest.fixture(scope="module")
def swarm(tmp_path_factory) -> Iterator[Swarm]:
    with started_swarm(tmp_path_factory.mktemp("dht-workers")) as swarm:
        yield swarm


def _value(result: dict | None) -> Any:
    return None if result is None else result["value"]


@pytest.mark.timeout(150)
def test_every_peer_stores_and_every_peer_reads_every_key(swarm):
    peers = swarm.peers
    keys = [f"own-key-{n}" for n in range(len(peers))]
    start = time.perf_counter()
    stored = swarm.run([(w, i, {"op": "store", "key": keys[n], "value": {"from": n, "data": "x" * n}, "ttl": 120})
                        for n, (w, i) in enumerate(peers)])
    store_s = time.perf_counter() - start
    assert all(a["ok"] is True for a in stored)

    start = time.perf_counter()
    answers = swarm.run([(w, i, {"op": "get_many", "keys": keys}) for w, i in peers])
    get_s = time.perf_counter() - start
    missing = [(reader, keys[n]) for reader, a in enumerate(answers) for n, r in enumerate(a["results"])
               if _value(r) != {"from": n, "data": "x" * n}]
    print(f"\n{len(peers)} stores in {store_s:.2f} s; {len(peers)}x{len(keys)} gets in {get_s:.2f} s "
          f"({len(peers) * len(keys) / get_s:.0f} gets/s); missing or wrong: {len(missing)}")
    assert not missing, missing[:10]


@pytest.mark.timeout(120)
def test_subkeys_from_8_peers_merge(swarm):
    peers = swarm.peers
    writers = [peers[4 * w + w % PEERS_PER_WORKER] for w in range(WORKERS)]  # one peer in each process
    stored = swarm.run([(w, i, {"op": "store", "key": "shared-dict", "subkey": f"writer-{n}", "value": n, "ttl": 120})
                        for n, (w, i) in enumerate(writers)])
    assert all(a["ok"] is True for a in stored)
    reader = peers[1]
    assert reader not in writers
    [answer] = swarm.run([(*reader, {"op": "get", "key": "shared-dict", "latest": True})])
    assert answer["result"]["subkeys"] is True
    assert {s: v["value"] for s, v in answer["result"]["value"].items()} == {f"writer-{n}": n for n in range(8)}
    answers = swarm.run([(w, i, {"op": "get", "key": "shared-dict", "latest": True}) for w, i in peers])
    incomplete = [n for n, a in enumerate(answers) if len(a["result"]["value"]) != 8]
    assert not incomplete, f"peers that did not see all 8 subkeys: {incomplete}"


@pytest.mark.timeout(120)
def test_a_record_expires_on_every_peer(swarm):
    peers = swarm.peers
    ttl = 2.0
    [now] = swarm.run([(*peers[5], {"op": "time"})])
    expiration = now["time"] + ttl
    [stored] = swarm.run([(*peers[5], {"op": "store", "key": "short-lived", "value": "soon gone",
                                       "expiration_time": expiration})])
    assert stored["ok"] is True
    start = time.perf_counter()
    readers = [peers[4 * w + 3 - w % PEERS_PER_WORKER] for w in range(WORKERS)]  # one peer in each process
    answers = swarm.run([(w, i, {"op": "get", "key": "short-lived"}) for w, i in readers])
    print(f"\nread from {len(readers)} peers {time.perf_counter() - start:.2f} s after the store")
    assert [_value(a["result"]) for a in answers] == ["soon gone"] * len(readers)
    assert all(a["result"]["expiration_time"] == pytest.approx(expiration) for a in answers)

    [now] = swarm.run([(*peers[5], {"op": "time"})])
    time.sleep(max(expiration + 1.0 - now["time"], 0.0))  # ~3 s after the store
    answers = swarm.run([(w, i, {"op": "get", "key": "short-lived"}) for w, i in peers])
    answers += swarm.run([(w, i, {"op": "get", "key": "short-lived", "latest": True}) for w, i in peers])
    assert [a["result"] for a in answers] == [None] * 2 * len(peers)


@pytest.mark.timeout(120)
def test_latest_finds_the_newer_value_stored_by_another_peer(swarm):
    peers = swarm.peers
    old_writer, new_writer = peers[2], peers[4 * 6 + 1]  # in two different processes
    assert old_writer[0] is not new_writer[0]
    [now] = swarm.run([(*old_writer, {"op": "time"})])
    first, second = now["time"] + 60, now["time"] + 90
    assert swarm.run([(*old_writer, {"op": "store", "key": "versioned", "value": "old",
                                     "expiration_time": first})])[0]["ok"] is True
    answers = swarm.run([(w, i, {"op": "get", "key": "versioned"}) for w, i in peers])  # now cached widely
    assert [_value(a["result"]) for a in answers] == ["old"] * len(peers)
    assert swarm.run([(*new_writer, {"op": "store", "key": "versioned", "value": "new",
                                     "expiration_time": second})])[0]["ok"] is True
    answers = swarm.run([(w, i, {"op": "get", "key": "versioned", "latest": True}) for w, i in peers])
    assert [_value(a["result"]) for a in answers] == ["new"] * len(peers)
    assert all(a["result"]["expiration_time"] == pytest.approx(second) for a in answers)


@pytest.mark.timeout(180)
def test_records_survive_kill_9_of_a_third_of_the_processes(swarm):
    """Runs last: it kills part of the shared swarm."""
    peers = swarm.peers
    keys = [f"churn-key-{n}" for n in range(64)]
    stored = swarm.run([(w, i, {"op": "store_many", "items": [
        {"key": keys[2 * n + j], "value": [n, j], "ttl": 300} for j in range(2)]}) for n, (w, i) in enumerate(peers)])
    assert all(ok is True for a in stored for ok in a["ok"])
    expected = [[n, j] for n in range(32) for j in range(2)]

    victims = [swarm.workers[w] for w in (0, 3, 6)]  # 12 of 32 peers, the very first (bootstrap) one included
    for worker in victims:
        os.kill(worker.proc.pid, signal.SIGKILL)
    for worker in victims:
        worker.kill()  # reap
    survivors = swarm.peers
    assert len(survivors) == 20

    start = time.perf_counter()
    answers = swarm.run([(w, i, {"op": "get_many", "keys": keys}) for w, i in survivors])
    found = [sum(_value(r) == e for r, e in zip(a["results"], expected)) for a in answers]
    print(f"\nafter kill -9 of {len(victims) * PEERS_PER_WORKER} peers: each of {len(survivors)} survivors found "
          f"{min(found)}..{max(found)} of {len(keys)} keys ({time.perf_counter() - start:.2f} s)")
    assert found == [len(keys)] * len(survivors)

    newcomers: list[WorkerProcess] = []
    try:
        start = time.perf_counter()
        for _ in range(2):
            known = swarm.addresses([w for w in swarm.workers if w not in newcomers])
            newcomers.append(swarm.start_worker(swarm.rng.sample(known, 2)))
        joined_s = time.perf_counter() - start
        start = time.perf_counter()
        answers = swarm.run([(w, i, {"op": "get_many", "keys": keys})
                             for w in newcomers for i in range(PEERS_PER_WORKER)])
        found = [sum(_value(r) == e for r, e in zip(a["results"], expected)) for a in answers]
        print(f"{len(newcomers) * PEERS_PER_WORKER} new peers joined in {joined_s:.1f} s; each found "
              f"{min(found)}..{max(found)} of {len(keys)} keys ({time.perf_counter() - start:.2f} s)")
        assert found == [len(keys)] * len(newcomers) * PEERS_PER_WORKER
    finally:
        for worker in newcomers:
            worker.kill()
