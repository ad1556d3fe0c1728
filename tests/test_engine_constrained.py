"""Constrained decoding (``regex`` / ``json_schema`` / ``ebnf``): outputs match their grammar, greedy tokens equal
transformers' greedy choice under the same grammar's mask, unconstrained requests beside them are unchanged,
and bad grammars are clear errors."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from jaxrt_testing import TINY_ENGINE, assert_no_leak

import jaxrt

LLM = TINY_ENGINE
# Compact JSON: a random model would otherwise fill the allowed whitespace until max_new_tokens.
COMPACT = {"x-guidance": {"whitespace_flexible": False}}
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "pet": {"enum": ["cat", "dog"]},
    },
    "required": ["name", "age", "pet"],
    "additionalProperties": False,
    **COMPACT,
}


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    engine = jaxrt.Engine(model_path=tiny_llama_dir, **LLM)
    yield engine
    engine.shutdown()


def test_mask_disallowed_keeps_exactly_the_set_bits():
    import jax.numpy as jnp

    from jaxrt.sampler import mask_disallowed

    rng = np.random.default_rng(0)
    rows, vocab = 3, 70  # 3 words, the last partly past the vocabulary
    logits = rng.normal(size=(rows, vocab)).astype(np.float32)
    keep = rng.random((rows, vocab)) < 0.3
    keep[2] = True
    padded = np.zeros((rows, 96), bool)
    padded[:, :vocab] = keep
    words = np.packbits(padded, axis=1, bitorder="little").view(np.int32)
    got = np.asarray(mask_disallowed(jnp.asarray(logits), jnp.asarray(words)))
    np.testing.assert_array_equal(got, np.where(keep, logits, -np.inf))


def test_regex_output_matches(llm):
    rx = r"(yes|no), [0-9]{3}"
    out = llm.generate("Answer:", {"temperature": 0, "max_new_tokens": 20, "regex": rx})
    assert re.fullmatch(rx, out["text"]), out["text"]
    assert out["meta_info"]["finish_reason"]["type"] == "stop"
    assert_no_leak(llm)


def test_json_schema_output_parses_and_conforms(llm):
    outs = llm.generate(
        ["JSON:", "Person:"],
        [
            {"temperature": 0, "max_new_tokens": 60, "json_schema": json.dumps(SCHEMA)},
            {
                "temperature": 0.9,
                "seed": 5,
                "max_new_tokens": 60,
                "json_schema": SCHEMA,
            },  # a dict is serialised
        ],
    )
    for out in outs:
        obj = json.loads(out["text"])
        assert set(obj) == {"name", "age", "pet"}
        assert isinstance(obj["name"], str) and len(obj["name"]) <= 6
        assert isinstance(obj["age"], int) and 0 <= obj["age"] <= 99
        assert obj["pet"] in ("cat", "dog")
        assert out["meta_info"]["finish_reason"]["type"] == "stop"


def test_ebnf_with_sampling_and_seeds(llm):
    grammar = 'root ::= ("cat" | "dog" | "bird") (", " ("cat" | "dog" | "bird"))?'
    params = {"temperature": 1.0, "max_new_tokens": 20, "ebnf": grammar}
    outs = llm.generate(["Pets:"] * 4, [{**params, "seed": s} for s in (1, 2, 3, 1)])
    pat = r"(cat|dog|bird)(, (cat|dog|bird))?"
    assert all(re.fullmatch(pat, o["text"]) for o in outs), [o["text"] for o in outs]
    assert outs[0]["output_ids"] == outs[3]["output_ids"]  # same seed, same draw


def test_greedy_tokens_equal_transformers_under_the_same_mask(llm, tiny_llama_dir):
    """transformers' greedy generate, with a logits processor that masks each step by a matcher of the same
    grammar, picks the same tokens (then its EOS, which the engine does not need: the grammar ended); an
    unconstrained request in the same step is unchanged."""
    import torch
    from jaxrt_testing import hf_generate, hf_model
    from transformers import LogitsProcessor

    from jaxrt.grammar import GrammarTokenizer, compile_grammar

    ids = llm.tokenizer.encode("Describe:")
    plain = {"temperature": 0, "max_new_tokens": 12}
    alone = llm.generate(input_ids=ids, sampling_params=plain)["output_ids"]
    vocab = llm.config.model.vocab_size
    grammars = GrammarTokenizer(llm.tokenizer.hf, vocab, sorted(llm.eos_ids))
    ref = hf_model(tiny_llama_dir)

    class Mask(LogitsProcessor):
        """-inf outside the tokens the grammar allows, the matcher fed what was generated so far."""

        def __init__(self, matcher):
            self.matcher, self.seen = matcher, len(ids)
            self.bits = np.zeros((1, -(-vocab // 32)), np.int32)

        def __call__(self, input_ids, scores):
            for t in input_ids[0, self.seen :].tolist():
                assert self.matcher.consume(t) in (None, "done")
            self.seen = input_ids.shape[1]
            self.matcher.fill(self.bits, 0)
            keep = np.unpackbits(self.bits[0].view(np.uint8), bitorder="little")[: scores.shape[1]]
            return scores.masked_fill(torch.from_numpy(keep == 0)[None], -float("inf"))

    for kind, text in (
        ("json_schema", json.dumps(SCHEMA)),
        ("regex", r"[a-z]{2,5}( [a-z]{2,5}){2}"),
    ):
        outs = llm.generate(
            input_ids=[ids, ids],
            sampling_params=[{"temperature": 0, "max_new_tokens": 60, kind: text}, plain],
        )
        assert outs[1]["output_ids"] == alone
        mask = Mask(grammars.matcher(compile_grammar(kind, text)))
        exp = hf_generate(
            ref, ids, max_new_tokens=61, logits_processor=[mask], eos_token_id=sorted(llm.eos_ids)
        )
        got = outs[0]["output_ids"]
        assert exp[: len(got)] == got and set(exp[len(got) :]) <= llm.eos_ids, (got, exp)
    assert_no_leak(llm)


@pytest.mark.parametrize(
    "params,match",
    [
        ({"regex": "(["}, "sampling_params.regex is not a valid regex"),
        ({"json_schema": "{not json"}, "sampling_params.json_schema is not valid JSON"),
        ({"json_schema": json.dumps({"type": "nonsense"})}, "sampling_params.json_schema is not a valid"),
        ({"ebnf": "root ::= ("}, "sampling_params.ebnf is not a valid ebnf"),
        ({"regex": "a", "ebnf": 'root ::= "a"'}, "at most one of regex, json_schema and ebnf"),
        ({"regex": ""}, "sampling_params.regex must be a non-empty string"),
    ],
)
def test_bad_constraints_are_value_errors(llm, params, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        llm.generate("x", {"max_new_tokens": 2, **params})
    out = llm.generate("x", {"temperature": 0, "max_new_tokens": 2})
    assert len(out["output_ids"]) == 2
    assert_no_leak(llm)


def test_constraints_need_the_tokenizer(tiny_llama_dir):
    needs = "sampling_params.regex: constrained decoding needs the tokenizer"
    with (
        jaxrt.Engine(model_path=tiny_llama_dir, skip_tokenizer_init=True, **LLM) as engine,
        pytest.raises(ValueError, match=needs),
    ):
        engine.generate(input_ids=[1, 2, 3], sampling_params={"regex": "a+"})


def test_min_new_tokens_does_not_outlast_a_complete_grammar(llm):
    """``min_new_tokens`` holds back the stop tokens, and a grammar may allow nothing else once complete: the
    request then ends when its grammar does (finish "stop"), with the grammar's text and no token forced past
    it, beside a request with the same floor and no grammar, which runs to its floor."""
    rx = r"(yes|no)"
    outs = llm.generate(
        ["Answer:", "Answer:"],
        [
            {"temperature": 0, "max_new_tokens": 20, "min_new_tokens": 10, "regex": rx},
            {"temperature": 0, "max_new_tokens": 12, "min_new_tokens": 10},
        ],
    )
    assert re.fullmatch(rx, outs[0]["text"]), outs[0]["text"]
    assert outs[0]["meta_info"]["finish_reason"]["type"] == "stop"
    assert outs[0]["meta_info"]["completion_tokens"] < 10
    assert outs[1]["meta_info"]["completion_tokens"] >= 10
    assert_no_leak(llm)
