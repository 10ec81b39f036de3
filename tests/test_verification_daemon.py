"""Verification with real daemons on loopback: ``swarm join --verify 1`` peers and one ``--byzantine
sign_flip`` peer train one run; the attacker says so loudly, its gradients fail the recomputation, the
honest peers ban it (an accusation with evidence in the DHT, re-verified by each of them) and
``swarm runs --json`` lists it under ``"banned"``. Bad ``--verify``/``--byzantine`` values get a clear
error. (The many-peer, every-attack cases run in tests/test_verification_sim.py.)"""

from __future__ import annotations

import json
import sys
import textwrap
import time
from pathlib import Path

import pytest

from .processes import ProcessGroup, run_swarm

pytestmark = [pytest.mark.slow, pytest.mark.skipif(sys.platform == "win32", reason="POSIX processes")]

# 260 parameters (32 claim blocks of 9 values), an epoch of 64 samples in milliseconds
TASK = textwrap.dedent("""
    import torch
    from swarm import Task

    W = torch.linspace(-1.0, 1.0, 256).reshape(64, 4)

    def data(shard, num_shards, batch_size, seed):
        g = torch.Generator().manual_seed(seed)
        for _ in range(8):
            x = torch.randn(batch_size, 64, generator=g)
            yield x, x @ W + 0.1 * torch.randn(batch_size, 4, generator=g)

    task = Task(name="verified-tiny", model=lambda: torch.nn.Linear(64, 4),
                optimizer=lambda p: torch.optim.SGD(p, lr=0.05), data=data,
                loss=lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]),
                batch_size=16, target_batch_size=64)
""")


def _join(task: str, tmp_path: Path, name: str, address: str, *extra: str) -> list[str]:
    return ["-m", "swarm", "join", task, "--host", "127.0.0.1", "--threads", "1", "--identity",
            str(tmp_path / f"{name}.key"), "--quiet", "--matchmaking-time", "0.5", "--initial-peers", address,
            "--run-id", "verified-run", "--verify", "1", "--max-seconds", "400", "--dashboard-port", "off", *extra]


def test_bad_verify_and_byzantine_arguments(tmp_path: Path) -> None:
    task = tmp_path / "task.py"
    task.write_text(TASK)
    for extra, phrase in ((["--verify", "1.5"], "--verify must be a probability"),
                          (["--byzantine", "nonsense"], "--byzantine: unknown attack 'nonsense'")):
        result = run_swarm(["join", str(task), "--host", "127.0.0.1", "--identity", str(tmp_path / "k.key"),
                            *extra], timeout=120)
        assert result.returncode == 2, result.stdout + result.stderr
        assert phrase in result.stderr and "Traceback" not in result.stderr


@pytest.mark.timeout(900)  # four daemons starting torch: minutes on a shared 2-core machine
def test_a_byzantine_daemon_is_banned_and_listed(tmp_path: Path) -> None:
    task = tmp_path / "task.py"
    task.write_text(TASK)
    with ProcessGroup(tmp_path / "logs") as group:
        address = group.bootstrap()
        group.spawn("honest0", _join(str(task), tmp_path, "honest0", address))
        group.wait_for("honest0", r"run 'verified-run' is new: this peer created it", timeout=180)
        for name in ("honest1", "honest2"):
            group.spawn(name, _join(str(task), tmp_path, name, address))
        group.spawn("attacker", _join(str(task), tmp_path, "attacker", address, "--byzantine", "sign_flip"))
        group.wait_for("attacker", r"BYZANTINE PEER: this daemon ATTACKS its run with 'sign_flip'", timeout=120)
        attacker = group.wait_for("attacker", r"^peer (\S+)", timeout=180).group(1)
        group.wait_for("honest1", r"verification on: each round a member is recomputed with probability 1",
                       timeout=180)
        # an honest peer bans it after checking the evidence itself
        group.wait_for("honest0", rf"banned {attacker}: wrong_gradient", timeout=180)
        deadline = time.monotonic() + 60
        while True:
            result = run_swarm(["runs", "--initial-peers", address, "--json"])
            assert result.returncode == 0, result.stderr
            runs = {r["run_id"]: r for r in json.loads(result.stdout)}
            banned = runs.get("verified-run", {}).get("banned", [])
            if any(b["peer_id"] == attacker for b in banned):
                break
            assert time.monotonic() < deadline, f"never listed as banned: {runs}\n{group.log('honest0')[-3000:]}"
            time.sleep(1.0)
        entry = next(b for b in banned if b["peer_id"] == attacker)
        assert "wrong_gradient" in entry["reason"] and entry["reporters"] >= 2
        honest = {group.wait_for(n, r"^peer (\S+)", timeout=5).group(1) for n in ("honest0", "honest1", "honest2")}
        assert not honest & {b["peer_id"] for b in banned}
