"""Task: what a user writes to define a collaborative training job.

A task file is plain Python that every peer has locally (task code is never fetched from peers)::

    # my_task.py
    import torch
    from swarm import Task

    def batches(shard: int, num_shards: int, batch_size: int, seed: int):
        ...  # yield batches from this peer's shard of the data (finite: it is restarted; or endless)

    task = Task(
        name="my-task",
        model=lambda: torch.nn.Linear(10, 2),
        optimizer=lambda params: torch.optim.Adam(params, lr=1e-3),
        data=batches,
        loss=lambda model, batch: torch.nn.functional.cross_entropy(model(batch[0]), batch[1]),
        evaluate=None,                       # optional: model -> {"loss": ..., "accuracy": ...}
        target_batch_size=256,               # samples per collaborative step, all peers together
    )

``swarm join my_task.py`` (attribute ``task``), ``swarm join my_task.py:other`` or
``swarm join package.module:attr`` load it with :func:`load_task`; :func:`task_code_hash` is what a
run announcement pins, so that every peer of a run runs the same code.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

__all__ = ["Task", "TaskLoadError", "load_task", "task_code_hash", "split_task_ref"]


class TaskLoadError(RuntimeError):
    """A task reference could not be loaded; the message says why."""


def _required(*_args: Any) -> Any:
    """Default of the Task fields that must be given (``__post_init__`` says which is missing)."""
    raise TypeError("a required Task field was not given")


def _first_item(batch: Any) -> Any:
    """The default ``Task.stage_input``: ``batch[0]`` of a tuple or list, else the batch itself."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


@dataclass
class Task:
    """A training job.

    - ``model``: a factory returning a fresh ``torch.nn.Module`` (called once per peer; every peer
      must build the same architecture; parameters are replaced by the swarm's).
    - ``optimizer``: a factory ``params -> torch.optim.Optimizer`` (the inner/local optimizer).
    - ``scheduler``: optional factory ``optimizer -> LR scheduler`` (e.g.
      ``lambda opt: torch.optim.lr_scheduler.StepLR(opt, 10, 0.5)``), stepped once per collaborative
      epoch (as hivemind's ``Optimizer(scheduler=...)``); its state travels with the shared state and
      checkpoints, so a joiner continues at the swarm's learning rate. Passed to
      :class:`swarm.Optimizer` as ``scheduler=`` (so ``optimizer_options`` must not also set it).
    - ``data``: ``data(shard, num_shards, batch_size, seed) -> iterable of batches`` of shard
      ``shard`` of ``num_shards`` (``swarm join --shard I/N``; default ``0/1``: all the data), in an
      order given by ``seed`` (each peer's differs: it comes from the peer id), so that peers do not
      train on the same samples at the same time. It may be finite (it is restarted with the next
      seed) or endless.
    - ``loss``: ``loss(model, batch) -> scalar tensor``.
    - ``count_samples``: optional ``count_samples(batch) -> int``, the number of samples in a batch
      (default: ``len(batch[0])`` for a tuple or list, else ``len(batch)``).
    - ``evaluate``: optional ``evaluate(model) -> dict`` with at least ``"loss"`` (e.g. held-out
      loss and accuracy), run by the daemon every ``eval_every`` epochs.
    - ``target``: optional ``(metric, goal)``, e.g. ``("accuracy", 0.9)`` or ``("loss", 1.5)``:
      what ``swarm demo`` trains to (higher is better for "accuracy", lower for anything else).
    - ``target_batch_size`` (samples per collaborative epoch, all peers together), ``batch_size``
      (per local step), ``hyperparameters`` (free-form, shown in the run announcement) and
      ``optimizer_options`` (extra keyword arguments for :class:`swarm.Optimizer`, e.g.
      ``{"mode": "diloco", "inner_steps": 50}``).

    A **pipeline** task (SWARM parallelism, :mod:`swarm.pipeline`) gives ``stages=[f0, f1, ...]``
    instead of ``model``: zero-argument factories of ``torch.nn.Module``, stage ``k`` feeding stage
    ``k + 1`` (each stage maps one tensor to one tensor; the first may take integer token ids).
    Then ``loss`` is ``loss(output, batch) -> scalar tensor`` (the last stage's output and the
    batch), ``stage_input(batch)`` is the first stage's input (default ``batch[0]``), and
    ``stage_costs`` (optional, one positive number per stage) are the relative FLOPs per sample of
    the stages (default: each stage's parameter count). ``optimizer`` is applied to one stage's
    parameters. :meth:`build_stage` builds a stage with the same initial weights on every peer.
    """

    name: str
    model: Callable[[], torch.nn.Module] | None = None  # None only for a pipeline task (``stages``)
    optimizer: Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer] = _required
    data: Callable[[int, int, int, int], Iterable[Any]] = _required
    loss: Callable[[Any, Any], torch.Tensor] = _required  # (model, batch); pipeline: (output, batch)
    batch_size: int = 32
    target_batch_size: int = 256
    evaluate: Callable[[torch.nn.Module], dict] | None = None
    eval_every: int = 5
    target: tuple[str, float] | None = None
    count_samples: Callable[[Any], int] | None = None
    hyperparameters: dict = field(default_factory=dict)
    optimizer_options: dict = field(default_factory=dict)
    scheduler: Callable[[torch.optim.Optimizer], Any] | None = None
    stages: list[Callable[[], torch.nn.Module]] | None = None
    stage_input: Callable[[Any], Any] = _first_item
    stage_costs: list[float] | None = None

    def __post_init__(self) -> None:
        for name in ("optimizer", "data", "loss"):
            if getattr(self, name) is _required:
                raise TypeError(f"Task.{name} is required")
        if self.stages is not None:
            self._check_stages()
        elif self.stage_costs is not None:
            raise ValueError("Task.stage_costs needs Task.stages")
        for name in ("model", "optimizer", "data", "loss", "stage_input"):
            if not (self.stages is not None and name == "model") and not callable(getattr(self, name)):
                raise TypeError(f"Task.{name} must be callable, got {getattr(self, name)!r}")
        if self.scheduler is not None and not callable(self.scheduler):
            raise TypeError(f"Task.scheduler must be a factory taking the optimizer, got {self.scheduler!r}")
        if self.scheduler is not None and "scheduler" in self.optimizer_options:
            raise ValueError("set the scheduler once: Task.scheduler or optimizer_options['scheduler'], not both")
        if self.batch_size <= 0 or self.target_batch_size <= 0:
            raise ValueError("Task.batch_size and Task.target_batch_size must be positive")
        if self.target is not None and (len(self.target) != 2 or not isinstance(self.target[0], str)):
            raise ValueError("Task.target must be (metric name, goal), e.g. ('accuracy', 0.9)")

    def build_model(self) -> torch.nn.Module:
        """A fresh ``model()``; a pipeline task has no single model (ValueError: use :meth:`build_stage`)."""
        if self.model is None:
            raise ValueError(f"task {self.name!r} is a pipeline task of {self.num_stages} stages: it has no "
                             "single model (build_stage(k) builds stage k)")
        return self.model()

    def _check_stages(self) -> None:
        stages = self.stages
        if not isinstance(stages, (list, tuple)) or not stages or not all(callable(f) for f in stages):
            raise TypeError(f"Task.stages must be a non-empty list of module factories, got {stages!r}")
        self.stages = list(stages)
        if self.model is not None:
            raise ValueError("a pipeline task gives Task.stages instead of Task.model, not both")
        if self.stage_costs is not None:
            costs = list(self.stage_costs)
            if len(costs) != len(stages) or not all(isinstance(c, (int, float)) and 0 < c < float("inf")
                                                    for c in costs):
                raise ValueError(f"Task.stage_costs must be {len(stages)} positive numbers (one per stage), "
                                 f"got {self.stage_costs!r}")
            self.stage_costs = [float(c) for c in costs]

    @property
    def is_pipeline(self) -> bool:
        """Whether the model is split into ``stages`` (served by different peers)."""
        return self.stages is not None

    @property
    def num_stages(self) -> int:
        """The number of stages (1 for a task with a single ``model``)."""
        return len(self.stages) if self.stages is not None else 1

    def _stage_factory(self, k: int) -> Callable[[], torch.nn.Module]:
        if self.stages is None:
            raise ValueError(f"task {self.name!r} is not a pipeline task (it has no Task.stages)")
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < len(self.stages):
            raise IndexError(f"task {self.name!r} has stages 0..{len(self.stages) - 1}, not {k!r}")
        return self.stages[k]

    def stage_seed(self, k: int) -> int:
        """The torch seed :meth:`build_stage` uses for stage ``k``: the first 8 bytes (big-endian, top
        bit cleared) of ``sha256(f"swarm.stage:{name}:{k}")``, so every peer builds the same weights."""
        digest = hashlib.sha256(f"swarm.stage:{self.name}:{k}".encode()).digest()
        return int.from_bytes(digest[:8], "big") & (2 ** 63 - 1)

    def build_stage(self, k: int) -> torch.nn.Module:
        """A fresh stage ``k`` with the initial weights every peer gets (``torch.manual_seed``
        (:meth:`stage_seed`) inside a forked RNG: the caller's random state is left untouched)."""
        factory = self._stage_factory(k)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.stage_seed(k))
            module = factory()
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"Task.stages[{k}]() returned {type(module).__name__}, not a torch.nn.Module")
        return module

    def stage_cost(self, k: int) -> float:
        """Relative FLOPs per sample of stage ``k``: ``stage_costs[k]`` if given, else the stage's
        parameter count (at least 1), counted on the meta device (no memory allocated)."""
        factory = self._stage_factory(k)
        if self.stage_costs is not None:
            return self.stage_costs[k]
        try:
            with torch.device("meta"):
                module = factory()
        except Exception:  # noqa: BLE001 - a factory that insists on real tensors: build it for real
            module = self.build_stage(k)
        return float(max(sum(p.numel() for p in module.parameters()), 1))

    def samples_in(self, batch: Any) -> int:
        """The number of samples in ``batch``."""
        if self.count_samples is not None:
            return int(self.count_samples(batch))
        first = batch[0] if isinstance(batch, (tuple, list)) else batch
        return len(first)

    def batches(self, shard: int, num_shards: int, batch_size: int | None = None, seed: int = 0) -> Iterator[Any]:
        """Endless batches of this shard (a finite ``data`` iterable is restarted with a new seed)."""
        epoch = 0
        while True:
            empty = True
            for batch in self.data(shard, num_shards, batch_size or self.batch_size, seed + epoch):
                empty = False
                yield batch
            if empty:
                raise ValueError(f"task {self.name!r}: data({shard}, {num_shards}, ...) yielded no batch")
            epoch += 1

    def target_reached(self, metrics: dict) -> bool:
        """Whether ``metrics`` (from ``evaluate``) meet ``target``."""
        if self.target is None or self.target[0] not in metrics:
            return False
        name, goal = self.target
        value = float(metrics[name])
        return value >= goal if name.startswith("acc") else value <= goal


def split_task_ref(ref: str) -> tuple[str, str]:
    """``"path/file.py[:attr]"`` or ``"package.module:attr"`` -> (location, attribute); default ``task``."""
    if ref.endswith(".py") or ":" not in ref:
        return ref, "task"
    location, _, attr = ref.rpartition(":")  # the last colon: Windows drive letters stay in the path
    return location, attr or "task"


def _looks_like_file(location: str) -> bool:
    return location.endswith(".py") or os.sep in location or "/" in location


def load_task(ref: str) -> Task:
    """Load a :class:`Task` from ``file.py`` (attribute ``task``), ``file.py:attr`` or ``module:attr``.

    Raises :class:`TaskLoadError` with the reason (missing file, import error with its message,
    missing attribute, not a Task)."""
    location, attr = split_task_ref(ref)
    if _looks_like_file(location):
        path = Path(location)
        if not path.is_file():
            raise TaskLoadError(f"task file {location} does not exist")
        module_name = f"swarm_task_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise TaskLoadError(f"cannot import {location} as a Python file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException as e:  # any failure of user code is reported, not dumped
            sys.modules.pop(module_name, None)
            raise TaskLoadError(f"task file {location} failed to import: {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(location)
        except BaseException as e:
            raise TaskLoadError(f"task module {location} failed to import: {type(e).__name__}: {e}") from e
    if not hasattr(module, attr):
        raise TaskLoadError(f"{location} has no attribute {attr!r} (a task file defines `task = swarm.Task(...)`, "
                            f"or name another attribute as {location}:NAME)")
    task = getattr(module, attr)
    if callable(task) and not isinstance(task, Task):
        try:
            task = task()
        except BaseException as e:
            raise TaskLoadError(f"{location}:{attr}() failed: {type(e).__name__}: {e}") from e
    if not isinstance(task, Task):
        kind = type(task).__name__
        raise TaskLoadError(f"{location}:{attr} is {'an' if kind[:1].lower() in 'aeiou' else 'a'} {kind}, "
                            "not a swarm.Task")
    task._module = module  # type: ignore[attr-defined]
    return task


def task_code_hash(ref: str, task: Task | None = None) -> str:
    """sha256 (hex) of the task's source: the task file for a file reference, else the module's
    source file. Peers of one run must run code with the same hash."""
    location, _ = split_task_ref(ref)
    if _looks_like_file(location):
        path = Path(location)
    else:
        module = getattr(task, "_module", None) or importlib.import_module(location)
        source = inspect.getsourcefile(module)
        if source is None:
            raise TaskLoadError(f"cannot find the source of task module {location}")
        path = Path(source)
    return hashlib.sha256(path.read_bytes()).hexdigest()
