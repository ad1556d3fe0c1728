#!/usr/bin/env python
"""The greedy sampler's statistics on one batch of logits: XLA's reductions against the Pallas kernel.

    python benchmarks/bench_sampler.py --rows 64,256 --vocab 128256 --chunks 2048,4096,8192,16384 --warps 4,8

For each rows x vocab (bf16 logits, 8 stop ids per row): the time of
- ``xla-3pass``: ``jax.nn.logsumexp`` + ``jnp.argmax`` over the suppressed rows (the sampler before 4ee3395);
- ``xla``: ``jaxrt.sampler.row_stats`` (a max/argmax variadic reduction, then the sum of exponentials);
- ``pallas c<chunk>/w<warps>``: ``jaxrt.kernels.greedy.greedy_row_stats`` with that tiling;
as GPU kernel time per call (CUPTI), with the bandwidth of reading the logits once. Every variant's tokens
and log-probabilities are checked against ``kernels.reference.greedy_row_stats_reference``. ``--smoke``: CPU,
interpret mode, tiny shapes.
"""

from __future__ import annotations

import argparse
import functools

import numpy as np
from common import append_jsonl, cupti_seconds, read_bandwidth


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rows", default="64,256")
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--chunks", default="2048,4096,8192,16384")
    p.add_argument("--warps", default="4,8")
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument(
        "--suppress-every", type=int, default=2, help="rows with suppressed stop ids: every N-th (0: none)"
    )
    p.add_argument("--output-file", default=None)
    p.add_argument("--model-cache", default=None, help="unused (the smoke test passes it to every script)")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    read_bw = read_bandwidth()  # the card's measured ceiling, for the '% of read bandwidth' column
    import jax
    import jax.numpy as jnp

    from jaxrt.batch import MAX_STOP_IDS
    from jaxrt.kernels import greedy_row_stats_reference
    from jaxrt.kernels.greedy import greedy_row_stats
    from jaxrt.sampler import mask_stop_ids, row_stats

    if args.smoke:
        args.rows, args.vocab, args.chunks, args.warps = "4", 1000, "256", "4"
    interpret = args.smoke or jax.default_backend() != "gpu"

    def three_pass(x, stop_ids, suppress):
        raw = x.astype(jnp.float32)
        masked = mask_stop_ids(raw, stop_ids, suppress)
        return jax.nn.logsumexp(raw, axis=-1), jnp.argmax(masked, axis=-1), masked.max(axis=-1)

    def xla(x, stop_ids, suppress):
        raw = x.astype(jnp.float32)
        return row_stats(raw, mask_stop_ids(raw, stop_ids, suppress))

    def timed(fn, args_):
        c = jax.jit(fn).lower(*args_).compile()
        out = jax.block_until_ready(c(*args_))
        if interpret:
            return out, float("nan")
        return out, cupti_seconds(c, args_, args.iterations)[0]

    rng = np.random.default_rng(0)
    for rows in (int(r) for r in args.rows.split(",")):
        x = jnp.asarray(rng.normal(size=(rows, args.vocab)) * 3, jnp.bfloat16)
        stop_ids = np.full((rows, MAX_STOP_IDS), -1, np.int32)
        stop_ids[:, 0] = np.asarray(jnp.argmax(x, axis=-1))  # each row's best id is a stop id ...
        every = args.suppress_every  # ... suppressed in every N-th row (min_new_tokens not reached)
        suppress = jnp.asarray(np.arange(rows) % every == 0 if every else np.zeros(rows, bool))
        a = (x, jnp.asarray(stop_ids), suppress)
        nbytes = rows * args.vocab * 2
        variants = [("xla-3pass", three_pass), ("xla", xla)] + [
            (
                f"pallas c{c}/w{w}",
                functools.partial(greedy_row_stats, chunk=c, num_warps=w, interpret=interpret),
            )
            for c in (int(v) for v in args.chunks.split(","))
            for w in (int(v) for v in args.warps.split(","))
        ]
        ref = greedy_row_stats_reference(*a)
        want = (np.asarray(ref[0]), np.asarray(ref[1]))
        for name, fn in variants:
            try:
                out, t = timed(fn, a)
            except Exception as e:  # noqa: BLE001 - a tiling that does not compile is reported, not fatal
                print(f"rows {rows} vocab {args.vocab} {name}: FAIL {type(e).__name__}: {str(e)[:200]}")
                continue
            lse, arg, _ = (np.asarray(o) for o in out)
            ok = np.array_equal(arg, want[1]) and np.allclose(lse, want[0], rtol=1e-5, atol=1e-3)
            bw = nbytes / t / read_bw if t == t else float("nan")
            print(
                f"rows {rows} vocab {args.vocab} suppress 1/{every} {name:18s} {t * 1e6:8.1f} us  {bw:6.1%} of read bandwidth  {'ok' if ok else 'MISMATCH'}"
            )
            assert ok, f"{name} disagrees with the reference"
            append_jsonl(
                args.output_file,
                {
                    "bench": "sampler",
                    "device": jax.devices()[0].device_kind,
                    "rows": rows,
                    "vocab": args.vocab,
                    "variant": name,
                    "suppress_every": every,
                    "us": t * 1e6 if t == t else None,
                    "ok": bool(ok),
                },
            )


if __name__ == "__main__":
    main()
