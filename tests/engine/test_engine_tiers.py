"""Greedy tokens with the host tier equal HF transformers': after swap-out / swap-in, and after a
conversation's prefix was evicted from the primary pool and came back from the host tier."""

from __future__ import annotations

import pytest

from kvos import LLM
from kvos.config import CacheConfig
from kvos.core.plan import StepPlan
from kvos.core.scheduler import KV_LOAD_FAILED
from kvos.entrypoints.cli import build_parser, engine_options
from kvos.entrypoints.metrics import ServerMetrics
from kvos.memory.virtual import VirtualKVCacheManager
from tests.conftest import GreedyFn, hf_greedy_fn
from tests.engine.test_engine_equivalence import MAX_NEW, TEXTS, check_against_hf, greedy
from tests.worker.test_worker_random import FlakyHostSaves

TINY_BYTES_PER_TOKEN = 2 * 2 * 2 * 16 * 4  # K and V, 2 layers, 2 kv heads, head_dim 16, fp32
SMOLLM_BYTES_PER_TOKEN = 2 * 30 * 3 * 64 * 4


def tier(llm: LLM, name: str):
    (found,) = [t for t in llm.engine.stats().tiers if t.tier == name]
    return found


def assert_host_back_to_baseline(llm: LLM) -> None:
    assert llm.engine.kv_manager.num_used_blocks == 0
    assert tier(llm, "host").used_bytes == 0


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> tuple[str, GreedyFn]:
    from transformers import AutoModelForCausalLM

    from tests.model.tiny_models import make_tiny_hf_model

    folder = make_tiny_hf_model(str(tmp_path_factory.mktemp("tiers")), "llama")
    return folder, hf_greedy_fn(AutoModelForCausalLM.from_pretrained(folder).eval())


def swap_llm(folder: str) -> LLM:
    return LLM(
        folder,
        block_size=4,
        kv_cache_memory_bytes=100 * TINY_BYTES_PER_TOKEN,
        enable_prefix_caching=False,
        kv_offload_bytes=4096 * TINY_BYTES_PER_TOKEN,
        preemption_mode="swap",
        dtype="float32",
    )


def record_plans(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> list[StepPlan]:
    worker = llm.engine.core.worker
    real = worker.execute
    plans: list[StepPlan] = []

    def execute(plan: StepPlan):
        plans.append(plan)
        return real(plan)

    monkeypatch.setattr(worker, "execute", execute)
    return plans


def test_tiny_swap_preemption_matches_hf(tiny_llama: tuple[str, GreedyFn], monkeypatch: pytest.MonkeyPatch) -> None:
    folder, hf = tiny_llama
    llm = swap_llm(folder)
    plans = record_plans(llm, monkeypatch)
    check_against_hf(llm, TEXTS, hf)
    stats = llm.engine.stats()
    assert dict(stats.preemptions_by_mode)["swap"] > 0
    assert stats.swap_in_bytes > 0 and stats.swap_out_bytes > 0
    # Some swap-ins loaded on the copy thread while the step computed others, and waited for it.
    loading = [(p, k.req_id) for p in plans for k in p.kv_loads]
    assert loading and all(p.scheduled and req_id not in {s.req_id for s in p.scheduled} for p, req_id in loading)
    assert_host_back_to_baseline(llm)


def test_tiny_a_failed_swap_in_ends_that_request_alone(
    tiny_llama: tuple[str, GreedyFn], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, hf = tiny_llama
    llm = swap_llm(folder)
    plans = record_plans(llm, monkeypatch)
    host_pool = llm.engine.core.worker.host_pool
    assert host_pool is not None
    real_load = host_pool.load
    lost: list[str] = []

    def load(primary, ops):  # the first copy for a waiting request fails; every other one works
        waiting = {k.loads: k.req_id for p in list(plans) for k in p.kv_loads}
        if not lost and tuple(ops) in waiting:
            lost.append(waiting[tuple(ops)])
            raise OSError("host memory went away")
        return real_load(primary, ops)

    monkeypatch.setattr(host_pool, "load", load)
    prompts = [llm.tokenizer.encode(t) for t in TEXTS]
    outputs = llm.generate(prompts, greedy(), use_tqdm=False)
    assert len(lost) == 1
    expected = hf(prompts, MAX_NEW)
    for out, want in zip(outputs, expected):
        if out.req_id == lost[0]:
            assert out.error == KV_LOAD_FAILED and out.finished
        else:
            assert out.error is None and out.outputs[0].token_ids == want
    assert_host_back_to_baseline(llm)


def test_tiny_virtual_cache_swap_preemption_matches_hf(
    tiny_llama: tuple[str, GreedyFn], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, hf = tiny_llama
    llm = LLM(
        folder,
        kv_cache="virtual",
        kv_cache_memory_bytes=96 * TINY_BYTES_PER_TOKEN,  # 12 pages of 8 tokens
        kv_offload_bytes=4096 * TINY_BYTES_PER_TOKEN,
        preemption_mode="swap",
        max_num_seqs=4,  # few idle rows: a swap-out's own pages are what the next allocation reclaims
        dtype="float32",
    )
    kv = llm.engine.kv_manager
    assert isinstance(kv, VirtualKVCacheManager)
    check_against_hf(llm, TEXTS, hf)
    stats = llm.engine.stats()
    assert dict(stats.preemptions_by_mode)["swap"] > 0
    assert stats.swap_in_bytes > 0 and stats.swap_out_bytes > 0
    assert_host_back_to_baseline(llm)
    assert kv.num_host_copies == 0 and not kv.table.draining
    assert kv.num_committed_pages <= kv.table.budget_pages
    text = ServerMetrics(llm.engine.stats).render().decode()
    assert 'kvos_kv_tier_capacity_bytes{tier="host"}' in text

    # A step that fails while it swaps out gives every tier back, and the engine serves on.
    worker = llm.engine.core.worker
    real = worker.execute

    def crash_in_saves(plan):
        if plan.saves:
            raise RuntimeError("copy engine lost")
        return real(plan)

    monkeypatch.setattr(worker, "execute", crash_in_saves)
    prompts = [llm.tokenizer.encode(t) for t in TEXTS]
    failed = llm.generate(prompts, greedy(), use_tqdm=False)
    assert any(out.error for out in failed)
    monkeypatch.setattr(worker, "execute", real)
    assert_host_back_to_baseline(llm)
    assert kv.num_host_copies == 0 and not kv.table.draining
    (again,) = llm.generate([prompts[4]], greedy(), use_tqdm=False)
    assert again.outputs[0].token_ids == hf([prompts[4]], MAX_NEW)[0]


def conversation_comes_back_warm(llm: LLM, hf: GreedyFn, fillers: list[str]) -> None:
    """Turn 1, then other prompts that evict it from the primary pool, then turn 2 on turn 1's history."""
    tokenizer = llm.tokenizer
    turn1 = tokenizer.encode("User: tell me about the sea and the ships that sail on it.\nAssistant:")
    (out1,) = llm.generate([turn1], greedy(), use_tqdm=False)
    assert out1.outputs[0].token_ids == hf([turn1], MAX_NEW)[0]
    for text in fillers:  # one at a time, so each one's blocks are cached and then evicted in turn
        llm.generate([tokenizer.encode(text)], greedy(), use_tqdm=False)
    hits_before = tier(llm, "host").hit_tokens
    turn2 = turn1 + list(out1.outputs[0].token_ids) + tokenizer.encode("\nUser: and the fish?\nAssistant:")
    (out2,) = llm.generate([turn2], greedy(), use_tqdm=False)
    assert out2.outputs[0].token_ids == hf([turn2], MAX_NEW)[0]
    assert out2.num_cached_tokens > 0
    assert tier(llm, "host").hit_tokens > hits_before
    assert llm.engine.stats().promoted_bytes > 0
    assert_host_back_to_baseline(llm)


def test_tiny_evicted_conversation_comes_back_from_host_tier(tiny_llama: tuple[str, GreedyFn]) -> None:
    folder, hf = tiny_llama
    llm = LLM(
        folder,
        block_size=4,
        kv_cache_memory_bytes=100 * TINY_BYTES_PER_TOKEN,
        kv_offload_bytes=4096 * TINY_BYTES_PER_TOKEN,
        dtype="float32",
    )
    conversation_comes_back_warm(llm, hf, TEXTS)
    assert llm.engine.stats().demoted_bytes > 0


def test_smollm_swap_preemption_matches_hf(hf_smollm: GreedyFn) -> None:
    llm = LLM(
        kv_cache_memory_bytes=144 * SMOLLM_BYTES_PER_TOKEN,
        enable_prefix_caching=False,
        kv_offload_bytes=64 * 2**20,
        preemption_mode="swap",
        dtype="float32",
    )
    check_against_hf(llm, TEXTS, hf_smollm)
    assert dict(llm.engine.stats().preemptions_by_mode)["swap"] > 0
    assert_host_back_to_baseline(llm)


def test_smollm_evicted_conversation_comes_back_from_host_tier(hf_smollm: GreedyFn) -> None:
    llm = LLM(kv_cache_memory_bytes=144 * SMOLLM_BYTES_PER_TOKEN, kv_offload_bytes=64 * 2**20, dtype="float32")
    conversation_comes_back_warm(llm, hf_smollm, TEXTS[4:8])
    text = ServerMetrics(llm.engine.stats).render().decode()
    assert 'kvos_kv_tier_capacity_bytes{tier="host"}' in text
    assert 'kvos_kv_tier_hit_tokens_total{tier="host"}' in text
    assert 'kvos_preemptions_by_mode_total{mode="swap"}' in text


def test_cache_config_validates_the_tier_fields() -> None:
    with pytest.raises(ValueError, match="kv_offload_bytes"):
        CacheConfig(preemption_mode="swap")
    with pytest.raises(ValueError, match="kv_offload_bytes"):
        CacheConfig(kv_offload_bytes=0)
    with pytest.raises(ValueError, match="preemption_mode"):
        CacheConfig(preemption_mode="spill")  # type: ignore[arg-type]


def test_cli_flags_set_the_tier_fields() -> None:
    args = build_parser().parse_args(["serve", "--kv-offload-size", "8GiB", "--preemption-mode", "swap"])
    options = engine_options(args)
    assert options["kv_offload_bytes"] == 8 * 2**30 and options["preemption_mode"] == "swap"
    defaults = engine_options(build_parser().parse_args(["serve"]))
    assert defaults["kv_offload_bytes"] is None and defaults["preemption_mode"] == "auto"


def write_back_llm(folder: str) -> tuple[LLM, list[int]]:
    """A pool of 100 tokens with prefix caching over a host tier, and a prompt it has cached: the next
    requests make the pool write that prompt's blocks back."""
    llm = LLM(
        folder,
        block_size=4,
        kv_cache_memory_bytes=100 * TINY_BYTES_PER_TOKEN,
        kv_offload_bytes=4096 * TINY_BYTES_PER_TOKEN,
        dtype="float32",
    )
    prompt = llm.tokenizer.encode(TEXTS[4])
    llm.generate([prompt], greedy(), use_tqdm=False)
    return llm, prompt


def test_tiny_a_step_failing_in_its_saves_leaves_no_unwritten_block_findable(
    tiny_llama: tuple[str, GreedyFn], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, hf = tiny_llama
    llm, prompt = write_back_llm(folder)
    tokenizer = llm.tokenizer
    worker = llm.engine.core.worker
    real = worker.execute

    def crash_in_saves(plan):  # the host saves never run
        if plan.saves:
            raise RuntimeError("copy engine lost")
        return real(plan)

    monkeypatch.setattr(worker, "execute", crash_in_saves)
    failed = llm.generate([tokenizer.encode(t) for t in TEXTS[5:8]], greedy(), use_tqdm=False)
    assert any(out.error for out in failed)
    monkeypatch.setattr(worker, "execute", real)
    assert tier(llm, "host").cached_bytes == 0  # nothing the failed saves were to write is findable
    (again,) = llm.generate([prompt], greedy(), use_tqdm=False)
    assert again.outputs[0].token_ids == hf([prompt], MAX_NEW)[0]
    assert_host_back_to_baseline(llm)


def die_in_host_saves(llm: LLM) -> FlakyHostSaves:
    """Every save to the host tier scribbles over its targets and raises, on the copy thread, as a copy
    dying half-way would (loads and other copies work)."""
    pool = llm.engine.core.worker.host_pool
    assert pool is not None
    saves = FlakyHostSaves(pool, seed=0)
    saves.fail_rate = 1.0
    return saves


def test_tiny_write_backs_dying_on_the_copy_thread_fail_nobody_and_leave_nothing_findable(
    tiny_llama: tuple[str, GreedyFn],
) -> None:
    folder, hf = tiny_llama
    llm, prompt = write_back_llm(folder)
    tokenizer = llm.tokenizer
    saves = die_in_host_saves(llm)
    others = [tokenizer.encode(t) for t in TEXTS[5:8]]
    outputs = llm.generate(others, greedy(), use_tqdm=False)
    assert saves.num_failed  # the pool reused the prompt's cached blocks, and their write-backs died
    assert [(o.error, o.outputs[0].token_ids) for o in outputs] == [(None, want) for want in hf(others, MAX_NEW)]
    assert tier(llm, "host").cached_bytes == 0  # no block the dead saves were to fill is findable
    (again,) = llm.generate([prompt], greedy(), use_tqdm=False)
    assert again.outputs[0].token_ids == hf([prompt], MAX_NEW)[0]
    assert_host_back_to_baseline(llm)


def test_tiny_swap_outs_dying_on_the_copy_thread_make_their_victims_recompute(
    tiny_llama: tuple[str, GreedyFn],
) -> None:
    folder, hf = tiny_llama
    llm = swap_llm(folder)
    saves = die_in_host_saves(llm)
    prompts = [llm.tokenizer.encode(t) for t in TEXTS]
    outputs = llm.generate(prompts, greedy(), use_tqdm=False)
    assert saves.num_failed and llm.engine.stats().num_preemptions > 0
    assert [(o.error, o.outputs[0].token_ids) for o in outputs] == [(None, want) for want in hf(prompts, MAX_NEW)]
    assert_host_back_to_baseline(llm)
