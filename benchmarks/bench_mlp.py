#!/usr/bin/env python
"""The decode MLP block, ``residual + down(act(x @ W_gate) * (x @ W_up))``, at a few tokens: XLA (cuBLAS,
as the engine compiles it) against the one-kernel Mosaic GPU MLP (``kernels.mosaic_mlp``).

    python benchmarks/bench_mlp.py --m 8,16 --shapes 1b,8b

Each call runs ``--layers`` blocks with distinct weights (like a model's layers: the weights come from HBM,
not L2) and is timed as the sum of its GPU kernel times (CUPTI), per layer, with the bandwidth of reading the
three weights once. Every variant is checked against a float64 evaluation of the same block. Variants:
``xla``; ``xla-nk`` (the weights stored ``[out, in]`` as transformers stores them); ``mgpu`` (TMA reductions
into the f32 output), ``mgpu-det`` (per-item partials summed by XLA), ``mgpu-il`` (gate and up blocks
interleaved: each item's rows are 256 contiguous bytes; the interleaving itself is done once, outside the
timed program), ``mgpu-t`` (phase 1 transposed: ``MlpConfig.transposed_gate_up``), each optionally with
``:stages/out_buffers`` or ``:stages/out_buffers/copy_only`` (the kernel's diagnostic modes,
``MlpConfig.copy_only``: their outputs are not checked), then optionally ``+nopdl`` (``MlpConfig.pdl=True``),
``+norot`` (``rotate_down=False``) and ``+cols`` (``down_by_columns=True``: the gated product, then
``kernels.mosaic_skinny`` for the down projection; ``+overlap`` also launches the second kernel with PDL,
``overlap_down``; ``+fused``: both phases in one kernel with a grid barrier, ``fused_columns``), e.g.
``mgpu:4/2/all+pdl``, ``mgpu+cols``, ``mgpu+overlap``. ``--smoke``: CPU, tiny shapes (the Mosaic GPU variants
in the Pallas GPU interpreter where jax has one).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
import traceback

import numpy as np
from common import append_jsonl, read_bandwidth

SHAPES = {"1b": (2048, 8192), "3b": (3072, 8192), "8b": (4096, 14336)}  # (hidden, intermediate)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument(
        "--shapes", default="1b", help=f"names from {sorted(SHAPES)} or HIDDENxINTERMEDIATE, comma-separated"
    )
    p.add_argument("--m", default="1,8,16", help="tokens (rows of x)")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--variants", default="xla,mgpu,mgpu-det")
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--output-file", default=None)
    p.add_argument("--model-cache", default=None, help="unused (the smoke test passes it to every script)")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    read_bw = read_bandwidth()
    import jax
    import jax.numpy as jnp

    from jaxrt.kernels import gated_mlp_reference, mosaic_mlp

    shapes = {
        name: SHAPES.get(name) or tuple(int(v) for v in name.split("x")) for name in args.shapes.split(",")
    }
    variants = args.variants.split(",")
    on_gpu = jax.default_backend() == "gpu" and not args.smoke
    if args.smoke:
        shapes, args.m, args.layers = {"tiny": (256, 128)}, "5", 2
        has_interpreter = mosaic_mlp.plgpu is not None and hasattr(mosaic_mlp.plgpu, "InterpretGPUParams")
        variants = ["xla", "xla-nk"] + (["mgpu-det"] if has_interpreter else [])
    options = {"xla_gpu_enable_triton_gemm": False} if on_gpu else {}

    def prepare(variant, ws):
        if variant == "xla-nk":  # the same weights stored [out, in] (transformers' layout)
            return [(jnp.asarray(wgu.T), jnp.asarray(wd.T)) for wgu, wd in ws]
        if not variant.startswith("mgpu-il"):
            return ws
        # the same weights with gate and up blocks of 64 columns interleaved
        block = mosaic_mlp.BLOCK_I
        return [
            (wgu.reshape(wgu.shape[0], 2, -1, block).transpose(0, 2, 1, 3).reshape(wgu.shape[0], -1), wd)
            for wgu, wd in ws
        ]

    def make_fn(variant, hidden, m):
        if variant == "xla":
            return lambda x, wgu, wd, residual: gated_mlp_reference(x, wgu, wd, residual=residual)
        if variant == "xla-nk":  # the transposes fold into the dots: products of [out, in] weights
            return lambda x, wgu_t, wd_t, residual: gated_mlp_reference(x, wgu_t.T, wd_t.T, residual=residual)
        variant, *opts = variant.split("+")
        name, _, tiling = variant.partition(":")
        cfg = mosaic_mlp.default_config(hidden, m)
        if tiling:
            stages, bufs, *copy = tiling.split("/")
            cfg = mosaic_mlp.MlpConfig(stages=int(stages), out_buffers=int(bufs), copy_only="".join(copy))
        unknown = set(opts) - {"pdl", "norot", "cols", "overlap", "fused"}
        if unknown:
            raise SystemExit(
                f"unknown variant options {sorted(unknown)} (known: +pdl, +norot, +cols, +overlap, +fused)"
            )
        cfg = dataclasses.replace(
            cfg,
            transposed_gate_up=name == "mgpu-t",
            pdl="pdl" in opts,
            rotate_down="norot" not in opts,
            down_by_columns="cols" in opts or "overlap" in opts,
            overlap_down="overlap" in opts,
            fused_columns="fused" in opts,
        )
        det, il = name == "mgpu-det", name == "mgpu-il"

        def fn(x, wgu, wd, residual):
            return mosaic_mlp.gated_mlp_mgpu(
                x,
                wgu,
                wd,
                residual=residual,
                deterministic=det,
                interleaved=il,
                config=cfg,
                interpret=not on_gpu,
            )

        return fn

    def timed(fn, x, res, ws):
        def call(x, res, ws):
            # Each layer takes the one before's output, as in a model (independent blocks would leave XLA
            # free to reorder or overlap them).
            outs = []
            for wgu, wd in ws:
                xb, rb, wgu, wd = jax.lax.optimization_barrier((x, res, wgu, wd))  # one block per layer
                x = fn(xb, wgu, wd, rb)
                outs.append(x)
            return outs

        t0 = time.perf_counter()
        c = jax.jit(call).lower(x, res, ws).compile(options)
        compile_s = time.perf_counter() - t0
        out = jax.block_until_ready(c(x, res, ws))
        if not on_gpu:
            return out, float("nan"), float("nan"), float("nan"), float("nan"), compile_s
        from jax.experimental.mosaic.gpu import profiler

        _, timings = profiler.measure(c, aggregate=False, iterations=args.iterations)(x, res, ws)
        seconds = float(np.median([sum(ms for _, ms in it) for it in timings])) * 1e-3
        own_ms = [sum(ms for n, ms in it if "jaxrt_mlp" in n or "jaxrt_skinny" in n) for it in timings]
        own = float(np.median(own_ms)) * 1e-3
        kernels = len(timings[0])
        # Back to back: the device's span per call, which counts a kernel that starts before the one ahead
        # of it ends (programmatic dependent launch) once, where the sum of kernel times counts the overlap
        # twice.
        t = time.perf_counter()
        for _ in range(args.iterations):
            out = c(x, res, ws)
        jax.block_until_ready(out)
        wall = (time.perf_counter() - t) / args.iterations
        return out, seconds / len(ws), kernels / len(ws), wall / len(ws), own / len(ws), compile_s

    key = jax.random.key(0)
    for shape, (hidden, inter) in shapes.items():
        ws = []
        for i in range(args.layers):
            k1, k2 = jax.random.split(jax.random.fold_in(key, i))
            wgu = (jax.random.normal(k1, (hidden, 2 * inter), jnp.float32) * hidden**-0.5).astype(
                jnp.bfloat16
            )
            wd = (jax.random.normal(k2, (inter, hidden), jnp.float32) * inter**-0.5).astype(jnp.bfloat16)
            ws.append((wgu, wd))
        f64 = lambda a: np.asarray(a.astype(jnp.float32), np.float64)  # noqa: E731
        wgu0, wd0 = f64(ws[0][0]), f64(ws[0][1])
        nbytes = 3 * hidden * inter * 2
        for m in (int(v) for v in args.m.split(",")):
            x = jax.random.normal(jax.random.fold_in(key, 10_000 + m), (m, hidden), jnp.bfloat16)
            res = jax.random.normal(jax.random.fold_in(key, 20_000 + m), (m, hidden), jnp.bfloat16)
            gu = f64(x) @ wgu0
            g, u = gu[:, :inter], gu[:, inter:]
            want = f64(res) + (g / (1 + np.exp(-g)) * u) @ wd0
            for variant in variants:
                why = (
                    None
                    if variant.startswith("xla")
                    else mosaic_mlp.supports(m, hidden, inter, jnp.bfloat16, "silu")
                )
                if why:
                    print(f"{shape} M={m} {variant}: skipped ({why})")
                    continue
                try:
                    out, t, kernels, wall, own, compile_s = timed(
                        make_fn(variant, hidden, m), x, res, prepare(variant, ws)
                    )
                except Exception as e:  # noqa: BLE001 - a tiling that does not compile is reported, not fatal
                    where = traceback.extract_tb(e.__traceback__)[-3:]
                    print(f"{shape} M={m} {variant}: FAIL {type(e).__name__}: {str(e)[:300]} at {where}")
                    continue
                err = float(np.abs(f64(out[0]) - want).max() / np.abs(want).max())
                bw = nbytes / t / read_bw if t == t else float("nan")
                print(
                    f"{shape} H={hidden} I={inter} M={m} {variant:16s} {t * 1e6:7.1f} us  {bw:6.1%} of read "
                    f"bandwidth  {kernels:.0f} kernel(s)  back to back {wall * 1e6:7.1f} us  "
                    + (f"the Mosaic kernel(s) alone {own * 1e6:7.1f} us  " if own > 0 else "")
                    + f"rel err {err:.1e}  ({args.layers} blocks compiled in {compile_s:.1f} s)"
                )
                assert err < 2e-2 or variant.count("/") == 2, f"{variant} is wrong: rel err {err:.2e}"
                append_jsonl(
                    args.output_file,
                    {
                        "bench": "mlp",
                        "device": jax.devices()[0].device_kind,
                        "shape": shape,
                        "hidden": hidden,
                        "intermediate": inter,
                        "m": m,
                        "variant": variant,
                        "us": t * 1e6 if not math.isnan(t) else None,
                        "wall_us": wall * 1e6 if not math.isnan(wall) else None,
                        "kernel_only_us": own * 1e6 if own > 0 else None,
                        "kernels_per_layer": kernels if not math.isnan(kernels) else None,
                        "rel_err": err,
                        "layers": args.layers,
                        "compile_s": compile_s,
                    },
                )


if __name__ == "__main__":
    main()
