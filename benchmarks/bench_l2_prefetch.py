#!/usr/bin/env python
"""Can a kernel that runs before a layer's projections prefetch their weights into L2 and so shorten them?

    python benchmarks/bench_l2_prefetch.py --rows 1,64 [--profile]

At batch 1 a decode step is mostly kernels that each take a few microseconds whatever they read, and the HBM
sits idle between them. One way to stream weights across kernel boundaries would be for a small kernel of
ours to issue TMA prefetches (``plgpu.async_prefetch``, ``cp.async.bulk.prefetch.tensor...L2``) of the next
projections' weights, so that cuBLAS then reads them from L2. This measures it on a chain shaped like
Llama-3.2-1B's (per layer, bf16, ``--layers`` distinct layers so nothing stays in L2 from the layer before):

    P(x) -> o = x @ Wo^T + x -> n = rms_norm(o) -> gu = n @ Wgu -> h = silu(g) * u -> x = h @ Wd + o

``P`` is a Mosaic GPU kernel of ``--programs`` programs that copies ``x`` and, per variant, prefetches
nothing (``p``), ``Wo`` (``o``), the first ``N`` MB of ``Wgu`` (``guN``) or both (``oguN``); ``none`` has no
``P``. Reported: wall time per layer (back-to-back calls) and with ``--profile`` each kernel's CUPTI time. Every
variant with ``P`` must give the same bits (a prefetch changes no value), and ``none`` the same within
rounding. ``--smoke``: CPU, tiny shapes,
XLA's chain only (and ``P`` in the Pallas GPU interpreter where jax has one).
"""

from __future__ import annotations

import argparse
import time

from common import append_jsonl

SHAPES = {"1b": (2048, 8192)}  # hidden, intermediate


def prefetch_kernel(x, targets, num_programs: int, interpret: bool):
    """``x`` copied by a Mosaic GPU kernel whose programs also prefetch ``targets`` (``(array, rows)``: the
    first ``rows`` rows of a 2-D array) into L2 in ``[256, 256]`` tiles, spread over the programs."""
    import jax
    from jax import lax
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    def tiling(shape, rows):
        tr, tc = min(256, rows), min(256, shape[1])
        return tr, tc, (rows // tr) * (shape[1] // tc) if rows else 0, shape[1] // tc

    specs = [tiling(t.shape, rows) for t, rows in targets]
    width = min(256, x.shape[1])

    def entry(x_ref, *refs):
        t_refs, out_ref = refs[:-1], refs[-1]
        c = lax.axis_index("c")
        for t_ref, (tr, tc, ntiles, ncol) in zip(t_refs, specs, strict=True):
            mine = (ntiles - c + num_programs - 1) // num_programs

            def body(i, carry, t_ref=t_ref, tr=tr, tc=tc, ncol=ncol):
                tile = c + i * num_programs
                r0 = pl.multiple_of(lax.div(tile, ncol) * tr, tr)
                c0 = pl.multiple_of(lax.rem(tile, ncol) * tc, tc)
                plgpu.async_prefetch(t_ref.at[pl.ds(r0, tr), pl.ds(c0, tc)])
                return carry

            lax.fori_loop(0, mine, body, None)

        @pl.when(c < x.shape[1] // width)
        def _():  # program c copies columns [c * width, ...) of x
            cols = pl.ds(pl.multiple_of(c * width, width), width)

            def scoped(smem, bar):
                plgpu.copy_gmem_to_smem(x_ref.at[:, cols], smem, bar.at[0])
                plgpu.barrier_wait(bar.at[0])
                plgpu.copy_smem_to_gmem(smem, out_ref.at[:, cols])
                plgpu.wait_smem_to_gmem(0)

            pl.run_scoped(
                scoped,
                plgpu.SMEM((x.shape[0], width), x.dtype),
                plgpu.Barrier(num_arrivals=1, num_barriers=1),
            )

    kw = {"interpret": plgpu.InterpretGPUParams()} if interpret else {}
    return plgpu.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct(x.shape, x.dtype),
        grid=(max(num_programs, x.shape[1] // width),),
        grid_names=("c",),
        kernel_name="bench_prefetch_l2",
        **kw,
    )(x, *[t for t, _ in targets])


def targets_of(variant: str, p: dict) -> list | None:
    """The prefetch targets of a variant; None for ``none`` (no kernel before the layer)."""
    if variant == "none":
        return None
    out = []
    if variant.startswith("o"):
        out.append((p["wo"], p["wo"].shape[0]))
    if "gu" in variant:
        wgu = p["wgu"]
        mb = float(variant.split("gu", 1)[1])
        rows = int(mb * (1 << 20)) // (wgu.shape[1] * 2) // 256 * 256
        out.append((wgu, max(0, min(rows, wgu.shape[0]))))
    return out


def layer(x, p, variant: str, num_programs: int, interpret: bool):
    import jax
    import jax.numpy as jnp
    from jax import lax

    targets = targets_of(variant, p)
    if targets is not None:
        x = prefetch_kernel(x, targets, num_programs, interpret)
    o = jnp.einsum("bk,nk->bn", x, p["wo"], preferred_element_type=jnp.float32).astype(x.dtype) + x
    of = o.astype(jnp.float32)
    n = (of * lax.rsqrt(jnp.mean(of * of, -1, keepdims=True) + 1e-5)).astype(x.dtype)
    gu = n @ p["wgu"]
    half = gu.shape[1] // 2
    h = jax.nn.silu(gu[:, :half]) * gu[:, half:]
    return h @ p["wd"] + o


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    ap.add_argument("--rows", default="1,64")
    ap.add_argument("--variants", default="none,p,o,gu32,ogu16,ogu32,ogu48")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--programs", type=int, default=132)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--profile", action="store_true", help="each kernel's CUPTI time per layer")
    ap.add_argument("--output-file", default=None)
    ap.add_argument("--model-cache", default=None, help="unused (the smoke test passes it to every script)")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    on_gpu = jax.default_backend() == "gpu"
    hidden, inter = SHAPES[args.shape]
    variants = args.variants.split(",")
    if args.smoke:
        hidden, inter, args.layers, args.rows, args.iters, args.programs = 256, 512, 2, "1", 1, 4
        variants = ["none", "p", "ogu0.5"]
    if not on_gpu:
        try:
            from jax.experimental.pallas import mosaic_gpu as plgpu

            has_interp = hasattr(plgpu, "InterpretGPUParams")
        except ImportError:
            has_interp = False
        variants = [v for v in variants if v == "none" or has_interp]
    keys = jax.random.split(jax.random.key(0), 4 * args.layers)
    params = [
        dict(
            wo=jax.random.normal(keys[4 * i], (hidden, hidden), jnp.bfloat16) * 0.02,
            wgu=jax.random.normal(keys[4 * i + 1], (hidden, 2 * inter), jnp.bfloat16) * 0.02,
            wd=jax.random.normal(keys[4 * i + 2], (inter, hidden), jnp.bfloat16) * 0.02,
        )
        for i in range(args.layers)
    ]
    device = jax.devices()[0].device_kind
    for rows in (int(r) for r in args.rows.split(",")):
        x0 = jax.random.normal(keys[3], (rows, hidden), jnp.bfloat16)
        outputs: dict[bool, np.ndarray] = {}  # the first output without / with the kernel before each layer
        for variant in variants:

            @jax.jit
            def chain(x, params, variant=variant):
                for p in params:
                    x = layer(x, p, variant, args.programs, not on_gpu)
                return x

            out = np.asarray(chain(x0, params).astype(jnp.float32))
            # A prefetch changes no value: every variant with the kernel gives the same bits. Without it XLA
            # may fuse the chain otherwise, so that one only within rounding.
            ref = outputs.setdefault(variant != "none", out)
            assert np.array_equal(out, ref), f"{variant} changed the chain's output"
            if len(outputs) == 2:
                assert np.allclose(outputs[True], outputs[False], rtol=5e-2, atol=5e-2)
            us, kernels = None, None
            if on_gpu:
                best = float("inf")
                for _ in range(3):
                    t = time.perf_counter()
                    for _ in range(args.iters):
                        y = chain(x0, params)
                    y.block_until_ready()
                    best = min(best, (time.perf_counter() - t) / args.iters / args.layers * 1e6)
                us = best
                if args.profile:
                    from jax._src.lib import mosaic_gpu as mosaic_gpu_lib

                    ext = mosaic_gpu_lib._mosaic_gpu_ext
                    ext._cupti_init()
                    for _ in range(5):
                        y = chain(x0, params)
                    y.block_until_ready()
                    by: dict[str, float] = {}
                    for name, ms in ext._cupti_get_timings(True):
                        by[name[:60]] = by.get(name[:60], 0.0) + ms * 1e3 / 5 / args.layers
                    kernels = {k: round(v, 2) for k, v in by.items()}
            shown = "cpu" if us is None else f"{us:7.2f} us per layer"
            print(f"rows {rows} {variant:10s} {shown}" + (f"  {kernels}" if kernels else ""))
            append_jsonl(
                args.output_file,
                {
                    "bench": "l2_prefetch",
                    "device": device,
                    "shape": args.shape if not args.smoke else "smoke",
                    "rows": rows,
                    "variant": variant,
                    "programs": args.programs,
                    "us_per_layer": us,
                    "kernels_us_per_layer": kernels,
                },
            )


if __name__ == "__main__":
    main()
