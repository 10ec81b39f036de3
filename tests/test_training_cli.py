"""``swarm join`` and ``swarm runs`` as real processes on loopback: bad input gets a clear message and
a non-zero exit code (never a traceback as the only explanation), runs are created, announced and
listed, and a restarted peer resumes from its checkpoint.

Exit codes of ``swarm join``: 2 bad task, 3 run/task mismatch, 4 network, 5 checkpoint."""

from __future__ import annotations

import json
import socket
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dht import Identity
from swarm.checkpoint import latest_checkpoint

from .processes import ProcessGroup, read_jsonl, run_swarm

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX processes and signals")

# A task small enough that a peer trains an epoch in milliseconds: 64 samples per epoch, 16 per step.
TINY_TASK = textwrap.dedent("""
    import torch
    from swarm import Task

    def data(shard, num_shards, batch_size, seed):
        g = torch.Generator().manual_seed(seed)
        w = torch.arange(1.0, 5.0)
        for _ in range(8):
            x = torch.randn(batch_size, 4, generator=g)
            yield x, x @ w + 0.1 * torch.randn(batch_size, generator=g)

    task = Task(name="tiny", model=lambda: torch.nn.Linear(4, {width}),
                optimizer=lambda p: torch.optim.Adam(p, lr=0.05), data=data,
                loss=lambda m, b: torch.nn.functional.mse_loss(m(b[0]).sum(-1), b[1]),
                batch_size=16, target_batch_size=64)
""")


def _task(directory: Path, name: str = "tiny_task.py", width: int = 1, extra: str = "") -> str:
    path = directory / name
    path.write_text(TINY_TASK.format(width=width) + extra)
    return str(path)


def _join_args(task: str, tmp_path: Path, name: str, *extra: str, initial_peers: list[str] = ()) -> list[str]:
    args = ["join", task, "--host", "127.0.0.1", "--threads", "1", "--identity", str(tmp_path / f"{name}.key"),
            "--quiet", "--matchmaking-time", "0.5"]
    if initial_peers:
        args += ["--initial-peers", *initial_peers]
    return args + list(extra)


def _assert_clean_failure(result, code: int, *phrases: str) -> None:
    assert result.returncode == code, f"exit code {result.returncode}, expected {code}:\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, result.stderr
    assert result.stderr.startswith("error: ") or "\nerror: " in result.stderr, result.stderr
    for phrase in phrases:
        assert phrase in result.stderr, f"{phrase!r} not in:\n{result.stderr}"


# ---------------------------------------------------------------- bad input

@pytest.mark.slow
def test_a_task_file_that_fails_to_import(tmp_path):
    broken = tmp_path / "broken_task.py"
    broken.write_text("import torch\nfrom swarm import Task\nraise RuntimeError('the data set is not downloaded')\n")
    result = run_swarm(_join_args(str(broken), tmp_path, "p"))
    _assert_clean_failure(result, 2, f"task file {broken} failed to import", "RuntimeError: the data set is not downloaded")

    missing = run_swarm(_join_args(str(tmp_path / "no_such_task.py"), tmp_path, "p"))
    _assert_clean_failure(missing, 2, "does not exist")

    wrong_attr = run_swarm(_join_args(_task(tmp_path) + ":nope", tmp_path, "p"))
    _assert_clean_failure(wrong_attr, 2, "has no attribute 'nope'")


@pytest.mark.slow
def test_an_unreachable_initial_peer(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"/ip4/127.0.0.1/tcp/{port}/p2p/{Identity().peer_id}"
    started = time.monotonic()
    result = run_swarm(_join_args(_task(tmp_path), tmp_path, "p", initial_peers=[address]), timeout=90)
    _assert_clean_failure(result, 4, "could not join the swarm", address)
    assert time.monotonic() - started < 60
    malformed = run_swarm(_join_args(_task(tmp_path), tmp_path, "p", initial_peers=["/ip4/127.0.0.1/tcp/notaport"]))
    _assert_clean_failure(malformed, 4, "could not join the swarm", "bad TCP port 'notaport'")


@pytest.mark.slow
def test_a_task_whose_code_differs_from_the_runs_announcement_is_refused(tmp_path):
    first = _task(tmp_path, "task_a.py")
    second = _task(tmp_path, "task_b.py", extra="\n# another version of the code\n")
    with ProcessGroup(tmp_path / "logs") as group:
        address = group.bootstrap()
        creator = run_swarm(_join_args(first, tmp_path, "a", "--run-id", "shared-run", "--max-epochs", "1",
                                       initial_peers=[address]))
        assert creator.returncode == 0, creator.stderr
        assert "run 'shared-run' is new: this peer created it" in creator.stdout
        # the creator left; its signed announcement stays in the DHT
        result = run_swarm(_join_args(second, tmp_path, "b", "--run-id", "shared-run", "--max-epochs", "1",
                                      initial_peers=[address]))
        _assert_clean_failure(result, 3, "run 'shared-run' was announced with task code", "refusing")
        assert "this peer created it" not in result.stdout
        # the same code joins the run instead of creating it
        same = run_swarm(_join_args(first, tmp_path, "c", "--run-id", "shared-run", "--max-epochs", "2",
                                    initial_peers=[address]))
        assert same.returncode == 0, same.stderr
        assert "joining run 'shared-run' created by" in same.stdout and "matches" in same.stdout


@pytest.mark.slow
def test_a_corrupt_or_incompatible_checkpoint(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    (checkpoints / "tiny-epoch00000007.swst").write_bytes(b"\x00garbage\xff" * 100)
    result = run_swarm(_join_args(_task(tmp_path), tmp_path, "p", "--checkpoint-dir", str(checkpoints)))
    _assert_clean_failure(result, 5, f"cannot resume from {checkpoints}", "tiny-epoch00000007.swst", "bad magic")

    # another model's checkpoint under the same run id: a peer of a 3-output model writes it ...
    other = tmp_path / "other"
    other.mkdir()
    wide = run_swarm(_join_args(_task(other, width=3), tmp_path, "w", "--run-id", "tiny", "--max-epochs", "1",
                                "--checkpoint-dir", str(other / "checkpoints")))
    assert wide.returncode == 0, wide.stderr
    written = sorted((other / "checkpoints").glob("tiny-epoch*.swst"))
    assert written, wide.stdout
    for path in checkpoints.iterdir():
        path.unlink()
    (checkpoints / written[-1].name).write_bytes(written[-1].read_bytes())
    # ... and a peer of the 1-output model refuses it
    result = run_swarm(_join_args(_task(tmp_path), tmp_path, "p", "--checkpoint-dir", str(checkpoints)))
    _assert_clean_failure(result, 5, f"cannot resume from {checkpoints}", "parameter 0", "(3, 4)", "(1, 4)")


# ---------------------------------------------------------------- runs, creation, resume

@pytest.mark.slow
def test_swarm_runs_lists_a_training_run(tmp_path):
    task = _task(tmp_path)
    with ProcessGroup(tmp_path / "logs") as group:
        address = group.bootstrap()
        empty = run_swarm(["runs", "--initial-peers", address, "--json"])
        assert empty.returncode == 0, empty.stderr
        assert json.loads(empty.stdout) == []
        for i in range(2):
            group.spawn(f"peer{i}", ["-m", "swarm", *_join_args(task, tmp_path, f"peer{i}", "--run-id", "listed-run",
                                                                  "--max-seconds", "90", initial_peers=[address])])
            if i == 0:  # the first peer of an unknown run creates it and says so
                group.wait_for("peer0", r"run 'listed-run' is new: this peer created it", timeout=60)
        group.wait_for("peer1", r"joining run 'listed-run' created by \S+ \(task code \w+ matches\)", timeout=60)
        creator = group.wait_for("peer0", r"^peer (\S+)", timeout=5).group(1)

        deadline = time.monotonic() + 60
        while True:  # until the progress records of both peers are in the DHT
            result = run_swarm(["runs", "--initial-peers", address, "--json"])
            assert result.returncode == 0, result.stderr
            runs = json.loads(result.stdout)
            assert isinstance(runs, list) and [r["run_id"] for r in runs] == ["listed-run"]
            run = runs[0]
            if run["peers"] == 2 and run["epoch"] >= 1 and run["loss"] is not None and run["samples_per_second"] > 0:
                break
            assert time.monotonic() < deadline, f"the listing never showed the training: {run}\n{group.log('peer0')}"
            time.sleep(1.0)
        assert isinstance(run["epoch"], int) and isinstance(run["loss"], float) and run["loss"] == run["loss"]
        assert isinstance(run["samples_per_second"], (int, float))
        assert run["creator"] == creator and run["task"] == task and len(run["task_hash"]) == 64

        table = run_swarm(["runs", "--initial-peers", address])
        assert table.returncode == 0 and "listed-run" in table.stdout and "PEERS" in table.stdout
        assert all(group.procs[f"peer{i}"].poll() is None for i in range(2)), group.log("peer0")


@pytest.mark.slow
def test_a_restarted_peer_resumes_from_its_checkpoint(tmp_path):
    task = _task(tmp_path)
    checkpoints = tmp_path / "checkpoints"
    metrics = tmp_path / "metrics.jsonl"
    common = ("--checkpoint-dir", str(checkpoints), "--checkpoint-every", "1", "--metrics-file", str(metrics))
    first = run_swarm(_join_args(task, tmp_path, "p", "--max-epochs", "3", *common))
    assert first.returncode == 0, first.stderr
    assert "resumed from checkpoint" not in first.stdout and "reached --max-epochs 3" in first.stdout
    assert [r["epoch"] for r in read_jsonl(metrics)] == [1, 2, 3]
    assert sorted(p.name for p in checkpoints.iterdir()) == [f"tiny-epoch{e:08d}.swst" for e in (1, 2, 3)]

    second = run_swarm(_join_args(task, tmp_path, "p", "--max-epochs", "6", *common))
    assert second.returncode == 0, second.stderr
    assert f"resumed from checkpoint {checkpoints / 'tiny-epoch00000003.swst'} (epoch 3)" in second.stdout
    records = read_jsonl(metrics)
    assert [r["epoch"] for r in records] == [1, 2, 3, 4, 5, 6]  # the epoch continues
    assert all(r["loss"] == r["loss"] for r in records)
    # three checkpoints kept: the newest
    assert sorted(p.name for p in checkpoints.iterdir()) == [f"tiny-epoch{e:08d}.swst" for e in (4, 5, 6)]
    # the optimizer continued from the checkpoint, not from scratch: Adam took 3 + 3 steps
    path, state = latest_checkpoint(checkpoints, "tiny")
    assert path.name == "tiny-epoch00000006.swst" and state.metadata["epoch"] == 6
    assert float(state.tensors["opt.0.step"]) == 6.0
