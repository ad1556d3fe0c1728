"""Errors in OpenAI's shape, each followed by a good request: 400 (bad params, malformed JSON, too long),
401, 404, 500 for real faults (the engine keeps serving), 503 while loading or after a failed load."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest
from server_testing import API_KEY, sse_events, start_inprocess, wait_idle

CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
MSG = [{"role": "user", "content": "hi"}]


def assert_error(r: httpx.Response, status: int, param: str | None = "", code=None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param != "":
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def still_serving(http: httpx.Client, model: str) -> None:
    r = http.post(COMP, json={"model": model, "prompt": "ok", "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("length", "stop")


BAD_BODIES = [
    (CHAT, {"messages": MSG, "temperature": -1}, "temperature"),
    (CHAT, {"messages": MSG, "top_p": 5}, "top_p"),
    (CHAT, {"messages": MSG, "temperature": "hot"}, "temperature"),
    (CHAT, {"messages": MSG, "max_tokens": 0}, "max_tokens"),
    (CHAT, {"messages": MSG, "max_completion_tokens": -3}, "max_completion_tokens"),
    (CHAT, {"messages": MSG, "n": 0}, "n"),
    (CHAT, {"messages": MSG, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    (CHAT, {"messages": MSG, "top_logprobs": 2}, "top_logprobs"),
    (CHAT, {"messages": MSG, "stream_options": {"include_usage": True}}, "stream_options"),
    (CHAT, {"messages": MSG, "top_k": 0}, "top_k"),
    (CHAT, {"messages": MSG, "min_tokens": 9, "max_tokens": 3}, "min_tokens"),
    (CHAT, {"messages": MSG, "stop_token_ids": [-1]}, "stop_token_ids"),
    (CHAT, {"messages": MSG, "response_format": {"type": "grammar"}}, "response_format"),
    (
        CHAT,
        {"messages": MSG, "response_format": {"type": "json_schema", "json_schema": {}}},
        "response_format",
    ),
    (CHAT, {"messages": MSG, "regex": "(["}, "regex"),
    (CHAT, {"messages": MSG, "guided_regex": "a", "regex": "b"}, "guided_regex"),
    (COMP, {"prompt": "x", "json_schema": "{nope"}, "json_schema"),
    (COMP, {"prompt": "x", "regex": "a", "response_format": {"type": "json_object"}}, "response_format"),
    ("/generate", {"text": "x", "sampling_params": {"ebnf": "root ::= ("}}, "ebnf"),
    (CHAT, {"messages": [{"content": "no role"}]}, "messages.0.role"),
    (
        CHAT,
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        None,
    ),
    (CHAT, {"messages": []}, "messages"),
    (CHAT, {}, "messages"),
    (COMP, {"prompt": "x", "logprobs": 21}, "logprobs"),
    (COMP, {"prompt": "x", "frequency_penalty": 3}, "frequency_penalty"),
    (COMP, {"prompt": ""}, "prompt"),
    (COMP, {"prompt": [10**9]}, "prompt"),
    (COMP, {"prompt": "x", "suffix": "y"}, "suffix"),
    (COMP, {"prompt": "x", "logit_bias": {"5": 101}}, "logit_bias"),
    (CHAT, {"messages": MSG, "logit_bias": {"five": 1}}, "logit_bias"),
    (CHAT, {"messages": MSG, "logit_bias": {"99999999": -100}}, "logit_bias"),
    ("/generate", {"text": "x", "sampling_params": {"logit_bias": {"3": "big"}}}, "logit_bias"),
    ("/generate", {"text": "x", "input_ids": [1]}, "text"),
    ("/generate", {"text": "x", "sampling_params": {"bogus": 1}}, None),
    ("/generate", {"text": "x", "sampling_params": {"temperature": -2}}, "temperature"),
    ("/generate", {}, "text"),
]


@pytest.mark.parametrize(
    ("path", "body", "param"), BAD_BODIES, ids=[f"{p}-{i}" for i, (p, _, _) in enumerate(BAD_BODIES)]
)
def test_bad_parameters_are_400(http, model_name, path, body, param):
    if path != "/generate":
        body = {"model": model_name, **body}
    err = assert_error(http.post(path, json=body), 400, param=param if param else "")
    assert err["type"] == "invalid_request_error"
    still_serving(http, model_name)


@pytest.mark.parametrize("path", [CHAT, COMP, "/generate"])
def test_malformed_json_and_content_type(http, model_name, path):
    r = http.post(path, content=b'{"model": "x", "messages": [', headers={"content-type": "application/json"})
    assert "JSON" in assert_error(r, 400)["message"]
    assert_error(http.post(path, content=b"prompt=hi", headers={"content-type": "text/plain"}), 400)
    still_serving(http, model_name)


def test_too_long_prompt_and_max_tokens(http, oai, model_name):
    long_ids = [100] * 600
    err = assert_error(
        http.post(COMP, json={"model": model_name, "prompt": long_ids}), 400, code="context_length_exceeded"
    )
    assert "maximum context length" in err["message"]
    err = assert_error(
        http.post(CHAT, json={"model": model_name, "messages": [{"role": "user", "content": "word " * 600}]}),
        400,
        param="messages",
    )
    assert "context length" in err["message"]
    err = assert_error(
        http.post(COMP, json={"model": model_name, "prompt": "hi", "max_tokens": 600}),
        400,
        param="max_tokens",
    )
    assert "maximum context length" in err["message"]
    # native: the engine's own check
    assert "too long" in assert_error(http.post("/generate", json={"input_ids": long_ids}), 400)["message"]
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model=model_name, prompt=long_ids, max_tokens=2)
    assert e.value.status_code == 400 and e.value.code == "context_length_exceeded"
    still_serving(http, model_name)


def test_api_key(server, model_name):
    base = server.base_url
    for path, method, body in [
        ("/v1/models", "GET", None),
        (CHAT, "POST", {"model": model_name, "messages": MSG}),
        (COMP, "POST", {"model": model_name, "prompt": "x"}),
        ("/generate", "POST", {"text": "x"}),
    ]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
            r = httpx.request(method, base + path, json=body, headers=headers, timeout=30)
            assert_error(r, 401, code="invalid_api_key")
    for path in ("/health", "/metrics"):
        assert httpx.get(base + path, timeout=30).status_code == 200
    bad = openai.OpenAI(base_url=base + "/v1", api_key="nope", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_unknown_model_and_route(http, oai):
    for path, body in [(CHAT, {"messages": MSG}), (COMP, {"prompt": "x"})]:
        assert_error(
            http.post(path, json={"model": "no-such-model", **body}),
            404,
            param="model",
            code="model_not_found",
        )
    assert_error(http.get("/v1/models/no-such-model"), 404, param="model")
    assert_error(http.get("/no/such/route"), 404)
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="no-such-model", messages=MSG)


def test_internal_fault_is_500_and_engine_survives(server, http, model_name):
    """A step that raises fails only its requests (500 / in-band error); a handler bug is a 500."""
    runner = server.engine.runner
    hooks = [h for h in ("fetch", "run") if hasattr(runner, h)]  # where a step's result is read back
    real = {h: getattr(runner, h) for h in hooks}
    fail = {"left": 1}

    def flaky(hook):
        def call(*a, **k):
            if fail["left"] > 0:
                fail["left"] -= 1
                raise RuntimeError("injected device fault")
            return real[hook](*a, **k)

        return call

    for h in hooks:
        setattr(runner, h, flaky(h))
    try:
        r = http.post(COMP, json={"model": model_name, "prompt": "boom", "max_tokens": 4})
        err = assert_error(r, 500)
        assert "injected device fault" in err["message"] and err["type"] == "internal_server_error"
        fail["left"] = 1
        with http.stream(
            "POST", CHAT, json={"model": model_name, "messages": MSG, "max_tokens": 4, "stream": True}
        ) as r:
            events = sse_events(r)
        # the fault hits the first step, before any token: answered with the real status, not a stream
        assert r.status_code == 500 or ("error" in events[-2] and events[-1] == "[DONE]")
    finally:
        for h in hooks:
            setattr(runner, h, real[h])
    tok = server.engine.tokenizer
    real_template = tok.apply_chat_template
    tok.apply_chat_template = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("template bug"))
    try:
        assert_error(http.post(CHAT, json={"model": model_name, "messages": MSG}), 500)
    finally:
        tok.apply_chat_template = real_template
    wait_idle(http)
    still_serving(http, model_name)
    assert httpx.get(server.base_url + "/health").status_code == 200


def test_503_while_loading_then_failed_load():
    gate = threading.Event()

    def factory():
        gate.wait(30)
        raise RuntimeError("weights are corrupt")

    live = start_inprocess(factory, wait=False)
    try:
        from server_testing import wait_http

        assert wait_http(live.base_url + "/health", timeout=30, ok=(503,)) == 503
        for method, path in [("POST", "/generate"), ("GET", "/v1/models"), ("GET", "/get_model_info")]:
            r = httpx.request(method, live.base_url + path, json={"text": "x"}, timeout=30)
            assert_error(r, 503)
            assert r.headers["retry-after"]
        assert "starting" in httpx.get(live.base_url + "/health").json()["error"]["message"]
        gate.set()
        live.state.wait_loaded(30)
        r = httpx.get(live.base_url + "/health", timeout=30)
        assert r.status_code == 503 and "weights are corrupt" in r.json()["error"]["message"]
    finally:
        gate.set()
        live.stop()


def test_engine_refusals_map_to_status():
    from jaxrt.server.protocol import APIError
    from jaxrt.server.state import _engine_error

    e = _engine_error(RuntimeError("the engine is shutting down"))
    assert isinstance(e, APIError) and e.status == 503 and e.headers["Retry-After"]
    died = RuntimeError("the engine loop died")
    assert _engine_error(died) is died  # a real fault: the catch-all answers 500
