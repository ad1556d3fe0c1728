#!/usr/bin/env python
"""FP8 against bf16 projections, as the engine compiles them (``jaxrt.models.quantization``).

    python benchmarks/bench_fp8_gemm.py --m 1,8,64,256,2048

For each projection shape of the Llama-3.2-1B / 3.1-8B decoder layers and each row count M: the bf16
product ``x @ W.T`` (W ``[N, K]``), the engine's fp8 product (``fp8_linear``: the rows quantized, one
fp8 x fp8 product, both scales applied; weight-only below ``MIN_FP8_GEMM_ROWS`` rows) and the fp8 x fp8
product alone on pre-quantized rows; and ``w8a16 triton``: bf16 rows times the fp8 weights converted inside
the GEMM, compiled with XLA's Triton GEMM fusions on (``JAXRT_FP8_WEIGHT_ONLY_ROWS``).
Each call runs ``--layers`` distinct weights (read from HBM, not L2), an optimisation barrier per layer so
XLA keeps the dots apart, and is timed as the sum of its GPU kernel times (CUPTI), per product; the kernel
XLA chose is named (a cuBLASLt fp8 GEMM is ``__cublas$lt$matmul$f8``). Every result is checked against a
float64 product of the dequantized operands. ``--smoke``: CPU, tiny shapes, no timing.
"""

from __future__ import annotations

import argparse
import math
import re

import numpy as np
from common import append_jsonl, cupti_seconds, read_bandwidth

# name -> (K, N)
SHAPES = {
    "1b.qkv": (2048, 3072),
    "1b.o": (2048, 2048),
    "1b.gate_up": (2048, 16384),
    "1b.down": (8192, 2048),
    "8b.qkv": (4096, 6144),
    "8b.o": (4096, 4096),
    "8b.gate_up": (4096, 28672),
    "8b.down": (14336, 4096),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--m", default="1,8,64,256,2048", help="rows of activations")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--output-file", default=None)
    p.add_argument("--model-cache", default=None, help="unused (the smoke test passes it to every script)")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    import jax
    import jax.numpy as jnp

    from jaxrt.models.quantization import MIN_FP8_GEMM_ROWS, dequantize, fp8_linear, quantize_rows

    shapes = {n: SHAPES[n] for n in args.shapes.split(",")}
    if args.smoke:
        shapes, args.m, args.layers = {"tiny": (64, 32)}, "3", 2
    timed_run = jax.default_backend() == "gpu"
    read_bw = read_bandwidth() if timed_run else float("nan")
    options = {"xla_gpu_enable_triton_gemm": False} if timed_run else {}  # as the engine compiles

    def bf16(x, w):
        return jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())))

    def fp8(x, wq, ws):
        return fp8_linear(x, wq, ws)

    def w8a16(x, wq, ws):  # weight-only: the conversion inside the GEMM where Triton fusions are on
        y = jax.lax.dot_general(
            x, wq.astype(x.dtype), (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
        )
        return (y * ws[None, :]).astype(x.dtype)

    def fp8_dot(xq, wq):
        return jax.lax.dot_general(xq, wq, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)

    def program(fn, n_args):
        def call(x, ws):
            outs = []
            for w in ws:
                xb, wb = jax.lax.optimization_barrier((x, w))
                outs.append(fn(xb, *wb) if n_args > 2 else fn(xb, wb))
            return outs

        return call

    key = jax.random.key(0)
    failures = 0
    for name, (k, n) in shapes.items():
        ws = [
            (jax.random.normal(jax.random.fold_in(key, i), (n, k), jnp.float32) * 0.02).astype(jnp.bfloat16)
            for i in range(args.layers)
        ]
        qs = [quantize_rows(w) for w in ws]
        w0 = np.asarray(dequantize(*qs[0]), np.float64)
        for m in (int(v) for v in args.m.split(",")):
            x = jax.random.normal(jax.random.fold_in(key, 10_000 + m), (m, k), jnp.bfloat16)
            xq, sx = quantize_rows(x)
            # the engine's product quantizes the rows from MIN_FP8_GEMM_ROWS on (fewer: weight-only)
            x_deq = np.asarray(dequantize(xq, sx) if m >= MIN_FP8_GEMM_ROWS else x, np.float64)
            variants = [
                (
                    "bf16",
                    program(bf16, 2),
                    (x, ws),
                    k * n * 2,
                    np.asarray(x, np.float64) @ np.asarray(ws[0], np.float64).T,
                ),
                ("fp8 (engine)", program(fp8, 3), (x, qs), k * n, x_deq @ w0.T),
                ("fp8 dot only", program(fp8_dot, 2), (xq, [q for q, _ in qs]), k * n, None),
                ("w8a16 triton", program(w8a16, 3), (x, qs), k * n, np.asarray(x, np.float64) @ w0.T),
            ]
            for label, fn, fargs, nbytes, want in variants:
                # the weight-only form as XLA compiles it with its Triton GEMM fusions on (its default)
                c = jax.jit(fn).lower(*fargs).compile({} if "triton" in label else options)
                out = jax.block_until_ready(c(*fargs))
                hlo = c.as_text()
                calls = sorted(set(re.findall(r'custom_call_target="([^"]+)"', hlo)))
                err = float("nan")
                if want is not None:
                    got = np.asarray(out[0].astype(jnp.float32), np.float64)
                    err = float(np.abs(got - want).max() / np.abs(want).max())
                    if not err < 2e-2:
                        failures += 1
                t = kernels = float("nan")
                if timed_run:
                    t, kernels = cupti_seconds(c, fargs, args.iterations)
                    t, kernels = t / len(ws), kernels / len(ws)
                bw = nbytes / t / read_bw if timed_run else float("nan")
                print(
                    f"{name:12s} K={k:5d} N={n:5d} M={m:4d} {label:14s} {t * 1e6:8.1f} us  {bw:6.1%} of read bw  "
                    f"{kernels:4.1f} kernels  err {err:.1e}  {','.join(calls) or '-'}"
                )
                append_jsonl(
                    args.output_file,
                    {
                        "bench": "fp8_gemm",
                        "device": jax.devices()[0].device_kind,
                        "shape": name,
                        "k": k,
                        "n": n,
                        "m": m,
                        "variant": label,
                        "us": t * 1e6 if not math.isnan(t) else None,
                        "kernels": kernels if not math.isnan(kernels) else None,
                        "custom_calls": calls,
                        "rel_err": None if math.isnan(err) else err,
                    },
                )
    assert failures == 0, f"{failures} products differ from the float64 reference"


if __name__ == "__main__":
    main()
