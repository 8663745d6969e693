#!/usr/bin/env bash
# The wheels kvos and its benchmark helpers import that the lent GPU machine's image lacks (Python 3.12
# there; gguf comes in through benchmarks.peers), into .whl/
# (git-ignored), to carry with a device run; the run installs them first:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
# The versions are this machine's (pip show), so both run the same code.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
mkdir -p .whl
for name in pydantic pydantic-core annotated-types typing-inspection llguidance gguf; do
    version=$("$PY" -m pip show "$name" | sed -n 's/^Version: //p')
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "$name==$version"
done
ls -la .whl
