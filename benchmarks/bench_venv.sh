#!/usr/bin/env bash
# Create (or refresh) the benchmark-only virtualenv `.bench-venv` at the repo root.
#
# hivemind is a *comparison baseline only*: it lives in this separate venv and
# is never imported by swarm's own code. Idempotent: re-running is cheap when
# everything is already installed.
#
# Usage: bash benchmarks/bench_venv.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.bench-venv"
PY="$VENV/bin/python"

if [ ! -x "$PY" ]; then
    echo "[bench_venv] creating $VENV" >&2
    python3 -m venv "$VENV"
fi

# Fast path: already fully set up.
if "$PY" - <<'EOF' 2>/dev/null
import importlib.metadata as md, sys
ok = md.version("torch").startswith("2.13.0") and md.version("hivemind") == "1.1.12"
import hivemind  # noqa: F401  (must also import cleanly)
sys.exit(0 if ok else 1)
EOF
then
    echo "[bench_venv] .bench-venv already has torch 2.13.0 + hivemind 1.1.12" >&2
    exit 0
fi

PIP=("$PY" -m pip install --disable-pip-version-check)

# 1) torch FIRST, pinned exactly. A bare `torch` requirement (hivemind says
#    torch>=1.9.0) could resolve to a multi-GB CUDA build from the index;
#    torch==2.13.0 resolves to the local CPU wheel (2.13.0+cpu) instead.
#    Once it is installed, hivemind's torch>=1.9.0 is already satisfied.
"${PIP[@]}" "torch==2.13.0"

# 2) hivemind 1.1.12: a manylinux wheel that bundles its own p2pd binary
#    (hivemind/hivemind_cli/p2pd), so nothing needs to be built or downloaded
#    outside PyPI. Its declared deps (protobuf>=5.29, pydantic>=2, grpcio-tools,
#    uvloop, ...) are all lower bounds and are compatible with torch 2.13 as
#    resolved here, so no extra pins were needed.
#    torch is passed again with the same pin so the resolver can never
#    "upgrade" it to a different (CUDA) build while resolving hivemind's deps.
"${PIP[@]}" "torch==2.13.0" "hivemind==1.1.12"

# 3) Sanity check.
"$PY" - <<'EOF'
import torch, hivemind
from hivemind.p2p import P2P  # noqa: F401
print(f"[bench_venv] ok: torch {torch.__version__}, hivemind {hivemind.__version__}")
EOF
