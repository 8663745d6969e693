#!/usr/bin/env bash
# Builds the benchmark-only CPU peers outside the repository (never in CI):
#   - llama.cpp's C++ llama-server, from the vendor/llama.cpp folder of the
#     llama-cpp-python source distribution (cmake, -DLLAMA_CURL=OFF; about
#     10 minutes on 2 idle cores, 20 with other work on the machine);
#   - llama-cpp-python on top of the same build's shared libraries
#     (LLAMA_BUILD=OFF skips its second copy of llama.cpp; the module finds
#     the libraries through LLAMA_CPP_LIB_PATH, which this script prints).
# Usage: bash scripts/build_peers.sh [DIR]   (default: ~/.cache/kvos-peers)
# LLAMA_CMAKE_FLAGS adds cmake flags after the defaults: on a VM that lists AMX but refuses it
# (llama-server dies with SIGILL at `tilezero` when it loads a model), BENCHMARKS.md, session 11,
# gives the flags that build for AVX-512 without AMX.
set -euo pipefail
PY="${PYTHON:-python3}"
dir="${1:-$HOME/.cache/kvos-peers}"
version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
mkdir -p "$dir"
cd "$dir"
sdist="llama_cpp_python-$version.tar.gz"
if [ ! -f "$sdist" ]; then
    "$PY" -m pip download --quiet --no-binary :all: --no-deps "llama-cpp-python==$version" -d .
fi
src="$dir/llama_cpp_python-$version"
[ -d "$src" ] || tar xzf "$sdist"
llama="$src/vendor/llama.cpp"
if [ ! -x "$llama/build/bin/llama-server" ]; then
    cmake -S "$llama" -B "$llama/build" -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON ${LLAMA_CMAKE_FLAGS:-}
    cmake --build "$llama/build" --target llama-server -j "$(nproc)"
fi
if ! "$PY" -c "import llama_cpp" 2>/dev/null; then
    CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" "$PY" -m pip install --quiet --no-deps "./$sdist"
    "$PY" -m pip install --quiet diskcache numpy jinja2
fi
echo "llama-server: $llama/build/bin/llama-server"
echo "export LLAMA_CPP_LIB_PATH=$llama/build/bin   # for llama-cpp-python"
