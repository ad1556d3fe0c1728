#!/usr/bin/env python
"""The fused q/k norm + rope + KV write (``kernels.rope_write_kv`` on pallas_gpu) against XLA's ops.

    python benchmarks/bench_kv_write.py --shapes llama-3.2-1b,qwen3-0.6b,phi-4-mini --tokens 8,64,256

For each model's head shape x token count: the Pallas kernel and the jnp composition
(``kernels.reference.rope_write_kv_reference``: split, the model's q/k norm, rope, two scatters) run on the
same inputs with NaN-poisoned pools and are checked against each other (every output within tolerance: an
ulp of the dtype without a norm, where they are normally bitwise equal, and a bf16 ulp of the inputs'
magnitude with one, whose sum of squares runs in another order; the same pool rows written), then timed as
GPU kernel time per call (CUPTI, median of ``--iterations`` calls). The pools are not donated here, so XLA
copies them before each call; kernels named ``copy`` are left out of the sums (a driver memcpy is not a
kernel and never counted). ``--dtypes bf16,f32`` checks (and times) f32 too. ``--smoke``: CPU, Pallas
interpret mode, tiny shapes, no timing (the test suite runs it).
"""

from __future__ import annotations

import argparse

import numpy as np
from common import append_jsonl, cupti_seconds, device_name

# Head shapes of real models: (q heads, kv heads, head_dim, rotary dims, q/k norm as QKNorm arguments).
SHAPES = {
    "llama-3.2-1b": (32, 8, 64, 64, None),
    "qwen3-0.6b": (16, 8, 128, 128, ("head", 1e-6, 0.0, False)),
    "gemma-3-1b": (4, 1, 256, 256, ("head", 1e-6, 1.0, True)),
    "olmo-2-1b": (16, 16, 128, 128, ("full", 1e-6, 0.0, True)),
    "phi-4-mini": (24, 8, 128, 96, None),
    "phi-2": (32, 32, 80, 32, None),
}
SMOKE_SHAPES = {
    "tiny": (4, 2, 16, 16, None),
    "tiny-norm": (4, 2, 32, 32, ("head", 1e-6, 0.0, False)),
    "tiny-partial": (6, 3, 48, 16, ("full", 1e-6, 0.0, True)),
}
PAGE = 16


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {sorted(SHAPES)}")
    p.add_argument("--tokens", default="8,64,256")
    p.add_argument("--dtypes", default="bf16")
    p.add_argument("--iterations", type=int, default=50)
    p.add_argument("--output-file", default=None)
    p.add_argument("--model-cache", default=None, help="unused (the smoke test passes it to every script)")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()

    import jax
    import jax.numpy as jnp

    from jaxrt.kernels import QKNorm, rope_write_kv, rope_write_kv_reference

    shapes = SMOKE_SHAPES if args.smoke else {s: SHAPES[s] for s in args.shapes.split(",")}
    if args.smoke:
        args.tokens, args.dtypes = "3,9", "bf16,f32"
    timed = not args.smoke and jax.default_backend() == "gpu"
    interpret = not timed and jax.default_backend() != "gpu"
    dtypes = {"bf16": jnp.bfloat16, "f32": jnp.float32}
    failures = 0
    for (name, (hq, hkv, d, rotary, norm_args)), dname, t in (
        (s, dt, int(t))
        for s in shapes.items()
        for dt in args.dtypes.split(",")
        for t in args.tokens.split(",")
    ):
        dtype = dtypes[dname]
        rng = np.random.default_rng(t * 1000 + d)
        norm = None if norm_args is None else QKNorm(*norm_args)
        num_pages = max(64, -(-2 * t // PAGE))
        qkv = jnp.asarray(rng.standard_normal((t, (hq + 2 * hkv) * d)) * 3, dtype)
        angles = rng.uniform(0, 2 * np.pi, (t, rotary // 2))
        cos, sin = jnp.asarray(np.cos(angles), jnp.float32), jnp.asarray(np.sin(angles), jnp.float32)
        slots = rng.permutation(num_pages * PAGE)[:t].astype(np.int32)
        slots[rng.random(t) < 0.2] = -1  # padding rows write nothing
        pools = jnp.full((num_pages, PAGE, hkv, d), jnp.nan, dtype)
        inputs = [qkv, cos, sin, pools, pools, jnp.asarray(slots)]
        kw = dict(num_q_heads=hq, num_kv_heads=hkv, head_dim=d)
        if norm is not None:
            rows = (hq, hkv) if norm.mode == "full" else (1, 1)
            inputs += [jnp.asarray(1 + 0.3 * rng.standard_normal(r * d), dtype) for r in rows]

        def call(*a, backend, norm=norm, kw=kw):
            extra = {} if norm is None else dict(qk_norm=norm, qk_norm_weights=(a[6], a[7]))
            if backend == "reference":
                return rope_write_kv_reference(*a[:6], **kw, **extra)
            return rope_write_kv(*a[:6], **kw, **extra, backend=backend, interpret=interpret)

        compiled = {
            b: jax.jit(lambda *a, b=b: call(*a, backend=b)).lower(*inputs).compile()
            for b in ("reference", "pallas_gpu")
        }
        got, want = (
            [np.asarray(x, np.float32) for x in compiled[b](*inputs)] for b in ("pallas_gpu", "reference")
        )
        if norm is None:
            tol = dict(rtol=1e-6, atol=1e-6) if dname == "f32" else dict(rtol=2**-7, atol=1e-5)
        else:
            tol = dict(rtol=1e-5, atol=1e-5) if dname == "f32" else dict(rtol=2**-7, atol=2**-4)
        ok = all(
            np.array_equal(np.isnan(a), np.isnan(b)) and np.allclose(a, b, equal_nan=True, **tol)
            for a, b in zip(got, want, strict=True)
        )
        exact = all(np.array_equal(a, b, equal_nan=True) for a, b in zip(got, want, strict=True))
        err = max(
            float(np.nanmax(np.abs(a - b))) if np.isfinite(b).any() else 0.0
            for a, b in zip(got, want, strict=True)
        )
        failures += not ok
        fused = fused_kernels = None
        xla = xla_kernels = None
        if timed:
            fused, fused_kernels = cupti_seconds(
                compiled["pallas_gpu"], inputs, args.iterations, exclude=("copy",)
            )
            xla, xla_kernels = cupti_seconds(
                compiled["reference"], inputs, args.iterations, exclude=("copy",)
            )
        line = f"{name:>13} {dname} T={t:<4} {'PASS' if ok else 'FAIL'} max|diff| {err:.3g}{' (bitwise)' if exact else ''}"
        if timed:
            line += f"  kernel {fused * 1e6:6.2f} us ({fused_kernels})  XLA {xla * 1e6:6.2f} us ({xla_kernels} kernels)"
        print(line, flush=True)
        append_jsonl(
            args.output_file,
            {
                "bench": "kv_write",
                "device": device_name(),
                "shape": name,
                "heads": [hq, hkv, d],
                "rotary_dim": rotary,
                "qk_norm": None if norm is None else norm.mode,
                "dtype": dname,
                "tokens": t,
                "ok": bool(ok),
                "bitwise": bool(exact),
                "max_abs_diff": err,
                "kernel_us": None if fused is None else fused * 1e6,
                "xla_us": None if xla is None else xla * 1e6,
                "xla_kernels": xla_kernels,
            },
        )
    print(f"kv_write: {failures} failures")
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
