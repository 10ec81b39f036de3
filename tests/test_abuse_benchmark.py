"""benchmarks/abuse.py runs end to end (two cheap attacks at a small scale) and prints its JSON rows
with the documented keys. The PASS/FAIL values depend on the defences, so they are not asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the benchmark reads /proc and binds 127.0.0.2")
def test_abuse_benchmark_json_rows():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "abuse.py"), "--scale", "0.05",
                           "--attacks", "nested-hello,unsigned-store", "--json"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["scale"] == 0.05 and report["attacker_ip"] == "127.0.0.2"
    assert set(report["targets"]) >= {"memory_mib", "fd_slack", "connect_share", "latency_s"}
    rows = report["rows"]
    assert [r["attack"] for r in rows] == ["nested-hello", "unsigned-store"]
    for row in rows:
        assert set(row) >= {"attack", "rss_mib", "fds", "connect", "store_get_s", "signed", "log_kib", "checks",
                            "failed", "passed", "wall_s", "attacker"}, row
        assert not any(f.startswith("harness error") for f in row["failed"]), row["failed"]
        for trio in (row["rss_mib"], row["fds"]):
            assert set(trio) == {"before", "peak", "after"} and trio["before"] > 0
            assert trio["peak"] >= trio["before"]
        assert row["connect"]["total"] >= 1 and 0 <= row["connect"]["ok"] <= row["connect"]["total"]
        assert row["store_get_s"]["total"] >= 1 and set(row["store_get_s"]) >= {"p50", "p95", "max", "ok"}
        assert row["signed"]["total"] == 7 and 0 <= row["signed"]["intact"] <= 7
        assert isinstance(row["passed"], bool) and row["passed"] == (not row["failed"])
        assert "error" not in row["attacker"], row["attacker"]
    assert rows[0]["attacker"]["opened"] >= 1  # the hellos were sent
    assert rows[1]["attacker"]["p2p_dials_from_attacker_ip"] >= 1  # the RPC attack left from the attacker's IP
    assert "attacks passed; total" in proc.stderr
