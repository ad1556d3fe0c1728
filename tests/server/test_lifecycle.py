"""A server in its own process (``jaxrt serve``): 503 until loaded, --chat-template / --served-model-name,
503 + Retry-After when the queue is full, and SIGTERM: no new work, in-flight requests finish, exit 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from server_testing import http_process_infos, metric, spawn_server, wait_http

TEMPLATE = "{% for m in messages %}<<{{ m['role'] }}:{{ m['content'] }}>>{% endfor %}"


def test_launch_server_help(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "jaxrt.launch_server", "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    for flag in (
        "--model-path",
        "--api-key",
        "--max-queued-requests",
        "--chat-template",
        "--served-model-name",
        "--host",
        "--port",
        "--context-length",
        "--mem-fraction-static",
        "--disable-radix-cache",
    ):
        assert flag in proc.stdout


def test_read_chat_template(tmp_path):
    from jaxrt.launch_server import read_chat_template

    f = tmp_path / "t.jinja"
    f.write_text(TEMPLATE)
    assert read_chat_template(str(f)) == TEMPLATE == read_chat_template(TEMPLATE)
    assert read_chat_template(None) is None
    with pytest.raises(ValueError):
        read_chat_template("no/such/file.jinja")


def test_server_freezes_its_startup_heap_once_loaded():
    """The server's own state moves the startup heap out of garbage collection once the engine is loaded;
    a state built for tests (which share the process) leaves the collector alone."""
    import gc

    from jaxrt.launch_server import build_parser, build_state
    from jaxrt.server.state import ServerState

    loaded = object()
    assert build_state(build_parser().parse_args([]), lambda: loaded).freeze_gc
    assert gc.get_freeze_count() == 0
    try:
        plain = ServerState(lambda: loaded)
        plain.start_loading()
        assert plain.wait_loaded(30) and plain.engine is loaded
        assert gc.get_freeze_count() == 0
        frozen = ServerState(lambda: loaded, freeze_gc=True)
        frozen.start_loading()
        assert frozen.wait_loaded(30) and frozen.engine is loaded
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_queue_full_and_graceful_sigterm(tiny_llama_dir, tmp_path):
    from transformers import AutoTokenizer

    args = [
        "--model-path", tiny_llama_dir, "--dtype", "float32", "--context-length", "512", "--page-size", "16",
        "--num-pages", "80", "--max-running-requests", "1", "--chunked-prefill-size", "32",
        "--max-queued-requests", "1", "--served-model-name", "tiny-served", "--chat-template", TEMPLATE,
        "--shutdown-timeout", "60",
    ]  # fmt: skip
    proc, url = spawn_server(args, cwd=str(tmp_path), entry=("-m", "jaxrt.cli", "serve"))
    threads: list[threading.Thread] = []
    try:
        # the socket is up before the model: /health says 503 until the engine is loaded and compiled
        assert wait_http(url + "/health", timeout=60, ok=(200, 503)) == 503
        wait_http(url + "/health", timeout=300)
        engine_pid = httpx.get(url + "/get_server_info", timeout=30).json()["engine_process_pid"]
        assert engine_pid != proc.pid  # the engine runs in a process of its own

        tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
        r = httpx.post(
            url + "/v1/chat/completions",
            json={"model": "tiny-served", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == len(tok.encode("<<user:hi>>", add_special_tokens=False))
        assert httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"] == "tiny-served"

        # A: a long stream holds the only running slot
        a_lines: list[str] = []
        a_started = threading.Event()

        def run_a() -> None:
            body = {"text": "long", "stream": True,
                    "sampling_params": {"max_new_tokens": 480, "ignore_eos": True, "temperature": 0}}  # fmt: skip
            with httpx.stream("POST", url + "/generate", json=body, timeout=300) as resp:
                for line in resp.iter_lines():
                    if line.startswith("data:"):
                        a_lines.append(line)
                        a_started.set()

        # B: waits in the queue behind A
        b_result: dict = {}

        def run_b() -> None:
            resp = httpx.post(
                url + "/generate",
                json={"text": "queued", "sampling_params": {"max_new_tokens": 4}},
                timeout=300,
            )
            b_result["status"] = resp.status_code
            b_result["body"] = resp.json()

        threads.append(threading.Thread(target=run_a, daemon=True))
        threads[0].start()
        assert a_started.wait(120)
        threads.append(threading.Thread(target=run_b, daemon=True))
        threads[1].start()
        deadline = time.monotonic() + 60
        while httpx.get(url + "/get_server_info", timeout=30).json()["num_inflight_seqs"] < 2:
            assert time.monotonic() < deadline, "B never reached the server"
            time.sleep(0.02)

        # C: the queue (1) is full
        r = httpx.post(
            url + "/generate", json={"text": "rejected", "sampling_params": {"max_new_tokens": 2}}, timeout=30
        )
        assert r.status_code == 503 and r.headers["retry-after"]
        assert r.json()["error"]["message"] == "The request queue is full."
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model="tiny-served", prompt="x", max_tokens=2)
        assert e.value.status_code == 503

        # SIGTERM while A streams and B waits
        assert '"finish_reason":null' in a_lines[-1], "A finished too early for this test to mean anything"
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        try:  # new work: refused at connect, or 503
            r = httpx.post(
                url + "/generate", json={"text": "late", "sampling_params": {"max_new_tokens": 2}}, timeout=10
            )
            assert r.status_code == 503
        except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError):
            pass
        assert proc.wait(timeout=120) == 0, "".join(proc.output_lines[-30:])
        with pytest.raises(ProcessLookupError):  # the engine process went with it
            os.kill(engine_pid, 0)
        for t in threads:
            t.join(30)
        assert a_lines[-1] == "data: [DONE]"
        final = json.loads(a_lines[-2][5:])
        assert final["meta_info"]["finish_reason"]["type"] == "length"
        assert final["meta_info"]["completion_tokens"] == 480
        assert (
            b_result["status"] == 200 and b_result["body"]["meta_info"]["finish_reason"]["type"] == "length"
        )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def test_disable_frontend_multiprocessing(tiny_llama_dir, tmp_path):
    """``--disable-frontend-multiprocessing``: the engine loop runs in the server's own process."""
    args = ["--model-path", tiny_llama_dir, "--dtype", "float32", "--context-length", "256",
            "--num-pages", "64", "--max-running-requests", "4", "--disable-frontend-multiprocessing"]  # fmt: skip
    proc, url = spawn_server(args, cwd=str(tmp_path))
    try:
        wait_http(url + "/health", timeout=300)
        assert "engine_process_pid" not in httpx.get(url + "/get_server_info", timeout=30).json()
        body = {"text": "hello", "sampling_params": {"max_new_tokens": 3, "ignore_eos": True}}
        out = httpx.post(url + "/generate", json=body, timeout=60).json()
        assert out["meta_info"]["completion_tokens"] == 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, "".join(proc.output_lines[-30:])
    finally:
        if proc.poll() is None:
            proc.kill()


def test_api_server_count_two_processes_one_engine(server, tiny_llama_dir, tmp_path):
    """``--api-server-count 2``: two HTTP processes share the port and one engine process; both answer
    (greedy outputs equal the in-process engine's), /abort_request reaches and counts a stream the other
    process holds, and SIGTERM stops all three processes with exit code 0."""
    from server_testing import ENGINE_ARGS

    args = ["--model-path", tiny_llama_dir, "--dtype", "float32", "--context-length", "512",
            "--num-pages", str(ENGINE_ARGS["num_pages"]), "--max-running-requests", "32",
            "--chunked-prefill-size", "64", "--api-server-count", "2"]  # fmt: skip
    proc, url = spawn_server(args, cwd=str(tmp_path))
    try:
        wait_http(url + "/health", timeout=300)
        infos = http_process_infos(url, 2)
        pids = set(infos)
        engine_pids = {i["engine_process_pid"] for i in infos.values()}
        assert len(engine_pids) == 1
        assert proc.pid not in pids | engine_pids

        greedy = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}
        prompts = [f"Process test {i}: once upon a time" for i in range(8)]
        ref = server.engine.generate(prompts, greedy)
        for p, r in zip(prompts, ref, strict=True):
            got = httpx.post(
                url + "/generate", json={"text": p, "sampling_params": greedy}, timeout=60
            ).json()
            assert got["output_ids"] == r["output_ids"]

        # /metrics from either process counts every process's requests (prometheus multiprocess mode)
        for _ in range(6):
            page = httpx.get(url + "/metrics", timeout=30).text  # a new connection each time
            assert metric(page, "jaxrt:num_requests_total", finish_reason="length") == len(prompts)

        # a stream in one process, aborted through whichever process answers /abort_request
        body = {"text": "long", "stream": True, "rid": "multi-rid-1",
                "sampling_params": {"max_new_tokens": 480, "ignore_eos": True}}  # fmt: skip
        with httpx.stream("POST", url + "/generate", json=body, timeout=120) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data:"))
            got = httpx.post(url + "/abort_request", json={"rid": "multi-rid-1"}, timeout=30)
            assert got.status_code == 200 and got.json()["num_aborted"] == 1  # counted in either process
            events = [line for line in lines if line.startswith("data:")]
        assert '"abort"' in events[-2] and events[-1] == "data: [DONE]"

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, "".join(proc.output_lines[-30:])
        for pid in pids | engine_pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        if proc.poll() is None:
            proc.kill()
