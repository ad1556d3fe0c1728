#!/usr/bin/env python
"""Decode-sized GEMMs (a few rows of activations times a weight matrix): cuBLAS, as XLA calls it in the
engine, against a Pallas (Triton) skinny-GEMM kernel, on the Llama-3.2-1B projections.

    python benchmarks/bench_skinny_gemm.py --m 1,64

Each call multiplies the same activations by ``--layers`` distinct weight matrices (like a model's layers, so
the weights are read from HBM, not L2) and is timed as the sum of its GPU kernel times (CUPTI), per GEMM, with
the bandwidth of reading the weights once. The XLA side is compiled as the engine compiles its programs
(Triton GEMM fusions off, so every dot is a cuBLAS call); an optimisation barrier per layer keeps XLA from
merging the dots that share their left operand into one. The Pallas kernel is a prototype kept here for the
measurement: program (n block, k split) streams its ``[K / splits, bn]`` slab of the weight in ``bk``-row
steps into an f32 ``[max(16, M), bn]`` accumulator; with ``splits > 1`` XLA sums the f32 partials. ``xla reduce
[N,K]`` writes the product as a multiply and a sum over K, the reduction fusion XLA emits by itself for one
row. ``mosaic`` is ``kernels.mosaic_skinny`` (Hopper, up to 16 rows): persistent programs that each own 16-64 output columns
and stream their whole ``[K, cols]`` slab through a TMA ring, writing the bf16 output themselves;
``--mosaic-configs cols/splits,...`` adds tilings (``splits > 1``: K split, the partials summed in the kernel
behind a GMEM semaphore; GPU only). Every result is checked against a float64 product. ``--smoke``: CPU,
interpret mode, tiny shapes.
"""

from __future__ import annotations

import argparse
import functools
import math

import numpy as np
from common import append_jsonl, cupti_seconds, read_bandwidth

SHAPES = {"qkv": (2048, 3072), "o": (2048, 2048), "gate_up": (2048, 16384), "down": (8192, 2048)}  # (K, N)
CONFIGS = "32/128/1/4/4,64/128/2/4/4,64/128/4/4/4,128/128/1/8/3,128/128/4/4/4"  # bn/bk/splits/warps/stages


def skinny_matmul(x, w, *, bn, bk, splits, warps, stages, interpret=False):
    """x [M, K] @ w [K, N] -> [M, N] (x's dtype)."""
    import jax
    import jax.numpy as jnp
    from jax import lax
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pl_triton

    m, k = x.shape
    n = w.shape[1]
    rows = max(16, 1 << max(0, (m - 1).bit_length()))  # the dot's M: a power of two >= 16
    if k % (splits * bk) or n % bn:
        raise ValueError(f"K={k} / N={n} do not tile as bn={bn}, bk={bk}, splits={splits}")
    xp = jnp.pad(x, ((0, rows - m), (0, 0))) if rows != m else x
    k_per = k // splits

    def kernel(x_ref, w_ref, o_ref):
        def body(i, acc):
            k0 = pl.multiple_of(i * bk, bk)
            return acc + jnp.dot(
                x_ref[:, pl.ds(k0, bk)], w_ref[pl.ds(k0, bk), :], preferred_element_type=jnp.float32
            )

        acc = lax.fori_loop(0, k_per // bk, body, jnp.zeros((rows, bn), jnp.float32))
        o_ref[...] = acc.astype(o_ref.dtype)

    if splits == 1:
        out_shape = jax.ShapeDtypeStruct((rows, n), x.dtype)
        out_spec = pl.BlockSpec((rows, bn), lambda j, s: (0, j))
    else:
        out_shape = jax.ShapeDtypeStruct((splits, rows, n), jnp.float32)
        out_spec = pl.BlockSpec((None, rows, bn), lambda j, s: (s, 0, j))
    out = pl.pallas_call(
        kernel,
        grid=(n // bn, splits),
        in_specs=[
            pl.BlockSpec((rows, k_per), lambda j, s: (0, s)),
            pl.BlockSpec((k_per, bn), lambda j, s: (s, j)),
        ],
        out_specs=out_spec,
        out_shape=out_shape,
        interpret=interpret,
        compiler_params=None if interpret else pl_triton.CompilerParams(num_warps=warps, num_stages=stages),
        name=f"skinny_bn{bn}_bk{bk}_s{splits}",
    )(xp, w)
    if splits > 1:
        out = out.sum(axis=0).astype(x.dtype)
    return out[:m]


def _dot_nk(x, w_nk):
    """x [M, K] @ w_nk[N, K].T: the weight stored as transformers stores it (each output's K contiguous; XLA
    folds the transpose into the dot)."""
    return x @ w_nk.T


def _reduce_nk(x, w_nk):
    """The same product written as a multiply and a sum over K in f32: what XLA emits by itself for one row
    (a reduction fusion reading each output's contiguous K), asked for at any row count."""
    import jax.numpy as jnp

    prod = x[:, None, :].astype(jnp.float32) * w_nk[None, :, :].astype(jnp.float32)
    return prod.sum(axis=-1).astype(x.dtype)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--m", default="1,64", help="rows of activations (the decode batch)")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--configs", default=CONFIGS, help="bn/bk/splits/warps/stages,...")
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--output-file", default=None)
    p.add_argument("--model-cache", default=None, help="unused (the smoke test passes it to every script)")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--mosaic", type=int, default=1, help="also time kernels.mosaic_skinny (1/0)")
    p.add_argument(
        "--mosaic-configs",
        default="",
        help="more mosaic_skinny tilings, cols/splits,... (e.g. 64/4: 64-column slabs, K split 4 ways)",
    )
    args = p.parse_args()
    read_bw = read_bandwidth()  # the card's measured ceiling, for the '% of read bandwidth' column
    import jax
    import jax.numpy as jnp

    from jaxrt.kernels import mosaic_skinny

    has_interp = mosaic_skinny.plgpu is not None and hasattr(mosaic_skinny.plgpu, "InterpretGPUParams")
    shapes = {name: SHAPES[name] for name in args.shapes.split(",")}
    configs = args.configs
    if args.smoke:
        shapes, args.m, args.layers, configs = {"tiny": (256, 128)}, "3", 2, "32/64/1/4/2,64/64/2/4/2"
    interpret = args.smoke or jax.default_backend() != "gpu"
    options = {} if interpret else {"xla_gpu_enable_triton_gemm": False}

    def timed(fn, x, ws):
        def call(x, ws):
            outs = []
            for w in ws:
                xb, wb = jax.lax.optimization_barrier((x, w))  # one dot per layer: no merged dots
                outs.append(fn(xb, wb))
            return outs

        c = jax.jit(call).lower(x, ws).compile(options)
        out = jax.block_until_ready(c(x, ws))
        if interpret:
            return out, float("nan"), float("nan")
        seconds, kernels = cupti_seconds(c, (x, ws), args.iterations)
        return out, seconds / len(ws), kernels / len(ws)

    key = jax.random.key(0)
    for name, (k, n) in shapes.items():
        ws = [
            (jax.random.normal(jax.random.fold_in(key, i), (k, n), jnp.float32) * 0.02).astype(jnp.bfloat16)
            for i in range(args.layers)
        ]
        ws_nk = [jnp.asarray(w.T) for w in ws]  # the same weights stored [N, K] (PyTorch's layout)
        w0 = np.asarray(ws[0].astype(jnp.float32), np.float64)
        nbytes = k * n * 2
        for m in (int(v) for v in args.m.split(",")):
            x = jax.random.normal(jax.random.fold_in(key, 10_000 + m), (m, k), jnp.bfloat16)
            want = np.asarray(x.astype(jnp.float32), np.float64) @ w0
            variants = [("cublas", jnp.dot), ("cublas [N,K]", _dot_nk), ("xla reduce [N,K]", _reduce_nk)]
            if (
                args.mosaic
                and mosaic_skinny.supports(m, k, n, x.dtype) is None
                and (not interpret or has_interp)
            ):
                variants.append(
                    ("mosaic", functools.partial(mosaic_skinny.skinny_matmul_mgpu, interpret=interpret))
                )
                for mc in filter(None, args.mosaic_configs.split(",")):
                    cols, splits = map(int, mc.split("/"))
                    cfg = mosaic_skinny.SkinnyConfig(cols=cols, splits=splits)
                    fn = functools.partial(mosaic_skinny.skinny_matmul_mgpu, config=cfg, interpret=interpret)
                    variants.append((f"mosaic {mc}", fn))
            variants += [
                (
                    f"pallas {c}",
                    functools.partial(
                        skinny_matmul,
                        **dict(
                            zip(
                                ("bn", "bk", "splits", "warps", "stages"), map(int, c.split("/")), strict=True
                            )
                        ),
                        interpret=interpret,
                    ),
                )
                for c in filter(None, configs.split(","))
            ]
            for label, fn in variants:
                try:
                    out, t, kernels = timed(fn, x, ws_nk if fn in (_dot_nk, _reduce_nk) else ws)
                except Exception as e:  # noqa: BLE001 - a tiling that does not compile is reported, not fatal
                    print(f"{name} M={m} {label}: FAIL {type(e).__name__}: {str(e)[:200]}")
                    continue
                got = np.asarray(out[0].astype(jnp.float32), np.float64)
                err = float(np.abs(got - want).max() / np.abs(want).max())
                bw = nbytes / t / read_bw if t == t else float("nan")
                print(
                    f"{name} K={k} N={n} M={m} {label:24s} {t * 1e6:7.1f} us  {bw:6.1%} of read bandwidth  "
                    f"{kernels:.0f} kernel(s)  rel err {err:.1e}"
                )
                assert err < 2e-2, f"{label} is wrong: rel err {err:.2e}"
                append_jsonl(
                    args.output_file,
                    {
                        "bench": "skinny_gemm",
                        "device": jax.devices()[0].device_kind,
                        "shape": name,
                        "k": k,
                        "n": n,
                        "m": m,
                        "variant": label,
                        "us": t * 1e6 if not math.isnan(t) else None,
                        "kernels_per_gemm": kernels if not math.isnan(kernels) else None,
                        "rel_err": err,
                    },
                )


if __name__ == "__main__":
    main()
