"""Peers in separate OS processes: kill -9 and SIGSTOP mid-call, and the CLI."""

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

from dht import ConnectionLostError, DeadlineExceededError, P2P

from .processes import ROOT, running

pytestmark = [pytest.mark.slow, pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")]


async def test_kill_9_mid_stream_fails_fast_with_the_peer_named():
    with running(["tests/peer_process.py"]) as (proc, address):
        client = await P2P.create(host="127.0.0.1")
        try:
            assert await client.call(address, "echo", "hi", timeout=10) == "hi"
            stream = await client.open_stream(address, "sink", timeout=120)
            chunk = b"\0" * (1 << 20)
            for _ in range(10):
                await stream.send(chunk)
            os.kill(proc.pid, signal.SIGKILL)
            start = time.monotonic()
            with pytest.raises(ConnectionLostError) as info:
                for _ in range(10_000):
                    await stream.send(chunk)
                await stream.recv()
            assert time.monotonic() - start < 10  # far below the 120 s deadline
            assert address.split("/p2p/")[1][-8:] in str(info.value)
        finally:
            await client.shutdown()


async def test_sigstopped_peer_hits_the_deadline_and_others_are_unaffected():
    with running(["tests/peer_process.py"]) as (frozen, frozen_address), \
            running(["tests/peer_process.py"]) as (healthy, healthy_address):
        client = await P2P.create(host="127.0.0.1")
        try:
            await client.call(frozen_address, "echo", 1, timeout=10)
            os.kill(frozen.pid, signal.SIGSTOP)
            start = time.monotonic()
            frozen_call = asyncio.ensure_future(client.call(frozen_address, "echo", 2, timeout=1.5))
            # meanwhile, calls to another peer go through
            assert await client.call(healthy_address, "echo", 3, timeout=10) == 3
            with pytest.raises(DeadlineExceededError):
                await frozen_call
            assert time.monotonic() - start < 5
            os.kill(frozen.pid, signal.SIGCONT)
            assert await client.call(frozen_address, "echo", 4, timeout=10) == 4  # it recovers
        finally:
            await client.shutdown()


def test_cli_peer_and_ping_over_real_processes(tmp_path):
    key = tmp_path / "id.pem"
    with running(["-m", "swarm", "peer", "--host", "127.0.0.1", "--identity", str(key), "--ping-interval", "60"],
                 ready_prefix="/ip4/") as (proc, address):
        assert key.exists() and (key.stat().st_mode & 0o777) == 0o600
        assert address.endswith(subprocess.run([sys.executable, "-m", "swarm", "identity", str(key)], cwd=ROOT,
                                               capture_output=True, text=True, check=True).stdout.strip())
        result = subprocess.run([sys.executable, "-m", "swarm", "ping", address, "--count", "2"], cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert result.stdout.count(" ms") == 2
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 0  # Ctrl-C stops it cleanly
        assert "peer stopped" in proc.stdout.read()


def test_cli_ping_of_an_unreachable_peer_fails_with_a_message():
    result = subprocess.run([sys.executable, "-m", "swarm", "ping", "/ip4/127.0.0.1/tcp/1", "--count", "1",
                             "--timeout", "3"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "cannot connect to /ip4/127.0.0.1/tcp/1" in result.stderr
    assert "Traceback" not in result.stderr
