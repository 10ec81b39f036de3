"""The LR scheduler's state is part of the shared training state and of checkpoints: a joiner that
downloads the state continues at the swarm's learning rate, a checkpoint resumes it, a state of format
version 1 (no scheduler state) still loads, and a hostile scheduler state is refused. The download
runs over real sockets on loopback (two DHT peers in one process)."""

from __future__ import annotations

import argparse
import math
import struct
import threading
import time

import msgpack
import pytest
import torch

from dht import DHT
from swarm.checkpoint import latest_checkpoint, save_checkpoint
from swarm.daemon import _optimizer_options
from swarm.optimizer import Optimizer
from swarm.state import (FORMAT_VERSION, MAGIC, StateFormatError, TrainingState, pack_state, unpack_state,
                         validated_scheduler_state)
from swarm.task import Task
from tests.test_optimizer import dhts  # noqa: F401 -- the fixture

LR = 0.1


def schedule(epoch: int) -> float:
    return 0.2 ** (epoch // 2)  # 0.1, 0.1, 0.02, 0.02, 0.004, ...


def make_scheduler(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(opt, schedule)




def peer(dht: DHT, mode: str = "sync", seed: int = 7) -> tuple[Optimizer, torch.nn.Module]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 1)
    options = dict(target_batch_size=32) if mode == "sync" else dict(inner_steps=2)
    opt = Optimizer(dht=dht, run_id=f"sched-{mode}", optimizer=lambda p: torch.optim.SGD(p, LR, momentum=0.9),
                    params=model.parameters(), batch_size_per_step=32, mode=mode, scheduler=make_scheduler,
                    matchmaking_time=0.5, averaging_timeout=10, **options)
    return opt, model


def train_epoch(opt: Optimizer, model: torch.nn.Module, seed: int, limit: float = 60.0) -> None:
    """Local steps until this peer's epoch advances (by averaging with the others, or alone)."""
    g = torch.Generator().manual_seed(seed)
    start, deadline = opt.local_epoch, time.monotonic() + limit
    while opt.local_epoch == start and time.monotonic() < deadline:
        x = torch.randn(32, 4, generator=g)
        loss = ((model(x) - x.sum(dim=1, keepdim=True)) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert opt.local_epoch > start, "the epoch never ended"


def lrs(opt: Optimizer) -> list[float]:
    return [group["lr"] for group in opt.opt.param_groups]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "diloco"])
def test_joiner_continues_at_the_swarms_learning_rate(dhts, mode):
    first, second = dhts(2)
    donor, donor_model = peer(first, mode)
    joiner = None
    try:
        for epoch in range(3):
            train_epoch(donor, donor_model, epoch)
        assert donor.local_epoch == 3 and math.isclose(lrs(donor)[0], LR * schedule(3))  # 0.02
        joiner, joiner_model = peer(second, mode, seed=123)
        deadline = time.monotonic() + 20
        while not joiner.load_state_from_peers(min_epoch=3):
            assert time.monotonic() < deadline, "the joiner never found the donor's state"
            time.sleep(0.3)
        assert joiner.local_epoch == 3
        assert joiner.scheduler.state_dict() == donor.scheduler.state_dict()
        assert lrs(joiner) == lrs(donor)
        assert joiner.state_hash == donor.state_hash

        errors: list[BaseException] = []

        def run(opt: Optimizer, model: torch.nn.Module, seed: int) -> None:
            try:
                train_epoch(opt, model, seed)
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errors.append(e)
        threads = [threading.Thread(target=run, args=(donor, donor_model, 10)),
                   threading.Thread(target=run, args=(joiner, joiner_model, 11))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        assert not errors, errors
        assert donor.local_epoch == joiner.local_epoch == 4
        # the next epoch: both at 0.1 * 0.2**2 = 0.004 (a fresh scheduler would put the joiner at 0.1)
        assert math.isclose(lrs(joiner)[0], LR * schedule(4)) and lrs(joiner) == lrs(donor)
        assert joiner.scheduler.state_dict() == donor.scheduler.state_dict()
    finally:
        if joiner is not None:
            joiner.shutdown()
        donor.shutdown()


def version1_blob(state: TrainingState) -> bytes:
    """``state`` as a state of format version 1 would hold it: no scheduler state, version 1 header."""
    metadata = {k: v for k, v in state.metadata.items() if k != "scheduler"}
    tensors = {k: v for k, v in state.tensors.items() if not k.startswith("sched.")}
    blob = pack_state(TrainingState(metadata, tensors))
    return blob[:4] + struct.pack("<H", 1) + blob[6:]


@pytest.mark.slow
def test_checkpoints_resume_the_schedule_and_version_1_checkpoints_still_load(dhts, tmp_path):
    (dht,) = dhts(1)
    opt, model = peer(dht)
    try:
        for epoch in range(5):
            train_epoch(opt, model, epoch)
        blob = opt.training_state_blob()
        assert blob[4:6] == struct.pack("<H", FORMAT_VERSION) and FORMAT_VERSION == 2
        assert unpack_state(blob).metadata["scheduler"]["last_epoch"] == 5
        expected_lr, expected_schedule = lrs(opt), opt.scheduler.state_dict()
        save_checkpoint(tmp_path / "v2", opt.run_id, opt.local_epoch, blob)
        save_checkpoint(tmp_path / "v1", opt.run_id, opt.local_epoch, version1_blob(unpack_state(blob)))
    finally:
        opt.shutdown()
    for kind in ("v2", "v1"):
        fresh, fresh_model = peer(dht, seed=99)
        try:
            assert lrs(fresh) == [LR]
            _, state = latest_checkpoint(tmp_path / kind, fresh.run_id)
            assert state.version == (2 if kind == "v2" else 1)
            fresh.load_training_state(state)
            assert fresh.local_epoch == 5
            assert lrs(fresh) == expected_lr and math.isclose(expected_lr[0], LR * schedule(5)), kind
            assert fresh.scheduler.state_dict()["last_epoch"] == expected_schedule["last_epoch"]
            for mine, theirs in zip(fresh_model.parameters(), model.parameters()):
                assert torch.equal(mine.detach(), theirs.detach())
            train_epoch(fresh, fresh_model, 0)
            assert math.isclose(lrs(fresh)[0], LR * schedule(6)), kind
        finally:
            fresh.shutdown()


def _scheduler() -> torch.optim.lr_scheduler.LRScheduler:
    return make_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], LR))


@pytest.mark.parametrize("change", [
    lambda s: s.update(optimizer={"param_groups": []}),   # a key torch would copy into the scheduler
    lambda s: s.pop("last_epoch"),
    lambda s: s.update(last_epoch="5"),
    lambda s: s.update(last_epoch=float("nan")),
    lambda s: s.update(base_lrs=[0.1, 0.1]),
    lambda s: s.update(base_lrs=[[0.1]]),
    lambda s: s.update(_last_lr=None, lr_lambdas={"a": 1}),
    lambda s: s.update(_is_initial=1),
])
def test_a_hostile_scheduler_state_is_refused(change):
    scheduler = _scheduler()
    state = msgpack.unpackb(msgpack.packb(scheduler.state_dict()), strict_map_key=False)
    assert validated_scheduler_state(scheduler, state, {}) == scheduler.state_dict()
    change(state)
    before = scheduler.state_dict()
    with pytest.raises(StateFormatError):
        validated_scheduler_state(scheduler, state, {})
    assert scheduler.state_dict() == before


def test_another_schedulers_strings_are_refused():
    def one_cycle(anneal: str):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], LR)
        return torch.optim.lr_scheduler.OneCycleLR(opt, 1.0, total_steps=10, anneal_strategy=anneal)
    theirs = msgpack.unpackb(msgpack.packb(one_cycle("linear").state_dict()), strict_map_key=False)
    with pytest.raises(StateFormatError, match="_anneal_func_type"):
        validated_scheduler_state(one_cycle("cos"), theirs, {})


@pytest.mark.slow
def test_a_state_with_a_hostile_scheduler_state_changes_nothing(dhts):
    (dht,) = dhts(1)
    opt, model = peer(dht)
    try:
        state = unpack_state(opt.training_state_blob())
        state.metadata["scheduler"]["base_lrs"] = "x" * 100
        state.metadata["epoch"] = 7
        with torch.no_grad():
            for name in state.tensors:
                if name.startswith("param."):
                    state.tensors[name] = state.tensors[name] + 1
        before = [p.detach().clone() for p in model.parameters()]
        with pytest.raises(StateFormatError, match="base_lrs"):
            opt.load_training_state(state)
        assert opt.local_epoch == 0 and lrs(opt) == [LR]
        assert all(torch.equal(a, p.detach()) for a, p in zip(before, model.parameters()))
    finally:
        opt.shutdown()


def test_task_scheduler_reaches_the_optimizer():
    common = dict(name="t", model=lambda: torch.nn.Linear(1, 1), optimizer=lambda p: torch.optim.SGD(p, LR),
                  data=lambda *a: [], loss=lambda m, b: m(b).sum())
    task = Task(**common, scheduler=make_scheduler)
    options, _ = _optimizer_options(task, argparse.Namespace(matchmaking_time=None))
    assert options["scheduler"] is make_scheduler
    assert "scheduler" not in _optimizer_options(Task(**common), argparse.Namespace(matchmaking_time=None))[0]
    with pytest.raises(ValueError, match="once"):
        Task(**common, scheduler=make_scheduler, optimizer_options={"scheduler": make_scheduler})
    with pytest.raises(TypeError):
        Task(**common, scheduler="StepLR")
