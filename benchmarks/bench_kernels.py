#!/usr/bin/env python
"""Check and benchmark jaxrt's ragged paged attention kernels.

Modes (combine freely):

  --smoke     CPU, Pallas interpret mode, tiny shapes: a few correctness checks and a tiny timing table
              (what tests/kernels/test_pallas_gpu.py runs).
  --check     GPU: compile and run every supported configuration of the pallas_gpu kernel (head_dim x
              page_size x dtype x window/soft-cap x GQA ratio, each on a mixed prefill+decode batch and on a
              decode batch) against a float64 numpy oracle and the jnp reference; prints PASS/FAIL per config.
  --tune      GPU: sweep block sizes / warps / stages / splits at a few decode and prefill points.
  --decode    GPU: decode benchmark (batch x context, Llama-3.2-1B and Llama-3-8B head shapes).
  --prefill   GPU: prefill benchmark (single sequence of 1k..8k tokens, and chunked prefill behind a prefix).

Decode bandwidth counts the K and V bytes of every sequence's context once (what any kernel must read);
"% of read bandwidth" divides by the card's measured read-only bandwidth (``common.read_bandwidth``: 3.19 TB/s on
the H100, ``bench_bandwidth.py`` measures it; ``JAXRT_READ_BW`` overrides).
Times are CUPTI GPU kernel times per call (median of 10-50 calls; ``--timer wall``: a jitted loop of dependent
calls, median of --repeats runs). With ``--l2 cold`` (the default) each timed call first reads 128 MiB, so
that it finds its K/V, page table and plan in HBM, as a model's layer does after the layer's weights have
streamed through L2; ``--l2 warm`` times back-to-back calls, which leaves inputs up to ~50 MB in L2 (1b at
batch 32 and context 1k: 26.4 µs warm, 28.3 cold on one H100; benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import itertools
import json
import math
import os
import sys
import time
import traceback
import warnings

import numpy as np

warnings.filterwarnings("ignore", category=DeprecationWarning)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402

from jaxrt.kernels import cudnn_prefill, pallas_gpu, ragged_paged_attention_reference  # noqa: E402
from jaxrt.kernels.mosaic_gpu import MosaicConfig  # noqa: E402
from jaxrt.kernels.pallas_gpu import GpuConfig  # noqa: E402
from jaxrt.kernels.testing import make_batch, oracle, rel_err  # noqa: E402

HBM_READ_BW = 3.19e12  # replaced in main() by the device's measured figure (common.read_bandwidth)
SHAPES = {"1b": (32, 8, 64), "8b": (32, 8, 128)}  # (num_q_heads, num_kv_heads, head_dim)
DTYPES = {"bf16": jnp.bfloat16, "f32": jnp.float32}


def log(*a):
    print(*a, flush=True)


# ----------------------------------------------------------------------------------------------------------
# Inputs and oracle


def mixed_case(page):
    """q_lens / kv_lens of a mixed batch: decodes at kv 1, page-1, page, page+1, prefill chunks with prefix."""
    q_lens = [1, 37, 1, 100, 5, 1, 64]
    kv_lens = [1, page + 36, page - 1 if page > 1 else 1, 2 * page + 101, page + 1, page, 64]
    return q_lens, kv_lens


def decode_case(page):
    kv_lens = [1, page - 1 if page > 1 else 2, page, page + 1, 3 * page + 7, 5, 4 * page]
    return [1] * len(kv_lens), kv_lens


# ----------------------------------------------------------------------------------------------------------
# Compilation helpers


def compile_many(jobs, threads):
    """jobs: list of (key, fn, args). Lower + compile in a thread pool; returns {key: compiled | Exception}."""

    def one(job):
        key, fn, args = job
        try:
            return key, jax.jit(fn).lower(*args).compile()
        except Exception as e:  # noqa: BLE001 - reported per config
            return key, e

    out = {}
    if threads <= 1:
        for job in jobs:
            k, v = one(job)
            out[k] = v
        return out
    with concurrent.futures.ThreadPoolExecutor(threads) as ex:
        for k, v in ex.map(one, jobs):
            out[k] = v
    return out


def short_err(e: BaseException) -> str:
    msg = f"{type(e).__name__}: {e}".replace("\n", " ")
    return msg[:300]


# ----------------------------------------------------------------------------------------------------------
# --check


def check_configs(quick: bool):
    gqa = [(4, 4), (8, 2), (16, 2), (8, 1), (6, 2), (32, 8)]  # ratios 1, 4, 8, MQA 8, 3 (padded), 4
    head_dims = [64, 128, 256]
    pages = [16, 32, 64, 128]
    dtypes = ["bf16", "f32"]
    flags = [(None, None), (48, None), (None, 30.0), (48, 30.0)]
    if quick:
        head_dims, pages, flags = [64], [16], [(None, None), (48, 30.0)]
    cases = []
    for i, (d, p, dt, (win, cap)) in enumerate(itertools.product(head_dims, pages, dtypes, flags)):
        hq, hkv = gqa[i % len(gqa)]
        for kind in ("mixed", "decode"):
            cases.append(dict(d=d, page=p, dtype=dt, window=win, soft_cap=cap, hq=hq, hkv=hkv, kind=kind))
    return cases


def check_variant(cfg: GpuConfig, c: dict) -> GpuConfig | None:
    """The second tiling --check runs (--variants): "prefetch" flips prefetch; "heads" takes the largest
    power-of-two kv_heads <= 4 dividing hkv (other than the default's), with block_kv cut to keep a K tile
    within 32 KiB; "mosaic" runs the Mosaic GPU decode kernel on every case it takes (bf16, head_dim
    64 / 128), mixed batches included, whatever the batch size."""
    hkv, d, dtype = c["hkv"], c["d"], c["dtype"]
    if "prefetch" in VARIANTS:
        return dataclasses.replace(cfg, prefetch=not cfg.prefetch)
    if "mosaic" in VARIANTS:  # the Mosaic GPU decode kernel on every batch it takes (mixed ones too)
        mcfg = pallas_gpu.mosaic_decode_config(
            num_tokens=1 << 20,
            num_q_heads=c["hq"],
            num_kv_heads=hkv,
            head_dim=d,
            page_size=c["page"],
            kv_dtype=DTYPES[dtype],
            num_sms=1,
        )
        return None if mcfg is None else GpuConfig(mosaic=mcfg)
    if "heads" in VARIANTS:
        heads = min(4, hkv & -hkv)
        if heads == cfg.kv_heads:
            heads = 1
        bkv = cfg.block_kv
        while bkv > 16 and bkv * heads * d * jnp.dtype(DTYPES[dtype]).itemsize > 32 * 1024:
            bkv //= 2
        return dataclasses.replace(cfg, kv_heads=heads, block_kv=bkv)
    return None


def run_check(args, interpret=False):
    rng = np.random.default_rng(0)
    cases = check_configs(args.smoke)
    if args.check_kinds != "mixed,decode":
        cases = [c for c in cases if c["kind"] in args.check_kinds.split(",")]
    cases = cases[:: args.check_sample]
    log(f"# check: {len(cases)} configurations, interpret={interpret}")
    jobs, batches, refs = [], {}, []
    for ci, c in enumerate(cases):
        ql, kvl = (mixed_case if c["kind"] == "mixed" else decode_case)(c["page"])
        extra = dict(max_num_seqs=len(ql) + 2, num_tokens=sum(ql) + 5)
        if c["kind"] == "decode":  # no more tokens than sequences: the decode tiling (with split-K)
            extra = dict(max_num_seqs=len(ql) + 1, num_tokens=len(ql) + 1)
        b = make_batch(
            rng,
            ql,
            kvl,
            num_q_heads=c["hq"],
            num_kv_heads=c["hkv"],
            head_dim=c["d"],
            page_size=c["page"],
            dtype=DTYPES[c["dtype"]],
            **extra,
        )
        batches[ci] = b
        kw = dict(sm_scale=1.0 / math.sqrt(c["d"]), sliding_window=c["window"], soft_cap=c["soft_cap"])
        jargs = tuple(jnp.asarray(x) for x in b.args())
        jobs.append(
            (
                ("k", ci),
                functools.partial(pallas_gpu.ragged_paged_attention_gpu, interpret=interpret, **kw),
                jargs,
            )
        )
        alt = check_variant(pallas_gpu.config_for(b.q, b.k_pages, b.page_indices), c)
        if alt is not None:
            pf = alt
            jobs.append(
                (
                    ("kpf", ci),
                    functools.partial(
                        pallas_gpu.ragged_paged_attention_gpu, interpret=interpret, config=pf, **kw
                    ),
                    jargs,
                )
            )
        # The jnp reference multiplies masked-out V rows by zero, so NaN poison would reach it: give it the
        # same batch with the poison replaced by zeros (the oracle never reads those entries).
        clean = tuple(jnp.asarray(x) for x in b.clean_args())
        jobs.append((("r", ci), functools.partial(ragged_paged_attention_reference, **kw), clean))
        refs.append(kw)
    t0 = time.time()
    compiled = compile_many(jobs, args.threads)
    log(f"# compiled {len(jobs)} programs in {time.time() - t0:.1f}s")
    rows, n_fail = [], 0
    ref_args = {key: args_ for key, _, args_ in jobs if key[0] == "r"}

    def evaluate(kern, b, jargs, want, tol):
        if isinstance(kern, Exception):
            return "FAIL", float("nan"), "compile: " + short_err(kern)
        try:
            out = np.asarray(jax.block_until_ready(kern(*jargs)), np.float64)
        except Exception as e:  # noqa: BLE001
            return "FAIL", float("nan"), "run: " + short_err(e)
        n_real = b.num_real_tokens
        err = rel_err(out[:n_real], want[:n_real])
        if not np.all(np.isfinite(out)):
            return "FAIL", err, "non-finite output"
        if not np.all(out[n_real:] == 0):
            return "FAIL", err, "padding rows not zero"
        if not err < tol:
            return "FAIL", err, f"error {err:.2e} > {tol:.0e}"
        return "PASS", err, ""

    for ci, c in enumerate(cases):
        b = batches[ci]
        jargs = tuple(jnp.asarray(x) for x in b.args())
        want = oracle(b, **refs[ci])
        tol = 2e-2 if c["dtype"] == "bf16" else 1e-4
        status, err, note = evaluate(compiled[("k", ci)], b, jargs, want, tol)
        row = dict(c, status=status, err=err, note=note, ref_err=float("nan"))
        if ("kpf", ci) in compiled:
            st2, err2, note2 = evaluate(compiled[("kpf", ci)], b, jargs, want, tol)
            row.update(status_pf=st2, err_pf=err2, note_pf=note2)
            if st2 != "PASS":
                status = "FAIL"
        ref = compiled[("r", ci)]
        if not isinstance(ref, Exception):
            r = np.asarray(jax.block_until_ready(ref(*ref_args[("r", ci)])), np.float64)
            row["ref_err"] = rel_err(r, want)
        n_fail += status != "PASS"
        row["all"] = status
        rows.append(row)
    log("")
    log(
        "| kind | head_dim | page | dtype | Hq/Hkv | window | soft_cap | default tiling | rel err | "
        "variant tiling | rel err | jnp ref rel err | note |"
    )
    log("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        log(
            f"| {r['kind']} | {r['d']} | {r['page']} | {r['dtype']} | {r['hq']}/{r['hkv']} | {r['window']} | "
            f"{r['soft_cap']} | {r['status']} | {r['err']:.2e} | {r.get('status_pf', '-')} | "
            f"{r.get('err_pf', float('nan')):.2e} | {r['ref_err']:.2e} | {r['note']} {r.get('note_pf', '')} |"
        )
    log(f"# check: {len(rows) - n_fail}/{len(rows)} PASS")
    return rows, n_fail


# ----------------------------------------------------------------------------------------------------------
# Timing


def time_loop(fn, q, rest, *, iters, repeats, threads_compiled=None):
    """Per-call seconds of fn(q, *rest) in a jitted loop of `iters` dependent calls (median of repeats)."""

    def loop(q, eps, *rest):
        def body(_, carry):
            out = fn(q + eps * carry.astype(q.dtype), *rest)
            return out.astype(carry.dtype)

        return jax.lax.fori_loop(0, iters, body, jnp.zeros(q.shape, q.dtype))

    eps = jnp.zeros((), q.dtype)
    compiled = threads_compiled or jax.jit(loop).lower(q, eps, *rest).compile()
    jax.block_until_ready(compiled(q, eps, *rest))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(q, eps, *rest))
        ts.append((time.perf_counter() - t0) / iters)
    return float(np.median(ts))


def loop_fn(fn, iters):
    def loop(q, eps, *rest):
        def body(_, carry):
            return fn(q + eps * carry.astype(q.dtype), *rest).astype(carry.dtype)

        return jax.lax.fori_loop(0, iters, body, jnp.zeros(q.shape, q.dtype))

    return loop


TIMER = "cupti"  # --timer
# --l2 cold (the command line's default): every timed call starts with L2 holding other data (l2_flush)
COLD_L2 = False
_FLUSH_BLOCK = 4096  # f32 per load of the flush kernel


def l2_flush(q, buf):
    """Read ``buf`` (more than twice the L2 cache) and return ``q`` unchanged (aliased, so nothing is copied):
    whatever consumes the result runs after the read, with L2 full of other lines, as attention finds it in a
    model (the layer's weights just streamed through). One kernel, ``jaxrt_l2_flush``, which CUPTI totals
    leave out."""
    programs, n = buf.shape

    def kernel(q_ref, buf_ref, q_out, sums_ref):
        del q_ref, q_out  # aliased: q passes through untouched

        def body(i, acc):
            return acc + buf_ref[pl.ds(pl.multiple_of(i * _FLUSH_BLOCK, _FLUSH_BLOCK), _FLUSH_BLOCK)]

        sums_ref[...] = jax.lax.fori_loop(0, n // _FLUSH_BLOCK, body, jnp.zeros((_FLUSH_BLOCK,), jnp.float32))

    q_out, _ = pl.pallas_call(
        kernel,
        grid=(programs,),
        in_specs=[pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec((None, n), lambda p: (p, 0))],
        out_specs=[pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec((None, _FLUSH_BLOCK), lambda p: (p, 0))],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((programs, _FLUSH_BLOCK), jnp.float32),
        ],
        input_output_aliases={0: 0},
        interpret=INTERPRET,
        name="jaxrt_l2_flush",
    )(q, buf)
    return q_out


def flush_buffer():
    """A 128 MiB f32 buffer (the H100's L2 is 50 MiB), [264, ...] rows: one row per flush program."""
    rows = 264
    n = (128 << 20) // 4 // rows // _FLUSH_BLOCK * _FLUSH_BLOCK
    if INTERPRET:
        n = _FLUSH_BLOCK
    return jnp.ones((rows, n), jnp.float32)


def cold_fn(fn):
    def g(q, *rest_and_buf):
        *rest, buf = rest_and_buf
        return fn(l2_flush(q, buf), *rest)

    return g


KERNEL_TIMES: dict = {}  # key -> seconds of the main kernel alone (CUPTI only)
CAPTURE_OUTPUTS = False  # measure() keeps each job's first output in OUTPUTS (--sweep checks them)
OUTPUTS: dict = {}
MAIN_KERNEL = {
    "pallas": "jaxrt_rpa",
    "pallas_pf": "jaxrt_rpa",
    "pallas_shared": "jaxrt_rpa",
    "pallas_prior": "jaxrt_rpa",
    "pallas_triton": "jaxrt_rpa",
    "jax_paged": "paged_attention",
}


def _cupti_times(compiled, args, iterations, main):
    """(median total GPU seconds per call, median seconds of kernels whose name contains `main`)."""
    from jax.experimental.mosaic.gpu import profiler

    _, timings = profiler.measure(compiled, aggregate=False, iterations=iterations)(*args)
    totals = [sum(ms for name, ms in it if "l2_flush" not in name) * 1e-3 for it in timings]
    mains = [sum(ms for name, ms in it if main and main in name) * 1e-3 for it in timings]
    return float(np.median(totals)), float(np.median(mains))


def measure(jobs, threads, repeats):
    """jobs: list of (key, fn, q, rest, iters). Compiles in parallel, runs one by one. {key: sec | Exception}.

    TIMER "cupti": sum of the GPU kernel times of one call (CUPTI, median of max(iters, 10) calls; no launch
    gaps). TIMER "wall": wall time of a jitted loop of `iters` dependent calls, median of `repeats`.
    """
    eps_cache = {}
    cjobs = []
    buf = flush_buffer() if COLD_L2 and TIMER == "cupti" else None
    for key, fn, q, rest, iters in jobs:
        if buf is not None:
            cjobs.append((key, cold_fn(fn), (q, *rest, buf)))
        elif TIMER == "cupti":
            cjobs.append((key, fn, (q, *rest)))
        else:
            eps = eps_cache.setdefault(q.dtype, jnp.zeros((), q.dtype))
            cjobs.append((key, loop_fn(fn, iters), (q, eps, *rest)))
    compiled = compile_many(cjobs, threads)
    out = {}
    for (key, _fn, _q, _rest, iters), (_, _, cargs) in zip(jobs, cjobs, strict=True):
        c = compiled[key]
        if isinstance(c, Exception):
            out[key] = c
            continue
        try:
            first = jax.block_until_ready(c(*cargs))
            if CAPTURE_OUTPUTS:
                OUTPUTS[key] = first
            if TIMER == "cupti":
                main = MAIN_KERNEL.get(key) if isinstance(key, str) else "jaxrt_rpa"
                n = max(10, min(iters, 50))
                try:
                    out[key], KERNEL_TIMES[key] = _cupti_times(c, cargs, n, main)
                except Exception as e:  # noqa: BLE001 - fall back to wall time of back-to-back calls
                    log(f"# CUPTI failed ({short_err(e)}); wall time of {n} back-to-back calls instead")
                    t0 = time.perf_counter()
                    jax.block_until_ready([c(*cargs) for _ in range(n)])
                    out[key] = (time.perf_counter() - t0) / n
                continue
            ts = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                jax.block_until_ready(c(*cargs))
                ts.append((time.perf_counter() - t0) / iters)
            out[key] = float(np.median(ts))
        except Exception as e:  # noqa: BLE001
            out[key] = e
    return out


def iters_for(est_seconds, budget=0.03, lo=3, hi=200):
    return int(min(hi, max(lo, budget / max(est_seconds, 1e-6))))


# ----------------------------------------------------------------------------------------------------------
# Decode


def decode_inputs(key, b, ctx, hq, hkv, d, page, dtype):
    pps = -(-ctx // page)
    num_pages = b * pps + 1
    k1, k2, k3 = jax.random.split(key, 3)
    k_pages = jax.random.normal(k1, (num_pages, page, hkv, d), dtype)
    v_pages = jax.random.normal(k2, (num_pages, page, hkv, d), dtype)
    q = jax.random.normal(k3, (b, hq, d), dtype)
    perm = np.random.default_rng(b * 7919 + ctx).permutation(num_pages)[: b * pps]
    pt = jnp.asarray(perm.reshape(b, pps).astype(np.int32))
    kv_lens = jnp.full((b,), ctx, jnp.int32)
    cu = jnp.arange(b + 1, dtype=jnp.int32)
    ns = jnp.array([b], jnp.int32)
    return q, k_pages, v_pages, kv_lens, pt, cu, ns


def kv_bytes(b, ctx, hkv, d, dtype):
    return 2 * b * ctx * hkv * d * jnp.dtype(dtype).itemsize


INTERPRET = False  # --interpret: dry-run the benchmark code paths on CPU
VARIANTS = ("default",)  # --variants: also measure/check GpuConfig(prefetch=True) on top of the default


def pallas_fn(sm_scale, config=None, shared_plan=False, kv_layout="nhd"):
    """The pallas_gpu call; with shared_plan it takes the batch's plan (gpu_metadata) as an extra argument,
    as every layer after the first does in a model that shares one plan per step. kv_layout "hnd": the
    pools passed are head-major ([num_pages, num_kv_heads, page_size, head_dim])."""
    if shared_plan:

        def g(q, k, v, kvl, pt, cu, ns, plan):
            return pallas_gpu.ragged_paged_attention_gpu(
                q,
                k,
                v,
                kvl,
                pt,
                cu,
                ns,
                sm_scale=sm_scale,
                metadata=plan,
                interpret=INTERPRET,
                kv_layout=kv_layout,
            )

        return g

    def f(q, k, v, kvl, pt, cu, ns):
        return pallas_gpu.ragged_paged_attention_gpu(
            q,
            k,
            v,
            kvl,
            pt,
            cu,
            ns,
            sm_scale=sm_scale,
            config=config,
            interpret=INTERPRET,
            kv_layout=kv_layout,
        )

    return f


def plan_for(ins, config=None, kv_layout="nhd"):
    q, k, _v, kvl, pt, cu, ns = ins
    return jax.block_until_ready(
        pallas_gpu.gpu_metadata(q, k, kvl, pt, cu, ns, config=config, kv_layout=kv_layout)
    )


def head_major(ins):
    """decode_inputs with head-major K/V pools (kv_layout "hnd")."""
    q, k, v, *rest = ins
    return (q, jnp.transpose(k, (0, 2, 1, 3)), jnp.transpose(v, (0, 2, 1, 3)), *rest)


def plan_only_fn(config=None):
    """The planning alone (what a model pays once per step instead of once per layer)."""

    def f(q, k, v, kvl, pt, cu, ns):
        plan = pallas_gpu.gpu_metadata(q, k, kvl, pt, cu, ns, config=config)
        return q + (plan.work.meta.sum() + plan.page_table.sum()).astype(q.dtype)

    return f


def reference_fn(sm_scale):
    def f(q, k, v, kvl, pt, cu, ns):
        return ragged_paged_attention_reference(q, k, v, kvl, pt, cu, ns, sm_scale=sm_scale)

    return f


def jax_paged_fn(sm_scale, hkv, ppcb=8, k_splits=4, num_warps=4):
    """jax.experimental.pallas.ops.gpu.paged_attention (deprecated; decode only; head-major pool)."""
    from jax.experimental.pallas.ops.gpu import paged_attention as jpa

    def f(q, k_hm, v_hm, kvl, pt):
        pps = pt.shape[1]
        ks = k_splits
        while pps % ks:
            ks //= 2
        ppcb_ = min(ppcb, pps // ks)
        while (pps // ks) % ppcb_:
            ppcb_ //= 2
        return jpa.paged_attention(
            q * jnp.asarray(sm_scale, q.dtype),
            k_hm,
            v_hm,
            pt,
            kvl,
            pages_per_compute_block=ppcb_,
            k_splits=ks,
            num_warps=num_warps,
            interpret=INTERPRET,
        )

    return f


def dense_decode_fn(sm_scale):
    """XLA dense decode attention over a contiguous cache [B, S, Hkv, D] (no paging)."""

    def f(q, k, v, kvl):
        b, hq, d = q.shape
        hkv = k.shape[2]
        qg = q.reshape(b, hkv, hq // hkv, d)
        s = jnp.einsum("bkgd,bskd->bkgs", qg, k, preferred_element_type=jnp.float32) * sm_scale
        mask = jnp.arange(k.shape[1])[None, :] < kvl[:, None]
        s = jnp.where(mask[:, None, None, :], s, -1e30)
        p = jax.nn.softmax(s, axis=-1)
        o = jnp.einsum("bkgs,bskd->bkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return o.reshape(b, hq, d).astype(q.dtype)

    return f


DECODE_DEFAULT_GRID = [
    (b, c) for b in (1, 8, 32, 64, 128, 256) for c in (512, 1024, 4096, 16384, 32768) if b * c <= 2**21
]


def run_decode(args, grid, shapes, tune_points=()):
    dtype = DTYPES[args.dtype]
    results = []
    key = jax.random.PRNGKey(0)
    for shape in shapes:
        hq, hkv, d = SHAPES[shape]
        sm = 1.0 / math.sqrt(d)
        for b, ctx in grid:
            ins = decode_inputs(key, b, ctx, hq, hkv, d, args.page_size, dtype)
            q, k_pages, v_pages, kv_lens, pt, cu, ns = ins
            nbytes = kv_bytes(b, ctx, hkv, d, dtype)
            est = nbytes / 2.0e12 + 4e-6
            it = iters_for(est)
            shapes = dict(
                num_tokens=b,
                max_num_seqs=b,
                num_q_heads=hq,
                num_kv_heads=hkv,
                head_dim=d,
                page_size=args.page_size,
                pages_per_seq=pt.shape[1],
                itemsize=jnp.dtype(dtype).itemsize,
            )
            cfg = pallas_gpu.default_config(**shapes, kv_dtype=dtype)
            jobs = [
                ("pallas", pallas_fn(sm), q, ins[1:], it),
                ("pallas_shared", pallas_fn(sm, shared_plan=True), q, (*ins[1:], plan_for(ins)), it),
            ]
            if "triton" in VARIANTS and cfg.mosaic is not None:  # the Triton kernel on the same batch
                tcfg = pallas_gpu.default_config(**shapes)  # no kv_dtype: never the Mosaic kernel
                tplan = plan_for(ins, config=tcfg)
                jobs.append(("pallas_triton", pallas_fn(sm, shared_plan=True), q, (*ins[1:], tplan), it))
            if "prior" in VARIANTS:
                prior = prior_decode_config(
                    b, hq, hkv, d, args.page_size, pt.shape[1], jnp.dtype(dtype).itemsize
                )
                jobs.append(("pallas_prior", pallas_fn(sm, prior), q, ins[1:], it))
            baselines = args.baselines.split(",") if args.baselines else []
            if "jax_paged" in baselines:
                k_hm = jnp.transpose(k_pages, (2, 0, 1, 3))
                v_hm = jnp.transpose(v_pages, (2, 0, 1, 3))
                jobs.append(("jax_paged", jax_paged_fn(sm, hkv), q, (k_hm, v_hm, kv_lens, pt), it))
            if "dense" in baselines:
                kd = k_pages[pt].reshape(b, -1, hkv, d)[:, :ctx]
                vd = v_pages[pt].reshape(b, -1, hkv, d)[:, :ctx]
                jobs.append(("xla_dense", dense_decode_fn(sm), q, (kd, vd, kv_lens), it))
            if "reference" in baselines and b * ctx <= args.ref_max_tokens:
                jobs.append(("xla_reference", reference_fn(sm), q, ins[1:], max(2, it // 20)))
            if (shape, b, ctx) in tune_points:
                for tc in decode_tune_configs(cfg, d, jnp.dtype(dtype).itemsize):
                    jobs.append((("tune", tc), pallas_fn(sm, tc), q, ins[1:], it))
            res = measure(jobs, args.threads, args.repeats)
            row = dict(shape=shape, b=b, ctx=ctx, bytes=nbytes, config=dataclasses.asdict(cfg))
            row["pallas_kernel"] = KERNEL_TIMES.pop("pallas", None)
            row["pallas_shared_kernel"] = KERNEL_TIMES.pop("pallas_shared", None)
            row["pallas_prior_kernel"] = KERNEL_TIMES.pop("pallas_prior", None)
            row["pallas_triton_kernel"] = KERNEL_TIMES.pop("pallas_triton", None)
            for k_, v_ in res.items():
                if isinstance(k_, tuple):
                    continue
                row[k_] = v_ if not isinstance(v_, Exception) else short_err(v_)
            tune = {
                k_[1]: v_ for k_, v_ in res.items() if isinstance(k_, tuple) and not isinstance(v_, Exception)
            }
            if tune:
                best = min(tune, key=tune.get)
                row["tune_best"] = dataclasses.asdict(best)
                row["tune_best_s"] = tune[best]
                row["tune_all"] = [
                    (dataclasses.asdict(c), t) for c, t in sorted(tune.items(), key=lambda x: x[1])
                ]
                fails = [
                    short_err(v_)
                    for k_, v_ in res.items()
                    if isinstance(k_, tuple) and isinstance(v_, Exception)
                ]
                row["tune_failures"] = fails[:5]
            results.append(row)
            log(decode_row(row))
            del ins, jobs, res
            if "jax_paged" in baselines:
                del k_hm, v_hm
            if "dense" in baselines:
                del kd, vd
    return results


def decode_tune_configs(cfg: GpuConfig, d, itemsize):
    out = {cfg}
    for pf, bk, ns in itertools.product((False, True), (64, 128, 256), (1, 2, 3)):
        if 2 * bk * d * itemsize * max(ns, 1) > 200 * 1024:
            continue
        c = dataclasses.replace(cfg, block_kv=bk, num_stages=ns, prefetch=pf, heads_fastest=False)
        out.add(c)
        if ns == 2:
            out.add(dataclasses.replace(c, heads_fastest=True))
    for pf, sp in itertools.product((False, True), (1, 2, 4, 8, 16)):
        out.add(dataclasses.replace(cfg, num_splits=sp, prefetch=pf))
    return sorted(out, key=lambda c: dataclasses.astuple(c))


def fmt_t(x):
    return f"{x * 1e6:.1f}" if isinstance(x, float) else "-"


def gbs(nbytes, t):
    return nbytes / t / 1e9 if isinstance(t, float) else float("nan")


def pct(nbytes, t):
    return f"{100 * nbytes / t / HBM_READ_BW:.0f}%" if isinstance(t, float) and t > 0 else "-"


def cfg_str(c, kv_layout="nhd"):
    """rows/block_kv/splits/warps/stages[/hf][/pf][/hN][/la][/spN][/hnd]: the --sweep-configs syntax."""
    c = c if isinstance(c, dict) else dataclasses.asdict(c)
    if c.get("mosaic"):  # the Mosaic GPU decode kernel: mgpu/hHEADS/block_kv/stages/splits[/cCONSUMERS]
        m = c["mosaic"]
        cons = m.get("consumers", 1)
        return (
            f"mgpu/h{m['heads']}/{m['block_kv']}/{m['stages']}/{m['num_splits']}"
            + (f"/c{cons}" if cons > 1 else "")
            + (f"/sp{sp}" if (sp := m.get("split_programs")) else "")
            + (f"/{COPY_SUFFIX[m['copy_only']]}" if m.get("copy_only") else "")
        )
    heads = c.get("kv_heads", 1)
    return (
        f"{c['block_rows']}/{c['block_kv']}/{c['num_splits']}/{c['num_warps']}/{c['num_stages']}"
        f"{'/hf' if c.get('heads_fastest') else ''}{'/pf' if c.get('prefetch') else ''}"
        f"{f'/h{heads}' if heads > 1 else ''}{'/la' if c.get('page_lookahead') else ''}"
        f"{f'/sp{sp}' if (sp := c.get('split_programs')) else ''}"
        f"{'/hnd' if kv_layout == 'hnd' else ''}"
    )


def prior_decode_config(b, hq, hkv, d, page, pages_per_seq, itemsize, num_sms=None):
    """The decode tiling that was the default before kv_heads existed (for comparison columns)."""
    kv_cap = max(16, 65536 // (2 * d * itemsize))
    rows = max(16, pallas_gpu.common.next_pow2(hq // hkv))
    block_kv = min(128, kv_cap // 2)
    block_q = max(1, rows // pallas_gpu.common.next_pow2(hq // hkv))
    num_work = pallas_gpu.common.num_work_items(b, b, block_q)
    max_blocks = pallas_gpu.common.cdiv(pages_per_seq * page, block_kv)
    splits = pallas_gpu.decode_splits(num_work * hkv, max_blocks, num_sms)
    stages = 3 if 3 * 2 * block_kv * d * itemsize + rows * d * itemsize <= 192 * 1024 else 2
    return GpuConfig(rows, block_kv, splits, 4, stages, prefetch=True)


# MosaicConfig.copy_only mode -> its tiling suffix in --sweep-configs
COPY_SUFFIX = {"pages": "copy", "head-pages": "copyh"}


def parse_cfg(spec, *, b, hq, hkv, d, page, pages_per_seq):
    """'rows/block_kv/splits/warps/stages[/hf][/pf][/hN][/la][/spN][/hnd]' -> (GpuConfig, kv_layout); splits
    'a' = decode_splits; spN: splits planned per batch for about N programs (at most ``splits``).
    'mgpu/hHEADS/block_kv/stages/splits[/cCONSUMERS][/spN][/copy]': the Mosaic GPU decode kernel with that
    tiling (Hopper; spN: at most ``splits``, planned per batch as above); /copy, /copyh: its K/V stream alone,
    as the kernel copies or as a head-major pool would (``MosaicConfig.copy_only`` "pages" / "head-pages";
    wrong outputs by design)."""
    parts = spec.split("/")
    if parts[0] == "mgpu":
        heads, bkv, stages, splits = int(parts[1].lstrip("h")), int(parts[2]), int(parts[3]), int(parts[4])
        flags = parts[5:]
        consumers = next((int(f[1:]) for f in flags if f.startswith("c") and f[1:].isdigit()), 1)
        copy_only = next((mode for mode, suffix in COPY_SUFFIX.items() if suffix in flags), "")
        split_programs = next((int(f[2:]) for f in flags if f.startswith("sp") and f[2:].isdigit()), 0)
        mosaic = MosaicConfig(
            heads=heads,
            block_kv=bkv,
            stages=stages,
            num_splits=splits,
            consumers=consumers,
            copy_only=copy_only,
            split_programs=split_programs,
        )
        return GpuConfig(mosaic=mosaic), "nhd"
    rows, bkv, splits, warps, stages = parts[:5]
    flags = parts[5:]
    heads, split_programs = 1, 0
    for f in flags:
        if f.startswith("h") and f[1:].isdigit():
            heads = int(f[1:])
        if f.startswith("sp") and f[2:].isdigit():
            split_programs = int(f[2:])
    if splits == "a":
        block_q = max(1, max(16, int(rows)) // (heads * pallas_gpu.common.next_pow2(hq // hkv)))
        num_work = pallas_gpu.common.num_work_items(b, b, block_q)
        max_blocks = pallas_gpu.common.cdiv(pages_per_seq * page, int(bkv))
        splits = pallas_gpu.decode_splits(num_work * (hkv // heads), max_blocks)
    cfg = GpuConfig(
        block_rows=int(rows),
        block_kv=int(bkv),
        num_splits=int(splits),
        num_warps=int(warps),
        num_stages=int(stages),
        heads_fastest="hf" in flags,
        prefetch="pf" in flags,
        kv_heads=heads,
        page_lookahead="la" in flags,
        split_programs=split_programs,
    )
    return cfg, ("hnd" if "hnd" in flags else "nhd")


SWEEP_POINTS = (
    "1b:32x1024,1b:32x4096,1b:64x2048,1b:128x1024,1b:256x1024,1b:32x8192,"
    "8b:32x1024,8b:32x4096,8b:64x2048,8b:256x1024"
)
# Tilings with 32 KiB of K+V per step and 4 warps (bigger steps or kv_heads 8 spilled registers, 8 warps
# was slower at every point of the first sweep: benchmarks/RESULTS.md, "Kernels").
SWEEP_CONFIGS = {
    64: [
        "16/128/a/4/3/pf",
        "16/128/1/4/3/pf/la",
        "16/128/2/4/3/pf/la",
        "16/32/1/4/2/pf/h4",
        "16/32/2/4/2/pf/h4",
        "16/32/4/4/2/pf/h4",
        "16/32/8/4/2/pf/h4",
        "16/32/1/4/2/pf/h4/la",
        "16/32/2/4/2/pf/h4/la",
        "16/32/4/4/2/pf/h4/la",
        "16/32/8/4/2/pf/h4/la",
        "16/32/4/4/3/pf/h4/la",
        "16/32/4/4/1/pf/h4/la",
        "16/64/2/4/2/pf/h2",
        "16/64/1/4/2/pf/h2/la",
        "16/64/2/4/2/pf/h2/la",
        "16/64/4/4/2/pf/h2/la",
        "16/16/4/4/2/pf/h4/la",
        "16/16/8/4/2/pf/h4/la",
    ],
    128: [
        "16/64/1/4/3/pf",
        "16/64/2/4/3/pf",
        "16/64/1/4/3/pf/la",
        "16/64/2/4/3/pf/la",
        "16/64/4/4/3/pf/la",
        "16/64/1/4/2/pf/la",
        "16/32/1/4/2/pf/h2",
        "16/32/1/4/2/pf/h2/la",
        "16/32/2/4/2/pf/h2/la",
        "16/32/4/4/2/pf/h2/la",
        "16/32/1/4/3/pf/la",
        "16/32/2/4/3/pf/la",
        "16/16/2/4/2/pf/h2/la",
    ],
}


def run_sweep(args):
    """One table per decode point: every tiling of --sweep-configs, whole call (shared plan) and kernel alone.

    The plan is made outside the timed call (as a model sharing one plan per step does); "plan µs" is the
    planning alone, measured once per point with the default tiling.
    """
    dtype = DTYPES[args.dtype]
    key = jax.random.PRNGKey(0)
    results = []
    t_start = time.time()
    for point in args.sweep_points.split(","):
        if args.time_budget and time.time() - t_start > args.time_budget:
            log(f"# sweep: time budget spent, skipping {point} and after")
            break
        shape, bc = point.split(":")
        page = args.page_size
        if "@" in bc:  # "1b:32x1024@32": page size 32 at this point
            bc, page = bc.split("@")
            page = int(page)
        b, ctx = (int(x) for x in bc.split("x"))
        hq, hkv, d = SHAPES[shape]
        sm = 1.0 / math.sqrt(d)
        ins = decode_inputs(key, b, ctx, hq, hkv, d, page, dtype)
        q, pt = ins[0], ins[4]
        nbytes = kv_bytes(b, ctx, hkv, d, dtype)
        it = iters_for(nbytes / 2.0e12 + 4e-6)
        specs = args.sweep_configs.split(",") if args.sweep_configs else SWEEP_CONFIGS[d]
        default = pallas_gpu.config_for(q, ins[1], pt)
        cfgs = {"default": (default, "nhd")}
        for spec in specs:
            if ":" in spec:  # "head_dim:tiling" applies to that head_dim only
                only_d, spec = spec.split(":")
                if int(only_d) != d:
                    continue
            cfgs[spec] = parse_cfg(spec, b=b, hq=hq, hkv=hkv, d=d, page=page, pages_per_seq=pt.shape[1])
        ins_hm = head_major(ins) if any(lay == "hnd" for _, lay in cfgs.values()) else None
        jobs = [("plan", plan_only_fn(), q, ins[1:], it)]
        for spec, (cfg, lay) in cfgs.items():
            ins_ = ins_hm if lay == "hnd" else ins
            fn = pallas_fn(sm, shared_plan=True, kv_layout=lay)
            jobs.append(((spec, cfg), fn, q, (*ins_[1:], plan_for(ins_, cfg, lay)), it))
        # Every tiling's output is checked against XLA dense attention (f32 softmax) on the same K/V.
        kd = ins[1][pt].reshape(b, -1, hkv, d)[:, :ctx]
        vd = ins[2][pt].reshape(b, -1, hkv, d)[:, :ctx]
        want = np.asarray(dense_decode_fn(sm)(q, kd, vd, ins[3]).astype(jnp.float32), np.float64)
        del kd, vd
        global CAPTURE_OUTPUTS
        CAPTURE_OUTPUTS = True
        t0 = time.time()
        res = measure(jobs, args.threads, args.repeats)
        CAPTURE_OUTPUTS = False
        errs = {}
        for k_ in list(OUTPUTS):
            if k_ != "plan":
                errs[k_] = rel_err(np.asarray(OUTPUTS[k_].astype(jnp.float32), np.float64), want)
        OUTPUTS.clear()
        rows = []
        for k_, cfg in [j[0] for j in jobs[1:]]:
            v_ = res[(k_, cfg)]
            kern = KERNEL_TIMES.pop((k_, cfg), None)
            err = errs.get((k_, cfg), float("nan"))
            copy_only = cfg.mosaic is not None and cfg.mosaic.copy_only  # outputs zeros by design
            if isinstance(v_, float) and not err < 2e-2 and not copy_only:
                v_ = RuntimeError(f"wrong result: rel err {err:.2e} vs XLA dense")
            rows.append(
                dict(
                    err=err,
                    spec=k_,
                    config=cfg_str(cfg, cfgs[k_][1]),
                    call=v_ if not isinstance(v_, Exception) else short_err(v_),
                    kernel=kern,
                )
            )
        ok = sorted((r for r in rows if isinstance(r["call"], float)), key=lambda r: r["call"])
        bad = [r for r in rows if not isinstance(r["call"], float)]
        plan_t = res["plan"] if isinstance(res["plan"], float) else float("nan")
        log(
            f"\n### sweep {shape} B={b} ctx={ctx} page={page} ({nbytes / 1e6:.0f} MB KV; plan alone {fmt_t(plan_t)} µs; "
            f"{time.time() - t0:.0f} s)\n| tiling | call µs | % | kernel µs | % | rel err |\n| --- | --- | --- | --- | --- | --- |"
        )
        for r in ok:
            name = r["config"] + (" (default)" if r["spec"] == "default" else "")
            log(
                f"| {name} | {fmt_t(r['call'])} | {pct(nbytes, r['call'])} | {fmt_t(r['kernel'])} | "
                f"{pct(nbytes, r['kernel'])} | {r['err']:.1e} |"
            )
        for r in bad:
            log(f"| {r['config']} | FAIL {r['call'][:150]} | | | | {r['err']:.1e} |")
        results.append(dict(shape=shape, b=b, ctx=ctx, page=page, bytes=nbytes, plan=plan_t, rows=rows))
        if args.json:
            with open(args.json + ".sweep.json", "w") as f:
                json.dump(results, f, indent=1, default=str)
        del ins, ins_hm, jobs, res
    return results


def decode_header():
    return (
        f"| shape | batch | context | KV MB | pallas µs | GB/s | % of {HBM_READ_BW / 1e12:.2f} TB/s | with shared plan µs (%) | "
        "kernel alone µs (%) | prior tiling µs (%) | Triton kernel, shared plan µs (%) | jax paged µs (%) | "
        "XLA dense µs (%) | XLA reference µs | pallas config | best tuned µs (%) config |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    )


def decode_row(r):
    t = r.get("pallas")
    nb = r["bytes"]
    tb = r.get("tune_best_s")
    best = f"{fmt_t(tb)} ({pct(nb, tb)}) {cfg_str(r['tune_best'])}" if tb else "-"

    def tp(x):
        return f"{fmt_t(x)} ({pct(nb, x)})" if isinstance(x, float) else (x if isinstance(x, str) else "-")

    return (
        f"| {r['shape']} | {r['b']} | {r['ctx']} | {nb / 1e6:.1f} | {fmt_t(t)} | {gbs(nb, t):.0f} | {pct(nb, t)} | "
        f"{tp(r.get('pallas_shared'))} | {tp(r.get('pallas_kernel'))} | {tp(r.get('pallas_prior'))} | "
        f"{tp(r.get('pallas_triton'))} | {tp(r.get('jax_paged'))} | "
        f"{tp(r.get('xla_dense'))} | "
        f"{fmt_t(r.get('xla_reference'))} | {cfg_str(r['config'])} | {best} |"
    )


def run_plan_overhead(args):
    """Time the XLA-side work planning alone (jnp.searchsorted method 'scan' vs 'compare_all')."""
    from jaxrt.kernels import _pallas_common as common

    rows = []
    for label, t, s_, bq in (("decode B=256", 256, 256, 4), ("prefill T=8192, 64 seqs", 8192, 64, 16)):
        cu = jnp.asarray(np.r_[0, np.cumsum(np.full(s_, t // s_))].astype(np.int32))
        kvl = jnp.full((s_,), 1024, jnp.int32)
        ns = jnp.array([s_], jnp.int32)
        for method in ("scan", "compare_all"):

            def f(q, cu, kvl, ns, method=method, t=t, bq=bq):
                plan = common.make_plan(
                    num_tokens=t,
                    num_q_heads=32,
                    num_kv_heads=8,
                    block_q=bq,
                    block_kv=128,
                    kv_lens=kvl,
                    cu_q_lens=cu,
                    num_seqs=ns,
                    sliding_window=None,
                    search_method=method,
                )
                return q + (plan.meta.sum() + plan.token_work.sum()).astype(q.dtype)

            q = jnp.zeros((t, 32, 64), jnp.bfloat16)
            res = measure([("plan", f, q, (cu, kvl, ns), 50)], 1, args.repeats)
            rows.append((label, method, res["plan"]))
            log(f"# plan overhead {label}, searchsorted {method}: {fmt_t(res['plan'])} µs/call")
    return rows


# ----------------------------------------------------------------------------------------------------------
# Prefill


def prefill_inputs(key, n_seq, q_len, kv_len, hq, hkv, d, page, dtype, max_num_seqs):
    pps = -(-kv_len // page)
    num_pages = n_seq * pps + 1
    k1, k2, k3 = jax.random.split(key, 3)
    k_pages = jax.random.normal(k1, (num_pages, page, hkv, d), dtype)
    v_pages = jax.random.normal(k2, (num_pages, page, hkv, d), dtype)
    t = n_seq * q_len
    q = jax.random.normal(k3, (t, hq, d), dtype)
    perm = np.random.default_rng(q_len + kv_len).permutation(num_pages)[: n_seq * pps]
    pt = np.zeros((max_num_seqs, pps), np.int32)
    pt[:n_seq] = perm.reshape(n_seq, pps)
    kvl = np.zeros(max_num_seqs, np.int32)
    kvl[:n_seq] = kv_len
    cu = np.zeros(max_num_seqs + 1, np.int32)
    cu[1 : n_seq + 1] = np.arange(1, n_seq + 1) * q_len
    cu[n_seq + 1 :] = t
    return (
        q,
        k_pages,
        v_pages,
        jnp.asarray(kvl),
        jnp.asarray(pt),
        jnp.asarray(cu),
        jnp.array([n_seq], jnp.int32),
    )


def dense_prefill_fn(sm_scale, n_seq, q_len, kv_len, implementation):
    """jax.nn.dot_product_attention over contiguous K/V [n_seq, kv_len, Hkv, D] (bottom-right causal)."""

    def f(q, k, v):
        t, hq, d = q.shape
        qb = q.reshape(n_seq, q_len, hq, d)
        if q_len == kv_len:
            o = jax.nn.dot_product_attention(
                qb, k, v, scale=sm_scale, is_causal=True, implementation=implementation
            )
        else:
            qpos = kv_len - q_len + jnp.arange(q_len)
            mask = jnp.arange(kv_len)[None, :] <= qpos[:, None]
            o = jax.nn.dot_product_attention(
                qb, k, v, scale=sm_scale, mask=mask[None, None], implementation=implementation
            )
        return o.reshape(t, hq, d)

    return f


def fresh_fn(sm_scale):
    """``cudnn_prefill.fresh_attention`` (cuDNN) on a batch of fresh prompts, whatever its size."""

    def f(q, k, v, kvl, pt, cu, ns):
        return cudnn_prefill.fresh_attention(q, k, v, kvl, pt, cu, ns, sm_scale=sm_scale)

    return f


PREFILL_DEFAULT = [(1, 1024, 1024), (1, 2048, 2048), (1, 4096, 4096), (1, 8192, 8192), (4, 2048, 4096)]


def prefill_tune_configs(cfg: GpuConfig, d, itemsize):
    out = {cfg, dataclasses.replace(cfg, heads_fastest=not cfg.heads_fastest)}
    for rows, bk, nw, ns, pf in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3), (False, True)):
        if (2 * bk * d * itemsize) * ns + rows * d * itemsize > 200 * 1024:
            continue
        out.add(
            GpuConfig(block_rows=rows, block_kv=bk, num_splits=1, num_warps=nw, num_stages=ns, prefetch=pf)
        )
    return sorted(out, key=lambda c: dataclasses.astuple(c))


def run_prefill(args, cases, shapes, tune_points=()):
    dtype = DTYPES[args.dtype]
    results = []
    key = jax.random.PRNGKey(1)
    baselines = args.baselines.split(",") if args.baselines else []
    for shape in shapes:
        hq, hkv, d = SHAPES[shape]
        sm = 1.0 / math.sqrt(d)
        for n_seq, q_len, kv_len in cases:
            ins = prefill_inputs(
                key, n_seq, q_len, kv_len, hq, hkv, d, args.page_size, dtype, args.max_num_seqs
            )
            q = ins[0]
            # causal FLOPs actually needed: 2 dots x 2 flops x Hq x D x sum over queries of visible keys
            visible = n_seq * sum(kv_len - q_len + r + 1 for r in range(q_len))
            flops = 4 * hq * d * visible
            est = flops / 300e12 + 1e-5
            it = iters_for(est, budget=0.05, hi=50)
            cfg = pallas_gpu.default_config(
                num_tokens=n_seq * q_len,
                max_num_seqs=args.max_num_seqs,
                num_q_heads=hq,
                num_kv_heads=hkv,
                head_dim=d,
                page_size=args.page_size,
                pages_per_seq=ins[4].shape[1],
                itemsize=jnp.dtype(dtype).itemsize,
            )
            jobs = [("pallas", pallas_fn(sm), q, ins[1:], it)]
            if "prefetch" in VARIANTS:
                jobs.append(
                    ("pallas_pf", pallas_fn(sm, dataclasses.replace(cfg, prefetch=True)), q, ins[1:], it)
                )
            pt = ins[4][:n_seq]
            kd = ins[1][pt].reshape(n_seq, -1, hkv, d)[:, :kv_len]
            vd = ins[2][pt].reshape(n_seq, -1, hkv, d)[:, :kv_len]
            if "dense" in baselines:
                jobs.append(("xla_dense", dense_prefill_fn(sm, n_seq, q_len, kv_len, "xla"), q, (kd, vd), it))
            if "cudnn" in baselines:
                jobs.append(("cudnn", dense_prefill_fn(sm, n_seq, q_len, kv_len, "cudnn"), q, (kd, vd), it))
            if "reference" in baselines:
                jobs.append(("xla_reference", reference_fn(sm), q, ins[1:], 2))
            jobs.append(("pallas_shared", pallas_fn(sm, shared_plan=True), q, (*ins[1:], plan_for(ins)), it))
            if "fresh" in baselines and q_len == kv_len:
                # The fresh-prompt path as a fresh-prompt program runs it: gathers + cuDNN (packed segments;
                # with one sequence also the one-row table's padded form, "fresh1")
                jobs.append(("fresh", fresh_fn(sm), q, ins[1:], it))
                if n_seq == 1:
                    one = (*ins[1:4], ins[4][:1], ins[5][:2], ins[6])
                    jobs.append(("fresh1", fresh_fn(sm), q, one, it))
            if (shape, n_seq, q_len, kv_len) in tune_points:
                for tc in prefill_tune_configs(cfg, d, jnp.dtype(dtype).itemsize):
                    jobs.append((("tune", tc), pallas_fn(sm, tc), q, ins[1:], it))
            res = measure(jobs, args.threads, args.repeats)
            row = dict(
                pallas_kernel=KERNEL_TIMES.pop("pallas", None),
                pallas_pf_kernel=KERNEL_TIMES.pop("pallas_pf", None),
                shape=shape,
                n_seq=n_seq,
                q_len=q_len,
                kv_len=kv_len,
                flops=flops,
                config=dataclasses.asdict(cfg),
            )
            for k_, v_ in res.items():
                if not isinstance(k_, tuple):
                    row[k_] = v_ if not isinstance(v_, Exception) else short_err(v_)
            tune = {
                k_[1]: v_ for k_, v_ in res.items() if isinstance(k_, tuple) and not isinstance(v_, Exception)
            }
            if tune:
                best = min(tune, key=tune.get)
                row["tune_best"] = dataclasses.asdict(best)
                row["tune_best_s"] = tune[best]
                row["tune_all"] = [
                    (dataclasses.asdict(c), t) for c, t in sorted(tune.items(), key=lambda x: x[1])
                ]
            results.append(row)
            log(prefill_row(row))
            del ins, jobs, res, kd, vd
    return results


def prefill_header():
    return (
        "| shape | seqs x q_len (kv_len) | pallas µs | TFLOP/s | pallas kernel only µs | pallas, shared plan µs | "
        "pallas+prefetch µs | XLA dense µs | cuDNN µs | fresh path µs | fresh, one-row table µs | "
        "XLA reference µs | pallas / XLA dense time | pallas config | best tuned µs config |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    )


def prefill_row(r):
    t = r.get("pallas")
    xd = r.get("xla_dense")
    ratio = f"{t / xd:.2f}" if isinstance(t, float) and isinstance(xd, float) else "-"
    tf = r["flops"] / t / 1e12 if isinstance(t, float) else float("nan")
    tb = r.get("tune_best_s")
    best = f"{fmt_t(tb)} {cfg_str(r['tune_best'])}" if tb else "-"
    return (
        f"| {r['shape']} | {r['n_seq']} x {r['q_len']} ({r['kv_len']}) | {fmt_t(t)} | {tf:.0f} | "
        f"{fmt_t(r.get('pallas_kernel'))} | {fmt_t(r.get('pallas_shared'))} | {fmt_t(r.get('pallas_pf'))} | "
        f"{fmt_t(xd)} | {fmt_t(r.get('cudnn'))} | {fmt_t(r.get('fresh'))} | {fmt_t(r.get('fresh1'))} | "
        f"{fmt_t(r.get('xla_reference'))} | "
        f"{ratio} | {cfg_str(r['config'])} | {best} |"
    )


# ----------------------------------------------------------------------------------------------------------
# --smoke (CPU interpret)


def run_smoke(args):
    rows, n_fail = run_check(args, interpret=True)
    # Tiny timing table in interpret mode (meaningless as performance; exercises the timing path).
    rng = np.random.default_rng(1)
    b = make_batch(
        rng,
        [1, 1, 1, 1],
        [5, 17, 33, 8],
        num_q_heads=4,
        num_kv_heads=2,
        head_dim=64,
        page_size=16,
        poison=False,
    )
    jargs = [jnp.asarray(x) for x in b.args()]
    fn = lambda *a: pallas_gpu.ragged_paged_attention_gpu(*a, sm_scale=0.125, interpret=True)  # noqa: E731
    t = time_loop(fn, jargs[0], jargs[1:], iters=2, repeats=2)
    log(f"# smoke timing (interpret mode, not a performance number): {t * 1e3:.1f} ms/call")
    return n_fail


def parse_grid(s):
    out = []
    for item in s.split(","):
        b, c = item.split("x")
        out.append((int(b), int(c)))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU interpret-mode self test (tiny)")
    p.add_argument("--check", action="store_true")
    p.add_argument("--check-kinds", default="mixed,decode", help="--check: batch kinds to run")
    p.add_argument("--check-sample", type=int, default=1, help="--check: run every N-th configuration")
    p.add_argument("--tune", action="store_true")
    p.add_argument("--decode", action="store_true")
    p.add_argument("--prefill", action="store_true")
    p.add_argument(
        "--sweep", action="store_true", help="GPU: time a list of tilings at a list of decode points"
    )
    p.add_argument("--sweep-points", default=SWEEP_POINTS, help="shape:batchxcontext,...")
    p.add_argument(
        "--sweep-configs",
        default=None,
        help="rows/block_kv/splits|a/warps/stages[/hf][/pf][/hN][/la][/spN],... or mgpu/...[/copy|/copyh]",
    )
    p.add_argument(
        "--time-budget", type=float, default=0, help="--sweep: skip points after this many seconds"
    )
    p.add_argument("--shapes", default="1b,8b")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--decode-grid", default=None, help="e.g. 1x512,32x1024 (batch x context)")
    p.add_argument(
        "--prefill-cases", default=None, help="e.g. 1x1024x1024,4x2048x4096 (seqs x q_len x kv_len)"
    )
    p.add_argument("--max-num-seqs", type=int, default=64, help="max_num_seqs of prefill batches")
    p.add_argument("--baselines", default="jax_paged,dense,reference,cudnn")
    p.add_argument("--ref-max-tokens", type=int, default=2**19)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=min(16, os.cpu_count() or 1))
    p.add_argument("--json", default=None, help="write all results here")
    p.add_argument(
        "--interpret", action="store_true", help="run the GPU modes in interpret mode (CPU dry run)"
    )
    p.add_argument("--timer", default="cupti", choices=("cupti", "wall"))
    p.add_argument(
        "--l2",
        default="cold",
        choices=("cold", "warm"),
        help="cold (default): read 128 MiB before each timed call (CUPTI timer), so that the call finds its "
        "K/V, page table and plan in HBM, as a model's layer does; warm: back-to-back calls (inputs of up to "
        "~50 MB stay in L2: the tables before 2026-11-28)",
    )
    p.add_argument(
        "--variants",
        default="default",
        help="default[,prefetch|heads][,prior]: extra tilings to check (prefetch, heads) / measure (prior)",
    )
    args = p.parse_args(argv)
    global INTERPRET, TIMER, VARIANTS, COLD_L2, HBM_READ_BW
    VARIANTS = tuple(args.variants.split(","))
    INTERPRET = args.interpret
    TIMER = "wall" if args.interpret or args.smoke else args.timer
    COLD_L2 = args.l2 == "cold"

    if args.smoke:
        args.threads = 1
        return 1 if run_smoke(args) else 0
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import read_bandwidth

    HBM_READ_BW = read_bandwidth()
    log(
        f"# jax {jax.__version__}, devices {jax.devices()}, backend {jax.default_backend()}, read bandwidth "
        f"{HBM_READ_BW / 1e12:.3f} TB/s"
    )
    out = {"jax": jax.__version__, "device": str(jax.devices()[0]), "argv": sys.argv, "read_bw": HBM_READ_BW}
    status = 0
    shapes = args.shapes.split(",")
    if args.check:
        rows, n_fail = run_check(args)
        out["check"] = rows
        status |= n_fail > 0
    grid = parse_grid(args.decode_grid) if args.decode_grid else DECODE_DEFAULT_GRID
    pcases = (
        [tuple(int(x) for x in c.split("x")) for c in args.prefill_cases.split(",")]
        if args.prefill_cases
        else PREFILL_DEFAULT
    )
    if args.tune:
        out["plan_overhead"] = run_plan_overhead(args)
        dpts = [
            ("1b", 32, 1024),
            ("1b", 256, 1024),
            ("1b", 1, 32768),
            ("8b", 64, 4096),
            ("8b", 8, 16384),
            ("8b", 32, 4096),
        ]
        log("\n## decode tuning\n" + decode_header())
        out["decode_tune"] = run_decode(
            args, sorted({(b, c) for _, b, c in dpts}), shapes, tune_points={(s, b, c) for s, b, c in dpts}
        )
        ppts = [(s, 1, 4096, 4096) for s in shapes]
        log("\n## prefill tuning\n" + prefill_header())
        out["prefill_tune"] = run_prefill(args, [(1, 4096, 4096)], shapes, tune_points=set(ppts))
    if args.sweep:
        out["sweep"] = run_sweep(args)
    if args.decode:
        log("\n## decode\n" + decode_header())
        out["decode"] = run_decode(args, grid, shapes)
    if args.prefill:
        log("\n## prefill\n" + prefill_header())
        out["prefill"] = run_prefill(args, pcases, shapes)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
    return status


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        traceback.print_exc()
        sys.exit(2)
