"""Data parallelism (``dp_size``, SGLang's ``--dp-size``): replicas of the engine in processes of their own
behind one handle give the in-process engine's answers, spread requests as the load-balance method says,
keep a prompt's ``n`` samples together, free every replica's pages after aborts, and refuse bad settings with
errors that name them. On CPU the two replicas share the host."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
from server_testing import API_KEY, ENGINE_ARGS, LiveServer, api_client, start_inprocess, wait_idle

from jaxrt.data_parallel import replica_devices, validate_dp_args

PROMPTS = [
    "The quick brown fox",
    "Once upon a time, in a land far away",
    "1, 2, 3,",
    "Hello there",
    "A B C D",
    "the end of the story is",
]
GREEDY = {"temperature": 0, "max_new_tokens": 10, "ignore_eos": True}


@pytest.fixture(scope="module")
def dp_server(tiny_llama_dir) -> Iterator[LiveServer]:
    def factory():
        import jaxrt

        return jaxrt.Engine(model_path=tiny_llama_dir, dp_size=2, **ENGINE_ARGS)  # a DataParallelEngine

    live = start_inprocess(factory, api_key=API_KEY)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def dp_http(dp_server) -> Iterator[httpx.Client]:
    with api_client(dp_server) as client:
        yield client


def generated(dp) -> list[int]:
    return [r.load_stats()["num_generated_tokens"] for r in dp.replicas]


def test_two_replicas_in_processes_of_their_own(dp_server, dp_http):
    from jaxrt.data_parallel import DataParallelEngine

    dp = dp_server.engine
    assert isinstance(dp, DataParallelEngine)
    info = dp_http.get("/get_server_info").json()
    assert info["dp_size"] == 2 and info["load_balance_method"] == "round_robin"
    pids = info["engine_process_pid"]
    assert len(set(pids)) == 2
    assert info["num_pages"] == 2 * ENGINE_ARGS["num_pages"]
    assert [r["num_pages"] for r in info["replicas"]] == [ENGINE_ARGS["num_pages"]] * 2
    # one tokenizer in the frontend, shared by both replicas' handles
    assert dp.tokenizer is not None and all(r.tokenizer is dp.tokenizer for r in dp.replicas)


def test_batch_matches_the_in_process_engine_spread_over_both(server, dp_server, dp_http):
    """A batch through /generate: every prompt's greedy ids, text and log-probabilities as the in-process
    engine gives them, and round robin gives each replica half the prompts."""
    dp = dp_server.engine
    before = generated(dp)
    ref = server.engine.generate(PROMPTS, GREEDY, return_logprob=True)
    got = dp_http.post(
        "/generate", json={"text": PROMPTS, "sampling_params": GREEDY, "return_logprob": True}
    ).json()
    assert len(got) == len(PROMPTS)
    for g, r in zip(got, ref, strict=True):
        assert g["output_ids"] == r["output_ids"]
        assert g["text"] == r["text"]
        glp = [lp for lp, _, _ in g["meta_info"]["output_token_logprobs"]]
        rlp = [lp for lp, _, _ in r["meta_info"]["output_token_logprobs"]]
        assert glp == pytest.approx(rlp, abs=1e-5)
    after = generated(dp)
    assert [a - b for a, b in zip(after, before, strict=True)] == [30, 30]
    total = dp_http.get("/get_load").json()["num_generated_tokens"]
    assert total == sum(after)
    wait_idle(dp_http)


def test_samples_of_one_prompt_share_a_replica(dp_server):
    dp = dp_server.engine
    before = generated(dp)
    outs = dp.generate(PROMPTS[0], {**GREEDY, "n": 3, "temperature": 0.8, "seed": 1})
    assert len(outs) == 3
    delta = sorted(a - b for a, b in zip(generated(dp), before, strict=True))
    assert delta == [0, 30]


def test_shortest_queue_sends_work_to_the_idle_replica(dp_server, dp_http):
    """With one long stream running on a replica, ``shortest_queue`` puts the next two requests on the other
    one first, then alternates (ties in turn); the stream's abort frees its pages."""
    dp = dp_server.engine
    dp.load_balance_method = "shortest_queue"
    try:
        stream = dp.generate(PROMPTS[1], {**GREEDY, "max_new_tokens": 400}, stream=True)
        next(stream)  # running now
        busy = [len(r._seqs) for r in dp.replicas].index(1)
        before = generated(dp)
        # One at a time: each waits for the last to finish, so the stream is the only other load.
        for p in PROMPTS[2:4]:
            dp.generate(p, GREEDY)
        delta = [a - b for a, b in zip(generated(dp), before, strict=True)]
        idle = 1 - busy
        assert delta[idle] >= 20, delta  # both short requests went to the idle replica
        stream.close()  # aborts the stream
    finally:
        dp.load_balance_method = "round_robin"
    info = wait_idle(dp_http)
    assert info["num_running_reqs"] == 0


def test_cache_aware_sends_a_next_turn_where_its_prefix_is_cached(dp_server):
    """A conversation's next turn (its prompt extends the last one) meets its cached pages with
    ``cache_aware``; in turn (``round_robin``) it lands on the other replica, which has none of them."""
    import numpy as np

    dp = dp_server.engine
    vocab = dp.config.model.vocab_size
    rng = np.random.default_rng(7)

    def turns(method: str) -> list[int]:
        dp.load_balance_method = method
        first = rng.integers(10, vocab - 10, 100).tolist()  # 6 full pages of 16
        second = first + rng.integers(10, vocab - 10, 20).tolist()
        cached = []
        for ids in (first, second):
            cached.append(dp.generate(input_ids=ids, sampling_params=GREEDY)["meta_info"]["cached_tokens"])
        return cached

    try:
        assert turns("round_robin") == [0, 0]
        _, cached = turns("cache_aware")
        assert cached >= 96, cached
    finally:
        dp.load_balance_method = "round_robin"


def test_cache_prefix_index():
    from jaxrt.data_parallel import CachePrefixIndex

    index = CachePrefixIndex(page_size=4, capacity=6)
    a = list(range(10))  # two full pages
    assert index.match(a) == (None, 0)
    index.insert(a, 1)
    assert index.match(a + [99, 98]) == (1, 8)
    assert index.match(a[:7]) == (1, 4)
    assert index.match([5] + a[1:]) == (None, 0)  # the first page differs, so no page after it matches
    index.insert(a[:4] + [7, 7, 7, 7], 0)  # shares the first page, which now points at replica 0
    assert index.match(a) == (1, 8)  # the deepest page decides
    assert index.match(a[:4] + [7, 7, 7, 7, 1]) == (0, 8)
    index.insert(list(range(100, 120)), 1)  # 5 more pages: past the capacity, the oldest go
    assert index.match(a) == (None, 0)


def test_abort_reaches_the_replica_that_holds_the_request(dp_server, dp_http):
    dp = dp_server.engine
    streams = [dp.generate(p, {**GREEDY, "max_new_tokens": 400}, stream=True) for p in PROMPTS[:2]]
    firsts = [next(s) for s in streams]
    assert sorted(len(r._seqs) for r in dp.replicas) == [1, 1]
    for f in firsts:
        dp.abort(f["meta_info"]["id"])
    for s in streams:
        last = list(s)[-1]
        assert last["meta_info"]["finish_reason"]["type"] == "abort"
    deadline = time.monotonic() + 30
    while any(r._seqs for r in dp.replicas) and time.monotonic() < deadline:
        time.sleep(0.05)
    wait_idle(dp_http)


def test_bad_request_leaves_the_replicas_serving(dp_http):
    r = dp_http.post("/generate", json={"text": "hi", "sampling_params": {"temperature": -1}})
    assert r.status_code == 400
    ok = dp_http.post("/generate", json={"text": "hi", "sampling_params": GREEDY})
    assert ok.status_code == 200 and len(ok.json()["output_ids"]) == 10


def test_flush_cache_reaches_every_replica(dp_server, dp_http):
    wait_idle(dp_http)
    assert dp_http.post("/flush_cache").status_code == 200
    assert [r.load_stats()["num_cached_pages"] for r in dp_server.engine.replicas] == [0, 0]


@pytest.mark.parametrize(
    ("dp_size", "method", "field"),
    [
        (0, "round_robin", "dp_size"),
        (2.0, "round_robin", "dp_size"),
        (True, "round_robin", "dp_size"),
        (2, "random", "load_balance_method"),
    ],
)
def test_bad_settings_name_the_field(dp_size, method, field):
    with pytest.raises(ValueError, match=field):
        validate_dp_args(dp_size, method)


def test_engine_refuses_a_bad_dp_size_before_loading(tmp_path):
    import jaxrt

    with pytest.raises(ValueError, match="dp_size"):
        jaxrt.Engine(model_path=str(tmp_path / "missing"), dp_size=0)


def test_replica_devices():
    assert replica_devices(2, {"JAX_PLATFORMS": "cpu"}) == [None, None]
    assert replica_devices(2, {}) == ["0", "1"]
    assert replica_devices(2, {"JAX_PLATFORMS": "cuda"}) == ["0", "1"]
    assert replica_devices(2, {"CUDA_VISIBLE_DEVICES": "3, 5,7"}) == ["3", "5"]
    with pytest.raises(ValueError, match="dp_size: 3 replicas need 3 GPUs"):
        replica_devices(3, {"CUDA_VISIBLE_DEVICES": "0,1"})


def test_server_flags(monkeypatch, capsys):
    from jaxrt.launch_server import main

    assert main(["--dp-size", "2", "--disable-frontend-multiprocessing"]) == 2
    assert main(["--dp-size", "0"]) == 2
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert main(["--dp-size", "2"]) == 2
    assert "dp_size: 2 replicas need 2 GPUs" in capsys.readouterr().err


def test_two_http_processes_over_two_replicas(server, tiny_llama_dir, tmp_path):
    """``--dp-size 2 --api-server-count 2``: two HTTP processes, each connected to both replicas; both answer
    with the in-process engine's greedy tokens, /abort_request through either process reaches a stream the
    other holds (on whichever replica), and SIGTERM stops all five processes with exit code 0."""
    import os
    import signal

    from server_testing import http_process_infos, spawn_server, wait_http

    args = ["--model-path", tiny_llama_dir, "--dtype", "float32", "--context-length", "512",
            "--num-pages", str(ENGINE_ARGS["num_pages"]), "--max-running-requests", "32",
            "--chunked-prefill-size", "64", "--api-server-count", "2", "--dp-size", "2"]  # fmt: skip
    proc, url = spawn_server(args, cwd=str(tmp_path))
    try:
        wait_http(url + "/health", timeout=300)
        infos = http_process_infos(url, 2)
        assert all(i["dp_size"] == 2 for i in infos.values())
        pids = set(infos)
        engine_pids = {tuple(i["engine_process_pid"]) for i in infos.values()}
        assert len(engine_pids) == 1 and len(next(iter(engine_pids))) == 2

        prompts = [f"Process test {i}: once upon a time" for i in range(6)]
        ref = server.engine.generate(prompts, GREEDY)
        for p, r in zip(prompts, ref, strict=True):
            got = httpx.post(
                url + "/generate", json={"text": p, "sampling_params": GREEDY}, timeout=60
            ).json()
            assert got["output_ids"] == r["output_ids"]

        for n, rid in enumerate(
            ["dp-rid-1", "dp-rid-2"]
        ):  # two streams: round robin puts them on both replicas
            body = {"text": f"long {n}", "stream": True, "rid": rid,
                    "sampling_params": {"max_new_tokens": 480, "ignore_eos": True}}  # fmt: skip
            with httpx.stream("POST", url + "/generate", json=body, timeout=120) as r:
                lines = r.iter_lines()
                next(line for line in lines if line.startswith("data:"))
                got = httpx.post(url + "/abort_request", json={"rid": rid}, timeout=30)
                assert got.status_code == 200 and got.json()["num_aborted"] == 1
                events = [line for line in lines if line.startswith("data:")]
            assert '"abort"' in events[-2] and events[-1] == "data: [DONE]"

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, "".join(proc.output_lines[-30:])
        for pid in pids | set(next(iter(engine_pids))):
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_dead_replica_fails_its_requests_and_new_ones_name_it(tiny_llama_dir):
    import os
    import signal

    from jaxrt.data_parallel import DataParallelEngine

    dp = DataParallelEngine(model_path=tiny_llama_dir, dp_size=2, **ENGINE_ARGS)
    try:
        streams = [dp.generate(p, {**GREEDY, "max_new_tokens": 400}, stream=True) for p in PROMPTS[:2]]
        for s in streams:
            next(s)
        victim, held = dp.replicas[1], streams[1]  # round robin put the second stream on replica 1
        assert len(victim._seqs) == 1
        os.kill(dp.get_server_info()["engine_process_pid"][1], signal.SIGKILL)
        with pytest.raises(RuntimeError):
            for _ in held:
                pass
        deadline = time.monotonic() + 30
        while victim._dead is None and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(RuntimeError, match="data-parallel replica 1"):
            dp.generate("hello", GREEDY)
        streams[0].close()  # the live replica's stream ends with an abort
    finally:
        dp.shutdown()


def test_a_replica_that_cannot_start_stops_the_others(tmp_path):
    from jaxrt.data_parallel import DataParallelEngine

    with pytest.raises(RuntimeError, match="data-parallel start failed: replica 0.*replica 1"):
        DataParallelEngine(model_path=str(tmp_path / "no-such-model"), dp_size=2, **ENGINE_ARGS)
