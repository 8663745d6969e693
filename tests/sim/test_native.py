"""The simulator compiled with mypyc (`kvos.sim.native`): the Python's results exactly, and only when current."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvos.sim import native
from tests.sim.test_simulator import roofline_args

REPO = Path(__file__).resolve().parents[2]
EXT = str(native.sysconfig.get_config_var("EXT_SUFFIX"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A kvos cache holding a build of the current sources (about a minute to compile)."""
    root = tmp_path_factory.mktemp("kvos-cache")
    # Builds of earlier sources, oldest first: a new build keeps the newest KEEP_BUILDS in all.
    earlier = [root / "sim-native" / f"earlier-{k}" for k in range(native.KEEP_BUILDS + 1)]
    for k, folder in enumerate(earlier):
        folder.mkdir(parents=True)
        os.utime(folder, (1e9 + k, 1e9 + k))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KVOS_CACHE_DIR", str(root))
        built = native.build()
    assert built.parent.parent == root and sorted(p.name for p in built.rglob(f"*{EXT}")) == sorted(
        name.rsplit(".", 1)[-1] + EXT for name in (*native.MODULES, "kvos_sim_native__mypyc")
    )
    assert sorted(built.parent.iterdir()) == sorted([*earlier[-(native.KEEP_BUILDS - 1) :], built])
    yield root


def run(args: list[str], cache_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KVOS_CACHE_DIR": str(cache_dir)}
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_compiled_simulations_give_the_pythons_results(cache: Path, tmp_path: Path) -> None:
    script = str(REPO / "tests" / "sim" / "native_runs.py")
    run([sys.executable, script, "compiled", str(tmp_path / "compiled.json")], cache)
    run([sys.executable, script, "python", str(tmp_path / "python.json")], tmp_path / "empty-cache")
    compiled = json.loads((tmp_path / "compiled.json").read_text())
    python = json.loads((tmp_path / "python.json").read_text())
    assert all(path.startswith(str(cache)) and path.endswith(EXT) for path in compiled["loaded"].values())
    assert all(path.endswith(".py") for path in python["loaded"].values())
    for name, expected in python["fleets"].items():
        assert compiled["fleets"][name] == expected, name
    # The fleets exercise what they are named for.
    fleets = python["fleets"]
    assert fleets["fcfs-preempting"]["instances"][0]["preemptions"] > 0
    assert any(outcome == "migrated" for outcome, *_ in fleets["migration-3"]["migrations"])
    assert fleets["disaggregated-1p2d"]["migrations"] and fleets["least-requests-4"]["instances"][3]["steps"] > 0


def test_the_sim_commands_load_the_build_and_report_what_the_python_does(cache: Path, tmp_path: Path) -> None:
    model = roofline_args(
        tmp_path, hidden_size=256, intermediate_size=512, num_hidden_layers=4, max_position_embeddings=1024
    )
    workload = ["--fixed-lengths", "60,20", "--num-requests", "40"]
    # As the `kvos` console script runs them: its own folder first on the path, from the repository root.
    kvos = [sys.executable, "-P", "-c", "import sys; from kvos.entrypoints.cli import main; sys.exit(main())"]
    commands = {
        "run": ["sim", "run", *model, *workload, "--num-instances", "2", "--router", "least-requests", "--breakdown"],
        "plan": ["sim", "plan", *model, *workload, "--rate", "20", "--router", "round-robin,least-requests"],
    }
    for name, command in commands.items():
        reports: dict[str, Any] = {}
        for kind, cache_dir in (("compiled", cache), ("python", tmp_path / "empty-cache")):
            done = run([*kvos, *command, "--json", str(tmp_path / f"{name}-{kind}.json")], cache_dir)
            assert ("runs compiled (mypyc)" in done.stderr) == (kind == "compiled"), done.stderr
            reports[kind] = json.loads((tmp_path / f"{name}-{kind}.json").read_text())
        for report in reports.values():  # how fast each simulated is the one thing allowed to differ
            for entry in report.get("runs", []):
                entry.pop("simulation")
        assert reports["compiled"] == reports["python"], name


def test_a_process_that_imported_the_python_keeps_it(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import kvos.core.plan  # noqa: F401  (this test process runs the Python)

    monkeypatch.setenv("KVOS_CACHE_DIR", str(cache))
    assert native.build_dir().is_dir()
    assert native.activate() is None
    assert not any(isinstance(finder, native._CompiledFinder) for finder in sys.meta_path)


def test_any_edit_to_the_sources_names_a_new_build(tmp_path: Path) -> None:
    copy = tmp_path / "kvos"
    shutil.copytree(native._PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    assert native.source_digest(copy) == native.source_digest()
    scheduler = copy / "core" / "scheduler.py"
    scheduler.write_text(scheduler.read_text() + "\n# an edit\n")
    edited = native.source_digest(copy)
    assert edited != native.source_digest()
    (copy / "core" / "new_policy.py").write_text("")
    assert native.source_digest(copy) not in (edited, native.source_digest())


def test_a_build_that_cannot_compile_says_why_and_leaves_no_build(tmp_path: Path) -> None:
    env = {**os.environ, "KVOS_CACHE_DIR": str(tmp_path), "CC": "/bin/false"}  # a C compiler that always fails
    done = subprocess.run(
        [sys.executable, "-m", "kvos.entrypoints.cli", "sim", "build"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    assert "kvos: error: mypyc could not compile the simulator" in done.stderr
    assert "Traceback" not in done.stderr
    assert not [p for p in (tmp_path / "sim-native").glob("*") if not p.name.startswith(".")]
