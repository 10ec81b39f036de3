"""The README's Python snippets run as written, and a script that succeeded exits 0 even when it never
shuts its DHT and Averager down (they are stopped at interpreter exit; a background uvloop thread still
running at finalisation used to crash such a script with rc 139 after it had printed its result).

The averaging snippet runs in two processes joined through a real bootstrap peer (``swarm dht``)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.processes import ROOT, ProcessGroup

pytestmark = pytest.mark.slow


def readme_snippets() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"^```python\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


def snippet(marker: str) -> str:
    found = [s for s in readme_snippets() if marker in s]
    assert len(found) == 1, f"expected one README snippet containing {marker!r}, found {len(found)}"
    return found[0]


def without_with(code: str) -> str:
    """The same script without a single ``with``: ``with X as y:`` becomes ``y = X`` + ``if True:``, so
    nothing is ever shut down explicitly."""
    converted = re.sub(r"^(\s*)with (.+?) as (\w+):$", r"\1\3 = \2\n\1if True:", code, flags=re.MULTILINE | re.DOTALL)
    assert "with " not in converted and ".shutdown(" not in converted, converted
    return converted


def run_script(path: Path, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))  # this checkout's code, not whatever is installed
    return subprocess.run([sys.executable, str(path)], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, env=env)


def test_readme_p2p_snippet_runs(tmp_path):
    script = tmp_path / "p2p_snippet.py"
    script.write_text(snippet("from dht import P2P"))
    done = run_script(script, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "{'hello': [1, 2, 3]}" in done.stdout and "10000000" in done.stdout, done.stdout
    assert (tmp_path / "server.key").exists()


@pytest.mark.parametrize("variant", ["as written", "without shutdown"])
def test_readme_dht_snippet_runs(tmp_path, variant):
    code = snippet("from dht import DHT, get_dht_time")
    if variant != "as written":
        code = code.replace("with DHT(host=\"127.0.0.1\") as bootstrap, \\\n        DHT(",
                            "bootstrap = DHT(host=\"127.0.0.1\")\npeer = DHT(")
        code = code.replace('host="127.0.0.1") as peer:', 'host="127.0.0.1")\nif True:', 1)
        assert "with " not in code and ".shutdown(" not in code, code
    script = tmp_path / "dht_snippet.py"
    script.write_text(code)
    done = run_script(script, tmp_path)
    assert done.returncode == 0, (done.returncode, done.stderr[-3000:])
    assert "value=0.42" in done.stdout and "['peer-A', 'peer-B']" in done.stdout, done.stdout


def test_readme_averaging_snippet_in_two_processes(tmp_path):
    """3 runs as written and 2 without any shutdown, each two processes averaging through a real
    bootstrap peer: every process exits 0 (the old code segfaulted at exit in most runs without
    shutdown) and both print the group they averaged in."""
    written = tmp_path / "average.py"
    written.write_text(snippet("from averaging import Averager"))
    bare = tmp_path / "average_no_shutdown.py"
    bare.write_text(without_with(written.read_text()))
    with ProcessGroup(tmp_path / "logs") as group:
        address = group.bootstrap()
        for run, script in enumerate([written] * 3 + [bare] * 2):
            names = [f"run{run}-{side}" for side in "ab"]
            procs = [group.spawn(name, [str(script), address]) for name in names]
            for name, proc in zip(names, procs):
                try:
                    code = proc.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    raise AssertionError(f"{script.name} run {run} hung:\n{group.log(name)[-3000:]}") from None
                assert code == 0, f"{script.name} run {run}: rc {code}\n{group.log(name)[-3000:]}"
                assert "2 members" in group.log(name), group.log(name)[-3000:]


OPTIMIZER_SCRIPT = '''
import sys
import torch
import swarm
from dht import DHT

dht = DHT(initial_peers=sys.argv[1:], host="127.0.0.1")
model = torch.nn.Linear(4, 1)
opt = swarm.Optimizer(dht=dht, run_id="exit-run", optimizer=lambda p: torch.optim.SGD(p, 0.1),
                      params=model.parameters(), target_batch_size=64, batch_size_per_step=8)
for _ in range(3):
    model(torch.randn(8, 4)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()
print("trained", dht.peer_id, flush=True)
# no opt.shutdown(), no dht.shutdown(): the exit hooks leave the run and stop the DHT
'''


def test_a_script_that_never_shuts_its_optimizer_down_leaves_cleanly_at_exit(tmp_path):
    """Exit code 0, and the Optimizer's exit hook ran before the DHT's: the swarm got its 'left' record."""
    from dht import DHT
    from swarm.progress import PeerProgress, progress_key

    script = tmp_path / "train.py"
    script.write_text(OPTIMIZER_SCRIPT)
    with DHT(host="127.0.0.1") as bootstrap:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        for run in range(3):
            done = subprocess.run([sys.executable, str(script), bootstrap.get_visible_addresses()[0]], cwd=tmp_path,
                                  capture_output=True, text=True, timeout=120, env=env, stdin=subprocess.DEVNULL)
            assert done.returncode == 0, (run, done.returncode, done.stderr[-3000:])
            peer_id = done.stdout.split()[-1]
            found = bootstrap.get(progress_key("exit-run"), latest=True)
            records = [PeerProgress.parse(v.value) for v in found.value.values()]
            mine = [r for r in records if r is not None and r.peer_id == peer_id]
            assert mine and mine[0].left, records
