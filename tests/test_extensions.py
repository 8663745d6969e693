"""Building kvos's C++ kernels: a build folder left locked by a killed process does not hang the next start."""

from __future__ import annotations

import subprocess
import sys

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
