"""The disk KV tier end to end: a restarted engine answers a prompt it saw before from disk, with HF
transformers' greedy tokens; bad files are caught; a full disk stops the tier, not the serving."""

from __future__ import annotations

import errno
import logging
from pathlib import Path

import pytest

from kvos import LLM
from kvos.config import CacheConfig
from kvos.entrypoints.cli import build_parser, engine_options
from kvos.entrypoints.metrics import ServerMetrics
from kvos.errors import DiskTierInUseError
from kvos.worker.disk_store import DiskKVStore
from tests.conftest import GreedyFn, hf_greedy_fn
from tests.engine.test_engine_equivalence import MAX_NEW, TEXTS, greedy
from tests.engine.test_engine_tiers import TINY_BYTES_PER_TOKEN, tier

PROMPT = (
    "Once upon a time, in a small village by the sea, there lived an old fisherman who mended his nets "
    "every morning and told the children stories about the storms he had seen."
)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> tuple[str, GreedyFn]:
    from transformers import AutoModelForCausalLM

    from tests.model.tiny_models import make_tiny_hf_model

    folder = make_tiny_hf_model(str(tmp_path_factory.mktemp("disk")), "llama")
    return folder, hf_greedy_fn(AutoModelForCausalLM.from_pretrained(folder).eval())


def tiny(folder: str, disk: Path, **options) -> LLM:
    options.setdefault("kv_cache_memory_bytes", 100 * TINY_BYTES_PER_TOKEN)
    return LLM(folder, block_size=4, kv_disk_path=str(disk), kv_disk_bytes=2**20, **options, dtype="float32")


def serve_once(llm: LLM, hf: GreedyFn, ids: list[int]):
    (out,) = llm.generate([ids], greedy(), use_tqdm=False)
    assert out.outputs[0].token_ids == hf([ids], MAX_NEW)[0]
    assert llm.engine.kv_manager.num_used_blocks == 0
    return out


def block_files(disk: Path) -> list[Path]:
    return sorted(disk.glob("*.kv"))


@pytest.mark.parametrize("host", [False, True], ids=["below-primary", "below-host"])
def test_restarted_engine_reads_a_seen_prompt_from_disk(tiny_llama, tmp_path: Path, host: bool) -> None:
    folder, hf = tiny_llama
    options = {"kv_offload_bytes": 64 * TINY_BYTES_PER_TOKEN} if host else {}
    with tiny(folder, tmp_path, **options) as first:
        ids = first.tokenizer.encode(PROMPT)
        cold = serve_once(first, hf, ids)
        assert cold.num_cached_tokens == 0
    assert len(block_files(tmp_path)) >= len(ids) // 4  # flushed at close
    with tiny(folder, tmp_path, **options) as second:
        warm = serve_once(second, hf, ids)
        expected = (len(ids) - 1) // 4 * 4
        assert warm.num_cached_tokens == expected
        assert tier(second, "disk").hit_tokens == expected
        assert second.engine.stats().disk_read_bytes > 0
        if host:
            assert tier(second, "host").used_bytes == 0
        assert tier(second, "disk").used_bytes == 0  # everything on disk is cache, held by nobody


def test_blocks_evicted_from_the_host_tier_go_down_to_disk_and_come_back(tiny_llama, tmp_path: Path) -> None:
    folder, hf = tiny_llama
    # 25 blocks in the pool and 8 in the host tier: the fillers push the prompt's blocks down to disk.
    with tiny(folder, tmp_path, kv_offload_bytes=32 * TINY_BYTES_PER_TOKEN) as llm:
        ids = llm.tokenizer.encode(PROMPT)
        serve_once(llm, hf, ids)
        for text in TEXTS:
            serve_once(llm, hf, llm.tokenizer.encode(text))
        stats = llm.engine.stats()
        assert stats.disk_write_bytes > 0 and tier(llm, "disk").cached_bytes > 0
        warm = serve_once(llm, hf, ids)
        assert warm.num_cached_tokens > 0 and tier(llm, "disk").hit_tokens > 0
        assert tier(llm, "host").used_bytes == 0 and llm.engine.kv_manager.num_host_copies == 0


def corrupt(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[-7] ^= 0x40
        path.write_bytes(bytes(data))
    else:
        path.write_bytes(bytes(data[: len(data) // 2]))


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_a_corrupted_disk_block_is_discarded_counted_and_recomputed(tiny_llama, tmp_path: Path, how: str) -> None:
    folder, hf = tiny_llama
    with tiny(folder, tmp_path) as first:
        ids = first.tokenizer.encode(PROMPT)
        serve_once(first, hf, ids)
        keys = first.engine.kv_manager.block_hashes_of(ids)
    # The prompt's third block goes bad after the first engine wrote it.
    corrupt(tmp_path / f"{keys[2].hex()}.kv", how)
    with tiny(folder, tmp_path) as second:
        warm = serve_once(second, hf, ids)  # tokens right: the bad block and all after it were recomputed
        assert warm.num_cached_tokens == 2 * 4
        # A flipped byte fails the checksum on read; a truncated file is caught by its size at open.
        assert second.engine.stats().disk_corrupted_blocks == 1
        text = ServerMetrics(second.engine.stats).render().decode()
        assert "kvos_kv_disk_corrupted_blocks_total" in text


def test_a_write_torn_by_a_kill_leaves_a_tier_the_next_start_opens(tiny_llama, tmp_path: Path) -> None:
    folder, hf = tiny_llama
    with tiny(folder, tmp_path) as first:
        ids = first.tokenizer.encode(PROMPT)
        serve_once(first, hf, ids)
        keys = first.engine.kv_manager.block_hashes_of(ids)
    # What a kill mid-write leaves: a temporary file; and (power cut) a renamed file cut short.
    (tmp_path / f"{keys[0].hex()}.kv.tmp-4242").write_bytes(b"KVOSBLK\0partial")
    corrupt(tmp_path / f"{keys[1].hex()}.kv", "truncate")
    with tiny(folder, tmp_path) as second:
        assert not list(tmp_path.glob("*.tmp-*"))
        warm = serve_once(second, hf, ids)
        assert warm.num_cached_tokens == 4  # block 0 survived; block 1 was lost, so the chain stops there


def test_a_second_engine_on_the_same_directory_gets_a_clear_error(tiny_llama, tmp_path: Path) -> None:
    folder, _ = tiny_llama
    with tiny(folder, tmp_path):
        with pytest.raises(DiskTierInUseError, match="in use by another kvos engine"):
            tiny(folder, tmp_path)
    with tiny(folder, tmp_path):  # the lock went with the first engine
        pass


def test_a_full_disk_stops_the_tier_once_and_serving_goes_on(
    tiny_llama, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    folder, hf = tiny_llama

    def no_space(self, caches, op):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(DiskKVStore, "save", no_space)
    with caplog.at_level(logging.ERROR), tiny(folder, tmp_path) as llm:
        for text in [PROMPT, *TEXTS]:
            serve_once(llm, hf, llm.tokenizer.encode(text))
        stats = llm.engine.stats()
        assert stats.disk_write_failures == 1  # the tier stopped taking blocks after the first
        assert not stats.disk_accepting
        assert tier(llm, "disk").cached_bytes == 0
        serve_once(llm, hf, llm.tokenizer.encode(PROMPT))
        text = ServerMetrics(llm.engine.stats).render().decode()
        assert "kvos_kv_disk_write_failures_total 1.0" in text
    assert sum("stopped taking blocks" in r.getMessage() for r in caplog.records) == 1
    assert not block_files(tmp_path)


def test_cache_config_and_cli_take_the_disk_tier() -> None:
    with pytest.raises(ValueError, match="both kv_disk_path and kv_disk_bytes"):
        CacheConfig(kv_disk_path="/tmp/x")
    with pytest.raises(ValueError, match="kv_disk_bytes must be > 0"):
        CacheConfig(kv_disk_path="/tmp/x", kv_disk_bytes=0)
    with pytest.raises(ValueError, match="kv_cache='paged'"):
        CacheConfig(kv_cache="virtual", kv_disk_path="/tmp/x", kv_disk_bytes=2**20)
    args = build_parser().parse_args(["serve", "--kv-disk-path", "/data/kv", "--kv-disk-size", "50GiB"])
    options = engine_options(args)
    assert options["kv_disk_path"] == "/data/kv" and options["kv_disk_bytes"] == 50 * 2**30
    defaults = engine_options(build_parser().parse_args(["serve"]))
    assert defaults["kv_disk_path"] is None and defaults["kv_disk_bytes"] is None
