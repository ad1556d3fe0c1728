"""Ragged paged attention for TPUs: a Pallas Mosaic TPU kernel (BlockSpec + scalar prefetch).

Correctness-first design, validated only in Pallas interpret mode (no TPU was available):

- The batch is split into the same work items as the GPU kernel (``_pallas_common``): up to ``block_q``
  query tokens of one sequence, all q heads, as a ``[Hkv, block_q * group_pad, D]`` query tile.
- Grid ``(work item, kv step)``; the per-work-item metadata and the flattened page table are scalar-prefetched
  into SMEM, and the K/V BlockSpecs' index maps look the page ids up there, so the Pallas pipeline DMAs
  ``pages_per_step`` whole pages ``[page_size, Hkv, D]`` (all kv heads: the token-major page is contiguous)
  per step. Steps past the work item's last needed block (causal end / kv_len) repeat the previous block
  index, so no DMA is issued, and skip the compute.
- Online softmax state lives in VMEM scratch across the ``arbitrary`` kv axis; the output is normalised and
  written at the last step.

No manual DMA or semaphores, and never compiled for or run on a TPU: Mosaic tiling / VMEM limits are
unchecked. Not tuned: every work item walks all ``pages_per_seq / pages_per_step`` grid steps (steps past
its end do no DMA and no math, but still cost a step), each step DMAs ``pages_per_step`` separate pages, and
heads are a static loop of small dots. A production TPU kernel (jax's / tpu-inference's RPA) batches page
DMAs by hand with double buffering and skips finished sequences.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxrt.kernels import _pallas_common as common
from jaxrt.kernels.attention import register_backend
from jaxrt.kernels.reference import MASK_VALUE

_KV_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))


@dataclasses.dataclass(frozen=True)
class TpuConfig:
    """block_rows: target query-tile rows (block_q x padded GQA group); pages_per_step: pages per grid step."""

    block_rows: int = 128
    pages_per_step: int = 0  # 0 = enough pages for 128 kv tokens


def default_config(*, num_tokens: int, max_num_seqs: int) -> TpuConfig:
    """Small query tiles for decode-shaped batches (no more tokens than sequences), 128 rows otherwise."""
    return TpuConfig(block_rows=8 if num_tokens <= max_num_seqs else 128)


def supports(q_shape, k_shape, kv_dtype) -> str | None:
    _, _, head_dim = q_shape
    _, page_size, _, _ = k_shape
    if jnp.dtype(kv_dtype) not in _KV_DTYPES:
        return f"kv dtype {kv_dtype} not supported"
    if page_size % 8:
        return f"page_size {page_size} is not a multiple of 8"
    del head_dim
    return None


def _kernel(
    meta_ref,  # SMEM [num_work * META_COLS]
    pt_ref,  # SMEM [max_num_seqs * pages_per_seq]
    q_ref,  # [Hkv, rows, D]
    *refs,
    sm_scale: float,
    soft_cap: float | None,
    sliding_window: int | None,
    page_size: int,
    pages_per_step: int,
    group_pad: int,
    num_steps: int,
    precision,
):
    k_refs = refs[:pages_per_step]
    v_refs = refs[pages_per_step : 2 * pages_per_step]
    o_ref, m_sc, l_sc, acc_sc = refs[2 * pages_per_step :]
    num_kv_heads, rows, _ = q_ref.shape
    block_kv = pages_per_step * page_size
    w = pl.program_id(0)
    j = pl.program_id(1)
    base = w * common.META_COLS
    first_pos = meta_ref[base + common.META_FIRST_POS]
    kv_len = meta_ref[base + common.META_KV_LEN]
    lo_blk = meta_ref[base + common.META_LO_BLK]
    hi_blk = meta_ref[base + common.META_HI_BLK]
    b = lo_blk + j

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(b < hi_blk)
    def _compute():
        q_pos = first_pos + lax.broadcasted_iota(jnp.int32, (rows, page_size), 0) // group_pad
        for pi in range(pages_per_step):
            k_pos = b * block_kv + pi * page_size + lax.broadcasted_iota(jnp.int32, (rows, page_size), 1)
            mask = (k_pos <= q_pos) & (k_pos < kv_len)
            if sliding_window is not None:
                mask = mask & (k_pos > q_pos - sliding_window)
            v_ok = (
                b * block_kv + pi * page_size + lax.broadcasted_iota(jnp.int32, (page_size, 1), 0)
            ) < kv_len
            for h in range(num_kv_heads):
                q = q_ref[h]
                k = k_refs[pi][:, h, :]
                v = v_refs[pi][:, h, :]
                s = lax.dot_general(
                    q, k, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
                )
                s = s * sm_scale
                if soft_cap is not None:
                    s = soft_cap * jnp.tanh(s / soft_cap)
                s = jnp.where(mask, s, MASK_VALUE)
                m_prev = m_sc[h]
                m_next = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
                alpha = jnp.exp(m_prev - m_next)
                p = jnp.where(mask, jnp.exp(s - m_next), 0.0)
                l_sc[h] = alpha * l_sc[h] + p.sum(axis=1, keepdims=True)
                v = jnp.where(v_ok, v, jnp.zeros_like(v))
                pv = lax.dot_general(
                    p.astype(v.dtype),
                    v,
                    (((1,), (0,)), ((), ())),
                    precision=precision,
                    preferred_element_type=jnp.float32,
                )
                acc_sc[h] = alpha * acc_sc[h] + pv
                m_sc[h] = m_next

    @pl.when(j == num_steps - 1)
    def _finish():
        l = l_sc[...]
        o_ref[...] = (acc_sc[...] / jnp.where(l == 0.0, 1.0, l)).astype(o_ref.dtype)


def ragged_paged_attention_tpu(
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
    config: TpuConfig | None = None,
) -> jax.Array:
    """The "pallas_tpu" backend (signature of the reference plus ``interpret`` and an optional ``config``).

    ``ragged_paged_attention`` sends calls ``supports`` refuses to the reference before they get here.
    """
    reason = supports(q.shape, k_pages.shape, k_pages.dtype)
    if reason is not None:
        raise ValueError(f"pallas_tpu cannot run this call: {reason}")
    return _tpu_call(
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
        config=config or default_config(num_tokens=q.shape[0], max_num_seqs=kv_lens.shape[0]),
    )


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap", "interpret", "config"))
def _tpu_call(
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
    config: TpuConfig,
):
    num_tokens, num_q_heads, head_dim = q.shape
    num_pages, page_size, num_kv_heads, _ = k_pages.shape
    max_num_seqs, pages_per_seq = page_indices.shape
    group_pad = common.next_pow2(num_q_heads // num_kv_heads)
    rows = max(8, common.next_pow2(config.block_rows), group_pad)
    block_q = rows // group_pad
    pages_per_step = config.pages_per_step or max(1, 128 // page_size)
    pages_per_step = max(1, min(pages_per_step, pages_per_seq))
    block_kv = pages_per_step * page_size
    num_steps = common.cdiv(pages_per_seq, pages_per_step)

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
    q_tiles = common.gather_q(q, plan, num_kv_heads, k_pages.dtype)  # [W, Hkv, rows, D]
    meta_flat = plan.meta.reshape(-1)
    pt_flat = jnp.clip(page_indices, 0, num_pages - 1).reshape(-1)

    def kv_index_map(pi):
        def index_map(w, j, meta, pt):
            base = w * common.META_COLS
            seq = meta[base + common.META_SEQ]
            lo_blk = meta[base + common.META_LO_BLK]
            hi_blk = meta[base + common.META_HI_BLK]
            # Past the last needed block keep the previous index: the pipeline then skips the copy.
            blk = lo_blk + jnp.minimum(j, jnp.maximum(hi_blk - lo_blk - 1, 0))
            col = jnp.minimum(blk * pages_per_step + pi, pages_per_seq - 1)
            return (pt[seq * pages_per_seq + col], 0, 0, 0)

        return index_map

    kv_spec = [
        pl.BlockSpec((None, page_size, num_kv_heads, head_dim), kv_index_map(pi))
        for pi in range(pages_per_step)
    ]
    tile_spec = pl.BlockSpec((None, num_kv_heads, rows, head_dim), lambda w, j, meta, pt: (w, 0, 0, 0))
    precision = lax.Precision.HIGHEST if jnp.dtype(k_pages.dtype) == jnp.float32 else None
    kernel = functools.partial(
        _kernel,
        sm_scale=sm_scale,
        soft_cap=soft_cap,
        sliding_window=sliding_window,
        page_size=page_size,
        pages_per_step=pages_per_step,
        group_pad=group_pad,
        num_steps=num_steps,
        precision=precision,
    )
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(plan.num_work, num_steps),
        in_specs=[tile_spec, *kv_spec, *kv_spec],
        out_specs=tile_spec,
        scratch_shapes=[
            pltpu.VMEM((num_kv_heads, rows, 1), jnp.float32),
            pltpu.VMEM((num_kv_heads, rows, 1), jnp.float32),
            pltpu.VMEM((num_kv_heads, rows, head_dim), jnp.float32),
        ],
    )
    out = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((plan.num_work, num_kv_heads, rows, head_dim), q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=(pltpu.PARALLEL, pltpu.ARBITRARY)),
        interpret=interpret,
        name="jaxrt_rpa_tpu",
    )(meta_flat, pt_flat, q_tiles, *([k_pages] * pages_per_step), *([v_pages] * pages_per_step))
    return common.scatter_out(out, plan, num_q_heads, q.dtype)


def _supports(q, k_pages) -> str | None:
    return supports(q.shape, k_pages.shape, k_pages.dtype)


# Opt-in (attention_backend="pallas_tpu") until it has run on TPU hardware; "auto" on TPU uses the reference.
register_backend("pallas_tpu", ragged_paged_attention_tpu, platforms=(), supports=_supports)
