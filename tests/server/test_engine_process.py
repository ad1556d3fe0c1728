"""The engine in a process of its own (the server's default): the same answers as the in-process engine,
through the same HTTP server; aborts and disconnects free the child's pages; a dead child fails its requests
instead of hanging them; the frontend never loads JAX."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from server_testing import (
    API_KEY,
    ENGINE_ARGS,
    LiveServer,
    api_client,
    sse_events,
    start_inprocess,
    wait_http,
    wait_idle,
)

PROMPTS = ["The quick brown fox", "Once upon a time, in a land far away", "1, 2, 3,"]
GREEDY = {"temperature": 0, "max_new_tokens": 10, "ignore_eos": True}


@pytest.fixture(scope="module")
def ep_server(tiny_llama_dir) -> Iterator[LiveServer]:
    def factory():
        from jaxrt.engine_process import EngineProcess

        return EngineProcess(model_path=tiny_llama_dir, **ENGINE_ARGS)

    live = start_inprocess(factory, api_key=API_KEY)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def ep_http(ep_server) -> Iterator[httpx.Client]:
    with api_client(ep_server) as client:
        yield client


def test_engine_runs_in_another_process(ep_http):
    info = ep_http.get("/get_server_info").json()
    pid = info["engine_process_pid"]
    assert pid != os.getpid()
    os.kill(pid, 0)  # alive
    assert info["num_pages"] == ENGINE_ARGS["num_pages"]
    assert info["max_running_requests"] == ENGINE_ARGS["max_running_requests"]


def test_generate_matches_the_in_process_engine(server, ep_http):
    """Batched /generate, with log-probabilities: ids, text and log-probs as the in-process engine gives."""
    ref = server.engine.generate(PROMPTS, GREEDY, return_logprob=True)
    got = ep_http.post(
        "/generate", json={"text": PROMPTS, "sampling_params": GREEDY, "return_logprob": True}
    ).json()
    assert len(got) == len(ref)
    for g, r in zip(got, ref, strict=True):
        assert g["output_ids"] == r["output_ids"]
        assert g["text"] == r["text"]
        assert g["meta_info"]["finish_reason"] == r["meta_info"]["finish_reason"] == {"type": "length"}
        assert g["meta_info"]["prompt_tokens"] == r["meta_info"]["prompt_tokens"]
        assert g["meta_info"]["completion_tokens"] == 10
        glp = [lp for lp, _, _ in g["meta_info"]["output_token_logprobs"]]
        rlp = [lp for lp, _, _ in r["meta_info"]["output_token_logprobs"]]
        assert glp == pytest.approx(rlp, abs=1e-5)
        # Not streamed, so the frontend hears of the tokens only at the end: the time to the first of them is
        # the engine's count, ten steps before the end (it was once the end-to-end latency).
        assert 0 < g["meta_info"]["ttft"] < g["meta_info"]["e2e_latency"]


def test_prompt_logprobs_match_the_in_process_engine(server, ep_http):
    """/generate with ``logprob_start_len`` through the engine process (the prompt's log-probabilities cross
    the pipe in a request's first delta), streamed and not: the in-process engine's, with their texts on
    ``return_text_in_logprobs``."""
    kw = dict(return_logprob=True, top_logprobs_num=2, logprob_start_len=1)
    ref = server.engine.generate(PROMPTS[1], GREEDY, **kw)["meta_info"]
    body = {"text": PROMPTS[1], "sampling_params": GREEDY, **kw, "return_text_in_logprobs": True}
    got = ep_http.post("/generate", json=body).json()["meta_info"]
    with ep_http.stream("POST", "/generate", json={**body, "stream": True}) as resp:
        last = [e for e in sse_events(resp) if e != "[DONE]"][-1]["meta_info"]
    want = [lp for lp, _, _ in ref["input_token_logprobs"]]
    assert len(want) == ref["prompt_tokens"] - 1 and all(lp is not None for lp in want)
    for meta in (got, last):
        assert [lp for lp, _, _ in meta["input_token_logprobs"]] == pytest.approx(want, abs=1e-5)
        assert [t for _, t, _ in meta["input_token_logprobs"]] == [
            t for _, t, _ in ref["input_token_logprobs"]
        ]
        assert all(isinstance(text, str) for _, _, text in meta["input_token_logprobs"])
        assert [len(row) for row in meta["input_top_logprobs"]] == [2] * len(want)


def test_constrained_decoding_matches_the_in_process_engine(server, ep_http):
    """A grammar is compiled by the front (validation) and matched in the engine's process."""
    sp = {"temperature": 0, "max_new_tokens": 16, "regex": "[a-z]{1,6} [0-9]{2}"}
    ref = server.engine.generate("Label:", sp)
    got = ep_http.post("/generate", json={"text": "Label:", "sampling_params": sp}).json()
    assert got["output_ids"] == ref["output_ids"] and got["text"] == ref["text"]
    assert re.fullmatch("[a-z]{1,6} [0-9]{2}", got["text"])
    bad = ep_http.post("/generate", json={"text": "Label:", "sampling_params": {"regex": "(["}})
    assert bad.status_code == 400 and "regex" in bad.text


def test_streams_and_stop_strings_match(server, ep_http):
    """A stream's chunks grow to the non-streamed text; a stop string cuts the text where the in-process
    engine cuts it, streamed or not."""
    prompt = PROMPTS[1]
    full = server.engine.generate(prompt, GREEDY)["text"]
    words = full.split()
    assert len(words) >= 4
    stop = words[len(words) // 2]
    body = {"text": prompt, "sampling_params": GREEDY, "stream": True}
    with ep_http.stream("POST", "/generate", json=body) as r:
        events = sse_events(r)
    chunks = [e for e in events if e != "[DONE]"]
    assert len(chunks) >= 2
    texts = [c["text"] for c in chunks]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:], strict=False))
    assert texts[-1] == full
    assert chunks[-1]["output_ids"] == server.engine.generate(prompt, GREEDY)["output_ids"]

    sp = {**GREEDY, "stop": [stop]}
    ref = server.engine.generate(prompt, sp)
    assert ref["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    got = ep_http.post("/generate", json={"text": prompt, "sampling_params": sp}).json()
    assert got["text"] == ref["text"]
    assert got["meta_info"]["finish_reason"] == ref["meta_info"]["finish_reason"]
    with ep_http.stream("POST", "/generate", json={**body, "sampling_params": sp}) as r:
        chunks = [e for e in sse_events(r) if e != "[DONE]"]
    assert chunks[-1]["text"] == ref["text"]
    assert all(stop not in c["text"] for c in chunks)  # a stop string never shows, even half-matched


def test_openai_chat_stream_matches_non_streamed(ep_server, ep_http):
    name = ep_http.get("/v1/models").json()["data"][0]["id"]
    client = openai.OpenAI(base_url=ep_server.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
    msgs = [{"role": "user", "content": "Say something."}]
    common = dict(model=name, messages=msgs, max_tokens=8, temperature=0)
    whole = client.chat.completions.create(**common)
    parts = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(stream=True, **common)
        if c.choices
    ]
    assert "".join(parts) == whole.choices[0].message.content
    assert whole.usage.completion_tokens == 8


def test_many_concurrent_streams_then_idle(server, ep_server, ep_http):
    """24 streams at once over the OpenAI API give the greedy texts; the child ends with no page in use
    outside the prefix cache."""
    prompts = [f"Stream {i} tells the tale of {i * 5 % 11}" for i in range(24)]
    name = ep_http.get("/v1/models").json()["data"][0]["id"]

    async def one(client, p):
        stream = await client.completions.create(
            model=name, prompt=p, max_tokens=8, temperature=0, stream=True, extra_body={"ignore_eos": True}
        )
        return "".join([c.choices[0].text async for c in stream])

    async def run_all():
        client = openai.AsyncOpenAI(
            base_url=ep_server.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=300
        )
        try:
            return await asyncio.wait_for(asyncio.gather(*(one(client, p) for p in prompts)), 300)
        finally:
            await client.close()

    got = asyncio.run(run_all())
    ref = server.engine.generate(prompts, {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True})
    assert got == [r["text"] for r in ref]
    wait_idle(ep_http)


def test_abort_and_disconnect_free_the_child_pages(ep_http):
    long = {"temperature": 0, "max_new_tokens": 400, "ignore_eos": True}
    body = {"text": "A long story begins", "sampling_params": long, "stream": True, "rid": "ep-rid-1"}
    with ep_http.stream("POST", "/generate", json=body) as r:
        lines = r.iter_lines()
        next(line for line in lines if line.startswith("data:"))
        assert ep_http.post("/abort_request", json={"rid": "ep-rid-1"}).json()["num_aborted"] == 1
        events = [line for line in lines if line.startswith("data:")]
    assert '"abort"' in events[-2] and events[-1] == "data: [DONE]"
    # a client that goes away mid-stream
    with ep_http.stream("POST", "/generate", json={**body, "rid": None}) as r:
        next(line for line in r.iter_lines() if line.startswith("data:"))
    info = wait_idle(ep_http)
    assert info["num_running_reqs"] == 0


def test_bad_input_is_400_and_the_server_keeps_serving(ep_http):
    r = ep_http.post("/generate", json={"text": "hi", "sampling_params": {"temperature": -1}})
    assert r.status_code == 400 and "temperature" in r.json()["error"]["message"]
    r = ep_http.post("/generate", json={"input_ids": [10**9], "sampling_params": GREEDY})
    assert r.status_code == 400 and "input_ids" in r.json()["error"]["message"]
    r = ep_http.post("/generate", json={"input_ids": [5] * 600, "sampling_params": GREEDY})
    assert r.status_code == 400 and "too long" in r.json()["error"]["message"]
    ok = ep_http.post("/generate", json={"text": "hi", "sampling_params": GREEDY})
    assert ok.status_code == 200 and ok.json()["meta_info"]["completion_tokens"] == 10


def test_a_dead_engine_process_fails_requests_instead_of_hanging(tiny_llama_dir):
    from jaxrt.engine_process import EngineProcess

    ep = EngineProcess(model_path=tiny_llama_dir, **ENGINE_ARGS)
    try:
        assert ep.generate("hello", GREEDY)["meta_info"]["completion_tokens"] == 10
        stream = ep.generate("hello", {**GREEDY, "max_new_tokens": 400}, stream=True)
        next(stream)
        os.kill(ep.get_server_info()["engine_process_pid"], signal.SIGKILL)
        with pytest.raises(RuntimeError):
            for _ in stream:
                pass
        deadline = time.monotonic() + 30
        while ep._dead is None and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(RuntimeError, match="engine loop died"):
            ep.generate("hello", GREEDY)
    finally:
        ep.shutdown()


def test_shutdown_aborts_what_is_in_flight(tiny_llama_dir):
    from jaxrt.engine_process import EngineProcess

    ep = EngineProcess(model_path=tiny_llama_dir, **ENGINE_ARGS)

    async def run():
        stream = ep.async_generate("hello", {**GREEDY, "max_new_tokens": 400}, stream=True)
        first = await stream.__anext__()
        await asyncio.to_thread(ep.shutdown)
        last = first
        async for chunk in stream:
            last = chunk
        return last

    last = asyncio.run(asyncio.wait_for(run(), 120))
    assert last["meta_info"]["finish_reason"]["type"] == "abort"
    assert ep._proc.poll() is not None  # the child has exited
    with pytest.raises(RuntimeError):
        ep.generate("hello", GREEDY)


def test_the_frontend_never_loads_jax(tiny_llama_dir, tmp_path):
    """The server's process must not start a JAX backend (on a GPU it would take the memory the engine
    process needs): serving through EngineProcess does not even import jax there."""
    script = tmp_path / "front.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import asyncio, sys
            from jaxrt.engine_process import EngineProcess
            ep = EngineProcess(model_path={tiny_llama_dir!r}, **{ENGINE_ARGS!r})
            out = ep.generate("hello", {{"max_new_tokens": 3, "ignore_eos": True}})
            async def chunks():
                return [c async for c in ep.async_generate("hi", {{"max_new_tokens": 3}}, stream=True)]
            asyncio.run(chunks())
            ep.shutdown()
            print("completion_tokens", out["meta_info"]["completion_tokens"], "jax", "jax" in sys.modules)
            """
        )
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "JAXRT_DISABLE_PROGRESS": "1"}
    r = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "completion_tokens 3 jax False" in r.stdout


def test_one_engine_process_serves_several_handles(server, tiny_llama_dir):
    """What ``--api-server-count`` builds on: handles attached to one engine process each get their own
    requests' outputs, an abort broadcast reaches the others and comes back with their count (the counts so
    far once its time is up, none for a handle that leaves meanwhile), and a handle that leaves has its
    requests aborted while the engine keeps serving the rest."""
    import logging

    from jaxrt.engine_process import EngineProcess, start_core

    core, (control, *links) = start_core(3)
    control.send(({"model_path": tiny_llama_dir, **ENGINE_ARGS}, logging.WARNING, True))
    fds = [os.dup(link.fileno()) for link in links]
    for link in links:
        link.close()
    try:
        a, b = (EngineProcess.attach(fd, i) for i, fd in enumerate(fds))
        assert control.recv()[0] == "ready"
        ref = server.engine.generate(PROMPTS, GREEDY)

        async def both():
            return await asyncio.gather(
                a.async_generate(PROMPTS, GREEDY), b.async_generate(PROMPTS[::-1], GREEDY)
            )

        got_a, got_b = asyncio.run(both())
        assert [g["output_ids"] for g in got_a] == [r["output_ids"] for r in ref]
        assert [g["output_ids"] for g in got_b] == [r["output_ids"] for r in ref[::-1]]

        heard = []

        def answer_two(rid, abort_all, reply):
            heard.append((rid, abort_all))
            reply(2)

        a.on_abort_broadcast = answer_two
        assert b.broadcast_abort("client-rid", False).result(30) == 2
        assert heard == [("client-rid", False)]

        # a handle that never answers: the core replies with what it has once the time is up
        a.on_abort_broadcast = lambda rid, abort_all, reply: heard.append((rid, abort_all))
        b.abort_broadcast_timeout = 0.5
        t0 = time.monotonic()
        assert b.broadcast_abort(None, True).result(30) == 0
        assert heard[-1] == (None, True) and time.monotonic() - t0 < 10

        long = {**GREEDY, "max_new_tokens": 400}
        stream_b = b.generate("hello", long, stream=True)
        next(stream_b)
        b.on_abort_broadcast = lambda rid, abort_all, reply: None  # b will leave instead of answering
        a.abort_broadcast_timeout = 600
        pending = a.broadcast_abort("client-rid", False)
        b.shutdown()  # b leaves: its request ends with an abort; the engine stays up for a
        rest = list(stream_b)
        assert rest and rest[-1]["meta_info"]["finish_reason"]["type"] == "abort"
        assert pending.result(60) == 0  # b left without answering: it counts as none, a waits no longer
        assert a.generate(PROMPTS[0], GREEDY)["output_ids"] == ref[0]["output_ids"]
        a.shutdown()
        control.send(("shutdown",))
        assert core.wait(timeout=120) == 0
    finally:
        if core.poll() is None:
            core.kill()
        control.close()


@pytest.fixture(scope="module")
def two_frontends(tiny_llama_dir) -> Iterator[tuple[httpx.Client, httpx.Client]]:
    """Two HTTP servers on one engine process, as the HTTP processes of ``--api-server-count 2`` are (here
    in this process, each with its own event loop): clients for A and B."""
    import logging

    from jaxrt.engine_process import EngineProcess, start_core

    core, (control, *links) = start_core(3)
    control.send(({"model_path": tiny_llama_dir, **ENGINE_ARGS}, logging.WARNING, True))
    fds = [os.dup(link.fileno()) for link in links]
    for link in links:
        link.close()
    lives: list[LiveServer] = []
    try:
        for i, fd in enumerate(fds):
            factory = lambda fd=fd, i=i: EngineProcess.attach(fd, i, **ENGINE_ARGS)  # noqa: E731
            lives.append(start_inprocess(factory, api_key=API_KEY, wait=False))
        for live in lives:
            wait_http(live.base_url + "/health", timeout=600)
        assert control.recv()[0] == "ready"
        with api_client(lives[0]) as http_a, api_client(lives[1]) as http_b:
            yield http_a, http_b
    finally:
        for live in lives:
            live.stop()
        try:
            control.send(("shutdown",))
            core.wait(timeout=120)
        except (OSError, subprocess.TimeoutExpired):
            core.kill()
        control.close()


LONG = {"temperature": 0, "max_new_tokens": 480, "ignore_eos": True}


def _first_event(lines: Iterator[str]) -> str:
    return next(line for line in lines if line.startswith("data:"))


def test_abort_request_counts_a_request_of_another_http_process(two_frontends):
    """/abort_request through B, by the rid of a stream that A holds: 1 aborted (A's count, summed by the
    core), and A's stream ends with an abort. A rid that nowhere matches counts 0, without waiting."""
    http_a, http_b = two_frontends
    body = {"text": "A long story begins", "sampling_params": LONG, "stream": True, "rid": "two-rid-1"}
    with http_a.stream("POST", "/generate", json=body) as r:
        lines = r.iter_lines()
        _first_event(lines)
        got = http_b.post("/abort_request", json={"rid": "two-rid-1"})
        assert got.status_code == 200 and got.json() == {"success": True, "num_aborted": 1}
        events = [line for line in lines if line.startswith("data:")]
    assert '"type":"abort"' in events[-2] and events[-1] == "data: [DONE]"
    assert json.loads(events[-2][5:])["meta_info"]["completion_tokens"] < LONG["max_new_tokens"]
    t0 = time.monotonic()
    assert http_b.post("/abort_request", json={"rid": "no-such-rid"}).json()["num_aborted"] == 0
    assert time.monotonic() - t0 < 4  # every process answered: no wait for the timeout
    for bad in ({}, {"rid": 5}):
        assert http_b.post("/abort_request", json=bad).status_code == 400
    wait_idle(http_a)
    wait_idle(http_b)


def test_abort_all_counts_every_http_process(two_frontends):
    """abort_all through B: a stream and a non-streamed request in A and a stream in B, 3 aborted; each ends
    with an abort."""
    http_a, http_b = two_frontends
    waited: dict[str, Any] = {}

    def run_a() -> None:
        body = {"text": "Wait for me", "sampling_params": LONG, "rid": "two-rid-wait"}
        waited["a"] = http_a.post("/generate", json=body).json()

    body = {"text": "Stream on", "sampling_params": LONG, "stream": True}
    with (
        http_a.stream("POST", "/generate", json={**body, "rid": "two-rid-a"}) as ra,
        http_b.stream("POST", "/generate", json={**body, "rid": "two-rid-b"}) as rb,
    ):
        lines_a, lines_b = ra.iter_lines(), rb.iter_lines()
        _first_event(lines_a)
        _first_event(lines_b)
        t = threading.Thread(target=run_a)
        t.start()
        deadline = time.monotonic() + 60
        while http_a.get("/get_server_info").json()["num_inflight_seqs"] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        got = http_b.post("/abort_request", json={"abort_all": True})
        assert got.status_code == 200 and got.json()["num_aborted"] == 3
        events = [[line for line in lines if line.startswith("data:")] for lines in (lines_a, lines_b)]
    t.join(120)
    assert waited["a"]["meta_info"]["finish_reason"]["type"] == "abort"
    for ev in events:
        assert '"type":"abort"' in ev[-2] and ev[-1] == "data: [DONE]"
    wait_idle(http_a)
    wait_idle(http_b)


def test_requests_of_one_loop_pass_go_in_one_message(tiny_llama_dir):
    """Requests submitted in one pass of the event loop reach the core as one ``add`` message; each gets the
    answer it gets alone, and an abort sent in the same pass does not overtake its request's add."""
    from jaxrt.engine_process import EngineProcess

    ep = EngineProcess(model_path=tiny_llama_dir, **ENGINE_ARGS)
    sent: list[tuple] = []
    real_send = ep._conn.send

    def spy(msg):  # records what goes to the real core, and sends it
        sent.append(msg)
        real_send(msg)

    ep._conn.send = spy
    try:
        alone = [ep.generate(p, GREEDY) for p in PROMPTS]
        long = {**GREEDY, "max_new_tokens": 400}

        async def together():
            loop = asyncio.get_running_loop()
            sent.clear()
            waits = [asyncio.ensure_future(ep.async_generate(p, GREEDY)) for p in PROMPTS]
            streams = [ep.async_generate(p, GREEDY, stream=True) for p in PROMPTS]
            firsts = [asyncio.ensure_future(s.__anext__()) for s in streams]
            ended: asyncio.Future = loop.create_future()

            async def submit_and_abort():  # runs after the tasks above, in the same pass
                (spec,), _ = ep._prepare("abort me", long, None, None, None)
                rid = ep._submit_many([(spec, lambda out: out_done(out, ended))], True, loop)[0]
                ep.abort(rid)

            await asyncio.ensure_future(submit_and_abort())
            results = await asyncio.wait_for(asyncio.gather(*waits), 120)
            await asyncio.wait_for(asyncio.gather(*firsts), 120)
            finals = [[c async for c in s][-1] for s in streams]
            return results, finals, await asyncio.wait_for(ended, 120)

        def out_done(out, fut):
            if not fut.done() and (isinstance(out, BaseException) or out["meta_info"]["finish_reason"]):
                fut.set_result(out)

        results, finals, aborted = asyncio.run(together())
        # no other handle on this engine: an abort broadcast answers at once, without a message
        assert ep.broadcast_abort("anything", True).result(0) == 0
        adds = [m for m in sent if m[0] == "add"]
        assert len(adds) == 1 and len(adds[0][1]) == 2 * len(PROMPTS) + 1, adds
        assert [m[0] for m in sent][:2] == ["add", "abort"]
        assert all(m[0] != "abort_broadcast" for m in sent)
        for a, r, f in zip(alone, results, finals, strict=True):
            assert (
                r["output_ids"] == a["output_ids"] == f["output_ids"] and r["text"] == a["text"] == f["text"]
            )
        assert aborted["meta_info"]["finish_reason"]["type"] == "abort"
        assert len(aborted["output_ids"]) < 400
    finally:
        ep.shutdown()


def test_a_bad_request_among_many_gets_its_400_while_the_others_finish(ep_server, ep_http):
    async def run_all():
        async with httpx.AsyncClient(
            base_url=ep_server.base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120
        ) as client:
            bodies = [{"text": p, "sampling_params": GREEDY} for p in PROMPTS * 3]
            bodies.insert(4, {"input_ids": [10**9], "sampling_params": GREEDY})
            bodies.insert(7, {"text": "hi", "sampling_params": {**GREEDY, "top_p": 7}})
            return await asyncio.gather(*(client.post("/generate", json=b) for b in bodies))

    got = asyncio.run(run_all())
    assert [r.status_code for r in got].count(400) == 2
    assert got[4].status_code == 400 and "input_ids" in got[4].json()["error"]["message"]
    assert got[7].status_code == 400 and "top_p" in got[7].json()["error"]["message"]
    ok = [r.json() for i, r in enumerate(got) if i not in (4, 7)]
    assert all(r["meta_info"]["completion_tokens"] == 10 for r in ok)
    assert [r["text"] for r in ok[:3]] == [r["text"] for r in ok[3:6]] == [r["text"] for r in ok[6:]]
    wait_idle(ep_http)
