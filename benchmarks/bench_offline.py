"""Offline throughput through ``jaxrt.Engine`` (SGLang's bench_offline_throughput vocabulary).

    python benchmarks/bench_offline.py --random-model llama-3.2-1b --num-prompts 256 \
        --random-input-len 128 --random-output-len 256 --output-file results.jsonl
"""

from __future__ import annotations

import argparse
import time

from common import add_model_args, append_jsonl, ensure_checkpoint, print_block, random_requests

from jaxrt.config import QUANTIZATION_METHODS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    add_model_args(p)
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--random-input-len", type=int, default=128)
    p.add_argument("--random-output-len", type=int, default=256)
    p.add_argument("--random-range-ratio", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--shared-prefix-len", type=int, default=0, help="prepend one shared random prefix to every prompt"
    )
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--max-running-requests", type=int, default=None)
    p.add_argument("--chunked-prefill-size", type=int, default=None)
    p.add_argument("--context-length", type=int, default=None)
    p.add_argument("--mem-fraction-static", type=float, default=0.85)
    p.add_argument("--disable-radix-cache", action="store_true")
    p.add_argument("--num-continuous-decode-steps", type=int, default=None)
    p.add_argument("--attention-backend", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument(
        "--quantization", default=None, choices=QUANTIZATION_METHODS, help="jaxrt.Engine(quantization=...)"
    )
    p.add_argument(
        "--impl", default="auto", choices=["auto", "native", "transformers"], help="model implementation"
    )
    p.add_argument(
        "--dp-size",
        type=int,
        default=1,
        help="data-parallel replicas, one GPU each (jaxrt.Engine(dp_size=...); SGLang's flag)",
    )
    p.add_argument("--output-file", default=None)
    p.add_argument("--smoke", action="store_true", help="tiny CPU run that checks the script works")
    args = p.parse_args()
    if args.smoke:
        args.random_model, args.random_dtype = "tiny", "float32"
        args.num_prompts, args.random_input_len, args.random_output_len = 6, 24, 8
        args.max_running_requests, args.chunked_prefill_size, args.context_length = 4, 32, 128

    import jaxrt

    path = ensure_checkpoint(args)
    t0 = time.perf_counter()
    llm = jaxrt.Engine(
        model_path=path,
        skip_tokenizer_init=True,
        dtype=args.dtype,
        page_size=args.page_size,
        max_running_requests=args.max_running_requests,
        chunked_prefill_size=args.chunked_prefill_size,
        context_length=args.context_length
        or (args.shared_prefix_len + args.random_input_len + args.random_output_len + 16),
        mem_fraction_static=args.mem_fraction_static,
        disable_radix_cache=args.disable_radix_cache,
        num_continuous_decode_steps=args.num_continuous_decode_steps,
        attention_backend=args.attention_backend,
        impl=args.impl,
        quantization=args.quantization,
        dp_size=args.dp_size,
    )
    startup = time.perf_counter() - t0
    vocab = llm.config.model.vocab_size
    reqs = random_requests(
        args.num_prompts,
        args.random_input_len,
        args.random_output_len,
        args.random_range_ratio,
        vocab,
        args.seed,
    )
    if args.shared_prefix_len:
        import numpy as np

        prefix = (
            np.random.default_rng(args.seed + 1).integers(100, vocab - 100, args.shared_prefix_len).tolist()
        )
        reqs = [(prefix + ids, o) for ids, o in reqs]
    # Warm-up: one short request (one per replica) so the timed run sees no first-call costs.
    t1 = time.perf_counter()
    llm.generate(
        input_ids=[reqs[0][0]] * args.dp_size, sampling_params={"max_new_tokens": 1, "temperature": 0}
    )
    first_token = time.perf_counter() - t1
    # Programs compiling in the background (the engine's default on GPU/TPU) finish before the timed run.
    llm.wait_compiled()
    all_compiled = time.perf_counter() - t0
    llm.flush_cache()
    stats0 = llm.load_stats()

    ids = [r[0] for r in reqs]
    params = [{"max_new_tokens": o, "temperature": 0, "ignore_eos": True} for _, o in reqs]
    t2 = time.perf_counter()
    outs = llm.generate(input_ids=ids, sampling_params=params)
    dur = time.perf_counter() - t2
    stats = llm.load_stats()
    # Not jax.devices() here: with --dp-size this process has no JAX backend of its own.
    device = llm.device[1]
    llm.shutdown()

    import numpy as np

    ttft = np.array([o["meta_info"]["ttft"] for o in outs])
    steps = stats["num_steps"] - stats0["num_steps"]
    host_ms = {  # schedule / dispatch / wait / process, ms per dispatched step
        k[5:-2]: (stats[k] - stats0[k]) / max(1, steps) * 1e3
        for k in ("host_schedule_s", "host_dispatch_s", "host_wait_s", "host_process_s")
    }
    n_in = sum(len(i) for i in ids)
    n_out = sum(o["meta_info"]["completion_tokens"] for o in outs)
    assert n_out == sum(o for _, o in reqs), "every request must produce exactly its output length"
    rows = [
        ("Backend", f"jaxrt engine ({llm.config.impl})"),
        ("Device", device + (f" x {args.dp_size} (data parallel)" if args.dp_size > 1 else "")),
        ("Model", args.model_path or f"random {args.random_model} ({args.random_dtype})"),
        ("Successful requests", len(outs)),
        ("Input lengths (min/max)", f"{min(len(i) for i in ids)}/{max(len(i) for i in ids)}"),
        ("Output lengths (min/max)", f"{min(o for _, o in reqs)}/{max(o for _, o in reqs)}"),
        ("Benchmark duration (s)", dur),
        ("Total input tokens", n_in),
        ("Total generated tokens", n_out),
        ("Request throughput (req/s)", len(outs) / dur),
        ("Input token throughput (tok/s)", n_in / dur),
        ("Output token throughput (tok/s)", n_out / dur),
        ("Total token throughput (tok/s)", (n_in + n_out) / dur),
        ("Mean TTFT (ms)", float(ttft.mean() * 1e3)),
        ("Median TTFT (ms)", float(np.median(ttft) * 1e3)),
        ("P99 TTFT (ms)", float(np.percentile(ttft, 99) * 1e3)),
        ("Cached prompt tokens", sum(o["meta_info"]["cached_tokens"] for o in outs)),
        ("Engine start-up (s)", startup),
        *[(f"  start-up: {k[:-2].replace('_', ' ')} (s)", v) for k, v in llm.startup_breakdown.items()],
        ("First request latency (s)", first_token),
        ("Start-up to first token (s)", startup + first_token),
        ("Start-up to every program compiled (s)", all_compiled),
        ("Steps", steps),
        ("Decode steps per dispatch", llm.config.scheduler.num_continuous_decode_steps),
        *[(f"Host {k} per step (ms)", v) for k, v in host_ms.items()],
        ("Preemptions", stats["num_preemptions"]),
    ]
    print_block("Offline Throughput Benchmark Result", rows)
    append_jsonl(
        args.output_file,
        {
            "bench": "offline",
            "device": device,
            "model": args.model_path or args.random_model,
            "impl": llm.config.impl,
            "dp_size": args.dp_size,
            "quantization": args.quantization,
            "num_continuous_decode_steps": llm.config.scheduler.num_continuous_decode_steps,
            "num_prompts": len(outs),
            "input_len": args.random_input_len,
            "output_len": args.random_output_len,
            "range_ratio": args.random_range_ratio,
            "duration_s": dur,
            "output_throughput": n_out / dur,
            "total_throughput": (n_in + n_out) / dur,
            "request_throughput": len(outs) / dur,
            "startup_s": startup,
            "startup_breakdown": llm.startup_breakdown,
            "shared_prefix_len": args.shared_prefix_len,
            "disable_radix_cache": args.disable_radix_cache,
            "mean_ttft_ms": float(ttft.mean() * 1e3),
            "median_ttft_ms": float(np.median(ttft) * 1e3),
            "first_request_s": first_token,
            "startup_to_first_token_s": startup + first_token,
            "all_compiled_s": all_compiled,
            "max_running_requests": llm.config.scheduler.max_running_requests,
            "chunked_prefill_size": llm.config.scheduler.chunked_prefill_size,
            "page_size": args.page_size,
            "steps": steps,
            # host time per dispatch (ms): what decides whether a slower host leaves the device idle
            "host_ms_per_step": host_ms,
        },
    )


if __name__ == "__main__":
    main()
