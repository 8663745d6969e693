"""The GGUF-built tokenizer encodes, decodes and renders chats exactly as transformers does."""

from __future__ import annotations

import os

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models

from benchmarks.sharegpt import load_sharegpt
from kvos.config import ModelConfig
from kvos.model import gguf_loader
from kvos.model.loader import default_model_path, load_model
from kvos.model.tokenizer import Tokenizer

HANDWRITTEN = [
    "",
    " ",
    "   ",
    "\n",
    "\n\n\n",
    "\t\tindented\ttabs",
    "Hello world",
    " Hello world",
    "Hello  world   with    runs     of      spaces",
    "trailing spaces   ",
    "I'm sure you'll see they've done it, DON'T you?",
    "3.14159 and 1,000,000 and 2024-01-05 and 0x1F and 1e-9",
    "12345678901234567890",
    "call 555-0199 at 10:30pm",
    "café naïve résumé über straße",
    "e\u0301 (a decomposed accent) vs \u00e9",
    "日本語のテキストと中文文本",
    "한국어 문장입니다",
    "Привет, мир! Ελληνικά",
    "مرحبا بالعالم",
    "emoji: 🤖🚀👍🏽 family: 👨‍👩‍👧‍👦",
    "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    '<html><body class="x">&amp;</body></html>',
    "SELECT * FROM users WHERE id = 42;",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "text with <|endoftext|> in the middle",
    "<|im_start|><|im_start|>",
    "not special: <|im_sta rt|> <im_start>",
    "\u0000 nul and \u0007 bell and \x7f del",
    "zero\u200bwidth\u200bspace and\u00a0nbsp",
    "~!@#$%^&*()_+`-={}|[]\\:\";'<>?,./",
    "a" * 300,
    "ab " * 100,
]


def _sharegpt_texts(count: int) -> list[str]:
    """Turns from the start of ShareGPT, taken in turn from code, non-ASCII, digit-heavy,
    whitespace-run and plain text, so every kind is well represented."""
    kinds = {
        "code": lambda t: "```" in t,
        "unicode": lambda t: any(ord(c) > 127 for c in t),
        "digits": lambda t: sum(c.isdigit() for c in t) > 20,
        "spaces": lambda t: "    " in t or "\n\n\n" in t,
    }
    pools: dict[str, list[str]] = {kind: [] for kind in [*kinds, "plain"]}
    for conversation in load_sharegpt(limit=600):
        for turn in conversation.turns:
            text = turn.text[:1500]
            pools[next((k for k, test in kinds.items() if test(text)), "plain")].append(text)
    picked: list[str] = []
    for i in range(count):
        for pool in pools.values():
            if len(picked) < count and i < len(pool):
                picked.append(pool[i])
    return picked


TEXTS = HANDWRITTEN + _sharegpt_texts(170)


@pytest.fixture(scope="module")
def ours() -> Tokenizer:
    return load_model(ModelConfig()).tokenizer


@pytest.fixture(scope="module")
def reference():
    """transformers' tokenizer for the same GGUF, with SmolLM2's real pre-tokenizer.

    transformers (5.24) builds "smollm" GGUF vocabularies with the plain GPT-2
    split, but SmolLM2's own tokenizer.json (and llama.cpp) first split every
    digit off: Sequence[Digits(individual_digits), ByteLevel(use_regex)]. The
    two differ on whitespace runs before a digit ("\n\n1." in numbered lists);
    the model was trained with the latter, so that is the reference.
    Vocabulary, merges, special tokens and decoding stay transformers' own.
    """
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    return tokenizer


def test_enough_varied_texts() -> None:
    assert len(TEXTS) >= 200
    assert sum("```" in t for t in TEXTS) >= 30
    assert sum(any(ord(c) > 127 for c in t) for t in TEXTS) >= 30


def test_special_ids_match_transformers(ours: Tokenizer, reference) -> None:
    assert ours.vocab_size == len(reference) == 49152
    assert ours.bos_token_id == reference.bos_token_id == 1
    assert ours.eos_token_ids == (reference.eos_token_id,) == (2,)
    assert ours.add_bos_token is False


def test_encode_matches_transformers(ours: Tokenizer, reference) -> None:
    for text in TEXTS:
        assert ours.encode(text) == reference.encode(text), text[:80]
        assert ours.encode(text, add_special_tokens=False) == reference.encode(text, add_special_tokens=False)


def test_known_token_ids(ours: Tokenizer) -> None:
    # Digits are split off first (llama.cpp's "smollm"), so a newline run before one stays whole:
    # "\n\n" is the single token 1116, where a plain GPT-2 split would give 198, 198.
    assert ours.encode("x:\n\n1.") == [104, 42, 1116, 33, 30]
    assert ours.encode("Hello 12345") == [19556, 216, 33, 34, 35, 36, 37]
    assert ours.encode("<|im_start|>user") == [1, 4093]


def test_decode_round_trips(ours: Tokenizer, reference) -> None:
    for text in TEXTS:
        ids = ours.encode(text)
        assert ours.decode(ids, skip_special_tokens=False) == text
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True)


def test_decode_skips_special_tokens(ours: Tokenizer) -> None:
    ids = ours.encode("<|im_start|>assistant\nHi there<|im_end|>")
    assert ours.decode(ids) == "assistant\nHi there"
    assert ours.decode(ids, skip_special_tokens=False) == "<|im_start|>assistant\nHi there<|im_end|>"


def test_decode_ignores_ids_beyond_vocab(ours: Tokenizer) -> None:
    assert ours.decode([19556, ours.vocab_size + 7]) == "Hello"


CONVERSATIONS = [
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3? Ünïcödé 🤖"},
    ],
    [{"role": "user", "content": "Hi"}],
    [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U"},
        {"role": "assistant", "content": "A"},
    ],
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_template_matches_transformers(
    ours: Tokenizer, reference, messages: list[dict[str, str]], add_generation_prompt: bool
) -> None:
    want = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == want


def test_chat_template_exact_text(ours: Tokenizer) -> None:
    text = ours.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize(
    ("messages", "complaint"),
    [
        ([], "non-empty list"),
        ("hello", "non-empty list"),
        (["hello"], "messages[0] must be a dict"),
        ([{"content": "hi"}], "messages[0] has no 'role'"),
        ([{"role": "user"}], "messages[0] has no 'content'"),
        (
            [{"role": "user", "content": "a"}, {"role": "user", "content": 3}],
            "messages[1]['content'] must be a str, got int",
        ),
        ([{"role": None, "content": "a"}], "messages[0]['role'] must be a str, got NoneType"),
    ],
)
def test_malformed_messages_are_rejected(ours: Tokenizer, messages, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint.replace("[", r"\[").replace("]", r"\]")):
        ours.apply_chat_template(messages)


def _bare_tokenizer(chat_template: str | None) -> Tokenizer:
    backend = BackendTokenizer(models.BPE(vocab={"a": 0, "<s>": 1}, merges=[]))
    return Tokenizer(backend, bos_token_id=1, eos_token_ids=(1,), chat_template=chat_template, add_bos_token=True)


def test_model_without_template_is_rejected() -> None:
    with pytest.raises(ValueError, match="no chat template"):
        _bare_tokenizer(None).apply_chat_template([{"role": "user", "content": "a"}])


def test_template_raise_exception_becomes_value_error() -> None:
    template = (
        "{% if messages[0]['role'] != 'system' %}{{ raise_exception('first message must be system') }}{% endif %}"
    )
    with pytest.raises(ValueError, match="first message must be system"):
        _bare_tokenizer(template).apply_chat_template([{"role": "user", "content": "a"}])


def test_template_is_sandboxed() -> None:
    template = "{{ messages.__class__.__mro__ }}"
    with pytest.raises(ValueError, match="unsafe"):
        _bare_tokenizer(template).apply_chat_template([{"role": "user", "content": "a"}])


def test_template_sees_bos_token_and_trims_blocks() -> None:
    template = "{{ bos_token }}\n{% for m in messages %}\n  {% if m %}{{ m['content'] }}|{% endif %}\n{% endfor %}"
    assert _bare_tokenizer(template).apply_chat_template([{"role": "user", "content": "a"}]) == "<s>\na|"


def test_add_bos_token_prepends_bos_once() -> None:
    tok = _bare_tokenizer(None)
    assert tok.encode("a") == [1, 0]
    assert tok.encode("") == [1]
    assert tok.encode("a", add_special_tokens=False) == [0]


def test_save_and_reload_keeps_everything(ours: Tokenizer, tmp_path) -> None:
    ours.save_pretrained(tmp_path)
    again = Tokenizer.from_hf_folder(tmp_path)
    assert (again.vocab_size, again.bos_token_id, again.eos_token_ids, again.add_bos_token) == (
        ours.vocab_size,
        ours.bos_token_id,
        ours.eos_token_ids,
        ours.add_bos_token,
    )
    assert again.chat_template == ours.chat_template
    for text in TEXTS[:40]:
        assert again.encode(text) == ours.encode(text)


def _pieces(normalizer, pre_tokenizer, text: str) -> list[str]:
    if normalizer is not None:
        text = normalizer.normalize_str(text)
    return [piece for piece, _ in pre_tokenizer.pre_tokenize_str(text)]


def test_qwen2_pre_tokenization_matches_transformers_qwen2_tokenizer() -> None:
    from transformers import Qwen2Tokenizer

    reference = Qwen2Tokenizer().backend_tokenizer
    normalizer, pre_tokenizer = gguf_loader._pre_tokenization("qwen2")
    for text in TEXTS:
        assert _pieces(normalizer, pre_tokenizer, text) == _pieces(
            reference.normalizer, reference.pre_tokenizer, text
        ), text[:80]


def test_llama3_pre_tokenization_matches_transformers_split() -> None:
    from tokenizers import Regex, pre_tokenizers
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    reference = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(GGUF_PRE_TOKENIZER_SPLITS["llama-bpe"]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    normalizer, pre_tokenizer = gguf_loader._pre_tokenization("llama-bpe")
    assert normalizer is None
    for text in TEXTS:
        assert _pieces(None, pre_tokenizer, text) == _pieces(None, reference, text), text[:80]


def test_unknown_pre_tokenizer_is_rejected() -> None:
    with pytest.raises(ValueError, match="unsupported GGUF pre-tokenizer 'tekken'"):
        gguf_loader._pre_tokenization("tekken")


def test_hf_folder_settings(tmp_path) -> None:
    """Llama-3 style folder: BOS from the post-processor, several EOS ids, template in chat_template.jinja."""
    from tokenizers import processors

    backend = BackendTokenizer(models.BPE(vocab={"a": 0, "<s>": 1, "</s>": 2, "<eot>": 3}, merges=[]))
    backend.add_special_tokens(["<s>", "</s>", "<eot>"])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        '{"bos_token": {"content": "<s>"}, "eos_token": "<eot>", "add_bos_token": true}'
    )
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [2, 3]}')
    (tmp_path / "config.json").write_text('{"eos_token_id": 3, "bos_token_id": 1}')
    (tmp_path / "chat_template.jinja").write_text(
        "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}"
    )

    tok = Tokenizer.from_hf_folder(tmp_path)
    assert tok.bos_token_id == 1
    assert tok.eos_token_ids == (3, 2)  # the tokenizer's own first: templates see it as eos_token
    assert tok.encode("a") == [1, 0]  # the post-processor's BOS, not a second one
    assert tok.encode("a", add_special_tokens=False) == [0]
    assert tok.apply_chat_template([{"role": "user", "content": "a"}]) == "<s>a<eot>"


def test_hf_folder_without_tokenizer_json(tmp_path) -> None:
    with pytest.raises(ValueError, match="no tokenizer.json"):
        Tokenizer.from_hf_folder(tmp_path)


def test_broken_template_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="chat template failed"):
        _bare_tokenizer("{% for m in messages %}").apply_chat_template([{"role": "user", "content": "a"}])
