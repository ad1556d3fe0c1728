#!/usr/bin/env python
"""A lone decode token's attention input: ``kernels.norm_qkv_rope_write``'s one kernel against the kernels the
engine runs without it (``JAXRT_FUSED_QKV=0``: XLA's RMSNorm and q/k/v product, then ``rope_write_kv``).

    python benchmarks/bench_decode_qkv.py --shapes llama-3.2-1b,llama-3.1-8b --pairs 1,2,4 --warps 2,4,8

Each call runs ``--layers`` layers with distinct weights and pools (so the weights come from HBM, as in a
model), compiled as the engine compiles its programs (XLA's Triton GEMMs off). The pools are not donated here,
so XLA copies them before each call; kernels named ``copy`` are left out of the sums.
Both sides are checked against each other (the roped q and the written k / v rows, within a bf16 ulp of
their magnitude), then timed as the sum of GPU kernel times per layer (CUPTI, median of ``--iterations``
calls). ``--pairs`` / ``--warps``: the kernel's tilings to sweep (rotate-half row pairs per program, warps);
the first pair is the default's. ``--smoke``: CPU, Pallas interpret mode, tiny shapes, no timing.
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np
from common import check_and_time_layers, device_name

# (hidden, q heads, kv heads, head_dim, q/k/v bias) of real models
SHAPES = {
    "llama-3.2-1b": (2048, 32, 8, 64, False),
    "llama-3.1-8b": (4096, 32, 8, 128, False),
    "qwen2.5-0.5b": (896, 14, 2, 64, True),
    "smollm2-135m": (576, 9, 3, 64, False),
}
SMOKE_SHAPES = {"tiny": (256, 4, 2, 32, False), "tiny-bias": (192, 3, 1, 64, True)}
PAGE, PAGES, EPS = 16, 256, 1e-5


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="llama-3.2-1b,llama-3.1-8b,qwen2.5-0.5b")
    p.add_argument("--pairs", default="", help="row pairs per program to sweep (default: the kernel's)")
    p.add_argument("--warps", default="", help="warps per program to sweep (default: the kernel's)")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--iterations", type=int, default=30)
    p.add_argument("--output-file", default=None)
    p.add_argument("--model-cache", default=None, help="unused (the smoke test passes it to every script)")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()

    import jax
    import jax.numpy as jnp

    from jaxrt.kernels import decode_qkv, rope_write_kv
    from jaxrt.kernels.reference import rms_norm

    shapes = SMOKE_SHAPES if args.smoke else {s: SHAPES[s] for s in args.shapes.split(",")}
    timed = not args.smoke and jax.default_backend() == "gpu"
    interpret = not timed and jax.default_backend() != "gpu"
    layers = 2 if args.smoke else args.layers
    options = {"xla_gpu_enable_triton_gemm": False} if timed else {}

    def bench_shape(name: str, hidden: int, hq: int, hkv: int, d: int, bias: bool) -> int:
        width = (hq + 2 * hkv) * d
        rng = np.random.default_rng(hidden + d)
        bf16 = jnp.bfloat16
        x = jnp.asarray(rng.standard_normal((1, hidden)) * 3, bf16)
        params = [
            (
                jnp.asarray(1 + 0.2 * rng.standard_normal(hidden), bf16),
                jnp.asarray(rng.standard_normal((width, hidden)) * hidden**-0.5, bf16),
                jnp.asarray(0.5 * rng.standard_normal(width), bf16) if bias else None,
            )
            for _ in range(layers)
        ]
        angles = rng.uniform(0, 2 * np.pi, (1, d // 2))
        cos, sin = jnp.asarray(np.cos(angles), jnp.float32), jnp.asarray(np.sin(angles), jnp.float32)
        slot = jnp.asarray([PAGE * 7 + 3], jnp.int32)
        heads = dict(num_q_heads=hq, num_kv_heads=hkv, head_dim=d)

        def pools():
            return [
                (
                    jnp.full((PAGES, PAGE, hkv, d), jnp.nan, bf16),
                    jnp.full((PAGES, PAGE, hkv, d), jnp.nan, bf16),
                )
                for _ in range(layers)
            ]

        def separate(x, nw, w, b, k, v):  # the engine's ops without the kernel
            qkv = jax.lax.dot_general(rms_norm(x, nw, EPS), w, (((1,), (1,)), ((), ())))
            qkv = qkv if b is None else qkv + b
            return rope_write_kv(
                qkv, cos, sin, k, v, slot, **heads, backend="pallas_gpu", interpret=interpret
            )

        def fused(pairs, warps):
            def f(x, nw, w, b, k, v):
                return decode_qkv.norm_qkv_rope_write_gpu(
                    x, nw, w, b, cos, sin, k, v, slot, **heads, eps=EPS, interpret=interpret, **tiling
                )

            tiling = {k: v for k, v in (("pairs", pairs), ("num_warps", warps)) if v}
            return f

        def chain(fn):
            def call(x, params, pools):
                qs, out = [], []
                for (nw, w, b), (k, v) in zip(params, pools, strict=True):
                    x, nw, w = jax.lax.optimization_barrier((x, nw, w))  # one layer at a time
                    q, k, v = fn(x, nw, w, b, k, v)
                    qs.append(q)
                    out.append((k, v))
                return qs, out

            return jax.jit(call).lower(x, params, pools()).compile(options)

        variants = [("separate", chain(separate))]
        sweep = itertools.product(
            [int(v) for v in args.pairs.split(",") if v] or [0],
            [int(v) for v in args.warps.split(",") if v] or [0],
        )
        for pairs, warps in sweep:
            if pairs and (d // 2) % pairs:
                continue
            label = f"kernel pairs {pairs or decode_qkv.PAIRS} warps {warps or decode_qkv.NUM_WARPS}"
            variants.append((label, chain(fused(pairs, warps))))

        return check_and_time_layers(
            variants,
            lambda: (x, params, pools()),
            lambda out: [np.asarray(a.astype(jnp.float32)) for a in (out[0][-1], *out[1][-1])],
            layers=layers,
            iterations=args.iterations,
            timed=timed,
            output_file=args.output_file,
            record={
                "bench": "decode_qkv",
                "device": device_name(),
                "shape": name,
                "hidden": hidden,
                "heads": [hq, hkv, d],
            },
            exclude=("copy",),
        )

    failures = sum(bench_shape(name, *cfg) for name, cfg in shapes.items())
    print(f"decode_qkv: {failures} failures")
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
