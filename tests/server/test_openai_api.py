"""The OpenAI API through the official ``openai`` client (and raw SSE where the shape matters)."""

from __future__ import annotations

import pytest
from server_testing import sse_events


def test_models(oai, model_name, server):
    models = oai.models.list()
    assert [m.id for m in models.data] == [model_name]
    card = oai.models.retrieve(model_name)
    assert card.id == model_name and card.max_model_len == 512


def test_completion_prompt_forms_and_usage(oai, model_name, server):
    tok = server.engine.tokenizer
    r = oai.completions.create(model=model_name, prompt="Hello world", max_tokens=6, temperature=0)
    assert r.object == "text_completion" and len(r.choices) == 1
    assert r.usage.prompt_tokens == len(tok.encode("Hello world"))
    assert r.usage.completion_tokens <= 6
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason in ("length", "stop")
    ref = server.engine.generate("Hello world", {"temperature": 0, "max_new_tokens": 6})
    assert r.choices[0].text == ref["text"]

    ids = tok.encode("Hello world")
    by_ids = oai.completions.create(model=model_name, prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == r.choices[0].text
    batch = oai.completions.create(
        model=model_name, prompt=["Hello world", "Bye"], max_tokens=6, temperature=0, n=2
    )
    assert len(batch.choices) == 4 and [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[0].text == r.choices[0].text == batch.choices[1].text
    assert batch.usage.prompt_tokens == len(ids) + len(tok.encode("Bye"))
    ids_batch = oai.completions.create(model=model_name, prompt=[ids, ids[:1]], max_tokens=2, temperature=0)
    assert len(ids_batch.choices) == 2
    echo = oai.completions.create(
        model=model_name, prompt="Echo this", max_tokens=3, temperature=0, echo=True
    )
    assert echo.choices[0].text.startswith("Echo this")


def test_completion_stop_seed_and_max_tokens(oai, model_name):
    base = oai.completions.create(
        model=model_name, prompt="Count:", max_tokens=24, temperature=0, extra_body={"ignore_eos": True}
    )
    text = base.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = text[: text.index(stop)]
    r = oai.completions.create(
        model=model_name,
        prompt="Count:",
        max_tokens=24,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True},
    )
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    kept = oai.completions.create(
        model=model_name,
        prompt="Count:",
        max_tokens=24,
        temperature=0,
        stop=stop,
        extra_body={"ignore_eos": True, "include_stop_str_in_output": True},
    )
    assert kept.choices[0].text == cut + stop

    kw = dict(model=model_name, prompt="Seeded", max_tokens=8, temperature=1.0)
    a = oai.completions.create(seed=7, **kw)
    b = oai.completions.create(seed=7, **kw)
    assert a.choices[0].text == b.choices[0].text
    three = oai.completions.create(seed=42, n=3, **kw)
    assert len({c.text for c in three.choices}) == 3

    exact = oai.completions.create(
        model=model_name, prompt="x", max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
    )
    assert exact.usage.completion_tokens == 5 and exact.choices[0].finish_reason == "length"


def test_completion_logprobs(oai, model_name):
    r = oai.completions.create(model=model_name, prompt="Log", max_tokens=4, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    n = r.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert all(3 <= len(d) <= 4 for d in lp.top_logprobs)
    assert all(x <= 0 for x in lp.token_logprobs)
    assert "".join(lp.tokens) == r.choices[0].text
    zero = oai.completions.create(model=model_name, prompt="Log", max_tokens=2, temperature=0, logprobs=0)
    assert all(len(d) == 1 for d in zero.choices[0].logprobs.top_logprobs)


def test_completion_echo_with_logprobs(oai, http, model_name, server):
    """``echo`` with ``logprobs`` (what lm-eval's loglikelihood requests send): the prompt's tokens come first
    with their log-probabilities (None for the first token and its alternatives), as the engine's
    ``input_token_logprobs``, then the completion's; streamed, the prompt's entries arrive in one event
    before the completion's."""
    tok = server.engine.tokenizer
    prompt = "Scores for every token"
    ids = tok.encode(prompt)
    ref = server.engine.generate(
        prompt, {"temperature": 0, "max_new_tokens": 2}, return_logprob=True, logprob_start_len=0
    )
    want = [lp for lp, _, _ in ref["meta_info"]["input_token_logprobs"]]
    assert want[0] is None and len(want) == len(ids)
    r = oai.completions.create(
        model=model_name, prompt=prompt, max_tokens=2, temperature=0, echo=True, logprobs=2
    )
    lp = r.choices[0].logprobs
    assert r.choices[0].text.startswith(prompt)
    assert len(lp.tokens) == len(ids) + r.usage.completion_tokens
    assert lp.tokens[: len(ids)] == [tok.decode([t], skip_special_tokens=False) for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1 : len(ids)] == pytest.approx(want[1:], abs=1e-5)
    assert all(2 <= len(d) <= 3 for d in lp.top_logprobs[1:])
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])

    body = dict(
        model=model_name, prompt=prompt, max_tokens=2, temperature=0, echo=True, logprobs=1, stream=True
    )
    with http.stream("POST", "/v1/completions", json=body) as resp:
        events = sse_events(resp)
    chunks = [e for e in events if e != "[DONE]"]
    first = chunks[0]["choices"][0]
    assert first["text"] == prompt and first["logprobs"]["token_logprobs"][0] is None
    assert first["logprobs"]["token_logprobs"][1:] == pytest.approx(want[1:], abs=1e-5)
    streamed = [t for c in chunks for t in (c["choices"][0]["logprobs"] or {}).get("tokens", [])]
    assert streamed == lp.tokens


def test_chat_non_stream_and_extra_sampling_keys(oai, model_name, server):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}]
    r = oai.chat.completions.create(model=model_name, messages=msgs, max_tokens=8, temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    ids = server.engine.tokenizer.apply_chat_template(msgs)
    assert r.usage.prompt_tokens == len(ids)
    ref = server.engine.generate(input_ids=ids, sampling_params={"temperature": 0, "max_new_tokens": 8})
    assert r.choices[0].message.content == ref["text"]
    capped = oai.chat.completions.create(
        model=model_name,
        messages=msgs,
        max_completion_tokens=3,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert capped.usage.completion_tokens == 3 and capped.choices[0].finish_reason == "length"
    extra = oai.chat.completions.create(
        model=model_name,
        messages=[{"role": "user", "content": [{"type": "text", "text": "Say hi"}]}],
        max_tokens=6,
        temperature=0.8,
        top_p=0.9,
        seed=1,
        frequency_penalty=0.5,
        presence_penalty=0.2,
        user="someone",
        extra_body={
            "top_k": 20,
            "min_p": 0.05,
            "repetition_penalty": 1.1,
            "min_tokens": 6,
            "ignore_eos": False,
            "unknown_field": 1,
            "stop_token_ids": [5],
        },
    )
    assert extra.usage.completion_tokens == 6


def test_logit_bias(oai, server, model_name):
    """OpenAI's logit_bias (token id strings -> [-100, 100]) reaches the sampler: banning the greedy first
    token changes it to what the engine gives for the same bias, and a strong push picks a token."""
    ids = server.engine.tokenizer.encode("The weather today")
    plain = oai.completions.create(model=model_name, prompt=ids, max_tokens=4, temperature=0)
    first = server.engine.generate(input_ids=ids, sampling_params={"temperature": 0, "max_new_tokens": 4})
    assert plain.choices[0].text == first["text"]
    banned = first["output_ids"][0]
    r = oai.completions.create(
        model=model_name, prompt=ids, max_tokens=4, temperature=0, logit_bias={str(banned): -100}
    )
    ref = server.engine.generate(
        input_ids=ids,
        sampling_params={"temperature": 0, "max_new_tokens": 4, "logit_bias": {banned: -100}},
    )
    assert banned not in ref["output_ids"] and r.choices[0].text == ref["text"] != plain.choices[0].text
    forced = oai.chat.completions.create(
        model=model_name,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        temperature=0.7,
        logit_bias={"42": 100},
        extra_body={"ignore_eos": True},
    )
    assert forced.usage.completion_tokens == 3
    assert forced.choices[0].message.content == server.engine.tokenizer.decode([42] * 3)


def test_structured_outputs(oai, http, model_name):
    """response_format (json_schema, json_object) and SGLang's regex / ebnf in the request body constrain the
    output; the native /generate takes them in sampling_params."""
    import json
    import re

    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 8}, "rank": {"type": "integer", "maximum": 9}},
        "required": ["city", "rank"],
        "additionalProperties": False,
        "x-guidance": {"whitespace_flexible": False},
    }
    msgs = [{"role": "user", "content": "A city as JSON"}]
    r = oai.chat.completions.create(
        model=model_name,
        messages=msgs,
        max_tokens=40,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}},
    )
    obj = json.loads(r.choices[0].message.content)
    assert set(obj) == {"city", "rank"} and obj["rank"] <= 9 and r.choices[0].finish_reason == "stop"
    r = oai.chat.completions.create(
        model=model_name, messages=msgs, max_tokens=8, temperature=0, response_format={"type": "json_object"}
    )
    assert r.choices[0].message.content.startswith("{")
    r = oai.completions.create(
        model=model_name,
        prompt="Code:",
        max_tokens=12,
        temperature=0,
        extra_body={"regex": "[A-Z]{3}-[0-9]{2}"},
    )
    assert re.fullmatch("[A-Z]{3}-[0-9]{2}", r.choices[0].text) and r.choices[0].finish_reason == "stop"
    vllm = oai.completions.create(
        model=model_name,
        prompt="Code:",
        max_tokens=12,
        temperature=0,
        extra_body={"guided_regex": "[A-Z]{3}-[0-9]{2}"},  # vLLM's name
    )
    assert vllm.choices[0].text == r.choices[0].text
    g = http.post(
        "/generate",
        json={
            "text": "Pick:",
            "sampling_params": {"max_new_tokens": 8, "temperature": 0, "ebnf": 'root ::= "left" | "right"'},
        },
    )
    assert g.status_code == 200 and g.json()["text"] in ("left", "right")


def test_chat_logprobs(oai, model_name):
    r = oai.chat.completions.create(
        model=model_name,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(
        len(c.top_logprobs) == 2 and c.logprob <= 0 and c.bytes == list(c.token.encode()) for c in content
    )
    assert content[0].top_logprobs[0].logprob >= content[0].top_logprobs[1].logprob


@pytest.mark.parametrize("n", [1, 2])
def test_chat_stream_shape_and_equality(oai, model_name, n):
    msgs = [{"role": "user", "content": "Tell me a story"}]
    whole = oai.chat.completions.create(model=model_name, messages=msgs, max_tokens=16, temperature=0)
    stream = oai.chat.completions.create(
        model=model_name,
        messages=msgs,
        max_tokens=16,
        temperature=0,
        n=n,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    texts = {i: "" for i in range(n)}
    first_seen: set[int] = set()
    finishes = {i: 0 for i in range(n)}
    for c in chunks[:-1]:
        assert c.object == "chat.completion.chunk" and c.usage is None and len(c.choices) == 1
        ch = c.choices[0]
        if ch.index not in first_seen:
            assert ch.delta.role == "assistant"
            first_seen.add(ch.index)
        texts[ch.index] += ch.delta.content or ""
        finishes[ch.index] += ch.finish_reason is not None
    assert finishes == {i: 1 for i in range(n)}
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage.prompt_tokens == whole.usage.prompt_tokens
    assert usage_chunk.usage.completion_tokens == n * whole.usage.completion_tokens
    for i in range(n):
        assert texts[i] == whole.choices[0].message.content


def test_completion_stream_raw_sse(http, model_name):
    body = {
        "model": model_name,
        "prompt": "Streaming test",
        "max_tokens": 12,
        "temperature": 0,
        "logprobs": 2,
    }
    whole = http.post("/v1/completions", json=body).json()
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert sum(c["choices"][0]["finish_reason"] is not None for c in chunks) == 1
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    tokens = [t for c in chunks for t in (c["choices"][0]["logprobs"] or {}).get("tokens", [])]
    assert tokens == whole["choices"][0]["logprobs"]["tokens"]
    assert "usage" not in chunks[0]  # only with stream_options.include_usage
