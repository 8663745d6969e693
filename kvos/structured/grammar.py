"""Grammars for constrained decoding, on llguidance: compiled once per schema, one matcher per request.

    StructuredOutput --GrammarCompiler.compile--> LLMatcher (template, cached)
                     --GrammarCompiler.matcher--> GrammarMatcher (a copy per request)

    each sampled step:  allowed() -> (V,) bool mask -> sampler masks the row -> advance(token)

llguidance never raises for a grammar problem (a bad schema, a token the
grammar refuses, a parser limit hit): its matcher enters an error state. Here
that state becomes a `GrammarError` (or an `InvalidRequestError` at compile
time), so the sampler fails that one row and nothing else. Compilation is
bounded by llguidance's parser limits (lexer fuel, grammar size), so even a
hostile schema returns; the server adds a wall-clock limit on top.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections import OrderedDict
from typing import TYPE_CHECKING

import llguidance
import torch

from kvos.errors import InvalidRequestError
from kvos.model.tokenizer import Tokenizer
from kvos.structured.spec import StructuredOutput

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

MAX_CACHED_GRAMMARS = 256

JSON_OPTIONS: JsonCompileOptions = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
"""Compact JSON (no free whitespace): a small model given the choice can emit newlines until max_tokens."""


class GrammarError(RuntimeError):
    """A matcher entered llguidance's error state; the request it belongs to fails."""


class GrammarMatcher:
    """One request's position in its grammar."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        self._matcher = matcher
        self.vocab_size = vocab_size
        self._bitmask = torch.zeros((vocab_size + 31) // 32, dtype=torch.int32)
        self._shifts = torch.arange(32, dtype=torch.int32)

    def allowed(self) -> torch.Tensor:
        """(V,) bool: the tokens that keep the output a prefix of the grammar (EOS only once it accepts)."""
        self._check()
        self._matcher.unsafe_compute_mask_ptr(self._bitmask.data_ptr(), self._bitmask.numel() * 4)
        self._check()
        # Bit b of word w allows token 32 * w + b.
        bits = (self._bitmask[:, None] >> self._shifts) & 1  # (V / 32, 32)
        return bits.flatten()[: self.vocab_size].bool()

    def advance(self, token_ids: list[int]) -> None:
        """Consume sampled tokens (or, on resume, all the tokens generated so far).

        Once the grammar is complete the mask allows EOS alone, which ends the
        request; llguidance counts consuming it as an error, so it is not fed.
        """
        if self._matcher.is_stopped():
            return
        if token_ids and not self._matcher.consume_tokens(token_ids):
            self._check()
            raise GrammarError("the grammar refused a token")

    def is_accepting(self) -> bool:
        return self._matcher.is_accepting()

    def _check(self) -> None:
        if self._matcher.is_error():
            raise GrammarError(self._matcher.get_error())


def _grammar(spec: StructuredOutput) -> str:
    """llguidance's grammar text for `spec` (ValueError for what it cannot even parse)."""
    if spec.kind in ("json_object", "json_schema"):
        return llguidance.LLMatcher.grammar_from_json_schema(spec.schema_dict(), defaults=JSON_OPTIONS)
    if spec.kind == "regex":
        assert spec.source is not None
        return llguidance.LLMatcher.grammar_from_regex(spec.source)
    if spec.kind == "choice":
        return "start: " + " | ".join(json.dumps(choice) for choice in spec.choices)
    assert spec.source is not None
    return llguidance.LLMatcher.grammar_from_lark(spec.source)


_SHARED: weakref.WeakKeyDictionary[Tokenizer, dict[int, GrammarCompiler]] = weakref.WeakKeyDictionary()
_SHARED_LOCK = threading.Lock()


class GrammarCompiler:
    """Compiles `StructuredOutput`s for one tokenizer and vocabulary, keeping the last few hundred.

    Thread-safe: the server compiles on worker threads while the engine thread
    builds matchers. Two threads missing on the same schema at once both
    compile it; the result is the same and compiling is cheap next to a lock
    held across it.

    `shared` hands every caller in a process the same compiler for a
    tokenizer: the server compiles a request's grammar on a worker thread,
    under its time limit, before the request reaches the engine, and the
    engine's worker then finds it in the cache instead of compiling on the
    step. (A core in its own process has its own cache: there the first
    request of a schema compiles on the core's step, bounded by llguidance's
    parser limits.)
    """

    @classmethod
    def shared(cls, tokenizer: Tokenizer, vocab_size: int) -> GrammarCompiler:
        """The process's compiler for `tokenizer` and `vocab_size`."""
        with _SHARED_LOCK:
            by_vocab = _SHARED.setdefault(tokenizer, {})
            if vocab_size not in by_vocab:
                by_vocab[vocab_size] = cls(tokenizer, vocab_size)
            return by_vocab[vocab_size]

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, max_cached: int = MAX_CACHED_GRAMMARS) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._max_cached = max_cached
        self._lock = threading.Lock()
        self._cache: OrderedDict[StructuredOutput, llguidance.LLMatcher] = OrderedDict()
        self._ll_tokenizer: llguidance.LLTokenizer | None = None

    def compile(self, spec: StructuredOutput) -> llguidance.LLMatcher:
        """The template matcher for `spec`; InvalidRequestError (naming `spec.param`) if it cannot be served."""
        with self._lock:
            template = self._cache.get(spec)
            if template is not None:
                self._cache.move_to_end(spec)
                return template
        try:
            grammar = _grammar(spec)
        except ValueError as exc:
            raise InvalidRequestError(f"{spec.what} is not valid: {exc}", spec.param) from exc
        template = llguidance.LLMatcher(self._llg_tokenizer(), grammar, log_level=0)
        if template.is_error():
            raise InvalidRequestError(f"{spec.what} cannot be served: {template.get_error()}", spec.param)
        with self._lock:
            self._cache[spec] = template
            while len(self._cache) > self._max_cached:
                self._cache.popitem(last=False)
        return template

    def matcher(self, spec: StructuredOutput) -> GrammarMatcher:
        """A fresh matcher at the start of `spec`'s grammar."""
        return GrammarMatcher(self.compile(spec).deep_copy(), self.vocab_size)

    def _llg_tokenizer(self) -> llguidance.LLTokenizer:
        """Built on first use (about a second for a 50k vocabulary): most servers never need it."""
        with self._lock:
            if self._ll_tokenizer is None:
                tok = self._tokenizer
                eos = tok.eos_token_ids[0] if tok.eos_token_ids else None
                vocab = tok.backend.to_str()
                self._ll_tokenizer = llguidance.LLTokenizer(vocab, n_vocab=self.vocab_size, eos_token=eos)
            return self._ll_tokenizer
