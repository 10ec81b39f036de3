"""swarm.progress_bar: one redrawn line on a terminal, plain periodic lines otherwise, both with
bytes, rate and time left; and the progress of a real checkpoint load."""

from __future__ import annotations

import io
import os
import pty

from swarm.checkpoint import load_checkpoint, save_checkpoint
from swarm.progress_bar import ProgressBar, format_bytes, format_seconds
from swarm.state import TrainingState, pack_state


class _Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_terminal_mode_redraws_one_line():
    clock, out = _Clock(), io.StringIO()
    bar = ProgressBar("downloading", 40_000_000, stream=out, tty=True, clock=clock)
    for i in range(1, 5):
        clock.t += 1.0
        bar.update(i * 8_000_000)
    bar.close()
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n"), "one line, ended once"
    frames = text.rstrip("\n").split("\r")[1:]
    assert len(frames) == 5
    assert frames[0] == "downloading: 8.00 MB / 40.0 MB (20%), 8.00 MB/s, 4 s left"
    assert frames[3] == "downloading: 32.0 MB / 40.0 MB (80%), 8.00 MB/s, 1 s left"
    assert frames[4].startswith("downloading: 32.0 MB in 4 s (8.00 MB/s)")
    assert len(frames[4]) >= len(frames[3]), "the final line covers the previous one"


def test_plain_mode_writes_periodic_lines_and_says_when_it_failed():
    clock, out = _Clock(), io.StringIO()
    bar = ProgressBar("loading", None, stream=out, tty=False, interval=5.0, clock=clock)
    for _ in range(12):
        clock.t += 1.0
        bar.advance(1_000_000, detail="epoch 3")
    try:
        with bar:
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    lines = out.getvalue().splitlines()
    assert lines == ["loading: 5.00 MB, 1.00 MB/s | epoch 3", "loading: 10.0 MB, 1.00 MB/s | epoch 3",
                     "loading: 12.0 MB in 12 s (1.00 MB/s), failed | epoch 3"]
    bar.update(99)  # after close: nothing more is written
    assert out.getvalue().splitlines() == lines


def test_the_mode_follows_the_stream_and_units_read_well():
    leader, follower = pty.openpty()
    try:
        with os.fdopen(follower, "w", closefd=False) as terminal:
            assert ProgressBar("x", stream=terminal).tty
    finally:
        os.close(leader)
        os.close(follower)
    assert not ProgressBar("x", stream=io.StringIO()).tty
    assert [format_bytes(n) for n in (999, 1500, 12_345_678, 4e9)] == ["999 B", "1.50 kB", "12.3 MB", "4.00 GB"]
    assert [format_seconds(s) for s in (7.2, 185, 7800)] == ["7 s", "3 min 05 s", "2 h 10 min"]


def test_a_checkpoint_load_shows_its_progress(tmp_path):
    import torch

    state = TrainingState(metadata={"epoch": 4, "run_id": "r"}, tensors={"p0": torch.randn(300_000)})
    path = save_checkpoint(tmp_path, "r", 4, pack_state(state))
    out = io.StringIO()
    loaded = load_checkpoint(path, "r", progress=out)
    assert torch.equal(loaded.tensors["p0"], state.tensors["p0"])
    lines = out.getvalue().splitlines()
    assert lines and lines[-1].startswith(f"loading checkpoint {path.name}: 1.20 MB in ")
