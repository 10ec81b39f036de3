"""``swarm join --role server|trainer`` over real sockets on loopback: --max-memory, the swarm_lm
example across 8 peers (the README command, bounded), and a stage emptied by kills refilled by
rebalancing. Every process is killed by its PID at the end, even when a test fails."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.processes import ROOT, ProcessGroup, run_swarm

pytestmark = pytest.mark.slow

SMALL = {"SWARM_LM_WIDTH": "32", "SWARM_CHARLM_MAX_BYTES": "300000"}  # ~0.35 MB per stage with AdamW state


@pytest.fixture
def small_lm(monkeypatch):
    for name, value in SMALL.items():
        monkeypatch.setenv(name, value)


def test_max_memory_and_stage_arguments_are_checked_before_joining(small_lm):
    import torch

    from swarm.examples import swarm_lm
    from swarm.pipeline.roles import parse_memory, stage_memory_bytes

    needs = [stage_memory_bytes(swarm_lm.task, k) for k in range(4)]
    # params + grads + AdamW's two moments: 4x the parameters' bytes
    params = [sum(p.numel() * 4 for p in swarm_lm.task.build_stage(k).parameters()) for k in range(4)]
    assert needs == [4 * p for p in params]
    assert parse_memory("2GB") == 2 * 10 ** 9 and parse_memory("512MiB") == 512 * 2 ** 20
    assert parse_memory("0.5MB") == 500_000
    for bad in ("lots", "-1MB", "5XB", "0"):
        with pytest.raises(ValueError):
            parse_memory(bad)
    assert sum(needs) > parse_memory("0.5MB") > max(needs)  # what the 8-peer test relies on
    del torch

    common = ["join", "examples/swarm_lm.py", "--role", "server", "--dashboard-port", "off", "--host", "127.0.0.1",
              "--initial-peers", "/ip4/127.0.0.1/tcp/9/p2p/QmNnooDu7bfjPFoTZYxMNLWUQJyrVwtbZg5gBMjTezGAJN"]
    done = run_swarm(common + ["--stage", "0", "--max-memory", "0.1MB"], timeout=120)
    assert done.returncode == 2, done.stderr
    assert re.search(r"stage 0 needs 0\.\d MB \(parameters \+ gradients \+ optimizer state\), more than "
                     r"--max-memory 0\.1 MB", done.stderr), done.stderr
    done = run_swarm(common + ["--stage", "7"], timeout=120)
    assert done.returncode == 2 and "--stage must be in 0..3" in done.stderr, done.stderr
    done = run_swarm(["join", "examples/charlm.py", "--role", "server", "--dashboard-port", "off"], timeout=120)
    assert done.returncode == 2 and "needs a pipeline task" in done.stderr, done.stderr


@pytest.mark.timeout(900)  # 9 processes started one after another: minutes on a loaded 2-core machine
def test_swarm_lm_trains_across_8_peers_whose_memory_holds_one_stage(tmp_path, small_lm):
    """The README command, bounded: 6 servers (--stage auto, --max-memory below the model's size) and 2
    trainers on loopback until every stage stepped once; the held-out loss goes down and `swarm runs
    --json` shows every stage served."""
    out = tmp_path / "lm"
    proc = subprocess.Popen([sys.executable, "-m", "swarm.examples.swarm_lm", "--servers", "6", "--trainers", "2",
                             "--max-epochs", "1", "--max-seconds", "400",
                             "--max-memory", "0.5MB", "--out", str(out)],
                            cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=860)
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the peers it started (its session)
            proc.wait(10)
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(out.glob("*.log")))
    assert proc.returncode == 0, output + logs
    loss = re.search(r"held-out loss: ([0-9.]+) -> ([0-9.]+)", output)
    assert loss and float(loss.group(2)) < float(loss.group(1)), output
    stages = re.search(r"stages: (.*)", output)
    assert stages and all(f"{k}: " in stages.group(1) for k in range(4)), output
    assert "0 servers" not in stages.group(1), output
    servers = sorted(out.glob("server*.log"))
    assert len(servers) == 6 and all("serving stage" in p.read_text() for p in servers)
    for trainer in ("trainer0", "trainer1"):
        text = (out / f"{trainer}.log").read_text()
        done = re.search(r"(\d+) microbatches ok, (\d+) failed", text.splitlines()[-1] if text else "")
        assert done and int(done.group(1)) > 0 and int(done.group(2)) == 0, text[-2000:]


def _stage_now(log: str) -> int | None:
    """The stage a server's log says it serves now (its last 'serving stage' or 'moved to stage' line)."""
    found = re.findall(r"(?:serving stage|moved to stage) (\d+)", log)
    return int(found[-1]) if found else None


def _ok_count(log: str) -> int:
    found = re.findall(r"(\d+) microbatches ok", log)
    return int(found[-1]) if found else 0


@pytest.mark.timeout(600)
def test_a_stage_emptied_by_kills_is_refilled_by_rebalancing(tmp_path, small_lm):
    with ProcessGroup(tmp_path) as group:
        address = group.bootstrap()
        common = ["-m", "swarm", "join", "examples/swarm_lm.py", "--initial-peers", address, "--host", "127.0.0.1",
                  "--dashboard-port", "off", "--threads", "1", "--matchmaking-time", "1"]
        for i, stage in enumerate([0, 0, 1, 2, 3]):
            group.spawn(f"s{i}", common + ["--role", "server", "--stage", str(stage), "--rebalance-period", "2",
                                           "--identity", str(tmp_path / f"s{i}.key")])
        for i in range(5):
            group.wait_for(f"s{i}", "serving stage", 120)
        group.spawn("t0", common + ["--role", "trainer", "--identity", str(tmp_path / "t0.key")])
        deadline = time.monotonic() + 120
        while _ok_count(group.log("t0")) < 5:
            assert time.monotonic() < deadline, group.log("t0")[-3000:]
            assert group.procs["t0"].poll() is None, group.log("t0")[-3000:]
            time.sleep(0.5)
        victims = [f"s{i}" for i in range(5) if _stage_now(group.log(f"s{i}")) == 1]
        assert victims, [group.log(f"s{i}")[-500:] for i in range(5)]
        marks = {f"s{i}": len(group.log(f"s{i}")) for i in range(5)}
        for name in victims:
            group.kill(name)  # kill -9: stage 1 has no server left
        ok_at_kill = _ok_count(group.log("t0"))
        survivors = [f"s{i}" for i in range(5) if f"s{i}" not in victims]
        deadline = time.monotonic() + 90
        movers = []
        while not movers:
            assert time.monotonic() < deadline, "\n".join(group.log(n)[-1500:] for n in survivors)
            movers = [n for n in survivors if "moved to stage 1" in group.log(n)[marks[n]:]]
            time.sleep(0.5)
        deadline = time.monotonic() + 90
        while _ok_count(group.log("t0")) < ok_at_kill + 5:  # the pipeline trains again through the refilled stage
            assert time.monotonic() < deadline, group.log("t0")[-3000:] + group.log(movers[0])[-2000:]
            time.sleep(0.5)
        runs = run_swarm(["runs", "--initial-peers", address, "--json"], timeout=120)
        listed = next(r for r in json.loads(runs.stdout) if r["run_id"] == "swarm-lm")
        assert [s["stage"] for s in listed["stages"]] == [0, 1, 2, 3]
        assert all(s["servers"] >= 1 for s in listed["stages"]), listed
        assert listed["trainers_samples_per_s"] is not None and listed["peers"] >= 1
