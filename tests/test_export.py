"""`swarm export CHECKPOINT OUT.pt --task TASK` and `swarm.export_state_dict`: a checkpoint (parameters by
position) becomes a plain state_dict that the task's model loads with load_state_dict(torch.load(OUT)),
without swarm. The checkpoints come from a real Optimizer on a loopback DHT, saved as the daemon does."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from dht import DHT
from swarm.checkpoint import CheckpointError, save_checkpoint
from tests.processes import ROOT

TASK = '''
import torch
from torch import nn
from swarm import Task


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 5)
        self.norm = nn.BatchNorm1d(5)            # running statistics: buffers, not parameters
        self.head = nn.Linear(5, 5, bias=False)
        self.tied = self.head                     # a second name for the same parameters

    def forward(self, x):
        return self.tied(torch.relu(self.norm(self.embed(x))))


def data(shard, num_shards, batch_size, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(4):
        x = torch.randn(batch_size, 6, generator=g)
        yield x, x[:, :5]


task = Task(name="export-test", model=Net, optimizer=lambda p: torch.optim.Adam(p, 1e-2), data=data,
            loss=lambda model, batch: ((model(batch[0]) - batch[1]) ** 2).mean(), batch_size=8,
            target_batch_size=16)
other = Task(**{**task.__dict__, "name": "other", "model": lambda: nn.Linear(6, 3)})
'''


def export_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "swarm", "export", *args], capture_output=True, text=True,
                          timeout=120, env=env, cwd=ROOT, stdin=subprocess.DEVNULL)


@pytest.fixture
def task_file(tmp_path):
    path = tmp_path / "export_task.py"
    path.write_text(TASK)
    return path


def _trained_checkpoint(directory, task_file, mode: str) -> tuple[list[torch.Tensor], object]:
    """Save a checkpoint like `swarm join` does; returns the parameters the swarm agreed on."""
    from swarm import Optimizer
    from swarm.task import load_task

    task = load_task(str(task_file))
    model = task.model()
    with DHT(host="127.0.0.1") as dht:
        opt = Optimizer(dht=dht, run_id="export-run", optimizer=task.optimizer, params=model.parameters(),
                        target_batch_size=task.target_batch_size, batch_size_per_step=task.batch_size, mode=mode)
        try:
            g = torch.Generator().manual_seed(1)
            with torch.no_grad():  # "training": every parameter gets distinct values
                for p in model.parameters():
                    p.copy_(torch.randn(p.shape, generator=g))
                if mode == "diloco":  # the agreed (global) parameters differ from this peer's local ones
                    for gp in opt.global_params:
                        gp.copy_(torch.randn(gp.shape, generator=g))
            agreed = [t.clone() for t in (opt.global_params if mode == "diloco" else model.parameters())]
            opt.local_epoch = 12
            save_checkpoint(directory, "export-run", opt.local_epoch, opt.training_state_blob())
        finally:
            opt.shutdown()
    return agreed, task


@pytest.mark.parametrize("mode", ["sync", "diloco"])
def test_swarm_export_writes_a_state_dict_the_model_loads(tmp_path, task_file, mode):
    agreed, task = _trained_checkpoint(tmp_path / "ckpt", task_file, mode)
    checkpoint = tmp_path / "ckpt" / "export-run-epoch00000012.swst"
    assert checkpoint.exists()
    for source in (checkpoint, tmp_path / "ckpt"):  # the file, or the checkpoint directory
        out = tmp_path / f"model-{source.name}.pt"
        done = export_cli(str(source), str(out), "--task", str(task_file))
        assert done.returncode == 0, done.stderr[-2000:]
        state_dict = torch.load(out)  # weights_only: plain tensors, no pickled objects
        fresh = task.model()
        fresh.load_state_dict(state_dict)  # strict: every name of the model, nothing else
        for got, want in zip(fresh.parameters(), agreed):
            assert torch.equal(got, want)
        assert torch.equal(fresh.tied.weight, fresh.head.weight)
        assert set(state_dict) == set(task.model().state_dict())

    import swarm

    helper = swarm.export_state_dict(checkpoint, task=str(task_file))
    assert all(torch.equal(helper[k], v) for k, v in torch.load(out).items())


def test_export_of_a_checkpoint_that_does_not_fit_the_task(tmp_path, task_file):
    _trained_checkpoint(tmp_path / "ckpt", task_file, "sync")
    checkpoint = tmp_path / "ckpt" / "export-run-epoch00000012.swst"
    wrong = export_cli(str(checkpoint), str(tmp_path / "out.pt"), "--task", f"{task_file}:other")
    assert wrong.returncode == 5, wrong.stderr
    assert "is it a checkpoint of this task?" in wrong.stderr and "Traceback" not in wrong.stderr
    assert not (tmp_path / "out.pt").exists()
    missing_task = export_cli(str(checkpoint), str(tmp_path / "out.pt"), "--task", str(tmp_path / "nope.py"))
    assert missing_task.returncode == 2 and "does not exist" in missing_task.stderr
    corrupt = tmp_path / "corrupt.swst"
    corrupt.write_bytes(checkpoint.read_bytes()[:100])
    broken = export_cli(str(corrupt), str(tmp_path / "out.pt"), "--task", str(task_file))
    assert broken.returncode == 5 and "unusable" in broken.stderr, broken.stderr
    from swarm.export import export_state_dict

    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        export_state_dict(tmp_path / "empty", task=str(task_file))
