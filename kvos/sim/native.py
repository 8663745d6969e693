"""The simulator's hot path compiled with mypyc: the same source, run as C.

`kvos sim` spends its time in kvos's own scheduler and KV books, which it
runs unchanged (docs/simulator.md, "Speed"). Those modules are fully
type-annotated, so mypyc (mypy's compiler, the one mypy and black ship
with) can turn them into C extensions from the same source: the same
decisions, token times and books, in about half the time.

`kvos sim build` (or `build()`) compiles `MODULES` once into
`$KVOS_CACHE_DIR/sim-native/<digest>`. The digest names every source file
of the kvos package and the Python it was built for, so an edit anywhere
makes a new folder and a stale build is never loaded. `kvos sim run` and
`kvos sim plan` call `activate()` before they import the simulator: with a
build for these sources, an import finder loads the compiled modules in
place of the Python ones; without one, the Python runs.

Only those simulator commands load it. The engine, `kvos sim profile`,
the benchmarks that drive the engine and the tests run the Python: a
compiled class refuses interpreted subclasses and patched methods, and the
tests' doubles and fault injection need both. `tests/sim/test_native.py`
builds the modules and checks that a compiled run gives the Python run's
results exactly.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType

from kvos.config import cache_root

logger = logging.getLogger(__name__)

MODULES = (
    "kvos.sampling_params",
    "kvos.outputs",
    "kvos.core.plan",
    "kvos.core.request",
    "kvos.core.scheduler",
    "kvos.core.policies.fcfs",
    "kvos.core.policies.priority",
    "kvos.core.policies.fair",
    "kvos.memory.block_allocator",
    "kvos.memory.block_hash",
    "kvos.memory.paged_kv_manager",
    "kvos.memory.tiers.swap",
    "kvos.memory.tiers.host",
    "kvos.memory.tiers.disk",
    "kvos.memory.virtual.layout",
    "kvos.memory.virtual.books_region",
    "kvos.memory.virtual.page_table",
    "kvos.memory.virtual.virtual_kv_manager",
    "kvos.cluster.routers.round_robin",
    "kvos.cluster.routers.least_load",
    "kvos.cluster.routers.prefix_aware",
    "kvos.cluster.routers.session",
    "kvos.sim.migration",
    "kvos.sim.metrics",
    "kvos.sim.simulator",
    "kvos.sim.worker",
    "kvos.sim.step_model",
    "kvos.sim.router",
    "kvos.sim.workload",
)
"""What a simulation spends its time in (the profiles in docs/simulator.md). Left as Python: the protocols
in `kvos.memory.kv_manager` (mypyc compiles no protocol that extends another), packages' `__init__`
modules, and any module a class outside this list extends (a compiled class refuses interpreted
subclasses: `kvos.core.migration`, whose endpoint the engine core extends)."""

KEEP_BUILDS = 4
"""Builds kept, the newest: every edit makes another (3.4 MB each), and checkouts that share a cache (a
revision and its base, compared in turn) each keep theirs."""

_GROUP = "kvos_sim_native"
"""The shared library mypyc puts the compiled code of every module in (`<group>__mypyc`)."""

_PACKAGE = Path(__file__).resolve().parents[1]

_MYPY_CONFIG = """\
[mypy]
ignore_missing_imports = True
follow_imports = silent
[mypy-torch.*,numpy.*,triton.*,transformers.*,ray.*,fastapi.*,uvicorn.*,starlette.*,gguf.*,safetensors.*,tokenizers.*,llguidance.*,jinja2.*,tqdm.*,prometheus_client.*,matplotlib.*]
follow_imports = skip
"""
"""Third-party packages are not followed: type-checking torch alone took minutes, and the compiled
modules only pass its objects through."""

_SETUP = """\
import os, sys
from mypyc.build import mypycify
from setuptools import setup

modules = mypycify(sys.argv[2:], multi_file=True, group_name=sys.argv[1])
setup(name="kvos-sim-native", ext_modules=modules,
      script_args=["build_ext", "--inplace", "-j", str(os.cpu_count() or 1)])
"""


def source_digest(package: Path = _PACKAGE) -> str:
    """Names the sources a build is made from: every .py file of the kvos package, and this Python."""
    digest = hashlib.sha256(f"{sys.version}\0{sysconfig.get_config_var('EXT_SUFFIX')}\0".encode())
    digest.update(_MYPY_CONFIG.encode())
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def build_dir() -> Path:
    """Where the build for the current sources lies (whether or not it has been built)."""
    return cache_root() / "sim-native" / source_digest()


def _module_file(root: Path, name: str) -> Path:
    return root.joinpath(*name.split(".")).with_name(name.rsplit(".", 1)[-1] + _suffix())


def _suffix() -> str:
    return str(sysconfig.get_config_var("EXT_SUFFIX"))


def build() -> Path:
    """Compile `MODULES` for the current sources (about 45 s on two cores) unless already built; older
    builds beyond the newest `KEEP_BUILDS` are removed.

    Needs mypy (its mypyc) and a C compiler; raises RuntimeError naming what is missing or, when the
    compiler fails, the end of its output.
    """
    dest = build_dir()
    if dest.is_dir():
        return dest
    if importlib.util.find_spec("mypyc") is None:
        raise RuntimeError("kvos sim build needs mypyc, which comes with mypy: pip install mypy")
    with tempfile.TemporaryDirectory(prefix="kvos-sim-native-") as tmp:
        work = Path(tmp)
        shutil.copytree(_PACKAGE, work / "kvos", ignore=shutil.ignore_patterns("__pycache__", "*.so", "csrc"))
        (work / "mypy.ini").write_text(_MYPY_CONFIG)
        sources = [str(Path(*name.split(".")).with_suffix(".py")) for name in MODULES]
        logger.info("compiling %d modules of the simulator with mypyc (about 45 s on two cores)", len(MODULES))
        done = subprocess.run(
            [sys.executable, "-c", _SETUP, _GROUP, *sources],
            cwd=work,
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(work)},
        )
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).splitlines()[-30:])
            raise RuntimeError(f"mypyc could not compile the simulator (exit {done.returncode}):\n{tail}")
        # The libraries move into place in one rename, so a build killed halfway leaves no folder that
        # looks finished.
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=dest.parent))
        for name in (*MODULES, f"{_GROUP}__mypyc"):
            target = _module_file(staging, name)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(_module_file(work, name), target)
    try:
        staging.rename(dest)
    except OSError:  # another process finished the same build first
        shutil.rmtree(staging, ignore_errors=True)
    builds = sorted((p for p in dest.parent.iterdir() if not p.name.startswith(".")), key=lambda p: p.stat().st_mtime)
    for old in builds[:-KEEP_BUILDS]:
        if old != dest:
            shutil.rmtree(old, ignore_errors=True)
    return dest


class _CompiledFinder(importlib.abc.MetaPathFinder):
    """Finds the compiled library of each module in `files` ahead of its Python source."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        file = self.files.get(fullname)
        if file is None:
            return None
        loader = importlib.machinery.ExtensionFileLoader(fullname, str(file))
        return importlib.util.spec_from_file_location(fullname, file, loader=loader)


def activate() -> Path | None:
    """Load the compiled modules from now on, if the current sources have a build; returns its folder.

    Call it before anything imports one of `MODULES`. Where one is already loaded as Python (the
    simulator's commands called from a process that ran the engine or the tests), nothing changes and
    None is returned: compiled code would refuse the Python module's objects.
    """
    if any(isinstance(finder, _CompiledFinder) for finder in sys.meta_path):
        return build_dir()
    dest = build_dir()
    if not dest.is_dir():
        return None
    loaded = [name for name in MODULES if name in sys.modules]
    if loaded:
        logger.info("not loading the compiled simulator: already imported as Python: %s", ", ".join(loaded))
        return None
    files = {name: _module_file(dest, name) for name in (*MODULES, f"{_GROUP}__mypyc")}
    sys.meta_path.insert(0, _CompiledFinder(files))
    return dest
