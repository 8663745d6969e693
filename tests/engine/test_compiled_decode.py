"""compile=True: decode steps through torch.compile give HF's greedy tokens, with no compiling under requests."""

from __future__ import annotations

import pytest
import torch

from kvos import LLM, SamplingParams
from tests.conftest import hf_greedy_fn
from tests.engine.test_engine_equivalence import TEXTS, check_against_hf
from tests.model.test_quantization import GOLDEN_TEXTS, INT4_EQUAL_TOKENS


@pytest.mark.parametrize("backend", ["paged", "gather_sdpa"])
def test_compiled_decode_matches_hf_and_compiles_only_at_start_up(tmp_path, backend: str) -> None:
    from transformers import AutoModelForCausalLM

    from tests.model.tiny_models import make_tiny_hf_model

    folder = make_tiny_hf_model(str(tmp_path), "llama")
    hf = hf_greedy_fn(AutoModelForCausalLM.from_pretrained(folder).eval())
    torch._dynamo.reset()
    llm = LLM(folder, block_size=4, max_num_seqs=4, compile=True, attention_backend=backend, dtype="float32")
    graphs_at_start_up = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs_at_start_up >= 1
    # Batches of 4, then 3, 2 and 1 as requests finish; contexts of every length.
    check_against_hf(llm, TEXTS, hf)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs_at_start_up


def test_compile_refuses_the_virtual_cache() -> None:
    with pytest.raises(ValueError, match="compile=True needs kv_cache='paged'"):
        LLM(compile=True, kv_cache="virtual", dtype="float32")


def test_compile_without_a_cpp_compiler_is_a_clear_error(monkeypatch, tmp_path) -> None:
    from tests.model.tiny_models import make_tiny_hf_model

    folder = make_tiny_hf_model(str(tmp_path), "llama")
    monkeypatch.setenv("CXX", "no-such-compiler++")
    with pytest.raises(ValueError, match="'no-such-compiler\\+\\+' is not on PATH"):
        LLM(folder, compile=True, dtype="float32")


def test_compiled_int4_decode_holds_int4s_tolerance() -> None:
    """The compiled graph runs the same int4 kernels, but its fused bfloat16 arithmetic rounds
    differently from eager's, and the kernel's int8 activations can turn that into a different
    token some steps in (measured: eager and compiled first differ at token 6 on one prompt). What
    a user is promised holds for both: the first `INT4_EQUAL_TOKENS` greedy tokens of every golden
    prompt equal float32's (tests/model/test_quantization.py)."""
    params = SamplingParams(temperature=0, max_tokens=INT4_EQUAL_TOKENS, ignore_eos=True)
    exact = LLM(kv_cache_memory_bytes=2**26, dtype="float32").generate(GOLDEN_TEXTS, params, use_tqdm=False)
    llm = LLM(kv_cache_memory_bytes=2**26, quantization="int4", compile=True, max_num_seqs=2, dtype="float32")
    compiled = llm.generate(GOLDEN_TEXTS, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in compiled] == [o.outputs[0].token_ids for o in exact]
    assert llm.engine.kv_manager.num_used_blocks == 0
