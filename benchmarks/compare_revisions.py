"""Run one benchmark at two revisions of kvos, alternating, in one run: "no slower than before".

Each revision runs from its own git worktree (created under a temporary
folder and removed afterwards), with that worktree first on PYTHONPATH, so
the old code runs its own benchmark script against its own engine. Rounds
alternate (base, head, base, head, ...) so drift on the machine hits both
alike. The benchmark's own output is printed as it runs; its JSON goes to
`--out`.

    python -m benchmarks.compare_revisions --base 2a225c1 --rounds 2 -- offline_throughput --engines kvos
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(checkout: Path, label: str, benchmark: list[str], out: Path, round_index: int) -> None:
    json_path = out / f"{benchmark[0]}-{label}-{round_index}.json"
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    command = [sys.executable, "-m", f"benchmarks.{benchmark[0]}", *benchmark[1:], "--json", str(json_path)]
    print(
        f"\n=== {label} ({checkout}), round {round_index}: {' '.join(command[2:])}; load {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    subprocess.run(command, cwd=checkout, env=env, check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the revision to compare against (a commit or branch)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("results/revisions"))
    parser.add_argument("benchmark", nargs=argparse.REMAINDER, help="-- NAME [ARGS]: a module under benchmarks/")
    args = parser.parse_args(argv)
    benchmark = [a for a in args.benchmark if a != "--"]
    if not benchmark:
        parser.error("name a benchmark after --, e.g. -- offline_throughput --engines kvos")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kvos-base-") as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(base), args.base], check=True)
        try:
            for i in range(args.rounds):
                run(base, f"base-{args.base}", benchmark, args.out.resolve(), i)
                run(REPO, "head", benchmark, args.out.resolve(), i)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(base)], check=False)
    print(f"\nJSON per run in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
