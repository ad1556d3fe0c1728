"""Ragged paged attention for NVIDIA GPUs: a Pallas kernel lowered through Triton.

One ``pallas_call`` serves a mixed batch of prefill chunks and decodes. The grid is
``(work item, kv head, kv split)`` (see ``_pallas_common``): a work item is a block of up to ``block_q``
query tokens of one sequence, and its ``block_q * group_pad`` query rows (tokens x the q heads sharing
the kv head) form the M dimension of both dots, so K/V pages are read once per kv head. Each program
walks the sequence's page table ``block_kv`` tokens at a time (an online softmax in base 2), gathering
whole pages straight from the token-major pool, and stops at the last block its causal / sliding-window
range needs. For decode batches that would not fill the GPU the kv range is also split across programs
("flash decoding"); the splits are merged in XLA.

Triton constraints honoured here (interpret mode does not check them): grid of 3 dims, no scalar prefetch
(metadata travels as ordinary int32 inputs), power-of-two load shapes, 2-D dots with M, N, K >= 16.
Shapes the kernel cannot take (head_dim or page_size not a power of two, head_dim < 16, a page larger
than ``block_kv`` cap, unsupported dtypes) fall back to the reference implementation.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jaxrt.kernels import _pallas_common as common
from jaxrt.kernels.attention import register_backend
from jaxrt.kernels.reference import MASK_VALUE, ragged_paged_attention_reference

LOG2E = math.log2(math.e)
_KV_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
_DEFAULT_NUM_SMS = 132  # H100 SXM


@dataclasses.dataclass(frozen=True)
class GpuConfig:
    """Static tiling of the GPU kernel.

    block_rows: target rows of the query tile (query tokens x padded GQA group), a power of two >= 16.
    block_kv: kv tokens per inner step, a power of two and a multiple of page_size (raised to page_size).
    num_splits: kv splits per work item (1 = no split-K).
    """

    block_rows: int = 16
    block_kv: int = 128
    num_splits: int = 1
    num_warps: int = 4
    num_stages: int = 2


def supports(q_shape, k_shape, kv_dtype) -> str | None:
    """None if the kernel takes these shapes, else the reason it falls back to the reference."""
    _, num_q_heads, head_dim = q_shape
    _, page_size, num_kv_heads, _ = k_shape
    if not common.is_pow2(head_dim) or head_dim < 16:
        return f"head_dim {head_dim} is not a power of two >= 16"
    if not common.is_pow2(page_size):
        return f"page_size {page_size} is not a power of two"
    if page_size > 256:
        return f"page_size {page_size} > 256"
    if jnp.dtype(kv_dtype) not in _KV_DTYPES:
        return f"kv dtype {kv_dtype} not supported"
    return None


def _num_sms() -> int:
    try:
        dev = jax.devices()[0]
        if dev.platform == "gpu":
            return int(getattr(dev, "core_count", _DEFAULT_NUM_SMS) or _DEFAULT_NUM_SMS)
    except Exception:  # pragma: no cover - no backend
        pass
    return _DEFAULT_NUM_SMS


def default_config(
    *,
    num_tokens: int,
    max_num_seqs: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    pages_per_seq: int,
    num_sms: int | None = None,
) -> GpuConfig:
    """Heuristic tiling from static shapes.

    A batch with no more tokens than sequences is treated as decode (small query tiles, split-K when the
    grid would not fill the GPU); anything else as prefill / mixed (large query tiles, no split).
    """
    group_pad = common.next_pow2(num_q_heads // num_kv_heads)
    if num_tokens <= max_num_seqs:
        rows = max(16, group_pad)
        block_kv = max(page_size, 128 if head_dim <= 128 else 64)
        block_q = max(1, rows // group_pad)
        num_work = common.num_work_items(num_tokens, max_num_seqs, block_q)
        programs = num_work * num_kv_heads
        max_blocks = common.cdiv(pages_per_seq * page_size, block_kv)
        target = 2 * (num_sms or _num_sms())
        splits = 1
        while programs * splits < target and splits * 2 <= min(16, max_blocks):
            splits *= 2
        return GpuConfig(block_rows=rows, block_kv=block_kv, num_splits=splits, num_warps=4, num_stages=3)
    rows = max(64 if head_dim > 128 else 128, group_pad)
    block_kv = max(page_size, 64 if head_dim <= 128 else 32)
    return GpuConfig(
        block_rows=rows, block_kv=block_kv, num_splits=1, num_warps=8 if rows >= 128 else 4, num_stages=2
    )


def _kernel(
    meta_ref,
    q_ref,
    k_ref,
    v_ref,
    pt_ref,
    *out_refs,
    sm_scale: float,
    soft_cap: float | None,
    sliding_window: int | None,
    block_kv: int,
    page_size: int,
    group_pad: int,
    num_pages: int,
    num_splits: int,
    precision,
):
    rows, head_dim = q_ref.shape
    pages_per_blk = block_kv // page_size
    pt_cols = pt_ref.shape[1]
    seq = meta_ref[common.META_SEQ]
    first_pos = meta_ref[common.META_FIRST_POS]
    kv_len = meta_ref[common.META_KV_LEN]
    lo_blk = meta_ref[common.META_LO_BLK]
    hi_blk = meta_ref[common.META_HI_BLK]
    if num_splits > 1:
        per = (hi_blk - lo_blk + num_splits - 1) // num_splits
        b0 = lo_blk + pl.program_id(2) * per
        b1 = jnp.minimum(hi_blk, b0 + per)
    else:
        b0, b1 = lo_blk, hi_blk

    q = q_ref[...]
    q_pos = first_pos + lax.div(lax.broadcasted_iota(jnp.int32, (rows,), 0), group_pad)
    # Scores are kept in base 2: s2 = log2(e) * s.
    if soft_cap is None:
        s_scale = sm_scale * LOG2E
    else:
        s_scale = sm_scale / soft_cap

    def body(i, carry):
        m_prev, l_prev, acc_prev = carry
        b = b0 + i
        start = jnp.minimum(b * pages_per_blk, pt_cols - pages_per_blk)
        pages = pt_ref[seq, pl.ds(start, pages_per_blk)]
        pages = jnp.clip(pages, 0, num_pages - 1)
        k = k_ref[pages].reshape(block_kv, head_dim)
        v = v_ref[pages].reshape(block_kv, head_dim)
        s = lax.dot_general(
            q, k, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
        )
        s = s * s_scale
        if soft_cap is not None:
            s = jnp.tanh(s) * (soft_cap * LOG2E)
        k_pos = b * block_kv + lax.broadcasted_iota(jnp.int32, (block_kv,), 0)
        mask = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] < kv_len)
        if sliding_window is not None:
            mask = mask & (k_pos[None, :] > q_pos[:, None] - sliding_window)
        s = jnp.where(mask, s, MASK_VALUE)
        m_next = jnp.maximum(m_prev, s.max(axis=1))
        alpha = jnp.exp2(m_prev - m_next)
        p = jnp.where(mask, jnp.exp2(s - m_next[:, None]), 0.0)
        l_next = alpha * l_prev + p.sum(axis=1)
        # Slots past kv_len may hold anything (stale or never-written pages): keep them out of p @ v.
        v = jnp.where((k_pos < kv_len)[:, None], v, jnp.zeros_like(v))
        pv = lax.dot_general(
            p.astype(v.dtype),
            v,
            (((1,), (0,)), ((), ())),
            precision=precision,
            preferred_element_type=jnp.float32,
        )
        return m_next, l_next, alpha[:, None] * acc_prev + pv

    init = (
        jnp.full((rows,), MASK_VALUE, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
        jnp.zeros((rows, head_dim), jnp.float32),
    )
    m, l, acc = lax.fori_loop(0, jnp.maximum(b1 - b0, 0), body, init)
    if num_splits == 1:
        (o_ref,) = out_refs
        o_ref[...] = (acc / jnp.where(l == 0.0, 1.0, l)[:, None]).astype(o_ref.dtype)
    else:
        acc_ref, m_ref, l_ref = out_refs
        acc_ref[...] = acc
        m_ref[...] = m
        l_ref[...] = l


def ragged_paged_attention_gpu(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    kv_lens: jax.Array,
    page_indices: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    interpret=False,
    config: GpuConfig | None = None,
) -> jax.Array:
    """The "pallas_gpu" backend (signature of the reference plus ``interpret`` and an optional ``config``)."""
    reason = supports(q.shape, k_pages.shape, k_pages.dtype)
    if reason is not None:
        return ragged_paged_attention_reference(
            q,
            k_pages,
            v_pages,
            kv_lens,
            page_indices,
            cu_q_lens,
            num_seqs,
            sm_scale=sm_scale,
            sliding_window=sliding_window,
            soft_cap=soft_cap,
        )
    num_tokens, num_q_heads, head_dim = q.shape
    num_pages, page_size, num_kv_heads, _ = k_pages.shape
    max_num_seqs, pages_per_seq = page_indices.shape
    if config is None:
        config = default_config(
            num_tokens=num_tokens,
            max_num_seqs=max_num_seqs,
            num_q_heads=num_q_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            page_size=page_size,
            pages_per_seq=pages_per_seq,
        )
    return _gpu_call(
        q,
        k_pages,
        v_pages,
        kv_lens,
        page_indices,
        cu_q_lens,
        num_seqs,
        sm_scale=float(sm_scale),
        sliding_window=None if sliding_window is None else int(sliding_window),
        soft_cap=None if soft_cap is None else float(soft_cap),
        interpret=interpret,
        config=config,
    )


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap", "interpret", "config"))
def _gpu_call(
    q,
    k_pages,
    v_pages,
    kv_lens,
    page_indices,
    cu_q_lens,
    num_seqs,
    *,
    sm_scale,
    sliding_window,
    soft_cap,
    interpret,
    config: GpuConfig,
):
    num_tokens, num_q_heads, head_dim = q.shape
    num_pages, page_size, num_kv_heads, _ = k_pages.shape
    max_num_seqs, pages_per_seq = page_indices.shape
    group_pad = common.next_pow2(num_q_heads // num_kv_heads)
    rows = max(16, common.next_pow2(config.block_rows), group_pad)
    block_q = rows // group_pad
    block_kv = max(common.next_pow2(config.block_kv), page_size, 16)
    pages_per_blk = block_kv // page_size
    num_splits = max(1, int(config.num_splits))

    plan = common.make_plan(
        num_tokens=num_tokens,
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        block_q=block_q,
        block_kv=block_kv,
        kv_lens=kv_lens,
        cu_q_lens=cu_q_lens,
        num_seqs=num_seqs,
        sliding_window=sliding_window,
    )
    kv_dtype = k_pages.dtype
    q_tiles = common.gather_q(q, plan, num_kv_heads, kv_dtype)  # [W, Hkv, rows, D]
    pt_cols = common.cdiv(pages_per_seq, pages_per_blk) * pages_per_blk
    pt = page_indices
    if pt_cols != pages_per_seq:
        pt = jnp.pad(pt, ((0, 0), (0, pt_cols - pages_per_seq)))

    if jnp.dtype(kv_dtype) == jnp.float32:
        # Triton's default for f32 dots is TF32; TF32x3 keeps ~f32 accuracy on the tensor cores.
        precision = lax.Precision.HIGHEST if interpret else lax.DotAlgorithmPreset.TF32_TF32_F32_X3
    else:
        precision = None
    kernel = functools.partial(
        _kernel,
        sm_scale=sm_scale,
        soft_cap=soft_cap,
        sliding_window=sliding_window,
        block_kv=block_kv,
        page_size=page_size,
        group_pad=group_pad,
        num_pages=num_pages,
        num_splits=num_splits,
        precision=precision,
    )
    num_work = plan.num_work
    grid = (num_work, num_kv_heads, num_splits)
    in_specs = [
        pl.BlockSpec((None, common.META_COLS), lambda w, h, s: (w, 0)),
        pl.BlockSpec((None, None, rows, head_dim), lambda w, h, s: (w, h, 0, 0)),
        pl.BlockSpec((num_pages, page_size, None, head_dim), lambda w, h, s: (0, 0, h, 0)),
        pl.BlockSpec((num_pages, page_size, None, head_dim), lambda w, h, s: (0, 0, h, 0)),
        pl.BlockSpec((max_num_seqs, pt_cols), lambda w, h, s: (0, 0)),
    ]
    if num_splits == 1:
        out_specs = pl.BlockSpec((None, None, rows, head_dim), lambda w, h, s: (w, h, 0, 0))
        out_shape = jax.ShapeDtypeStruct((num_work, num_kv_heads, rows, head_dim), q.dtype)
    else:
        out_specs = [
            pl.BlockSpec((None, None, None, rows, head_dim), lambda w, h, s: (s, w, h, 0, 0)),
            pl.BlockSpec((None, None, None, rows), lambda w, h, s: (s, w, h, 0)),
            pl.BlockSpec((None, None, None, rows), lambda w, h, s: (s, w, h, 0)),
        ]
        out_shape = [
            jax.ShapeDtypeStruct((num_splits, num_work, num_kv_heads, rows, head_dim), jnp.float32),
            jax.ShapeDtypeStruct((num_splits, num_work, num_kv_heads, rows), jnp.float32),
            jax.ShapeDtypeStruct((num_splits, num_work, num_kv_heads, rows), jnp.float32),
        ]
    out = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=pltriton.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name=f"jaxrt_rpa_r{rows}_kv{block_kv}_s{num_splits}",
    )(plan.meta, q_tiles, k_pages, v_pages, pt)
    if num_splits == 1:
        return common.scatter_out(out, plan, num_q_heads, q.dtype)
    acc, m, l = out
    return common.merge_splits(acc, m, l, plan, num_q_heads, q.dtype)


def _backend(
    q,
    k_pages,
    v_pages,
    kv_lens,
    page_indices,
    cu_q_lens,
    num_seqs,
    *,
    sm_scale,
    sliding_window=None,
    soft_cap=None,
    interpret=False,
):
    return ragged_paged_attention_gpu(
        q,
        k_pages,
        v_pages,
        kv_lens,
        page_indices,
        cu_q_lens,
        num_seqs,
        sm_scale=sm_scale,
        sliding_window=sliding_window,
        soft_cap=soft_cap,
        interpret=interpret,
    )


# Preferred on GPU only once every configuration has passed on an H100 (see benchmarks/RESULTS.md).
register_backend("pallas_gpu", _backend, platforms=())
