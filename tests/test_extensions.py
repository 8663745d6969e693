"""Building kvos's C++ kernels: a finished build loads without torch's loader, an unfinished one is built
again, and a build folder left locked by a killed process does not hang the next start."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from kvos import extensions
from kvos.worker import sampler

_LOAD_SAMPLER = (
    "from kvos.extensions import build_cpu_extension; from kvos.worker import sampler; "
    "build_cpu_extension('kvos_sampler_ops', sampler._SOURCE, 'the greedy sampler')"
)
# Loads the kernel, runs its argmax on a row torch can check, and says whether torch's loader was imported.
_LOAD_AND_RUN = (
    _LOAD_SAMPLER + "; import sys, torch; x = torch.tensor([[0.5, 3.0, -1.0, 3.0]]); "
    "assert torch.ops.kvos.argmax_rows(x).tolist() == [1]; "
    "print('torch.utils.cpp_extension' in sys.modules)"
)


def _sampler_build_dir() -> Path:
    extensions.build_cpu_extension("kvos_sampler_ops", sampler._SOURCE, "the greedy sampler")  # built, or cached
    return extensions._build_dir("kvos_sampler_ops", sampler._SOURCE, extensions._SHARED_HEADERS)


def _load_in_child() -> bool:
    """Load the sampler's kernel in a fresh process; whether it went through torch's loader."""
    done = subprocess.run([sys.executable, "-c", _LOAD_AND_RUN], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1] == "True"


def test_a_finished_build_loads_without_torchs_loader() -> None:
    build_dir = _sampler_build_dir()
    assert (build_dir / "kvos.built").exists()
    assert not _load_in_child()  # setuptools and ninja's check cost a warm start ~0.15 s


def test_a_build_that_did_not_finish_goes_through_torchs_loader_again() -> None:
    built = _sampler_build_dir() / "kvos.built"
    built.unlink()  # what a build killed before it finished leaves
    assert _load_in_child()
    assert built.exists()  # finished this time: the next start loads directly
    built.write_text("-O0")  # built with other flags than kvos's own
    assert _load_in_child()
    assert not _load_in_child()


def test_a_lock_left_by_a_killed_build_is_removed() -> None:
    build_dir = _sampler_build_dir()
    (build_dir / "kvos.built").unlink()  # torch's loader is the one that waits on its lock
    stale = build_dir / "lock"
    stale.touch()  # what torch's loader leaves when the process holding it is killed

    # torch alone would wait on it forever; the child must load and exit.
    done = subprocess.run([sys.executable, "-c", _LOAD_SAMPLER], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert not stale.exists()


def test_the_same_kernel_in_two_checkouts_gets_two_builds(tmp_path: Path) -> None:
    for checkout in ("a", "b"):
        (tmp_path / checkout / "csrc").mkdir(parents=True)
        (tmp_path / checkout / "kernel.cpp").write_text("int f() { return 1; }\n")
        (tmp_path / checkout / "csrc" / "shared.h").write_text("#pragma once\n")
    a = extensions._build_dir("k", tmp_path / "a" / "kernel.cpp", tmp_path / "a" / "csrc")
    b = extensions._build_dir("k", tmp_path / "b" / "kernel.cpp", tmp_path / "b" / "csrc")
    assert a != b  # torch's build file names the paths: one folder would rebuild at every switch
    assert a == extensions._build_dir("k", tmp_path / "a" / "kernel.cpp", tmp_path / "a" / "csrc")
    (tmp_path / "a" / "kernel.cpp").write_text("int f() { return 2; }\n")
    assert extensions._build_dir("k", tmp_path / "a" / "kernel.cpp", tmp_path / "a" / "csrc") != a
