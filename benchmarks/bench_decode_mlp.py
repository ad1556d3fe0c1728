#!/usr/bin/env python
"""A lone decode token's MLP input: ``kernels.norm_gate_up``'s one kernel (RMSNorm, gate/up product,
``act(gate) * up``) against XLA's kernels for the same (the engine's default path; ``JAXRT_FUSED_GATE_UP=1``
takes the kernel).

    python benchmarks/bench_decode_mlp.py --shapes llama-3.2-1b --tilings 64/128/8/4,32/128/4/4

Each call runs ``--layers`` layers with distinct weights (so they come from HBM, as in a model), compiled as
the engine compiles its programs (XLA's Triton GEMMs off). Both sides are checked against each other (within
a bf16 ulp of the outputs' magnitude), then timed as the sum of GPU kernel times per layer (CUPTI, median of
``--iterations`` calls). ``--tilings``: the kernel's ``block_n/block_k/warps/stages`` to sweep (default: the
kernel's). ``--smoke``: CPU, Pallas interpret mode, tiny shapes, no timing.
"""

from __future__ import annotations

import argparse

import numpy as np
from common import check_and_time_layers, device_name

SHAPES = {  # (hidden, intermediate) of real models
    "llama-3.2-1b": (2048, 8192),
    "llama-3.1-8b": (4096, 14336),
    "qwen2.5-0.5b": (896, 4864),
}
SMOKE_SHAPES = {"tiny": (256, 128), "tiny-576": (576, 192)}
EPS = 1e-5


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="llama-3.2-1b")
    p.add_argument("--tilings", default="", help="block_n/block_k/warps/stages, comma-separated")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--iterations", type=int, default=30)
    p.add_argument("--output-file", default=None)
    p.add_argument("--model-cache", default=None, help="unused (the smoke test passes it to every script)")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()

    import jax
    import jax.numpy as jnp

    from jaxrt.kernels import decode_mlp
    from jaxrt.kernels.reference import MLP_ACTIVATIONS, rms_norm

    shapes = SMOKE_SHAPES if args.smoke else {s: SHAPES[s] for s in args.shapes.split(",")}
    timed = not args.smoke and jax.default_backend() == "gpu"
    interpret = not timed and jax.default_backend() != "gpu"
    layers = 2 if args.smoke else args.layers
    options = {"xla_gpu_enable_triton_gemm": False} if timed else {}
    tilings = [tuple(int(v) for v in t.split("/")) for t in args.tilings.split(",") if t] or [()]

    def bench_shape(name: str, hidden: int, inter: int) -> int:
        rng = np.random.default_rng(hidden + inter)
        bf16 = jnp.bfloat16
        x = jnp.asarray(rng.standard_normal((1, hidden)) * 3, bf16)
        params = [
            (
                jnp.asarray(1 + 0.2 * rng.standard_normal(hidden), bf16),
                jnp.asarray(rng.standard_normal((hidden, 2 * inter)) * hidden**-0.5, bf16),
            )
            for _ in range(layers)
        ]

        def separate(x, nw, w):  # XLA's kernels
            gate, up = jnp.split(rms_norm(x, nw, EPS) @ w, 2, axis=-1)
            return MLP_ACTIVATIONS["silu"](gate) * up

        def kernel(tiling):
            names = ("block_n", "block_k_rows", "num_warps", "num_stages")
            kw = dict(zip(names, tiling, strict=False))
            return lambda x, nw, w: decode_mlp.norm_gate_up_gpu(x, nw, w, eps=EPS, interpret=interpret, **kw)

        def chain(fn):
            def call(x, params):
                outs = []
                for nw, w in params:
                    x, nw, w = jax.lax.optimization_barrier((x, nw, w))  # one layer at a time
                    outs.append(fn(x, nw, w))
                return outs

            return jax.jit(call).lower(x, params).compile(options)

        variants = [("separate", chain(separate))]
        for tiling in tilings:
            t = (
                tiling
                + (decode_mlp.BLOCK_N, decode_mlp.BLOCK_K, decode_mlp.NUM_WARPS, decode_mlp.NUM_STAGES)[
                    len(tiling) :
                ]
            )
            if inter % t[0]:
                continue
            variants.append(("kernel " + "/".join(map(str, t)), chain(kernel(t))))
        return check_and_time_layers(
            variants,
            lambda: (x, params),
            lambda out: [np.asarray(out[-1].astype(jnp.float32))],
            layers=layers,
            iterations=args.iterations,
            timed=timed,
            output_file=args.output_file,
            record={
                "bench": "decode_mlp",
                "device": device_name(),
                "shape": name,
                "hidden": hidden,
                "intermediate": inter,
            },
            label_width=22,
        )

    failures = sum(bench_shape(name, *cfg) for name, cfg in shapes.items())
    print(f"decode_mlp: {failures} failures")
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
