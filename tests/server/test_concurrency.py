"""Many concurrent streams give the greedy text; a client that goes away mid-request frees everything."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
from server_testing import API_KEY, metric, wait_idle

N = 32
MAX_TOKENS = 12


def _prompts() -> list[str]:
    return [f"Request number {i}: the story of item {i * 7 % 13} begins" for i in range(N)]


def test_32_concurrent_streams_match_greedy(server, http, model_name):
    prompts = _prompts()
    common = {
        "model": model_name,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "extra_body": {"ignore_eos": True},
    }

    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[str, list]:
        stream = await client.completions.create(prompt=prompts[i], stream=True, **common)
        text, finishes = "", []
        async for chunk in stream:
            text += chunk.choices[0].text
            if chunk.choices[0].finish_reason is not None:
                finishes.append(chunk.choices[0].finish_reason)
        return text, finishes

    async def run_all():
        client = openai.AsyncOpenAI(
            base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=300
        )
        try:
            return await asyncio.wait_for(asyncio.gather(*(one(client, i) for i in range(N))), timeout=300)
        finally:
            await client.close()

    streamed = asyncio.run(run_all())
    assert all(f == ["length"] for _, f in streamed)
    # the same prompts, not streamed, in one batched request; and the engine directly
    body = {
        "model": model_name,
        "prompt": prompts,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
    }
    batch = http.post("/v1/completions", json=body).json()["choices"]
    direct = server.engine.generate(
        prompts, {"temperature": 0, "max_new_tokens": MAX_TOKENS, "ignore_eos": True}
    )
    for i in range(N):
        assert streamed[i][0] == batch[i]["text"] == direct[i]["text"], i
    wait_idle(http)


def _aborted(server) -> float:
    text = httpx.get(server.base_url + "/metrics").text
    try:
        return metric(text, "jaxrt:num_aborted_requests_total")
    except KeyError:
        return 0.0


def test_disconnect_mid_stream_frees_pages(server, http, model_name):
    wait_idle(http)
    before = _aborted(server)
    long = {"temperature": 0, "max_new_tokens": 480, "ignore_eos": True}
    with httpx.Client(
        base_url=server.base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60
    ) as c:
        with c.stream(
            "POST", "/generate", json={"text": "leave early", "sampling_params": long, "stream": True}
        ) as r:
            seen = 0
            for line in r.iter_lines():
                seen += line.startswith("data:")
                if seen >= 3:
                    break
        # the connection closes here, mid-stream
        with c.stream(
            "POST",
            "/v1/chat/completions",
            json={
                "model": model_name,
                "messages": [{"role": "user", "content": "go"}],
                "max_tokens": 480,
                "ignore_eos": True,
                "stream": True,
                "n": 2,
            },
        ) as r:
            for line in r.iter_lines():
                if '"content":"' in line and '"content":""' not in line:
                    break
    info = wait_idle(http, timeout=60)
    assert info["num_used_pages"] == info["num_cached_pages"]
    assert _aborted(server) >= before + 3  # 1 native stream + 2 chat choices, none ran to 480 tokens


def test_disconnect_non_streamed_request_aborts(server, http):
    wait_idle(http)
    before = _aborted(server)
    long = {"temperature": 0, "max_new_tokens": 480, "ignore_eos": True}
    t0 = time.monotonic()
    try:
        httpx.post(
            server.base_url + "/generate",
            json={"text": "impatient", "sampling_params": long},
            headers={"Authorization": f"Bearer {API_KEY}"},
            timeout=0.5,
        )
    except httpx.TimeoutException:
        pass
    wait_idle(http, timeout=60)
    assert _aborted(server) >= before + 1
    # and the server answers new work right away
    r = http.post("/generate", json={"text": "next", "sampling_params": {"max_new_tokens": 2}})
    assert r.status_code == 200 and time.monotonic() - t0 < 60
