"""Preemption with real ``swarm join`` processes on loopback (issue 20, point 4).

Three peers train ``swarm/examples/digits.py`` with the default matchmaking settings; one is killed with
``kill -9`` (a preempted machine). The survivors must not stall: the longest gap between their epochs
after the kill stays under 5 s, their progress view stops counting the dead peer within seconds, and a
peer that joins after the kill starts from a live donor's state (never from epoch 0). A clean exit
(``--max-seconds``) announces the departure, so the partner does not wait for it either.

Every peer runs with ``--max-seconds`` as a safety net; the processes are killed by PID when the test
ends, whatever happens.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from .processes import ProcessGroup, read_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.skipif(sys.platform == "win32", reason="POSIX processes and signals")]

TASK = "swarm/examples/digits.py"
MAX_SECONDS = 150
MAX_GAP = 5.0  # seconds between two epochs of a survivor after the kill (the bound)


def _join(group: ProcessGroup, tmp_path: Path, name: str, run_id: str, address: str, *extra: str) -> Path:
    metrics = tmp_path / f"{name}.jsonl"
    group.spawn(name, [
        "-m", "swarm", "--log-level", "INFO", "join", TASK, "--run-id", run_id, "--initial-peers", address,
        "--host", "127.0.0.1", "--threads", "1", "--identity", str(tmp_path / f"{name}.key"),
        "--metrics-file", str(metrics), "--quiet", *extra] + ([] if "--max-seconds" in extra else
                                                               ["--max-seconds", str(MAX_SECONDS)]))
    return metrics


def _epochs(metrics: Path) -> list[tuple[float, int]]:
    return [(r["time"], r["epoch"]) for r in read_jsonl(metrics)]


def _wait(group: ProcessGroup, what: str, condition, names: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        for name in names:
            if group.procs[name].poll() is not None:
                raise AssertionError(f"{name} exited ({group.procs[name].returncode}) while waiting for {what}:\n"
                                     f"{group.log(name)[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s\n" +
                                 "\n".join(f"--- {n}\n{group.log(n)[-2000:]}" for n in names))
        time.sleep(0.2)


def _longest_gap(epochs: list[tuple[float, int]], since: float) -> float:
    """The longest time between two epochs (or from ``since`` to the first one) after ``since``."""
    times = [since] + [t for t, _ in epochs if t > since]
    return max((b - a for a, b in zip(times, times[1:])), default=float("inf"))


def test_kill_9_does_not_stall_the_survivors_and_a_joiner_starts_from_a_live_donor(tmp_path):
    run_id = "preempt-digits"
    with ProcessGroup(tmp_path / "logs") as group:
        address = group.bootstrap()
        names = ["p0", "p1", "p2"]
        metrics = {}
        for i, name in enumerate(names):
            metrics[name] = _join(group, tmp_path, name, run_id, address, "--shard", f"{i}/3")
            if i == 0:
                group.wait_for("p0", r"this peer created it", timeout=60)
        _wait(group, "3 epochs on every peer", lambda: all(len(_epochs(metrics[n])) >= 3 for n in names),
              names, timeout=90)
        survivors = ["p0", "p2"]
        group.kill("p1")
        killed_at = time.time()
        _wait(group, "12 s of training after the kill",
              lambda: all(_epochs(metrics[n]) and _epochs(metrics[n])[-1][0] > killed_at + 12 for n in survivors),
              survivors, timeout=60)
        for name in survivors:
            records = read_jsonl(metrics[name])
            gap = _longest_gap(_epochs(metrics[name]), killed_at)
            assert gap <= MAX_GAP, (name, gap, [(round(t - killed_at, 2), e) for t, e in _epochs(metrics[name])
                                                if t > killed_at - 5], group.log(name)[-3000:])
            # the progress view stops counting the dead peer within seconds
            late = [r["peers"] for r in records if r["time"] > killed_at + 8]
            assert late and all(p == 2 for p in late), (name, late)

        # a joiner after the kill downloads the state from a live donor, at the swarm's epoch
        swarm_epoch = max(_epochs(metrics[n])[-1][1] for n in survivors)
        metrics["p3"] = _join(group, tmp_path, "p3", run_id, address)
        loaded = int(group.wait_for("p3", r"loaded the swarm's state at epoch (\d+)", timeout=60).group(1))
        assert loaded >= swarm_epoch, (loaded, swarm_epoch, group.log("p3")[-3000:])
        _wait(group, "an epoch of the joiner", lambda: len(_epochs(metrics["p3"])) >= 1, ["p3"], timeout=30)
        assert _epochs(metrics["p3"])[0][1] > swarm_epoch, _epochs(metrics["p3"])[:3]
        for name in survivors + ["p3"]:
            assert group.stop(name) in (0, 130), group.log(name)[-2000:]


def test_every_clean_exit_announces_the_departure(tmp_path):
    """Ctrl+C (SIGINT), ``--max-seconds`` and SIGTERM: the peers left behind stop counting the leaver
    within a couple of seconds (its 'left' record) and do not stall waiting for it."""
    run_id = "leave-digits"
    with ProcessGroup(tmp_path / "logs") as group:
        address = group.bootstrap()
        metrics = {"p0": _join(group, tmp_path, "p0", run_id, address, "--shard", "0/3")}
        group.wait_for("p0", r"this peer created it", timeout=60)
        metrics["p1"] = _join(group, tmp_path, "p1", run_id, address, "--shard", "1/3", "--max-seconds", "30")
        metrics["p2"] = _join(group, tmp_path, "p2", run_id, address, "--shard", "2/3")
        names = ["p0", "p1", "p2"]
        _wait(group, "epochs with 3 peers", lambda: all(any(r["peers"] == 3 for r in read_jsonl(metrics[n]))
                                                         for n in names), names, timeout=90)

        def check(leaver: str, left_at: float, stayers: list[str], peers: int) -> None:
            _wait(group, f"training after {leaver} left",
                  lambda: all(_epochs(metrics[n]) and _epochs(metrics[n])[-1][0] > left_at + 6 for n in stayers),
                  stayers, timeout=60)
            for name in stayers:
                gap = _longest_gap(_epochs(metrics[name]), left_at)
                assert gap <= MAX_GAP, (leaver, name, gap, group.log(name)[-3000:])
                late = [r["peers"] for r in read_jsonl(metrics[name]) if r["time"] > left_at + 3]
                assert late and all(p == peers for p in late), (leaver, name, late)

        group.procs["p2"].send_signal(2)  # Ctrl+C
        assert group.procs["p2"].wait(timeout=30) == 130, group.log("p2")[-2000:]
        left_at = time.time()
        assert "interrupted: leaving the swarm" in group.log("p2")
        check("p2 (Ctrl+C)", left_at, ["p0", "p1"], peers=2)

        assert group.procs["p1"].wait(timeout=60) == 0, group.log("p1")[-2000:]  # --max-seconds 30
        left_at = time.time()
        assert "ran --max-seconds 30" in group.log("p1")
        check("p1 (--max-seconds)", left_at, ["p0"], peers=1)
        assert group.stop("p0") == 130, group.log("p0")[-2000:]  # SIGTERM


# ---------------------------------------------------------------- the pieces, in one process over loopback

def _wait_true(condition, timeout: float) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, "condition not met in time"
        time.sleep(0.05)
    return time.monotonic() - started


def test_the_progress_view_drops_a_silent_peer_and_a_newcomer_never_counts_it():
    from dht import DHT
    from swarm.progress import ProgressTracker

    first = DHT(host="127.0.0.1")
    second = DHT(initial_peers=first.get_visible_addresses(), host="127.0.0.1")
    third = None
    trackers = []
    try:
        a = ProgressTracker(first, "view", 100, online_window=2.0)
        b = ProgressTracker(second, "view", 100, online_window=2.0)
        trackers += [a, b]
        a.report(epoch=3, samples=10, samples_per_second=5.0)
        b.report(epoch=3, samples=20, samples_per_second=5.0)
        _wait_true(lambda: len(a.online_peers()) == 2 and len(b.online_peers()) == 2, timeout=20)
        time.sleep(2.5)  # longer than the window: heartbeats (1 s) keep both online without new reports
        assert len(a.refresh().peers) == 2 and a.global_progress.num_peers == 2

        # b dies without a word (its loop stops: no heartbeat, no 'left' record)
        second.loop.call_soon_threadsafe(b._task.cancel)
        b._closed = True
        took = _wait_true(lambda: a.online_peers() == {str(first.peer_id)}, timeout=10)
        assert took <= 2.0 + 1.5, took  # the window plus a heartbeat and a refresh
        assert a.global_progress.num_peers == 1

        # a newcomer never counts b: b's last record is older than the window (by its DHT time)
        third = DHT(initial_peers=first.get_visible_addresses(), host="127.0.0.1")
        c = ProgressTracker(third, "view", 100, online_window=2.0)
        trackers.append(c)
        c.report(epoch=0, samples=0, samples_per_second=0.0)
        view = c.refresh()
        assert str(second.peer_id) not in {r.peer_id for r in view.peers}
        _wait_true(lambda: str(first.peer_id) in c.online_peers(), timeout=10)
        assert str(second.peer_id) not in c.online_peers()
    finally:
        for t in trackers:
            t.shutdown()
        for d in (third, second, first):
            if d is not None:
                d.shutdown()


def test_a_donor_that_leaves_withdraws_its_state_announcement():
    from dht import DHT
    from swarm.state_sharing import StateSharing

    first = DHT(host="127.0.0.1")
    second = DHT(initial_peers=first.get_visible_addresses(), host="127.0.0.1")
    try:
        donor = StateSharing(first, "withdraw")
        joiner = StateSharing(second, "withdraw", serve=False)
        donor.publish(b"state bytes" * 100, epoch=7)
        _wait_true(lambda: [d.epoch for d in joiner.donors()] == [7], timeout=20)
        assert joiner.download(min_epoch=7) == (b"state bytes" * 100, 7)
        # a filter that accepts nobody (e.g. nobody online) leaves nothing to download
        assert joiner.download(min_epoch=7, alive=lambda d: False) is None
        donor.shutdown()
        assert joiner.donors() == []
        assert joiner.download(min_epoch=0) is None
    finally:
        second.shutdown()
        first.shutdown()
