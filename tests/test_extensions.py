"""Building kvos's C++ kernels: a build folder left locked by a killed process does not hang the next start."""

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


def test_a_lock_left_by_a_killed_build_is_removed() -> None:
    extensions.build_cpu_extension("kvos_sampler_ops", sampler._SOURCE, "the greedy sampler")  # built, or cached
    build_dir = extensions._build_dir("kvos_sampler_ops", sampler._SOURCE, extensions._SHARED_HEADERS)
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
