"""The built paged kernel still holds the prefetches its speed rests on.

GCC 12 once deleted the kernel's prefetch helper whole: its mod-ref analysis
took a function whose only effect was `__builtin_prefetch` for one without
effects. Nothing failed, the output stayed exact, and the kernel read KV 1.4x
slower, session after session, until `objdump` showed no prefetch in the library.
The outputs are checked elsewhere (test_backends); this checks the machine code.
"""

from __future__ import annotations

import platform
import shutil
import subprocess

import pytest

from kvos.attention import paged_cpu


def loaded_library(name: str) -> str:
    """The path of the shared library `name` that this process has mapped."""
    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if line.rstrip().endswith(name)}
    assert len(paths) == 1, f"expected one mapped {name}, found {sorted(paths)}"
    return paths.pop()


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the prefetch instruction checked is x86's")
@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs binutils' objdump")
def test_built_paged_kernel_keeps_its_prefetches() -> None:
    paged_cpu.load_kernel()
    library = loaded_library("kvos_paged_attention.so")
    code = subprocess.run(["objdump", "-d", "--no-show-raw-insn", library], capture_output=True, text=True, check=True)
    assert "prefetcht0" in code.stdout, f"no prefetch instruction in {library}: the compiler dropped them"
