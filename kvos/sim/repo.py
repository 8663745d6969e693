"""The repository's `benchmarks/` package, which the simulator reuses but kvos does not install.

Imported by name at run time rather than statically: the serving
benchmark's metrics and ShareGPT sampler are the point of reuse (simulated
and measured figures computed by one piece of code), but they live beside
the package, not in it, and are type-checked on their own terms.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType


def benchmarks(name: str) -> ModuleType:
    """`benchmarks.<name>`, found on the path or in the working directory; ValueError saying where to run
    from when neither has it.

    The `kvos` console script puts its own folder first on `sys.path`, not the
    working directory (as `python -m` would), so the repository root is added
    here when the command runs from it."""
    try:
        return importlib.import_module(f"benchmarks.{name}")
    except ModuleNotFoundError as exc:
        if exc.name is None or not exc.name.startswith("benchmarks"):
            raise
        root = str(Path.cwd())
        if (Path(root) / "benchmarks" / "__init__.py").is_file() and root not in sys.path:
            sys.path.insert(0, root)
            return benchmarks(name)
        raise ValueError(
            "kvos sim reuses the repository's benchmarks/ package: run it from the repository root"
        ) from exc
