"""Get the trained model out of a checkpoint: a plain ``state_dict`` for the task's model.

Checkpoints (:mod:`swarm.checkpoint`) hold the parameters by position (``param.0``, ``param.1``, ...,
in ``model.parameters()`` order; in DiLoCo mode the swarm's global parameters), not by name: the
names come from the task's model. :func:`export_state_dict` builds the task's model, checks that
every parameter's shape matches, copies the checkpoint's values in and returns
``model.state_dict()``; :func:`export_checkpoint` (``swarm export``) saves it with ``torch.save``, so
that ``model.load_state_dict(torch.load("model.pt"))`` loads it anywhere, without swarm::

    state_dict = swarm.export_state_dict("ckpt/digits-epoch00000040.swst", task="swarm.examples.digits:task")
    swarm export ckpt/digits-epoch00000040.swst model.pt --task swarm.examples.digits:task

Buffers that are not parameters (e.g. BatchNorm's running statistics) are not trained by the swarm:
they come from a freshly built model.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .checkpoint import CheckpointError, atomic_write, latest_checkpoint, load_checkpoint
from .state import TrainingState
from .task import Task, load_task

__all__ = ["export_state_dict", "export_checkpoint", "resolve_checkpoint"]


def resolve_checkpoint(checkpoint: str | os.PathLike, run_id: str | None = None) -> tuple[Path, TrainingState]:
    """A checkpoint file, or a ``--checkpoint-dir`` (its newest checkpoint of ``run_id``; without
    ``run_id`` the directory must hold the checkpoints of one run only). Raises CheckpointError."""
    path = Path(checkpoint)
    if not path.is_dir():
        return path, load_checkpoint(path, run_id)
    if run_id is None:
        runs = sorted({p.name.rsplit("-epoch", 1)[0] for p in path.glob("*-epoch*.swst")})
        if not runs:
            raise CheckpointError(f"{path} holds no checkpoint (*-epochNNNNNNNN.swst)")
        if len(runs) > 1:
            raise CheckpointError(f"{path} holds checkpoints of several runs ({', '.join(runs)}): name the file")
        run_id = runs[0]
    found = latest_checkpoint(path, run_id)
    if found is None:
        raise CheckpointError(f"{path} holds no checkpoint of run {run_id!r}")
    return found


def export_state_dict(checkpoint: str | os.PathLike | TrainingState, task: Task | str,
                      run_id: str | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint's parameters as a ``state_dict`` of ``task``'s model (a :class:`swarm.Task` or a
    task reference such as ``"swarm.examples.digits:task"``). ``checkpoint``: a checkpoint file, a
    checkpoint directory (see :func:`resolve_checkpoint`) or a loaded :class:`swarm.state.TrainingState`.
    Raises :class:`swarm.checkpoint.CheckpointError` if it does not fit the model (saying which
    parameter), :class:`swarm.task.TaskLoadError` if the task does not load."""
    if isinstance(task, str):
        task = load_task(task)
    if isinstance(checkpoint, TrainingState):
        state, where = checkpoint, "the state"
    else:
        path, state = resolve_checkpoint(checkpoint, run_id)
        where = str(path)
    model = task.build_model()
    named = list(model.named_parameters())  # model.parameters() order, what the swarm trained by position
    count = state.metadata.get("num_params")
    if count is not None and count != len(named):
        raise CheckpointError(f"{where} holds {count} parameters, but the model of task {task.name!r} has "
                              f"{len(named)}: is it a checkpoint of this task?")
    with torch.no_grad():
        for i, (name, p) in enumerate(named):
            t = state.tensors.get(f"param.{i}")
            if t is None or tuple(t.shape) != tuple(p.shape):
                raise CheckpointError(f"{where}: parameter {i} ({name}) is {None if t is None else tuple(t.shape)} "
                                      f"in the checkpoint, {tuple(p.shape)} in the model of task {task.name!r}")
            p.copy_(t.to(p.dtype))
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, task: Task | str,
                      run_id: str | None = None) -> Path:
    """Write :func:`export_state_dict` to ``out`` with ``torch.save`` (atomically: a temporary file in
    the same directory, renamed). Returns the path."""
    state_dict = export_state_dict(checkpoint, task, run_id)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda f: torch.save(state_dict, f))
    return out
