"""kvos's C++ kernels: compiled on first use for this machine's CPU and cached.

Each kernel is one source file built with torch's extension tools
(`-O3 -march=native`, OpenMP) into `$KVOS_CACHE_DIR/torch_extensions`; helpers
several kernels share are headers in `kvos/csrc`. Each build has its own
folder, named for the torch version, the CPU's feature flags, the source and
the shared headers, and for where those files lie: a cache shared between
machines never hands one CPU code built for another, and two checkouts that
share one cache keep a build each. (torch's build file names the source's and
the headers' paths, so checkouts with the same kernel in one folder rebuilt it
whenever the other had loaded it last: 30-60 s a start for runs that take turns,
as `benchmarks.compare_revisions` does.)
Loading a kernel registers its torch operators (`torch.ops.kvos...`); the
caller adds their fake (shape-only) implementations so torch.compile can trace
through them.

A folder whose build finished holds a `kvos.built` file naming the compiler
flags it was built with. A later start loads that library directly: torch's
loader (which imports setuptools and asks ninja whether anything changed)
cost a warm start about 0.15 s, and the folder's name already says the source
and headers are the same. A build killed before it finished leaves no
`kvos.built`, so the next start goes through torch's loader and ninja again.

torch's loader guards a build folder with a `lock` file that a killed process
leaves behind, and every later load (a warm start's too) then waits on it
forever. kvos holds an flock on its own `kvos.lock` around each load instead:
the kernel drops it when the holder dies, and whoever holds it knows a `lock`
file it finds is stale.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import platform
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from kvos.config import cache_root

_SHARED_HEADERS = Path(__file__).parent / "csrc"
AMX_FLAGS = frozenset({"amx_tile", "amx_bf16", "avx512_bf16"})
"""The CPU flags kvos's AMX kernels are built for (kvos/csrc/amx_tiles.h's KVOS_AMX)."""
_CFLAGS = ("-O3", "-march=native", "-fopenmp")
_LDFLAGS = ("-fopenmp",)
_BUILT = "kvos.built"


def build_cpu_extension(name: str, source: Path, purpose: str, headers: Path = _SHARED_HEADERS) -> None:
    """Compile `source` (first use on this machine) and load it; `purpose` names it in errors.

    `headers` is the folder of shared headers it includes: kvos's own, unless a benchmark builds a
    kernel as it was at another revision, with that revision's headers.
    """
    build_dir = _build_dir(name, source, headers)
    build_dir.mkdir(parents=True, exist_ok=True)
    library = build_dir / f"{name}.so"
    built = build_dir / _BUILT
    flags = " ".join(_CFLAGS + _LDFLAGS)
    with _build_lock(build_dir):
        if library.exists() and built.exists() and built.read_text() == flags:
            torch.ops.load_library(str(library))
            return
        compiler = os.environ.get("CXX", "c++")
        if shutil.which(compiler) is None:
            raise ValueError(
                f"{purpose} builds a C++ kernel on first use and needs a C++ compiler; {compiler!r} "
                "is not on PATH (install g++, or set CXX)"
            )
        if shutil.which("ninja") is None:
            raise ValueError(f"{purpose} builds its C++ kernel with ninja, which is not on PATH")
        from torch.utils import cpp_extension

        cpp_extension.load(
            name=name,
            sources=[str(source)],
            extra_cflags=list(_CFLAGS),
            extra_ldflags=list(_LDFLAGS),
            extra_include_paths=[str(headers)],
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=False,
        )
        built.write_text(flags)


@contextlib.contextmanager
def _build_lock(build_dir: Path) -> Iterator[None]:
    """The folder's build to this process alone; a `lock` file left by a killed process removed."""
    with (build_dir / "kvos.lock").open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # released by close, or by the kernel if this process dies
        (build_dir / "lock").unlink(missing_ok=True)  # torch's: no live kvos process holds it now
        yield


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (`avx512_vnni`, ...) from /proc/cpuinfo; empty where it cannot be read."""
    return _cpu_flags_line()[1]


def _build_dir(name: str, source: Path, headers: Path) -> Path:
    digest = hashlib.sha256(f"{source.resolve()}\0{headers.resolve()}\0".encode())
    digest.update(source.read_bytes())
    for header in sorted(headers.glob("*.h")):
        digest.update(header.read_bytes())
    source_key = digest.hexdigest()[:12]
    return cache_root() / "torch_extensions" / f"{name}-torch{torch.__version__}-{_cpu_key()}-{source_key}"


def _cpu_key() -> str:
    line = platform.machine() + platform.processor() + _cpu_flags_line()[0]
    return hashlib.sha256(line.encode()).hexdigest()[:12]


@functools.cache
def _cpu_flags_line() -> tuple[str, frozenset[str]]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        line = ""
    return line, frozenset(line.partition(":")[2].split())
