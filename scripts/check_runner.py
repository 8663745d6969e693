"""What the prepared GPU scripts share: a check's result, its lines, and the loop that runs the checks.

A check is a function of its Result that returns when it passed, raises
CheckFailed when it saw something wrong, and crashes otherwise; every check
runs whatever the others did, and the summary lists them all.
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Result:
    name: str
    passed: bool = False
    details: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


class CheckFailed(Exception):
    """A check saw something wrong (as opposed to crashing)."""


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def say(result: Result, line: str) -> None:
    print(f"   {line}", flush=True)
    result.details.append(line)


def run_checks(checks: dict[str, Callable[[Result], None]], names: Sequence[str], out: Path | None) -> int:
    """Run `names` in order, print each one's outcome and a summary, write the results to `out` as JSON.
    Exit status: 0 when every check passed."""
    results = []
    for name in names:
        print(f"== {name}", flush=True)
        result = Result(name)
        start = time.perf_counter()
        try:
            checks[name](result)
            result.passed = True
        except CheckFailed as exc:
            say(result, f"FAILED: {exc}")
        except Exception as exc:
            traceback.print_exc()
            say(result, f"CRASHED: {type(exc).__name__}: {exc}")
        result.seconds = time.perf_counter() - start
        print(f"-- {name}: {'PASS' if result.passed else 'FAIL'} ({result.seconds:.1f}s)", flush=True)
        results.append(result)
    print("\n== summary")
    for result in results:
        last = result.details[-1] if result.details else ""
        print(f"{'PASS' if result.passed else 'FAIL'}  {result.name:9} {result.seconds:6.1f}s  {last}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps([r.__dict__ for r in results], indent=2))
    return 0 if all(r.passed for r in results) else 1
