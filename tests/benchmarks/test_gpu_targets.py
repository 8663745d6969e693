"""scripts/gpu_targets.py runs end to end before a lent GPU's minutes are spent on it.

A device call runs the script as prepared here, once, within its time limit; a check that crashes there
wastes the call (session 25's engine change broke the sim check's step timer, and only a dry run showed
it). Its `--dry-run` runs the same code on the CPU with a 2-layer model and 16 requests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu_targets.py"


def test_the_gpu_script_prepares_and_runs_its_checks_dry(tmp_path: Path) -> None:
    data, out = tmp_path / "gpu", tmp_path / "summary.json"
    prepared = subprocess.run(
        [sys.executable, str(SCRIPT), "--prepare", str(data), "--num-requests", "16"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    assert len(json.loads((data / "requests.json").read_text())) == 16
    # Every check that runs kvos; `attention` and `kernel` time or skip kernels the suite tests itself.
    checks = ["versions", "engine", "offline", "steps", "decode", "sim"]
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--data", str(data), "--only", *checks, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    results = {r["name"]: r for r in json.loads(out.read_text())}
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert list(results) == checks and all(r["passed"] for r in results.values())
    step = results["steps"]["figures"]["offline_step"]
    assert step["wall_ms"] > 0 and step["kernel_ms"]["gemm"] > 0 and step["top"]
    # The sim check's prediction: the engine's work overlapped can only make the simulated run shorter.
    sim = results["sim"]["figures"]
    assert 0 < sim["predicted_overlapped_s"] <= sim["simulated_worker_and_engine"]["duration_s"]
