"""The example tasks load with swarm.task.load_task, train locally (loss goes down) and evaluate to
finite numbers. No network: a few plain local steps of each task's model, optimizer, data and loss."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from swarm.task import Task, load_task

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _local_training(task: Task, steps: int, shard: int = 0, num_shards: int = 2) -> tuple[dict, dict, list[float]]:
    """(evaluation before, evaluation after, training losses) of ``steps`` local steps."""
    torch.manual_seed(0)
    model = task.model()
    opt = task.optimizer(model.parameters())
    before = task.evaluate(model.eval())
    model.train()
    batches = task.batches(shard, num_shards, seed=1)
    losses = []
    for _ in range(steps):
        batch = next(batches)
        assert task.samples_in(batch) == task.batch_size
        loss = task.loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return before, task.evaluate(model.eval()), losses


def _check_learns(before: dict, after: dict, losses: list[float], drop: float) -> None:
    for metrics in (before, after):
        assert "loss" in metrics
        assert all(math.isfinite(float(v)) for v in metrics.values()), metrics
    assert after["loss"] < drop * before["loss"], (before, after)
    head, tail = losses[:3], losses[-3:]
    assert sum(tail) / 3 < sum(head) / 3, losses


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_digits_task_trains_locally():
    pytest.importorskip("sklearn")
    task = load_task(str(EXAMPLES / "digits.py"))
    assert task.name == "digits" and task.evaluate is not None
    before, after, losses = _local_training(task, steps=40)
    _check_learns(before, after, losses, drop=0.7)
    assert 0.0 <= after["accuracy"] <= 1.0 and after["accuracy"] > before["accuracy"]


def test_charlm_task_trains_locally_on_the_standard_library(monkeypatch):
    monkeypatch.delenv("SWARM_CHARLM_DATA", raising=False)
    monkeypatch.setenv("SWARM_CHARLM_MAX_BYTES", "1000000")  # a smaller corpus: faster, same code path
    task = load_task(str(EXAMPLES / "charlm.py"))
    assert task.name == "charlm" and task.target is not None
    before, after, losses = _local_training(task, steps=30)
    _check_learns(before, after, losses, drop=0.7)
    assert after["bits_per_byte"] == pytest.approx(after["loss"] / math.log(2))
    assert before["bits_per_byte"] > 7.0  # an untrained model: ~8 bits per byte


def test_example_diloco_variants_load():
    pytest.importorskip("sklearn")
    for name in ("digits", "charlm"):
        task = load_task(f"{EXAMPLES / name}.py:diloco")
        assert task.optimizer_options.get("mode") == "diloco"
        assert task.target_batch_size > load_task(str(EXAMPLES / f"{name}.py")).target_batch_size


def test_charlm_shards_by_file_and_holds_files_out(monkeypatch, tmp_path):
    for i in range(40):
        (tmp_path / f"f{i:02d}.txt").write_text(f"file {i:02d} " + "abcdefgh" * 20 + "\n")
    (tmp_path / "binary.bin").write_bytes(b"\0\1\2" * 100)
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "secret.txt").write_text("never read " * 50)
    monkeypatch.setenv("SWARM_CHARLM_DATA", str(tmp_path))
    monkeypatch.setenv("SWARM_CHARLM_MAX_BYTES", "1000000")
    task = load_task(str(EXAMPLES / "charlm.py"))
    module = task._module  # type: ignore[attr-defined]
    shards = [bytes(module.shard_bytes(i, 3).to(torch.uint8).tolist()) for i in range(3)]
    held = bytes(module.heldout_windows().to(torch.uint8).reshape(-1).tolist())
    names = [{f"file {i:02d}" for i in range(40) if f"file {i:02d}".encode() in s} for s in shards]
    assert all(names), names
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2]), "a file in two shards"
    assert len(set.union(*names)) == 36  # 4 of 40 files held out
    assert b"never read" not in b"".join(shards) and b"\0" not in b"".join(shards)
    assert b"file 09" in held and b"file 09" not in b"".join(shards)
    inputs, targets = next(task.batches(1, 3, batch_size=4, seed=0))
    assert inputs.shape == targets.shape == (4, module.CONTEXT)
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    before = task.evaluate(task.model())
    assert math.isfinite(before["loss"])


def test_charlm_bad_data_path_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("SWARM_CHARLM_DATA", str(tmp_path / "missing"))
    task = load_task(str(EXAMPLES / "charlm.py"))
    with pytest.raises(FileNotFoundError, match="SWARM_CHARLM_DATA"):
        next(task.batches(0, 1))
