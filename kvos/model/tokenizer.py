"""Text <-> token ids, and chat messages -> prompt text.

Wraps a `tokenizers.Tokenizer` directly instead of going through
`transformers`: importing transformers alone costs seconds at start-up, and the
Rust tokenizer is all that encoding and decoding need. What transformers adds on
top (BOS handling, the chat template) is small and reproduced here.

A tokenizer is stored on disk in Hugging Face's layout (`tokenizer.json` +
`tokenizer_config.json`), so that the loader's GGUF cache, the tiny test
models and real HF folders all go through `from_hf_folder`.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import Tokenizer as BackendTokenizer

if TYPE_CHECKING:
    import jinja2

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


class Tokenizer:
    """A model's tokenizer: vocabulary, special ids and chat template."""

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        bos_token_id: int | None,
        eos_token_ids: tuple[int, ...],
        chat_template: str | None,
        add_bos_token: bool,
    ) -> None:
        self.backend = backend
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.bos_token_id = bos_token_id
        self.eos_token_ids = eos_token_ids
        self.chat_template = chat_template
        self.add_bos_token = add_bos_token

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_token_id is None else self.backend.id_to_token(self.bos_token_id)

    @property
    def eos_token(self) -> str | None:
        return self.backend.id_to_token(self.eos_token_ids[0]) if self.eos_token_ids else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`.

        With `add_special_tokens`, the tokenizer's own post-processor runs (an
        HF `tokenizer.json` may add BOS there) and BOS is prepended when the
        model's config asks for it (`add_bos_token`; SmolLM2 does not).
        Special tokens written in the text (`<|im_start|>`) always map to their
        single id, as in transformers, since chat templates rely on it.
        """
        ids: list[int] = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if (
            add_special_tokens
            and self.add_bos_token
            and self.bos_token_id is not None
            and (not ids or ids[0] != self.bos_token_id)
        ):
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; ids outside the vocabulary decode to nothing."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render a conversation as the model's prompt text, as transformers does.

        Raises ValueError for a model without a template, for malformed
        messages, and when the template itself rejects the conversation
        (`raise_exception`, e.g. roles that do not alternate).
        """
        if self.chat_template is None:
            raise ValueError("this model has no chat template; send a plain prompt instead of messages")
        _check_messages(messages)
        import jinja2

        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except jinja2.TemplateError as exc:
            raise ValueError(f"chat template failed on these messages: {exc}") from exc

    @cached_property
    def _template(self) -> jinja2.Template:
        """Compiled on first use: importing jinja2 and compiling cost ~0.1 s of start-up."""
        assert self.chat_template is not None
        return _compile_template(self.chat_template)

    @classmethod
    def from_hf_folder(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json` and the settings HF keeps beside it.

        EOS ids are the union of the tokenizer's `eos_token`,
        generation_config.json and config.json: instruct models often list
        several ids (end of turn, end of text) and generation must stop at any.
        The tokenizer's comes first because chat templates see it as `eos_token`.
        """
        folder = Path(path)
        tokenizer_file = folder / TOKENIZER_FILE
        if not tokenizer_file.is_file():
            raise ValueError(f"{folder} has no {TOKENIZER_FILE} (only fast tokenizers are supported)")
        backend = BackendTokenizer.from_file(str(tokenizer_file))
        tok_cfg = _read_json(folder / TOKENIZER_CONFIG_FILE)
        gen_cfg = _read_json(folder / "generation_config.json")
        model_cfg = _read_json(folder / "config.json")

        bos_id = _token_id(backend, tok_cfg.get("bos_token"))
        if bos_id is None:
            bos_id = gen_cfg.get("bos_token_id", model_cfg.get("bos_token_id"))
        eos_ids: list[int] = []
        for candidate in (
            _token_id(backend, tok_cfg.get("eos_token")),
            gen_cfg.get("eos_token_id"),
            model_cfg.get("eos_token_id"),
        ):
            for token_id in candidate if isinstance(candidate, list) else [candidate]:
                if token_id is not None and int(token_id) not in eos_ids:
                    eos_ids.append(int(token_id))
        return cls(
            backend,
            bos_token_id=None if bos_id is None else int(bos_id),
            eos_token_ids=tuple(eos_ids),
            chat_template=_chat_template(folder, tok_cfg),
            add_bos_token=bool(tok_cfg.get("add_bos_token", False)),
        )

    def save_pretrained(self, path: str | Path) -> None:
        """Write `tokenizer.json` + `tokenizer_config.json` (HF layout, readable by `from_hf_folder`).

        Only the first EOS id fits in tokenizer_config.json; a caller that has
        several writes them to generation_config.json.
        """
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(folder / TOKENIZER_FILE))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self.add_bos_token,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "chat_template": self.chat_template,
        }
        (folder / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, ensure_ascii=False, indent=2))


def _compile_template(source: str) -> jinja2.Template:
    """Compile in a sandbox with the same environment transformers uses.

    Chat templates come with downloaded models, so they are untrusted code.
    trim_blocks/lstrip_blocks and the helpers below are what HF templates are
    written against; other settings change the rendered whitespace.
    """
    import jinja2
    import jinja2.ext
    import jinja2.sandbox

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes HTML characters, which would change prompts.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    import jinja2

    raise jinja2.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"messages must be a non-empty list of {{'role', 'content'}} dicts, got {messages!r}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(message).__name__}")
        for key in ("role", "content"):
            if key not in message:
                raise ValueError(f"messages[{i}] has no {key!r}")
            if not isinstance(message[key], str):
                raise ValueError(f"messages[{i}][{key!r}] must be a str, got {type(message[key]).__name__}")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def _token_id(backend: BackendTokenizer, token: Any) -> int | None:
    """Id of a special token given as HF writes it: a string or an AddedToken dict."""
    if isinstance(token, dict):
        token = token.get("content")
    if not isinstance(token, str):
        return None
    return backend.token_to_id(token)


def _chat_template(folder: Path, tok_cfg: dict[str, Any]) -> str | None:
    """The default template, wherever this folder's transformers version put it."""
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if isinstance(template, str):
        return template
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = _read_json(folder / "chat_template.json").get("chat_template")
    return template if isinstance(template, str) else None
