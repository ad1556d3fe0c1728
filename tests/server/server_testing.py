"""Server fixtures: one in-process uvicorn server (tiny random Llama, API key) shared by the session, plus
helpers to start more servers in-process or as subprocesses. Loopback only; every wait is bounded."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

# `python -m pytest` from the checkout puts its root on sys.path, where the `kernels/` folder shadows Hugging Face's
# `kernels` package that transformers probes at import (and kernels/__init__.py refuses that import). jaxrt itself
# is installed (editable), so the root entry is not needed here.
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != _ROOT]

API_KEY = "sk-jaxrt-test"
ENGINE_ARGS: dict[str, Any] = dict(
    dtype="float32",
    chunked_prefill_size=64,
    max_running_requests=32,
    context_length=512,
    num_pages=300,
    page_size=16,
)


@dataclass
class LiveServer:
    base_url: str
    state: Any
    server: Any
    thread: threading.Thread

    @property
    def engine(self):
        return self.state.engine

    def stop(self, timeout: float = 60) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def wait_http(url: str, timeout: float, ok=(200,)) -> int:
    """Poll ``url`` until it answers with a status in ``ok``; returns the status. Bounded by ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = httpx.get(url, timeout=5).status_code
            if last in ok:
                return last
        except httpx.HTTPError as e:
            last = e
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout}s (last: {last!r})")


def start_inprocess(factory, *, api_key: str | None = None, wait: bool = True, **state_kwargs) -> LiveServer:
    from jaxrt.launch_server import bind_socket, make_server
    from jaxrt.server.app import create_app
    from jaxrt.server.state import ServerState

    state = ServerState(factory, api_key=api_key, **state_kwargs)
    app = create_app(state)
    server = make_server(app, "127.0.0.1", 0, "warning", 10.0, state)
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="uvicorn-test")
    thread.start()
    live = LiveServer(f"http://127.0.0.1:{port}", state, server, thread)
    if wait:
        wait_http(live.base_url + "/health", timeout=600)
    return live


@pytest.fixture(scope="session")
def server(tiny_llama_dir) -> Iterator[LiveServer]:
    def factory():
        from jaxrt.engine import Engine

        return Engine(model_path=tiny_llama_dir, **ENGINE_ARGS)

    live = start_inprocess(factory, api_key=API_KEY)
    yield live
    live.stop()


def api_client(live: LiveServer) -> httpx.Client:
    """An HTTP client for ``live`` with the test API key."""
    return httpx.Client(base_url=live.base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120)


@pytest.fixture(scope="session")
def http(server) -> Iterator[httpx.Client]:
    with api_client(server) as client:
        yield client


@pytest.fixture(scope="session")
def oai(server):
    import openai

    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def model_name(server) -> str:
    return server.engine.served_model_name


def sse_events(response: httpx.Response) -> list[Any]:
    """Parse an SSE body: the JSON of each ``data:`` event, and the string "[DONE]"."""
    out: list[Any] = []
    for line in response.iter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def wait_idle(http: httpx.Client, timeout: float = 60) -> dict[str, Any]:
    """Until nothing runs or waits and every used page belongs to the prefix cache (no leaked pages)."""
    deadline = time.monotonic() + timeout
    info: dict[str, Any] = {}
    while time.monotonic() < deadline:
        info = http.get("/get_server_info").json()
        if (
            info["num_running_reqs"] == 0
            and info["num_queue_reqs"] == 0
            and info["num_inflight_seqs"] == 0
            and info["num_used_pages"] == info["num_cached_pages"]
        ):
            return info
        time.sleep(0.1)
    raise AssertionError(f"server not idle after {timeout}s: {info}")


def http_process_infos(url: str, count: int, timeout: float = 60) -> dict[int, dict[str, Any]]:
    """``/get_server_info`` of each of ``count`` HTTP processes sharing ``url``'s port (``--api-server-count``),
    by server pid: new connections until every process has answered once its engine handle is ready."""
    infos: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while len(infos) < count and time.monotonic() < deadline:
        r = httpx.get(url + "/get_server_info", timeout=30)  # a new connection each time
        if r.status_code == 503:  # this process is still connecting to the engine (Retry-After)
            time.sleep(0.5)
            continue
        info = r.json()
        infos[info["server_pid"]] = info
        wait_http(url + "/health", timeout=30)  # /health waits for the engine in each process
    assert len(infos) == count, f"{len(infos)} of {count} HTTP processes answered"
    return infos


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` in a Prometheus text page."""
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        sample = head.split("{")[0]
        if sample != name:
            continue
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
            found = True
    if not found:
        raise KeyError(name)
    return total


def spawn_server(args: list[str], cwd: str, entry: tuple[str, ...] = ("-m", "jaxrt.launch_server")):
    """A server subprocess on 127.0.0.1 (``--port 0``); returns (proc, base_url) once it printed its port.

    Runs from ``cwd`` outside the checkout: a checkout root on sys.path shadows Hugging Face's ``kernels``.
    """
    from jaxrt.launch_server import spawn

    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "JAXRT_DISABLE_PROGRESS": "1"}
    return spawn(args, entry=entry, env=env, cwd=cwd)
