"""Build one of kvos's C++ kernels as it was at another git revision, beside this checkout's.

A kernel change worth 5-10% only shows on this noisy VM when both versions run
side by side in one process on the same data. The source at `revision` (and the
shared headers of `kvos/csrc` at that revision) is written to a folder, its torch
library renamed from `NAME` to `NAME_base` so both can be loaded, and built with
kvos's own extension builder. Used by `paged_kernel_ab` and `linear_kernels_ab`, which time the two with
`time_alternating`.
"""

from __future__ import annotations

import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from kvos.extensions import build_cpu_extension

REPO = Path(__file__).resolve().parent.parent


def renamed_library(code: str, library: str) -> str:
    """`code` with its torch library `library` (and only that one) registered as `library`_base."""
    for block in ("TORCH_LIBRARY", "TORCH_LIBRARY_FRAGMENT", "TORCH_LIBRARY_IMPL"):
        code = code.replace(f"{block}({library},", f"{block}({library}_base,")
    return code


def build_at_revision(revision: str, source: str, library: str, folder: Path) -> None:
    """Build `source` (a path in the repository) at `revision`; its ops appear as torch.ops.<library>_base.

    `library` is the name its `TORCH_LIBRARY`, `TORCH_LIBRARY_FRAGMENT` and `TORCH_LIBRARY_IMPL` blocks use.
    """

    def show(path: str) -> str:
        return subprocess.run(
            ["git", "show", f"{revision}:{path}"], cwd=REPO, check=True, capture_output=True, text=True
        ).stdout

    headers = folder / "include"
    headers.mkdir(parents=True, exist_ok=True)
    listing = subprocess.run(
        ["git", "ls-tree", "--name-only", revision, "kvos/csrc/"], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout.split()
    for path in listing:
        if path.endswith(".h"):
            (headers / Path(path).name).write_text(show(path))
    name = Path(source).stem + "_base"
    (folder / f"{name}.cpp").write_text(renamed_library(show(source), library))
    build_cpu_extension(f"kvos_{name}", folder / f"{name}.cpp", f"{source} at {revision}", headers)


def time_alternating(passes: dict[str, Callable[[], object]], rounds: int, warmup: int = 0) -> dict[str, float]:
    """Median seconds of each pass over `rounds` timed rounds after `warmup` untimed ones, the passes
    taking turns in one process and swapping their order every round (so neither always runs after
    the other has warmed the caches)."""
    names = list(passes)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(warmup + rounds):
        for name in names if round_index % 2 == 0 else reversed(names):
            start = time.perf_counter()
            passes[name]()
            if round_index >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}
