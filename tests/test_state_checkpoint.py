"""Training state blobs, checkpoints and task loading (fast, no network)."""

from __future__ import annotations

import os
import struct
import textwrap

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from swarm.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from swarm.state import (FORMAT_VERSION, MAGIC, StateFormatError, TrainingState, optimizer_state_from_tensors,
                         optimizer_state_to_tensors, pack_state, state_hash, unpack_state)
from swarm.task import Task, TaskLoadError, load_task, split_task_ref, task_code_hash

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool]


def _random_tensor(dtype: torch.dtype, shape: list[int], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 100).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000) + 1, shape, generator=g, dtype=torch.int64).to(dtype)


# ---------------------------------------------------------------- state blobs

@settings(max_examples=60, deadline=None)
@given(entries=st.lists(st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 5), max_size=4)),
                        max_size=6),
       epoch=st.integers(0, 2 ** 40), seed=st.integers(0, 2 ** 16))
def test_pack_unpack_roundtrip(entries, epoch, seed):
    tensors = {f"t{i}": _random_tensor(dtype, shape, seed + i) for i, (dtype, shape) in enumerate(entries)}
    metadata = {"epoch": epoch, "mode": "sync", "nested": {"a": [1, 2.5, None, "x"]}}
    blob = pack_state(TrainingState(metadata, tensors))
    assert blob[:4] == MAGIC
    state = unpack_state(blob)
    assert state.metadata == metadata
    assert list(state.tensors) == list(tensors)
    for name, original in tensors.items():
        got = state.tensors[name]
        assert got.dtype == original.dtype and got.shape == original.shape
        assert torch.equal(got, original)
    assert pack_state(state) == blob  # deterministic: the same state hashes the same everywhere
    assert state_hash(blob) == state_hash(bytes(blob)) and len(state_hash(blob)) == 64


def test_pack_copies_non_contiguous_tensors_and_rejects_unsupported_dtypes():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    assert torch.equal(unpack_state(pack_state(TrainingState({}, {"t": t}))).tensors["t"], t)
    scalar = torch.tensor(1.5, dtype=torch.bfloat16)  # 0-dim bfloat16 (optimizer step counters can be 0-dim)
    assert torch.equal(unpack_state(pack_state(TrainingState({}, {"s": scalar}))).tensors["s"], scalar)
    with pytest.raises(TypeError, match="not supported"):
        pack_state(TrainingState({}, {"c": torch.zeros(2, dtype=torch.complex64)}))


def _blob() -> bytes:
    return pack_state(TrainingState({"epoch": 3}, {"w": torch.arange(10, dtype=torch.float32),
                                                   "b": torch.ones(2, 3, dtype=torch.int64)}))


def test_truncated_blobs_raise_state_format_error_at_every_length():
    blob = _blob()
    for length in range(len(blob)):
        with pytest.raises(StateFormatError):
            unpack_state(blob[:length])


@pytest.mark.parametrize("corrupt, message", [
    (lambda b: b"XXXX" + b[4:], "bad magic"),
    (lambda b: b[:4] + struct.pack("<H", FORMAT_VERSION + 1) + b[6:], "version"),
    (lambda b: b[:6] + struct.pack("<I", 2 ** 31) + b[10:], "truncated"),
    (lambda b: b"", "truncated"),
    (lambda b: b"\x00" * 4096, "bad magic"),
])
def test_corrupt_or_foreign_blobs_raise_state_format_error(corrupt, message):
    with pytest.raises(StateFormatError, match=message):
        unpack_state(corrupt(_blob()))


def _with_metadata(metadata) -> bytes:
    meta = msgpack.packb(metadata, use_bin_type=True)
    return struct.pack("<4sHI", MAGIC, FORMAT_VERSION, len(meta)) + meta + b"\0" * 64


@pytest.mark.parametrize("metadata", [
    {"epoch": 1},  # no layout
    [1, 2, 3],  # not a map
    {"tensors": [["w", "float32", [4], 0]]},  # short entry
    {"tensors": [["w", "complex64", [2], 0, 16]]},  # unknown dtype
    {"tensors": [["w", "float32", [4], 0, 15]]},  # size does not match the shape
    {"tensors": [["w", "float32", [100], 0, 400]]},  # beyond the bytes
    {"tensors": [["w", "float32", [4], -8, 16]]},  # negative offset
    {"tensors": [["w", "float32", [-4], 0, 16]]},  # negative dimension
    {"tensors": [["w", "float32", ["x"], 0, 16]]},  # not a shape
])
def test_malformed_layouts_raise_state_format_error(metadata):
    with pytest.raises(StateFormatError):
        unpack_state(_with_metadata(metadata))


def test_garbage_metadata_raises_state_format_error():
    blob = struct.pack("<4sHI", MAGIC, FORMAT_VERSION, 5) + b"\xc1\xc1\xc1\xc1\xc1"
    with pytest.raises(StateFormatError, match="metadata"):
        unpack_state(blob)


# ---------------------------------------------------------------- optimizer state

def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))


def _train(model, opt, steps=3):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(8, 4, generator=g)
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("factory", [
    lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.8, 0.95)),
    lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, amsgrad=True),
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
], ids=["adam", "adamw-amsgrad", "sgd-momentum"])
def test_optimizer_state_roundtrip_through_a_blob(factory):
    source = _model()
    opt = factory(source.parameters())
    _train(source, opt)
    meta, tensors = optimizer_state_to_tensors(opt)
    assert tensors, "a trained optimizer has state tensors"
    blob = pack_state(TrainingState({"optimizer": meta}, tensors))
    state = unpack_state(blob)

    target = _model()
    with torch.no_grad():
        for p, q in zip(target.parameters(), source.parameters()):
            p.copy_(q)
    opt2 = factory(target.parameters())
    optimizer_state_from_tensors(opt2, state.metadata["optimizer"], state.tensors)
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for index in a["state"]:
        assert a["state"][index].keys() == b["state"][index].keys()
        for key, value in a["state"][index].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, b["state"][index][key]), (index, key)
            else:
                assert value == b["state"][index][key]
    # and both continue identically
    _train(source, opt, 2)
    _train(target, opt2, 2)
    for p, q in zip(source.parameters(), target.parameters()):
        assert torch.equal(p, q)


def test_optimizer_state_from_tensors_rejects_missing_tensors_and_other_groups():
    model = _model()
    opt = torch.optim.Adam(model.parameters())
    _train(model, opt, 1)
    meta, tensors = optimizer_state_to_tensors(opt)
    missing = dict(tensors)
    missing.pop(next(iter(missing)))
    with pytest.raises(StateFormatError, match="missing"):
        optimizer_state_from_tensors(torch.optim.Adam(_model().parameters()), meta, missing)
    two_groups = torch.optim.Adam([{"params": list(model.parameters())[:2]}, {"params": list(model.parameters())[2:]}])
    with pytest.raises(StateFormatError, match="groups"):
        optimizer_state_from_tensors(two_groups, meta, tensors)


# ---------------------------------------------------------------- checkpoints

def test_checkpoint_is_written_atomically_and_only_the_newest_are_kept(tmp_path):
    blobs = {}
    for epoch in range(1, 7):
        blobs[epoch] = pack_state(TrainingState({"epoch": epoch, "run_id": "run/1"}, {"w": torch.full((3,), epoch)}))
        path = save_checkpoint(tmp_path, "run/1", epoch, blobs[epoch], keep=3)
        assert path.name == f"run_1-epoch{epoch:08d}.swst"
        assert path.read_bytes() == blobs[epoch]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"run_1-epoch{e:08d}.swst" for e in (4, 5, 6)]
    assert not list(tmp_path.glob(".tmp-*"))  # no temporary file left behind
    path, state = latest_checkpoint(tmp_path, "run/1")
    assert path.name.endswith("00000006.swst") and state.metadata["epoch"] == 6
    assert latest_checkpoint(tmp_path, "other-run") is None
    assert latest_checkpoint(tmp_path / "missing", "run/1") is None


def test_a_failed_write_leaves_no_file_under_a_checkpoint_name(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, "r", 1, pack_state(TrainingState({"epoch": 1}, {})))

    def fail(*_args):
        raise OSError("disk full")
    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, "r", 2, pack_state(TrainingState({"epoch": 2}, {})))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r-epoch00000001.swst"]


def test_latest_checkpoint_skips_a_corrupt_newer_file(tmp_path, caplog):
    good = pack_state(TrainingState({"epoch": 4, "run_id": "r"}, {"w": torch.ones(5)}))
    save_checkpoint(tmp_path, "r", 4, good)
    (tmp_path / "r-epoch00000005.swst").write_bytes(good[: len(good) // 2])  # truncated by a crash elsewhere
    (tmp_path / "r-epoch00000006.swst").write_bytes(os.urandom(300))  # garbage
    with caplog.at_level("WARNING"):
        path, state = latest_checkpoint(tmp_path, "r")
    assert path.name == "r-epoch00000004.swst" and state.metadata["epoch"] == 4
    assert "00000006" in caplog.text and "00000005" in caplog.text


def test_only_unusable_checkpoints_raise_with_the_reasons(tmp_path):
    (tmp_path / "r-epoch00000002.swst").write_bytes(b"garbage")
    foreign = pack_state(TrainingState({"epoch": 1, "run_id": "someone-else"}, {}))
    (tmp_path / "r-epoch00000001.swst").write_bytes(foreign)
    with pytest.raises(CheckpointError) as info:
        latest_checkpoint(tmp_path, "r")
    assert "no usable checkpoint" in str(info.value)
    assert "truncated" in str(info.value) or "magic" in str(info.value)
    assert "belongs to run 'someone-else'" in str(info.value)
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(tmp_path / "absent.swst")


# ---------------------------------------------------------------- task loading

TASK_SOURCE = textwrap.dedent("""
    import torch
    from swarm import Task

    def data(shard, num_shards, batch_size, seed):
        g = torch.Generator().manual_seed(seed)
        for _ in range(4):
            yield torch.randn(batch_size, 3, generator=g), torch.randint(0, 2, (batch_size,), generator=g)

    def make():
        return Task(name="made", model=lambda: torch.nn.Linear(3, 2),
                    optimizer=lambda p: torch.optim.SGD(p, lr=0.1), data=data,
                    loss=lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1]), batch_size=4)

    task = make()
    other = Task(**{**task.__dict__, "name": "other"})
    not_a_task = 42
""")


def test_split_task_ref():
    assert split_task_ref("examples/digits.py") == ("examples/digits.py", "task")
    assert split_task_ref("examples/digits.py:diloco") == ("examples/digits.py", "diloco")
    assert split_task_ref("pkg.module:attr") == ("pkg.module", "attr")
    assert split_task_ref("pkg.module") == ("pkg.module", "task")
    assert split_task_ref("C:/x/y.py:attr") == ("C:/x/y.py", "attr")


def test_load_task_from_a_file_an_attribute_a_factory_and_a_module(tmp_path, monkeypatch):
    path = tmp_path / "mytask.py"
    path.write_text(TASK_SOURCE)
    task = load_task(str(path))
    assert isinstance(task, Task) and task.name == "made"
    assert load_task(f"{path}:other").name == "other"
    assert load_task(f"{path}:make").name == "made"  # a callable returning a Task
    batches = task.batches(0, 1, seed=3)
    first = [next(batches) for _ in range(6)]  # a finite data iterable is restarted
    assert all(b[0].shape == (4, 3) for b in first) and task.samples_in(first[0]) == 4
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_task("mytask:other").name == "other"
    assert task_code_hash("mytask:other") == task_code_hash(str(path)) == task_code_hash(f"{path}:other")


def test_task_code_hash_follows_the_code(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text(TASK_SOURCE)
    b.write_text(TASK_SOURCE + "\n# a comment changes the code\n")
    assert task_code_hash(str(a)) != task_code_hash(str(b))
    assert len(task_code_hash(str(a))) == 64
    b.write_text(TASK_SOURCE)
    assert task_code_hash(str(a)) == task_code_hash(str(b))


@pytest.mark.parametrize("source, ref_suffix, message", [
    ("import no_such_module_xyz\n", "", "failed to import: ModuleNotFoundError"),
    ("raise RuntimeError('boom at import')\n", "", "boom at import"),
    ("def oops(:\n", "", "SyntaxError"),
    ("import sys\nsys.exit(3)\n", "", "SystemExit"),
    (TASK_SOURCE, ":missing", "has no attribute 'missing'"),
    (TASK_SOURCE, ":not_a_task", "is an int, not a swarm.Task"),
    ("task = None\n", "", "not a swarm.Task"),
    ("def task():\n    raise ValueError('bad factory')\n", "", "bad factory"),
    ("x = 1\n", "", "has no attribute 'task'"),
])
def test_task_load_errors_say_why(tmp_path, source, ref_suffix, message):
    path = tmp_path / "broken.py"
    path.write_text(source)
    with pytest.raises(TaskLoadError, match=message.replace("(", r"\(")):
        load_task(f"{path}{ref_suffix}")


def test_task_load_errors_for_missing_files_and_modules(tmp_path):
    with pytest.raises(TaskLoadError, match="does not exist"):
        load_task(str(tmp_path / "absent.py"))
    with pytest.raises(TaskLoadError, match="failed to import"):
        load_task("no_such_package_xyz.tasks:task")


def test_task_validates_its_fields():
    base = dict(name="t", model=lambda: torch.nn.Linear(1, 1), optimizer=lambda p: torch.optim.SGD(p, 0.1),
                data=lambda *a: iter(()), loss=lambda m, b: m(b).sum())
    with pytest.raises(TypeError, match="Task.model"):
        Task(**dict(base, model=3))
    with pytest.raises(ValueError, match="positive"):
        Task(**dict(base, batch_size=0))
    with pytest.raises(ValueError, match="target"):
        Task(**dict(base, target=("accuracy",)))
    with pytest.raises(ValueError, match="yielded no batch"):
        next(Task(**base).batches(0, 1))
    t = Task(**dict(base, target=("accuracy", 0.9)))
    assert t.target_reached({"accuracy": 0.95}) and not t.target_reached({"accuracy": 0.5})
    assert Task(**dict(base, target=("loss", 1.0))).target_reached({"loss": 0.5})
    assert not t.target_reached({"loss": 0.1})
