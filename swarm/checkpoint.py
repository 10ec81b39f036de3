"""Checkpoints: periodic, atomic, versioned snapshots of the training state in ``--checkpoint-dir``.

A checkpoint is a :mod:`swarm.state` blob (format version inside: version 2 holds the LR
scheduler's state too; version-1 checkpoints still load, see :data:`swarm.state.READABLE_VERSIONS`;
no pickle) in a file named
``{run_id}-epoch{EPOCH:08d}.swst``. It is written to a temporary file in the same directory, flushed
and fsync'ed, then renamed over its final name, so a crash never leaves a half-written checkpoint
under a checkpoint's name. The newest ``keep`` (default 3) are kept. :func:`latest_checkpoint` finds
the newest readable one and says why any newer file was skipped.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, TextIO

from .state import StateFormatError, TrainingState, unpack_state

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "CheckpointError"]

logger = logging.getLogger(__name__)
_NAME = re.compile(r"^(?P<run>.+)-epoch(?P<epoch>\d{8})\.swst$")


class CheckpointError(RuntimeError):
    """A checkpoint is unreadable, corrupt, of another format or another run; the message says which."""


def _safe(run_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", run_id)


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write ``path`` through ``write(file)`` into a temporary file of the same directory (``.tmp-*``,
    fsynced), then rename it over ``path``: readers see the old file or the whole new one."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=path.suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def save_checkpoint(directory: str | os.PathLike, run_id: str, epoch: int, blob: bytes, keep: int = 3) -> Path:
    """Atomically write ``blob`` (from :func:`swarm.state.pack_state`) as the checkpoint of ``epoch``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{_safe(run_id)}-epoch{epoch:08d}.swst"
    atomic_write(path, lambda f: f.write(blob))
    try:  # make the rename itself durable where the platform allows it
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    for old in _checkpoints(directory, run_id)[keep:]:
        try:
            old[1].unlink()
        except OSError:
            pass
    return path


_READ_CHUNK = 4 << 20


def _read(path: Path, progress: bool | TextIO) -> bytes:
    if not progress:
        return path.read_bytes()
    from .progress_bar import ProgressBar

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        blob = bytearray()
        with ProgressBar(f"loading checkpoint {path.name}", size,
                         stream=sys.stderr if progress is True else progress) as bar:
            while chunk := f.read(_READ_CHUNK):
                blob += chunk
                bar.advance(len(chunk))
    return bytes(blob)


def load_checkpoint(path: str | os.PathLike, run_id: str | None = None,
                    progress: bool | TextIO = False) -> TrainingState:
    """Read and validate one checkpoint; raises :class:`CheckpointError` saying what is wrong.
    ``progress``: show the read's progress (:mod:`swarm.progress_bar`) on stderr, or on this stream."""
    path = Path(path)
    try:
        blob = _read(path, progress)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from None
    try:
        state = unpack_state(blob)
    except StateFormatError as e:
        raise CheckpointError(f"checkpoint {path} is unusable: {e}") from None
    if run_id is not None and state.metadata.get("run_id") not in (None, run_id):
        raise CheckpointError(f"checkpoint {path} belongs to run {state.metadata.get('run_id')!r}, not {run_id!r}")
    return state


def _checkpoints(directory: Path, run_id: str) -> list[tuple[int, Path]]:
    found = []
    for path in directory.glob(f"{_safe(run_id)}-epoch*.swst"):
        match = _NAME.match(path.name)
        if match and match["run"] == _safe(run_id):
            found.append((int(match["epoch"]), path))
    return sorted(found, reverse=True)


def latest_checkpoint(directory: str | os.PathLike, run_id: str,
                      progress: bool | TextIO = False) -> tuple[Path, TrainingState] | None:
    """The newest valid checkpoint of ``run_id`` in ``directory`` (None if there is none). Invalid
    files are skipped with a warning; if every file is invalid, :class:`CheckpointError` says why.
    ``progress``: as for :func:`load_checkpoint`."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    errors = []
    for _, path in _checkpoints(directory, run_id):
        try:
            return path, load_checkpoint(path, run_id, progress)
        except CheckpointError as e:
            logger.warning("skipping checkpoint: %s", e)
            errors.append(str(e))
    if errors:
        raise CheckpointError("no usable checkpoint: " + "; ".join(errors))
    return None

