"""Online serving benchmark against a running server (SGLang's bench_serving vocabulary).

Requests arrive as a Poisson process at ``--request-rate`` (inf = all at once), at most ``--max-concurrency``
in flight, each streamed so that time to first token (TTFT), inter-token latency (ITL) and time per output
token (TPOT) are measured per request. Works with jaxrt's ``/generate`` (``--backend jaxrt``) and any
OpenAI-compatible ``/v1/completions`` (``--backend openai``). Loopback by default; every loop is bounded.

    python -m jaxrt.launch_server --model-path PATH --port 30000 &
    python benchmarks/bench_serving.py --port 30000 --num-prompts 200 --request-rate 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import time
from dataclasses import dataclass, field

import numpy as np
from common import append_jsonl, make_random_checkpoint, print_block, random_requests, shared_prefix_requests


@dataclass
class Result:
    ok: bool = False
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    server_prompt_tokens: int = -1  # openai backend: the prompt tokens the server's usage reports
    error: str = ""


def tokens_so_far(backend: str, chunk: dict, res: Result) -> int:
    """Output tokens after this stream chunk. OpenAI chunks carry text, not counts: a chunk with text is a
    token (or several), and the usage chunk (which also gives the server's prompt count) has the true total."""
    if backend == "jaxrt":
        return chunk["meta_info"]["completion_tokens"]
    has_text = any(c.get("text") for c in chunk.get("choices") or [])
    n = res.output_tokens + 1 if has_text else res.output_tokens
    if chunk.get("usage"):
        res.server_prompt_tokens = chunk["usage"].get("prompt_tokens", -1)
        n = max(n, chunk["usage"]["completion_tokens"])
    return n


async def one_request(session, args, ids: list[int], out_len: int) -> Result:
    import aiohttp

    res = Result(prompt_tokens=len(ids))
    if args.backend == "jaxrt":
        url = f"{args.base_url}/generate"
        body = {
            "input_ids": ids,
            "sampling_params": {"max_new_tokens": out_len, "temperature": 0, "ignore_eos": True},
            "stream": True,
        }
    else:
        url = f"{args.base_url}/v1/completions"
        body = {
            "model": args.model,
            "prompt": args.detokenize(ids) if args.detokenize else ids,
            "max_tokens": out_len,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if not args.disable_ignore_eos:
            body["ignore_eos"] = True
    t0 = time.perf_counter()
    last = t0
    try:
        async with session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=args.timeout)) as r:
            if r.status != 200:
                res.error = f"HTTP {r.status}"
                return res
            buf = b""
            async for data in r.content.iter_any():  # SSE events, split into lines here (no line limit)
                *lines, buf = (buf + data).split(b"\n")
                for raw in lines:
                    line = raw.decode()
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    now = time.perf_counter()
                    n = tokens_so_far(args.backend, json.loads(line[6:]), res)
                    if n > res.output_tokens:
                        if res.ttft == 0.0:
                            res.ttft = now - t0
                        else:
                            res.itl.append(now - last)
                        last = now
                        res.output_tokens = n
        res.latency = time.perf_counter() - t0
        res.ok = True
    except (TimeoutError, aiohttp.ClientError, json.JSONDecodeError, KeyError) as e:
        res.error = repr(e)
    return res


async def run(args, reqs) -> tuple[list[Result], float]:
    import aiohttp

    rng = np.random.default_rng(args.seed)
    sem = asyncio.Semaphore(args.max_concurrency or len(reqs))
    # aiohttp, as SGLang's bench_serving: httpx's connection pool costs O(connections) per request event,
    # which at 256 concurrent streams added ~1.3 s to a run against a server that does no work.
    connector = aiohttp.TCPConnector(limit=(args.max_concurrency or len(reqs)) + 8)
    async with aiohttp.ClientSession(connector=connector, trust_env=False) as session:

        async def guarded(ids, n):
            async with sem:
                return await one_request(session, args, ids, n)

        tasks = []
        t0 = time.perf_counter()
        for ids, n in reqs:
            tasks.append(asyncio.create_task(guarded(ids, n)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.exponential(1.0 / args.request_rate))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - t0


def summarize(args, results: list[Result], dur: float) -> None:
    ok = [r for r in results if r.ok]
    ms = lambda xs: np.array(xs) * 1e3 if xs else np.zeros(1)  # noqa: E731
    ttft = ms([r.ttft for r in ok])
    e2e = ms([r.latency for r in ok])
    itl = ms([x for r in ok for x in r.itl])
    tpot = ms([(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1])
    n_in = sum(r.prompt_tokens for r in ok)
    n_out = sum(r.output_tokens for r in ok)
    rows = [
        ("Backend", f"{args.backend} ({args.label})" if args.label else args.backend),
        ("Traffic request rate", args.request_rate),
        ("Max request concurrency", args.max_concurrency or "not set"),
        ("Successful requests", len(ok)),
        ("Failed requests", len(results) - len(ok)),
        ("Benchmark duration (s)", dur),
        ("Total input tokens", n_in),
        ("Total generated tokens", n_out),
        ("Request throughput (req/s)", len(ok) / dur),
        ("Input token throughput (tok/s)", n_in / dur),
        ("Output token throughput (tok/s)", n_out / dur),
        ("Mean E2E Latency (ms)", float(e2e.mean())),
        ("Median E2E Latency (ms)", float(np.median(e2e))),
        ("P99 E2E Latency (ms)", float(np.percentile(e2e, 99))),
        ("Mean TTFT (ms)", float(ttft.mean())),
        ("Median TTFT (ms)", float(np.median(ttft))),
        ("P99 TTFT (ms)", float(np.percentile(ttft, 99))),
        ("Mean TPOT (ms)", float(tpot.mean())),
        ("Median TPOT (ms)", float(np.median(tpot))),
        ("P99 TPOT (ms)", float(np.percentile(tpot, 99))),
        ("Mean ITL (ms)", float(itl.mean())),
        ("Median ITL (ms)", float(np.median(itl))),
        ("P99 ITL (ms)", float(np.percentile(itl, 99))),
    ]
    print_block("Serving Benchmark Result", rows)
    errors = sorted({r.error for r in results if not r.ok})
    append_jsonl(
        args.output_file,
        {
            "bench": "serving",
            "backend": args.backend,
            "label": args.label or args.backend,
            "request_rate": args.request_rate,
            "max_concurrency": args.max_concurrency,
            "num_prompts": len(results),
            "dataset": args.dataset_name,
            "input_tokens": sum(r.prompt_tokens for r in results),
            "completed": len(ok),
            "duration_s": dur,
            "output_throughput": n_out / dur,
            "median_tpot_ms": float(np.median(tpot)),
            "p99_tpot_ms": float(np.percentile(tpot, 99)),
            "median_e2e_ms": float(np.median(e2e)),
            "mean_ttft_ms": float(ttft.mean()),
            "median_ttft_ms": float(np.median(ttft)),
            "p99_ttft_ms": float(np.percentile(ttft, 99)),
            "mean_tpot_ms": float(tpot.mean()),
            "mean_itl_ms": float(itl.mean()),
            "p99_itl_ms": float(np.percentile(itl, 99)),
            "mean_e2e_ms": float(e2e.mean()),
            "errors": errors[:5],
        },
    )


def start_smoke_server(args) -> subprocess.Popen:
    """--smoke: a tiny random model served on a loopback port the server binds itself
    (``jaxrt.launch_server.spawn``), so the script checks itself on CPU."""
    import requests

    from jaxrt.launch_server import spawn

    path = make_random_checkpoint("tiny", f"{args.model_cache}/tiny-float32", "float32")
    args.smoke_model = path
    server_args = ["--model-path", path, "--chunked-prefill-size", "32", "--max-running-requests", "4"]
    server_args += ["--context-length", "128", "--num-pages", "64", "--skip-server-warmup"]
    proc, args.base_url = spawn(server_args, timeout=300)
    deadline = time.time() + 300
    while time.time() < deadline:
        assert proc.poll() is None, "smoke server exited"
        try:
            if requests.get(f"{args.base_url}/health", timeout=2).status_code == 200:
                return proc
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise TimeoutError("smoke server did not become healthy")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--backend", default="jaxrt", choices=["jaxrt", "openai"])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--base-url", default=None)
    p.add_argument(
        "--model", default=None, help="model name for the OpenAI backend (default: first of /v1/models)"
    )
    p.add_argument("--dataset-name", default="random", choices=["random", "generated-shared-prefix"])
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--random-input-len", type=int, default=128)
    p.add_argument("--random-output-len", type=int, default=256)
    p.add_argument("--random-range-ratio", type=float, default=1.0)
    p.add_argument("--vocab-size", type=int, default=32000, help="token ids are drawn below this")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="openai backend: send each prompt as this tokenizer's text of its ids (servers that take only text, "
        "e.g. `transformers serve`; the benchmarks' random checkpoints carry a tokenizer whose text encodes back "
        "to the same ids); without it prompts go as token ids",
    )
    p.add_argument("--gsp-num-groups", type=int, default=64, help="generated-shared-prefix: system prompts")
    p.add_argument("--gsp-prompts-per-group", type=int, default=16)
    p.add_argument("--gsp-system-prompt-len", type=int, default=2048)
    p.add_argument("--gsp-question-len", type=int, default=128)
    p.add_argument("--gsp-output-len", type=int, default=256)
    p.add_argument("--request-rate", type=float, default=float("inf"))
    p.add_argument(
        "--disable-ignore-eos",
        action="store_true",
        help="openai backend: do not send ignore_eos (servers that reject unknown fields, e.g. transformers serve)",
    )
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--output-file", default=None)
    p.add_argument("--label", default=None, help="name of the server in the summary and JSONL (e.g. jaxrt)")
    p.add_argument("--model-cache", default="/tmp/jaxrt-bench-models")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    proc = None
    if args.smoke:
        args.num_prompts, args.random_input_len, args.random_output_len, args.vocab_size = 6, 16, 6, 500
        args.request_rate, args.max_concurrency = 20.0, 4
        args.gsp_num_groups, args.gsp_prompts_per_group, args.gsp_system_prompt_len = 2, 3, 24
        args.gsp_question_len, args.gsp_output_len = 8, 6
        proc = start_smoke_server(args)
    args.base_url = args.base_url or f"http://{args.host}:{args.port}"
    try:
        wait_compiled(args.base_url)
        if args.dataset_name == "generated-shared-prefix":
            reqs = shared_prefix_requests(
                args.gsp_num_groups,
                args.gsp_prompts_per_group,
                args.gsp_system_prompt_len,
                args.gsp_question_len,
                args.gsp_output_len,
                args.vocab_size,
                args.seed,
            )
        else:
            reqs = random_requests(
                args.num_prompts,
                args.random_input_len,
                args.random_output_len,
                args.random_range_ratio,
                args.vocab_size,
                args.seed,
            )
        results = bench(args, reqs)
        if args.smoke:
            assert all(r.ok for r in results), [r.error for r in results]
            # The same server through its OpenAI API with text prompts (as for `transformers serve`): the
            # random checkpoint's tokenizer must give the server exactly the prompt ids.
            args.backend, args.tokenizer = "openai", args.smoke_model
            results = bench(args, reqs)
            assert all(r.ok for r in results), [r.error for r in results]
            assert [r.server_prompt_tokens for r in results] == [len(ids) for ids, _ in reqs]
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)


def bench(args, reqs) -> list[Result]:
    """One timed run of ``reqs`` against ``args.base_url``; prints the summary block, appends the record."""
    args.detokenize = None
    if args.backend == "openai":
        import requests

        if args.tokenizer:
            from transformers import AutoTokenizer

            args.detokenize = AutoTokenizer.from_pretrained(args.tokenizer).decode
        if args.model is None:
            args.model = requests.get(f"{args.base_url}/v1/models", timeout=30).json()["data"][0]["id"]
    results, dur = asyncio.run(run(args, reqs))
    summarize(args, results, dur)
    return results


def wait_compiled(base_url: str, timeout: float = 900.0) -> None:
    """A jaxrt server compiles some step programs in the background after it is healthy: wait for them so
    the timed run sees no compile. Other servers have no ``compiling`` field and are not waited for."""
    import requests

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            info = requests.get(f"{base_url}/get_server_info", timeout=5)
            if info.status_code != 200 or not info.json().get("compiling"):
                return
        except (requests.RequestException, ValueError):
            return
        time.sleep(1.0)
    raise TimeoutError("the server's background compiles did not finish")


if __name__ == "__main__":
    main()
