"""Grammar masks on the tiny random model: whatever it samples, the text stays valid JSON (or a prefix of it)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from kvos.engine.llm_engine import LLMEngine
from kvos.errors import InvalidRequestError
from kvos.outputs import RequestOutput
from kvos.sampling_params import SamplingParams
from kvos.structured import StructuredOutput
from kvos.structured.grammar import GrammarCompiler, GrammarError
from kvos.worker.sampler import SamplingRow, sample

sys.path.insert(0, str(Path(__file__).parents[1] / "entrypoints"))
from in_process import tiny_engine, write_tiny_model  # noqa: E402

VOCAB = 49152
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
        "note": {"anyOf": [{"type": "string", "maxLength": 8}, {"type": "null"}]},
    },
    "required": ["name", "age", "tags", "note"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> LLMEngine:
    return tiny_engine(write_tiny_model(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def compiler(engine: LLMEngine) -> GrammarCompiler:
    return GrammarCompiler(engine.tokenizer, VOCAB)


def run(engine: LLMEngine, params: list[SamplingParams]) -> list[RequestOutput]:
    req_ids = [f"g{i}-{id(params)}" for i in range(len(params))]
    for req_id, p in zip(req_ids, params):
        engine.add_request(req_id, [1, 2, 3, 4], p)
    done = {}
    while len(done) < len(req_ids):
        for out in engine.step():
            if out.finished:
                done[out.req_id] = out
    return [done[r] for r in req_ids]


@pytest.mark.parametrize("spec", [StructuredOutput.json_schema(SCHEMA), StructuredOutput("json_object")])
def test_sampled_output_is_valid_json_or_a_prefix(
    engine: LLMEngine, compiler: GrammarCompiler, spec: StructuredOutput
) -> None:
    settings = [(0.0, 0), (1.0, 1), (1.0, 2), (1.5, 3)]
    params = [SamplingParams(max_tokens=80, temperature=t, seed=s, structured=spec) for t, s in settings]
    for out in run(engine, params):
        assert out.error is None
        c = out.outputs[0]
        # Replaying the tokens through a fresh matcher proves each was allowed when sampled.
        compiler.matcher(spec).advance(list(c.token_ids[: -1 if c.finish_reason == "stop" else None]))
        if c.finish_reason == "stop":
            value = json.loads(c.text)
            assert isinstance(value, dict)
            if spec.kind == "json_schema":
                assert set(value) == set(SCHEMA["properties"]) and isinstance(value["age"], int)
                assert all(tag in ("a", "b") for tag in value["tags"])


def test_a_matcher_rebuilt_from_tokens_masks_like_the_one_that_saw_them(compiler: GrammarCompiler) -> None:
    spec = StructuredOutput.json_schema(SCHEMA)
    tokens = compiler._tokenizer.encode('{"name": "Al", "age": 4', add_special_tokens=False)
    stepped = compiler.matcher(spec)
    for token in tokens:
        assert stepped.allowed()[token]
        stepped.advance([token])
    resumed = compiler.matcher(spec)
    resumed.advance(tokens)
    assert torch.equal(stepped.allowed(), resumed.allowed())


def test_eos_is_allowed_only_once_the_grammar_accepts(compiler: GrammarCompiler) -> None:
    matcher = compiler.matcher(StructuredOutput("json_object"))
    eos = compiler._tokenizer.eos_token_ids[0]
    tokens = compiler._tokenizer.encode('{"a": 1', add_special_tokens=False)
    matcher.advance(tokens)
    assert not matcher.allowed()[eos]
    matcher.advance(compiler._tokenizer.encode("}", add_special_tokens=False))
    allowed = matcher.allowed()
    assert allowed[eos] and int(allowed.sum()) == 1


def test_a_grammar_error_fails_its_row_alone(compiler: GrammarCompiler) -> None:
    spec = StructuredOutput.json_schema({"type": "object"})
    broken = compiler.matcher(spec)
    with pytest.raises(GrammarError):
        broken.advance(compiler._tokenizer.encode("oops", add_special_tokens=False))
    params = SamplingParams(temperature=0.0, structured=spec)
    rows = [
        SamplingRow(params, [1], [], None, broken),
        SamplingRow(params, [1], [], None, compiler.matcher(spec)),
        SamplingRow(SamplingParams(temperature=0.0), [1], [], None),
    ]
    results = sample(torch.randn(3, VOCAB), rows)
    assert isinstance(results[0], GrammarError)
    assert not isinstance(results[1], Exception) and compiler._tokenizer.decode([results[1].token_id]).startswith("{")
    assert not isinstance(results[2], Exception)


def test_compiled_once_per_schema(compiler: GrammarCompiler) -> None:
    first = compiler.compile(StructuredOutput.json_schema({"type": "array"}))
    assert compiler.compile(StructuredOutput.json_schema({"type": "array"})) is first


@pytest.mark.parametrize("schema", [{"type": "nope"}, {"not": {"type": "string"}}, {"$ref": "#/missing"}])
def test_a_schema_that_cannot_be_served_names_the_field(compiler: GrammarCompiler, schema: dict) -> None:
    with pytest.raises(InvalidRequestError) as info:
        compiler.compile(StructuredOutput.json_schema(schema, param="tools"))
    assert info.value.param == "tools"


def test_unbounded_integers_are_bounded() -> None:
    schema = StructuredOutput.json_schema({"type": "object", "properties": {"n": {"type": "integer", "minimum": 0}}})
    n = schema.schema_dict()["properties"]["n"]
    assert n["minimum"] == 0 and n["maximum"] == 2**53 - 1
