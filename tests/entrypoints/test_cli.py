"""`kvos generate` as a user runs it (a process of its own): the completion HF transformers gives, a disk
tier written down on the way out, and a clear error with exit code 2 for a bad request."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from kvos.model.tokenizer import Tokenizer
from tests.conftest import hf_greedy_fn
from tests.engine.test_engine_disk_tier import PROMPT, block_files

REPO_ROOT = Path(__file__).resolve().parents[2]


def kvos(*args: str) -> subprocess.CompletedProcess[str]:
    """This checkout's `kvos` command, through its console entry point (`kvos.entrypoints.cli.entry`)."""
    return subprocess.run(
        [sys.executable, "-m", "kvos.entrypoints.cli", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_generate_prints_hfs_completion_and_writes_its_disk_tier_on_the_way_out(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from tests.model.tiny_models import make_tiny_hf_model

    folder = make_tiny_hf_model(str(tmp_path / "model"), "llama")
    disk = tmp_path / "disk"
    done = kvos(
        "generate", PROMPT, "--model", folder, "--dtype", "float32", "--max-tokens", "6", "--block-size", "4",
        "--kv-disk-path", str(disk), "--kv-disk-size", "1MiB",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    tokenizer = Tokenizer.from_hf_folder(Path(folder))
    ids = tokenizer.encode(PROMPT)
    expected = hf_greedy_fn(AutoModelForCausalLM.from_pretrained(folder).eval())([ids], 6)[0]
    assert done.stdout == tokenizer.decode(expected) + "\n"
    # Closing the engine writes the pool's cached blocks to disk: the prompt's full blocks are there.
    assert len(block_files(disk)) >= len(ids) // 4


def test_a_bad_request_exits_with_2_and_names_what_was_wrong() -> None:
    done = kvos("generate", "Hi", "--max-tokens", "0")
    assert done.returncode == 2
    assert "kvos: error:" in done.stderr and "max_tokens" in done.stderr
