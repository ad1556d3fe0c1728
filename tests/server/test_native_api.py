"""SGLang's native endpoints over a real socket: /generate (single, batch, ids, n, logprobs, SSE), health,
info, flush_cache, abort_request, metrics."""

from __future__ import annotations

import threading
import time

import httpx
from server_testing import API_KEY, metric, sse_events, wait_idle

GREEDY = {"temperature": 0, "max_new_tokens": 12}


def test_health_info_and_models(server, http):
    assert httpx.get(server.base_url + "/health").status_code == 200  # no key needed
    assert httpx.get(server.base_url + "/ping").status_code == 200
    info = http.get("/get_model_info").json()
    assert info["is_generation"] is True and info["architectures"] == ["LlamaForCausalLM"]
    assert info["model_path"] == server.engine.model_path
    sinfo = http.get("/get_server_info").json()
    for key in ("num_pages", "page_size", "num_used_pages", "num_cached_pages", "context_length", "version"):
        assert key in sinfo
    assert sinfo["context_length"] == 512
    assert http.get("/version").json()["version"]
    assert http.get("/get_load").json()["num_running_reqs"] == 0


def test_generate_text_matches_engine(server, http):
    out = http.post("/generate", json={"text": "The quick brown fox", "sampling_params": GREEDY}).json()
    assert set(out) >= {"text", "output_ids", "meta_info"}
    meta = out["meta_info"]
    assert meta["finish_reason"]["type"] in ("length", "stop")
    assert meta["completion_tokens"] == len(out["output_ids"])
    assert meta["prompt_tokens"] == len(server.engine.tokenizer.encode("The quick brown fox"))
    assert isinstance(meta["id"], str) and meta["e2e_latency"] > 0
    ref = server.engine.generate("The quick brown fox", GREEDY)
    assert out["output_ids"] == ref["output_ids"] and out["text"] == ref["text"]


def test_generate_batch_ids_and_n(server, http):
    ids = server.engine.tokenizer.encode("Once upon a time")
    single = http.post("/generate", json={"input_ids": ids, "sampling_params": GREEDY}).json()
    assert isinstance(single, dict)
    batch = http.post(
        "/generate",
        json={"input_ids": [ids, ids[:2]], "sampling_params": [GREEDY, {**GREEDY, "max_new_tokens": 3}]},
    ).json()
    assert isinstance(batch, list) and len(batch) == 2
    assert batch[0]["output_ids"] == single["output_ids"]
    assert batch[1]["meta_info"]["completion_tokens"] <= 3
    texts = http.post(
        "/generate",
        json={
            "text": ["a b c", "d e f"],
            "sampling_params": {"temperature": 1.0, "max_new_tokens": 4, "n": 2, "seed": 3},
        },
    ).json()
    assert len(texts) == 4  # prompt-major
    assert texts[0]["meta_info"]["prompt_tokens"] == texts[1]["meta_info"]["prompt_tokens"]


def test_generate_logprobs(http):
    out = http.post(
        "/generate",
        json={
            "text": "Hello",
            "sampling_params": {"temperature": 0, "max_new_tokens": 5},
            "return_logprob": True,
            "top_logprobs_num": 3,
            "return_text_in_logprobs": True,
        },
    ).json()
    meta = out["meta_info"]
    lps = meta["output_token_logprobs"]
    assert len(lps) == meta["completion_tokens"]
    assert [t for _, t, _ in lps] == out["output_ids"]
    assert all(lp <= 0 and isinstance(txt, str) for lp, _, txt in lps)
    assert all(len(row) == 3 for row in meta["output_top_logprobs"])
    # greedy: the sampled token is the top-1
    assert [row[0][1] for row in meta["output_top_logprobs"]] == out["output_ids"]


def test_generate_stream_equals_non_stream(http):
    body = {"text": "In a galaxy far away", "sampling_params": {"temperature": 0, "max_new_tokens": 16}}
    whole = http.post("/generate", json=body).json()
    with http.stream("POST", "/generate", json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["meta_info"]["finish_reason"] is not None
    texts = [c["text"] for c in chunks]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:], strict=False))  # cumulative
    assert chunks[-1]["text"] == whole["text"] and chunks[-1]["output_ids"] == whole["output_ids"]


def test_generate_stream_batch_has_indices(http):
    body = {
        "text": ["x y", "p q"],
        "sampling_params": {"temperature": 0, "max_new_tokens": 4, "n": 2},
        "stream": True,
    }
    with http.stream("POST", "/generate", json=body) as r:
        events = sse_events(r)
    finals = [e for e in events[:-1] if e["meta_info"]["finish_reason"] is not None]
    assert sorted(e["index"] for e in finals) == [0, 1, 2, 3]
    assert events[-1] == "[DONE]"


def test_abort_request_by_rid_and_abort_all(server, http):
    long = {"temperature": 0, "max_new_tokens": 480, "ignore_eos": True}
    results: dict[str, dict] = {}

    def run(name: str, body: dict) -> None:
        results[name] = http.post("/generate", json=body).json()

    t = threading.Thread(
        target=run, args=("a", {"text": "abort me", "rid": "my-rid-1", "sampling_params": long})
    )
    t.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and http.get("/get_server_info").json()["num_running_reqs"] == 0:
        time.sleep(0.02)
    r = http.post("/abort_request", json={"rid": "my-rid-1"})
    assert r.status_code == 200 and r.json()["num_aborted"] == 1
    t.join(60)
    assert results["a"]["meta_info"]["finish_reason"]["type"] == "abort"
    assert results["a"]["meta_info"]["id"] == "my-rid-1"

    # streams: abort_all, and abort by the engine id seen in the first chunk
    with http.stream("POST", "/generate", json={"text": "s1", "sampling_params": long, "stream": True}) as r1:
        lines = r1.iter_lines()
        first = next(line for line in lines if line.startswith("data:"))
        assert '"finish_reason":null' in first
        assert http.post("/abort_request", json={"abort_all": True}).json()["num_aborted"] >= 1
        rest = [line for line in lines if line.startswith("data:")]
    assert rest[-1] == "data: [DONE]" and '"type":"abort"' in rest[-2]
    wait_idle(http)
    assert http.post("/abort_request", json={}).status_code == 400


def test_flush_cache(http):
    http.post("/generate", json={"text": "fill the cache with a prefix " * 4, "sampling_params": GREEDY})
    wait_idle(http)
    r = http.post("/flush_cache")
    assert r.status_code == 200 and "Cache flushed" in r.text
    assert http.get("/get_server_info").json()["num_cached_pages"] == 0


def test_health_generate(server):
    assert httpx.get(server.base_url + "/health_generate", timeout=60).status_code == 200


def test_metrics(server, http):
    http.post("/generate", json={"text": "metrics please", "sampling_params": GREEDY})
    r = httpx.get(server.base_url + "/metrics")  # open without the key
    assert r.status_code == 200
    text = r.text
    for name in (
        "jaxrt:num_running_reqs",
        "jaxrt:num_queue_reqs",
        "jaxrt:token_usage",
        "jaxrt:cache_hit_rate",
        "jaxrt:gen_throughput",
        "jaxrt:num_preemptions_total",
        "jaxrt:prompt_tokens_total",
        "jaxrt:generation_tokens_total",
        "jaxrt:time_to_first_token_seconds_count",
        "jaxrt:inter_token_latency_seconds_count",
        "jaxrt:e2e_request_latency_seconds_count",
    ):
        assert name in text, name
    assert metric(text, "jaxrt:generation_tokens_total") > 0
    assert metric(text, "jaxrt:e2e_request_latency_seconds_count") >= 1
    model = server.engine.served_model_name
    assert metric(text, "jaxrt:num_running_reqs", model_name=model) == 0
    assert API_KEY not in text


def test_generate_incremental_stream_concatenates_to_the_whole(server, http):
    """--incremental-streaming-output: each chunk carries only its new text, ids and log-probabilities;
    concatenated they are the non-streamed response."""
    body = {
        "text": "In a galaxy far away",
        "sampling_params": {"temperature": 0, "max_new_tokens": 16},
        "return_logprob": True,
    }
    whole = http.post("/generate", json=body).json()
    server.state.incremental_streaming_output = True
    try:
        with http.stream("POST", "/generate", json={**body, "stream": True}) as r:
            events = sse_events(r)
    finally:
        server.state.incremental_streaming_output = False
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[-1]["meta_info"]["finish_reason"] is not None
    assert len(chunks) > 1 and all(c["output_ids"] for c in chunks[:-1])
    assert "".join(c["text"] for c in chunks) == whole["text"]
    assert [t for c in chunks for t in c["output_ids"]] == whole["output_ids"]
    lps = [lp for c in chunks for lp in c["meta_info"]["output_token_logprobs"]]
    assert [t for _, t, _ in lps] == whole["output_ids"]
    assert chunks[-1]["meta_info"]["completion_tokens"] == len(whole["output_ids"])


def _http_chunks(base_url: str, path: str, body: dict) -> list[bytes]:
    """POST ``body`` over a raw socket and return the response body's HTTP/1.1 chunks (the framing the
    server wrote, whatever the TCP segments were)."""
    import json
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(base_url)
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {url.netloc}\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    )
    raw = b""
    with socket.create_connection((url.hostname, url.port), timeout=120) as s:
        s.sendall(head.encode() + data)
        while part := s.recv(65536):
            raw += part
    headers, _, rest = raw.partition(b"\r\n\r\n")
    assert headers.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in headers.lower()
    chunks = []
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            assert rest == b"\r\n"
            return chunks
        chunks.append(rest[:size])
        assert rest[size : size + 2] == b"\r\n"
        rest = rest[size + 2 :]


def test_stream_ends_with_its_last_event_and_done_in_one_piece(server):
    """The last event and [DONE] (and, for OpenAI streams, the usage event) go out as one HTTP chunk that
    ends the body: one send and one socket write for a stream's end instead of three."""
    for path, body, tail in (
        ("/generate", {"text": "a b c", "sampling_params": GREEDY, "stream": True}, b'"finish_reason":{'),
        (
            "/generate",
            {"text": ["a b", "c d"], "sampling_params": {**GREEDY, "n": 2}, "stream": True},
            b'"finish_reason":{',
        ),
        (
            "/v1/completions",
            {
                "model": server.engine.served_model_name,
                "prompt": "a b c",
                "max_tokens": 4,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
            b'"usage":{',
        ),
    ):
        chunks = _http_chunks(server.base_url, path, body)
        assert len(chunks) >= 2, chunks
        assert all(b"[DONE]" not in c for c in chunks[:-1])
        last = chunks[-1]
        assert last.endswith(b"data: [DONE]\n\n") and last.count(b"data: ") >= 2 and tail in last, last
