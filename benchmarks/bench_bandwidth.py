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

``--cold-sizes-mb 16,67,134,268`` also measures what one streaming kernel reaches at the size of a single
call (one layer's K/V, say): XLA's bf16 -> f32 sum over the whole buffer and over rows of 4096, each timed
call after ``bench_kernels``' 128 MiB L2 flush (CUPTI, the flush left out), as a fraction of the card's read
bandwidth. A kernel reading 67 MB cannot be held to the 2 GiB figure: launch, ramp-up and the last wave are
a fixed cost that small calls do not amortise.
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
    p.add_argument(
        "--cold-sizes-mb",
        type=lambda v: [float(x) for x in v.split(",") if x],
        default=[],
        help="also: read ceilings at these sizes (MB, comma-separated) with the L2 cold",
    )
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
        if t is None:
            t = wall_seconds(compiled, (x,), 3 if args.smoke else args.iterations)
            name += "_wall"
        record[f"{name}_gbps"] = moved / t / 1e9
        print(
            f"{name:>9}: {moved / 1e9:.3f} GB moved in {t * 1e3:.3f} ms = {moved / t / 1e9:,.0f} GB/s",
            flush=True,
        )
    sizes = [0.1] if args.smoke else args.cold_sizes_mb
    if sizes:
        record["cold_read"] = cold_read_ceilings(sizes, args.iterations, args.smoke)
    append_jsonl(args.output_file, record)


def wall_seconds(compiled, args, iterations: int) -> float:
    """Median wall clock of single synchronised calls (where CUPTI sees no kernel, or off the GPU)."""
    import jax

    ts = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def cold_read_ceilings(sizes_mb: list[float], iterations: int, smoke: bool) -> list[dict]:
    """One streaming read per size with the L2 cold (see the module docstring); prints a line per program
    and returns the rows. Off the GPU (the smoke test) the flush runs in Pallas interpret mode and the time
    is the wall clock of the whole call, flush included."""
    import bench_kernels as bk
    import jax
    import jax.numpy as jnp
    from common import read_bandwidth

    gpu = jax.default_backend() == "gpu"
    bk.INTERPRET = not gpu
    bw = read_bandwidth()
    buf = bk.flush_buffer()
    programs = {
        "sum": lambda a: jnp.sum(a, dtype=jnp.float32),
        "rowsum": lambda a: jnp.sum(a, axis=1, dtype=jnp.float32),
    }
    rows = []
    for mb in sizes_mb:
        n = max(4096, int(mb * 1e6) // 2 // 4096 * 4096)
        x = jnp.ones((n // 4096, 4096), jnp.bfloat16)
        nbytes = n * 2
        for name, fn in programs.items():
            compiled = jax.jit(lambda a, b, fn=fn: fn(bk.l2_flush(a, b))).lower(x, buf).compile()
            if gpu:
                t, _ = cupti_seconds(compiled, (x, buf), max(iterations, 10), exclude=("l2_flush",))
            else:
                t = wall_seconds(compiled, (x, buf), 3)
            rows.append(dict(mb=nbytes / 1e6, program=name, us=t * 1e6, fraction_of_read_bw=nbytes / t / bw))
            print(
                f"cold {name:>6}: {nbytes / 1e6:8.1f} MB in {t * 1e6:8.1f} us = {nbytes / t / 1e9:6,.0f} GB/s "
                f"({nbytes / t / bw:.1%} of {bw / 1e12:.3f} TB/s)",
                flush=True,
            )
    return rows


if __name__ == "__main__":
    main()
