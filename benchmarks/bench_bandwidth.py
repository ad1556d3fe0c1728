#!/usr/bin/env python
"""The card's memory ceilings, measured: what the decode floors and the kernels' "% of read bandwidth" divide by.

    python benchmarks/bench_bandwidth.py            # GPU: 2 GiB buffers
    python benchmarks/bench_bandwidth.py --smoke    # CPU, tiny buffers (the test suite runs this)

Three XLA programs over one buffer, each timed with CUPTI (GPU kernel time, median of ``--iterations`` calls;
a program that runs no kernel, such as a copy done by the driver, falls back to the wall clock and its record
key says ``_wall``):
a read-only reduction (``sum`` of bf16 into f32: reads the buffer once, writes nothing; the figure the other
scripts take as "read bandwidth"), a copy (read + write counted) and an elementwise ``x + 1`` (read + write).
Prints one line per program and appends one JSONL record with all three and the device name, so that a
table of floors can cite the run. ``benchmarks/common.py``'s ``READ_BW`` holds the figures measured so far.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from common import append_jsonl, cupti_seconds, device_name


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gib", type=float, default=2.0, help="buffer size in GiB")
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--output-file", default=None)
    p.add_argument("--model-cache", default=None, help="unused (the smoke test passes it to every script)")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()

    import jax
    import jax.numpy as jnp

    n = 1 << 16 if args.smoke else int(args.gib * (1 << 30)) // 2
    n -= n % 1024
    x = jax.random.normal(jax.random.key(0), (n,), jnp.bfloat16)  # made on the device: fast at 2 GiB
    nbytes = x.size * x.dtype.itemsize
    programs = {
        "read_sum": (lambda a: jnp.sum(a, dtype=jnp.float32), nbytes),
        "copy": (lambda a: jnp.copy(a), 2 * nbytes),
        "add_one": (lambda a: a + jnp.bfloat16(1), 2 * nbytes),
    }
    record = {"bench": "bandwidth", "device": device_name(), "bytes": nbytes}
    for name, (fn, moved) in programs.items():
        compiled = jax.jit(fn).lower(x).compile()
        t = None
        if jax.default_backend() == "gpu":
            try:  # a copy may run as a driver memcpy, which CUPTI's kernel records do not show
                t, _ = cupti_seconds(compiled, (x,), args.iterations)
            except TypeError:
                pass
        if t is None:  # wall clock: median of single synchronised calls
            ts = []
            for _ in range(3 if args.smoke else args.iterations):
                t0 = time.perf_counter()
                jax.block_until_ready(compiled(x))
                ts.append(time.perf_counter() - t0)
            t = float(np.median(ts))
            name += "_wall"
        record[f"{name}_gbps"] = moved / t / 1e9
        print(
            f"{name:>9}: {moved / 1e9:.3f} GB moved in {t * 1e3:.3f} ms = {moved / t / 1e9:,.0f} GB/s",
            flush=True,
        )
    append_jsonl(args.output_file, record)


if __name__ == "__main__":
    main()
