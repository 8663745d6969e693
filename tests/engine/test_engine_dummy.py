"""Random-weight ("dummy") engines: the way big shapes are benchmarked without downloads."""

from __future__ import annotations

import json

import pytest

from kvos import LLM, SamplingParams
from tests.model.tiny_models import make_tiny_hf_model


def write_config(tmp_path) -> str:
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 49152,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return str(path)


def test_dummy_weights_generate_deterministically_and_free_memory(tmp_path) -> None:
    config = write_config(tmp_path)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    a = LLM(config, load_format="dummy", seed=3, dtype="float32").generate(["hello world"] * 3, params, use_tqdm=False)
    llm = LLM(config, load_format="dummy", seed=3, dtype="float32")
    b = llm.generate(["hello world"], params, use_tqdm=False)
    assert a[0].outputs[0].token_ids == a[2].outputs[0].token_ids == b[0].outputs[0].token_ids
    assert len(b[0].outputs[0].token_ids) == 8
    assert llm.engine.max_model_len == 256
    assert llm.engine.kv_manager.num_used_blocks == 0
    other = LLM(config, load_format="dummy", seed=4, dtype="float32").generate(["hello world"], params, use_tqdm=False)
    assert other[0].outputs[0].token_ids != b[0].outputs[0].token_ids


def test_sliding_window_caps_the_context(tmp_path) -> None:
    folder = make_tiny_hf_model(str(tmp_path), "mistral", sliding_window=64)
    llm = LLM(folder, dtype="float32")
    assert llm.engine.max_model_len == 64
    with pytest.raises(ValueError, match="context length of 64"):
        llm.engine.add_request("long", [5] * 60, SamplingParams(max_tokens=10))
