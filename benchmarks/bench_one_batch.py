"""Decode step time and prefill latency of one static batch, against the bandwidth floor.

Decode: ``B`` sequences with ``C`` tokens of context each generate one token; the step is the engine's own
(bucketed batch, paged KV, sampling). ``device`` times back-to-back compiled calls; ``engine`` adds the host
side (building the batch, reading the tokens back). Floor = (weight bytes + KV bytes read) / read bandwidth.

    python benchmarks/bench_one_batch.py --random-model llama-3.2-1b --batch-sizes 1,64 --context-lens 1024
"""

from __future__ import annotations

import argparse
import itertools
import time

import numpy as np
from common import (
    add_model_args,
    append_jsonl,
    device_name,
    ensure_checkpoint,
    print_block,
    read_bandwidth,
    trace_timeline,
)

from jaxrt.config import QUANTIZATION_METHODS


def ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


KERNEL_GROUPS = (
    ("sampler", ("greedy",)),  # the greedy statistics' Pallas kernel (kernels/greedy.py)
    ("mosaic mlp/proj", ("jaxrt_mlp", "jaxrt_skinny")),  # kernels/mosaic_mlp.py, kernels/mosaic_skinny.py
    ("norm + q/k/v + kv write", ("norm_qkv_rope_write",)),  # kernels/decode_qkv.py
    ("norm + gate/up", ("norm_gate_up",)),  # kernels/decode_mlp.py
    ("add + norm", ("add_rms_norm",)),  # kernels/add_norm.py
    ("kv write", ("rope_write_kv", "write_kv")),  # kernels/kv_write.py
    ("attention", ("jaxrt_rpa", "ragged", "paged", "attention", "_kernel")),
    ("gemm", ("gemm", "nvjet", "cutlass", "cublas", "sm90_xmma", "dot")),
    ("sort/top-k", ("sort", "topk", "top_k")),
    ("reduce", ("reduce", "reduction")),
    ("copy", ("copy", "memcpy", "memset", "dynamic_update_slice", "scatter")),
)


def kernel_group(name: str) -> str:
    low = name.lower()
    for group, keys in KERNEL_GROUPS:
        if any(k in low for k in keys):
            return group
    return "other fusions"


def profile_kernels(fn, label: str, top: int, device_s: float, iters: int = 5) -> None:
    """Per-kernel GPU times of the compiled step (CUPTI, as jax's mosaic GPU profiler reads them)."""
    import jax

    try:
        from jax._src.lib import mosaic_gpu as mosaic_gpu_lib

        ext = mosaic_gpu_lib._mosaic_gpu_ext
    except Exception as e:  # noqa: BLE001 - CPU or a jaxlib without the extension
        print(f"[profile] {label}: CUPTI unavailable ({type(e).__name__})")
        return
    ext._cupti_init()
    try:
        for _ in range(iters):
            out = fn()
        jax.block_until_ready(out)
    finally:
        timings = ext._cupti_get_timings(True)
    if not timings:
        print(f"[profile] {label}: no kernels recorded")
        return
    per_iter = len(timings) / iters
    by_name: dict[str, list[float]] = {}
    for name, ms in timings:
        by_name.setdefault(name, []).append(ms)
    total = sum(ms for _, ms in timings) / iters
    groups: dict[str, float] = {}
    for name, times in by_name.items():
        g = kernel_group(name)
        groups[g] = groups.get(g, 0.0) + sum(times) / iters
    print(
        f"[profile] {label}: {per_iter:.0f} kernels/step, kernel time {total:.3f} ms, "
        f"wall {device_s * 1e3:.3f} ms (gaps {device_s * 1e3 - total:.3f} ms)"
    )
    for g, ms in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"[profile]   {g:<16} {ms:8.3f} ms  {ms / total:5.1%}")
    ranked = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))
    for name, times in ranked[:top]:
        n = len(times) / iters
        print(
            f"[profile]     {sum(times) / iters * 1e3:8.1f} us  x{n:<4.0f} {sum(times) / len(times) * 1e3:7.1f} us  "
            f"{name[:110]}"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    add_model_args(p)
    p.add_argument("--batch-sizes", type=ints, default=[1, 8, 32, 64, 128, 256])
    p.add_argument("--context-lens", type=ints, default=[1024])
    p.add_argument("--prefill-lens", type=ints, default=[128, 1024, 4096])
    p.add_argument(
        "--prefill-seqs",
        type=ints,
        default=[1],
        help="prompts per prefill step: each --prefill-lens point runs S prompts of that length together",
    )
    p.add_argument(
        "--prefix-lens",
        type=ints,
        default=[0],
        help="cached tokens before each prefill prompt: P > 0 times a chunk of L new tokens behind P cached "
        "ones (a long prompt's later chunk, or a radix-cache hit)",
    )
    p.add_argument(
        "--mixed-decodes",
        type=ints,
        default=[0],
        help="decoding sequences in each prefill step, laid out before the prompts (the serving case: a "
        "prompt's chunk beside running requests), each at --mixed-context tokens",
    )
    p.add_argument("--mixed-context", type=int, default=1024)
    p.add_argument(
        "--chunked-prefill-size",
        type=int,
        default=None,
        help="the engine's largest token bucket (default: what the largest step needs)",
    )
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument(
        "--bandwidth",
        type=float,
        default=None,
        help="HBM read bandwidth for the floor, bytes/s (default: the card's measured figure, common.READ_BW)",
    )
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--attention-backend", default=None)
    p.add_argument(
        "--quantization", default=None, choices=QUANTIZATION_METHODS, help="jaxrt.Engine(quantization=...)"
    )
    p.add_argument("--mem-fraction-static", type=float, default=0.85)
    p.add_argument("--output-file", default=None)
    p.add_argument(
        "--profile-top",
        type=int,
        default=0,
        help="GPU: also print the step's kernels (CUPTI), grouped, with the K most expensive by name",
    )
    p.add_argument("--trace", action="store_true", help="also summarise a JAX profiler trace of 5 steps")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    if args.bandwidth is None:
        args.bandwidth = read_bandwidth()
    if args.smoke:
        args.random_model, args.random_dtype = "tiny", "float32"
        args.batch_sizes, args.context_lens, args.prefill_lens, args.iters = [1, 4], [48], [32], 3

    import jax

    import jaxrt
    from jaxrt.request import Request
    from jaxrt.sampling_params import SamplingParams
    from jaxrt.scheduler import ScheduledRequest, SchedulerOutput, cdiv

    path = ensure_checkpoint(args)
    max_ctx = max(args.context_lens)
    max_b = max(args.batch_sizes)
    llm = jaxrt.Engine(
        model_path=path,
        skip_tokenizer_init=True,
        skip_warmup=True,
        page_size=args.page_size,
        context_length=max(
            max_ctx,
            max(args.prefill_lens) + max(args.prefix_lens),
            args.mixed_context if max(args.mixed_decodes) else 0,
        )
        + args.page_size,
        max_running_requests=max(max_b, max(args.prefill_seqs) + max(args.mixed_decodes)),
        chunked_prefill_size=args.chunked_prefill_size
        or max(max_b, max(args.prefill_lens) * max(args.prefill_seqs) + max(args.mixed_decodes)),
        mem_fraction_static=args.mem_fraction_static,
        attention_backend=args.attention_backend,
        quantization=args.quantization,
    )
    runner = llm.runner
    m = llm.config.model
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(runner.state))
    kv_per_token = 2 * m.num_layers * m.num_kv_heads * m.head_dim * runner.kv_caches[0][0].dtype.itemsize
    usable = runner.num_pages - 1
    rng = np.random.default_rng(0)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=1)

    def fake_batch(batch: int, ctx: int, q_len: int, decodes: int = 0) -> SchedulerOutput | None:
        """``decodes`` one-token sequences at ``--mixed-context`` first, then ``batch`` of ``q_len`` new
        tokens at context ``ctx``."""
        seqs = [(args.mixed_context, 1)] * decodes + [(ctx, q_len)] * batch
        if sum(cdiv(c, args.page_size) for c, _ in seqs) > usable:
            return None
        out = SchedulerOutput()
        first = 1
        for i, (c, q) in enumerate(seqs):
            req = Request(str(i), rng.integers(10, m.vocab_size - 10, c).tolist(), greedy, seed=i)
            pps = cdiv(c, args.page_size)
            req.page_ids = list(range(first, first + pps))
            first += pps
            req.page_row = i  # its row of the runner's page table (the scheduler hands these out)
            out.scheduled.append(ScheduledRequest(req, c - q, q, True))
        return out

    def time_step(sched: SchedulerOutput, label: str) -> tuple[float, float]:
        runner.run(sched, {})  # compile + warm
        t = time.perf_counter()
        for _ in range(args.iters):
            runner.run(sched, {})
        engine_s = (time.perf_counter() - t) / args.iters
        # Device only: the same compiled step called back to back on device-resident inputs.
        staged = runner.stage(*runner.prepare(sched, {}))

        def fn():
            return runner.run_staged(staged)

        out = fn()
        jax.block_until_ready(out)
        t = time.perf_counter()
        call_s = 0.0
        for _ in range(args.iters):
            tc = time.perf_counter()
            out = fn()
            call_s += time.perf_counter() - tc
        jax.block_until_ready(out)
        device_s = (time.perf_counter() - t) / args.iters
        # If the call itself takes about as long as the step, dispatch is not asynchronous (a host sync
        # inside the program) and the engine cannot overlap host work with it.
        print(
            f"[dispatch] {label}: the call returns after {call_s / args.iters * 1e3:.3f} ms (step {device_s * 1e3:.3f} ms,"
            f" program {staged.forward_key})"
        )
        if args.trace:

            def five():
                o = None
                for _ in range(5):
                    o = fn()
                jax.block_until_ready(o)

            trace_timeline(five, label)
        if args.profile_top:
            profile_kernels(fn, label, args.profile_top, device_s)
        return engine_s, device_s

    rows = []
    for ctx in args.context_lens:
        for b in args.batch_sizes:
            sched = fake_batch(b, ctx, 1)
            if sched is None:
                print(f"skip decode B={b} C={ctx}: KV pool too small")
                continue
            engine_s, device_s = time_step(sched, f"decode B={b} C={ctx}")
            floor = (weight_bytes + b * ctx * kv_per_token) / args.bandwidth
            rows.append(
                (
                    f"decode B={b} C={ctx}",
                    f"device {device_s * 1e3:.3f} ms  engine {engine_s * 1e3:.3f} ms  "
                    f"floor {floor * 1e3:.3f} ms  ({floor / device_s:.0%} of floor)  {b / engine_s:.0f} tok/s",
                )
            )
            append_jsonl(
                args.output_file,
                {
                    "bench": "one_batch_decode",
                    "device": device_name(),
                    "model": args.model_path or args.random_model,
                    "batch": b,
                    "context": ctx,
                    "device_ms": device_s * 1e3,
                    "engine_ms": engine_s * 1e3,
                    "floor_ms": floor * 1e3,
                    "read_bw": args.bandwidth,
                    "attention_backend": llm.config.attention_backend,
                    "quantization": args.quantization,
                },
            )
    points = itertools.product(args.prefill_seqs, args.prefill_lens, args.prefix_lens, args.mixed_decodes)
    for s, n, pre, dec in points:
        sched = fake_batch(s, pre + n, n, dec)
        if sched is None:
            print(f"skip prefill {s} x L={n} P={pre} D={dec}: KV pool too small")
            continue
        label = (f"prefill L={n}" if s == 1 else f"prefill {s} x L={n}") + (f" P={pre}" if pre else "")
        label += f" + {dec} decodes at {args.mixed_context}" if dec else ""
        engine_s, device_s = time_step(sched, label)
        rows.append(
            (
                label,
                f"device {device_s * 1e3:.3f} ms  engine {engine_s * 1e3:.3f} ms  {s * n / device_s:.0f} tok/s",
            )
        )
        append_jsonl(
            args.output_file,
            {
                "bench": "one_batch_prefill",
                "device": device_name(),
                "model": args.model_path or args.random_model,
                "tokens": n,
                "seqs": s,
                "prefix": pre,
                "decodes": dec,
                "decode_context": args.mixed_context if dec else 0,
                "device_ms": device_s * 1e3,
                "engine_ms": engine_s * 1e3,
                "quantization": args.quantization,
            },
        )
    llm.shutdown()
    print_block(
        "One Batch Benchmark Result", [("Device", device_name()), ("Weights (GB)", weight_bytes / 1e9), *rows]
    )


if __name__ == "__main__":
    main()
