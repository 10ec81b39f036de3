"""Issue 16's training modes end to end: two peer processes (benchmarks/low_bandwidth.py peer) over
loopback TCP train examples/charlm.py in every mode, a few outer steps each; and the benchmark's
mode names and figures."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.low_bandwidth import (  # noqa: E402
    PeerSet,
    build_result,
    float32_bytes_per_step,
    mode_options,
    summarise,
)

pytestmark = pytest.mark.slow

MODES = ["diloco_float16", "streaming", "sparseloco", "demo"]


def test_mode_names():
    assert mode_options("diloco_float16") == {"compression": "float16"}
    assert mode_options("streaming") == {"fragments": 4, "overlap": True}
    assert mode_options("streaming_uint8")["compression"] == "uint8"
    with pytest.raises(ValueError, match="unknown codec 'nonsense'"):
        mode_options("diloco_nonsense")
    assert float32_bytes_per_step(1000, peers=4) == 6000  # 2 * 3/4 * 1000 values * 4 bytes


def test_every_mode_in_two_processes(tmp_path):
    """2 peers, H = 8, 2 outer steps per mode: every mode averages (no failed round), both peers end
    with the same global parameters (identical held-out loss), the loss fell from the initial
    model's, every compressed mode sends fewer bytes per outer step than float16, and sparseloco
    over 100x fewer than float32 would."""
    import torch

    from swarm.examples.charlm import task

    torch.manual_seed(0)
    initial_loss = task.evaluate(task.model())["loss"]
    modes = MODES
    procs, logs = [], []
    prefix = f"t{time.time_ns()}"  # one run id per mode for both peers
    try:
        for i in range(2):
            log = tmp_path / f"peer{i}.log"
            logs.append(log)
            extra = ["--print-address"] if i == 0 else [_address(procs[0], logs[0])]
            with open(log, "w") as f:
                procs.append(subprocess.Popen(
                    [sys.executable, str(ROOT / "benchmarks" / "low_bandwidth.py"), "peer", "--host", "127.0.0.1",
                     "--index", str(i), "--peers", "2", "--modes", ",".join(modes), "--samples", "512",
                     "--inner-steps", "8", "--dir", str(tmp_path), "--run-prefix", prefix, *extra],
                    stdout=f, stderr=subprocess.STDOUT, cwd=ROOT))
        peers = PeerSet(procs, logs, tmp_path)
        summaries = {}
        for mode in modes:
            results = peers.run(mode, 180)
            assert all(r["epochs"] == 2 and r["rounds_failed"] == 0 and r["rounds_ok"] >= 2 for r in results), results
            summaries[mode] = summarise(results)
            assert summaries[mode]["heldout_loss_spread"] == 0.0, (mode, results)
            assert summaries[mode]["heldout_loss"] < initial_loss - 0.1, (mode, initial_loss, results)
        assert summaries["streaming"]["fragments"] == 4 and summaries["streaming"]["compression"] != "float16"
        baseline = summaries["diloco_float16"]["bytes_per_step"]
        for mode in modes[1:]:
            assert summaries[mode]["bytes_per_step"] < baseline, (mode, summaries)
        float32 = float32_bytes_per_step(summaries["sparseloco"]["num_params"], peers=2)
        assert summaries["sparseloco"]["bytes_per_step"] * 100 < float32, summaries["sparseloco"]
        result = build_result({100.0: summaries}, modes, {"peers": 2})
        assert [r["mode"] for r in result["modes"]] == modes
        assert {"bytes_per_step", "heldout_loss", "wall_s_100mbit", "utilisation_100mbit"} <= set(result["modes"][0])
        for proc in procs:
            assert proc.wait(60) == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _address(proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("ADDR "):
                return line.split()[1]
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise RuntimeError(f"peer 0 printed no address:\n{log.read_text(errors='replace')[-3000:]}")
