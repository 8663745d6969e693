"""The repository's `benchmarks/` package, which the simulator reuses but kvos does not install.

Imported by name at run time rather than statically: the serving
benchmark's metrics and ShareGPT sampler are the point of reuse (simulated
and measured figures computed by one piece of code), but they live beside
the package, not in it, and are type-checked on their own terms.
"""

from __future__ import annotations

import importlib
from types import ModuleType


def benchmarks(name: str) -> ModuleType:
    """`benchmarks.<name>`; ValueError saying where to run from when it is not on the path."""
    try:
        return importlib.import_module(f"benchmarks.{name}")
    except ModuleNotFoundError as exc:
        if exc.name is not None and exc.name.startswith("benchmarks"):
            raise ValueError(
                "kvos sim reuses the repository's benchmarks/ package: run it from the repository root"
            ) from exc
        raise
