"""Paged decode attention for Hopper GPUs: a Pallas kernel lowered through Mosaic GPU (TMA + wgmma).

The Triton-lowered kernel (``pallas_gpu``) moves K/V through registers with one block of software prefetch
and levels off at 83-87% of HBM bandwidth on an H100. This kernel moves K/V with the Tensor Memory
Accelerator into a ring of shared-memory stages, so several blocks per program are in flight with no
registers held, and computes on the tensor cores (wgmma): 87-95% at batch >= 64 and context >= 1k on an
H100, timed with the L2 cache cold as in a model (82% for the 1B head shape at batch 64 and context 1k;
benchmarks/RESULTS.md, "Kernels").

Work: every query token is one work item (``_pallas_common.make_plan`` with ``block_q=1``), so any ragged
batch is served, but each token reads its whole kv prefix: the kernel is meant for decode batches, where
``pallas_gpu`` sends it (``mosaic_decode_config``). An item is (token, group of ``heads`` adjacent kv
heads, kv split).

Programs are persistent: about one per SM (as many as fit its shared memory), each taking items
``c, c + num_programs, ...``. Two warpgroups per program (three with ``consumers=2``, see
``MosaicConfig``):

- the producer walks the program's items and, per ``block_kv`` tokens, issues one TMA copy per page and
  per K/V of the ``[page_size, heads * head_dim]`` slab (page ids read from the page table in global
  memory) into stage ``step % stages`` of the ring, waiting for the consumer to free a stage before
  refilling it. It also loads each item's query tile (two buffers), so the next item's pages and queries
  are in flight while the consumer finishes the current one: no per-item start-up gap.
- the consumer computes ``S = Q @ K^T`` with a 64-row query tile (wgmma's M), an online softmax in base 2,
  and ``O += P @ V``; at the end of an item it normalises and stores the item's rows straight into the
  ``[T, Hq, D]`` output (untiled staging, one block per kv head).

The query tile is block-diagonal. For kv head ``j`` of the item the 8-row aligned slab of q rows holding
its q heads is copied to rows ``[j * slab, (j + 1) * slab)`` and columns ``[j * head_dim, ...)``; the
other columns of those rows stay zero, so one product over ``heads * head_dim`` columns gives each row the
scores of its own kv head. Rows of a slab that belong to another kv head, and rows past the slabs, give
results that are never stored (``_tile_rows``).

Pages of a block that lie wholly past a sequence's length are not copied (``predicate``); slots past the
length inside its last page are read but masked. Either way the stage rows past the length hold something
(older data, anything): the consumer masks them out of the scores and zeroes those V rows before ``P @ V``,
so not even a NaN there can reach the output through ``0 * NaN``. With ``num_splits > 1`` each split writes its normalised rows and (max, sum) and XLA merges
them (flash decoding).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxrt.kernels import _pallas_common as common

try:  # Mosaic GPU is part of jax; import lazily-failing so CPU-only installs still import this module.
    from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # pragma: no cover
    plgpu = None

LOG2E = math.log2(math.e)
_MASK = -1e30  # finite: an empty split's (m, l) = (_MASK, 0) merges to zero weight without NaN
ROWS = 64  # wgmma M


COPY_ONLY_MODES = ("", "pages", "head-pages")  # MosaicConfig.copy_only


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
    """Static tiling of the Mosaic GPU decode kernel.

    heads: kv heads per program (their K/V rows are ``heads * head_dim`` contiguous elements of a token;
      ``heads * head_dim <= 256`` and ``heads * group <= 64``).
    block_kv: kv tokens per stage (a multiple of 64 and of the page size).
    stages: shared-memory ring depth (blocks in flight per program).
    num_splits: kv splits per work item (flash decoding; merged in XLA).
    split_programs: 0: every work item takes ``num_splits``. > 0: ``num_splits`` is the most an item takes;
      the plan gives each item its own count from the batch's kv lengths (``pallas_gpu.plan_splits``, the
      Triton path's rule, aiming at about this many programs' worth of splits) and splits past an item's
      count read nothing (they merge with zero weight), so one static tiling suits a bucket whose
      sequences may be short or long.
    consumers: compute warpgroups per program (1 or 2). With 2, consumer ``c`` takes the blocks the producer
      issues at steps ``c, c + 2, ...`` (so each stage of the ring has one owner: ``stages`` must be even),
      and at the end of an item consumer 1 hands its (acc, m, l) to consumer 0 through shared memory, which
      merges and stores. It halves each consumer's wgmma -> softmax -> wgmma chain. On an H100 that made
      head_dim 128 0-1.1% faster and head_dim 64 no faster (up to 35% slower with one kv head per program):
      the kernel is bound by memory and a fixed cost per call, not by the chain (benchmarks/RESULTS.md).
    copy_only: a diagnostic for benchmarks, never for models (outputs are zeros): "" (off), "pages": the
      producer streams K/V exactly as it does for attention, but the consumer only waits for each stage and
      frees it (no wgmma, no softmax). Its time is this kernel's copy pattern and synchronisation alone, to
      set beside a plain read of the same bytes. "head-pages": the same, but each copy reads what one kv
      head's page would be in a head-major pool (``[num_pages, num_kv_heads, page_size, head_dim]``: one
      contiguous ``page_size * head_dim`` run per head instead of ``page_size`` rows of ``heads * head_dim``
      elements ``num_kv_heads * head_dim`` apart), on the same bytes reinterpreted, so what that layout
      would move can be measured before adopting it (``benchmarks/bench_kernels.py --sweep``, tiling
      suffixes ``/copy`` and ``/copyh``).
    """

    heads: int = 1
    block_kv: int = 64
    stages: int = 4
    num_splits: int = 1
    consumers: int = 1
    copy_only: str = ""
    split_programs: int = 0

    def __post_init__(self) -> None:
        if self.copy_only not in COPY_ONLY_MODES:
            raise ValueError(f"copy_only must be one of {COPY_ONLY_MODES}, got {self.copy_only!r}")


def supports(q_shape, k_shape, kv_dtype) -> str | None:
    """None if the kernel takes these shapes (the hardware check is ``hopper_available``), else the reason."""
    _, num_q_heads, head_dim = q_shape
    _, page_size, num_kv_heads, _ = k_shape
    if plgpu is None:
        return "jax has no Mosaic GPU"
    if jnp.dtype(kv_dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"kv dtype {kv_dtype} (the Mosaic GPU kernel takes bf16 / f16)"
    if head_dim not in (64, 128):
        return f"head_dim {head_dim} not in (64, 128)"
    if page_size % 8 or (64 % page_size and page_size % 64):
        return f"page_size {page_size} does not tile 64-token blocks"
    if slab_rows(1, padded_group(1, num_q_heads // num_kv_heads)) > ROWS:
        return f"GQA group {num_q_heads // num_kv_heads} does not fit a {ROWS}-row tile"
    return None


def padded_group(heads: int, group: int, split: bool = False) -> int:
    """GQA group as the kernel lays it out: a program's ``heads * group`` q heads must fill whole 8-row
    slabs or sit inside one, so other groups are padded (zero q heads, in XLA) to the next power of two.
    With split outputs (``num_splits > 1``) each kv head's (max, sum) row of ``group`` f32 is one TMA
    store, which must be a multiple of 16 bytes: groups 1 and 2 are then padded to 4 (the q tile keeps its
    8-row slab, so this costs only the padding in XLA)."""
    n = heads * group
    gp = group if n % 8 == 0 or 8 % n == 0 else common.next_pow2(group)
    return max(gp, 4) if split else gp


def slab_rows(heads: int, group: int) -> int:
    """Rows of q copied per kv head: the 8-row aligned slab(s) holding a program's q heads."""
    n = heads * group
    return n if n % 8 == 0 else 8


def _tile_rows(g, heads: int, group: int):
    """(s0, off) for the item's kv head group ``g``: its q heads start at row ``s0 + off`` of q, ``s0`` a
    multiple of 8 (the slab start copied for every kv head), and kv head ``j``'s own ``group`` rows sit at
    tile rows ``j * slab + off + j * group + [0, group)``. ``g`` may be traced or a Python int."""
    first = g * (heads * group)
    if (heads * group) % 8 == 0:
        return first, 0
    off = first % 8 if isinstance(first, int) else lax.rem(first, 8)
    return first - off, off


SMEM_BUDGET = 227 * 1024  # per SM on Hopper


def smem_bytes(cfg: MosaicConfig, head_dim: int, itemsize: int) -> int:
    """Shared memory of one program: two query tiles, the output tile, the K/V stages, with two consumers
    the f32 hand-over tile (+ small change)."""
    hd = cfg.heads * head_dim
    merge = (ROWS * hd + 2 * ROWS) * 4 if cfg.consumers > 1 else 0
    return (3 * ROWS * hd + 2 * cfg.stages * cfg.block_kv * hd) * itemsize + merge + 2048


def hopper_available() -> bool:
    """Whether the default device is a Hopper GPU (wgmma and TMA, which this kernel needs)."""
    if plgpu is None:
        return False
    try:
        dev = jax.devices()[0]
    except Exception:  # pragma: no cover - no backend
        return False
    return dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")).startswith("9.")


def _kernel(
    meta_ref,  # [W, META_COLS] int32 per work item (one query token each), GMEM
    q_ref,  # [T, Hkv * group, D] (T = W; group padded, see padded_group), GMEM
    k_ref,  # [num_pages, page_size, Hkv * D], GMEM
    v_ref,
    pt_ref,  # [max_num_seqs, pt_cols] int32, GMEM
    o_ref,  # [T, Hkv * group, D], or [S, T, Hkv * group, D] normalised per split
    m_ref,  # [S, T, Hkv * group] f32 (split only)
    l_ref,
    q_smem,  # [2, ROWS, hd]: the query tiles of two consecutive items
    o_smem,  # [heads, ROWS, D], untiled: output staging, one block per kv head
    k_smem,  # [stages, block_kv, hd]
    v_smem,
    ml_smem,  # [2, ROWS] f32
    q_bar,  # [2]: item's q tile landed
    q_free,  # [2]: q tile buffer may be refilled
    k_bar,  # [stages]
    v_bar,
    free_bar,  # [stages]: K/V stage may be refilled
    merge_refs,  # consumers == 2: (acc [ROWS, hd] f32, ml [2, ROWS] f32, full barrier, free barrier); else None
    *,
    cfg: MosaicConfig,
    groups: int,
    num_items: int,
    head_dim: int,
    page_size: int,
    group: int,
    sm_scale: float,
    soft_cap: float | None,
    sliding_window: int | None,
    split_out: bool,
):
    c = lax.axis_index("c")
    num_ctas = lax.axis_size("c")
    wg = lax.axis_index("wg")
    heads = cfg.heads
    hd = heads * head_dim
    slab = slab_rows(heads, group)
    bk, stages, splits = cfg.block_kv, cfg.stages, cfg.num_splits
    consumers = cfg.consumers
    pages_per_blk = bk // page_size
    my_items = (num_items - c + num_ctas - 1) // num_ctas

    def item(k):
        """Work of this program's k-th item: kv heads [g * heads, ...) of token w, kv split s."""
        it = c + k * num_ctas
        g = lax.rem(it, groups)
        rest = lax.div(it, groups)
        s = lax.rem(rest, splits)
        w = lax.div(rest, splits)
        seq = meta_ref[w, common.META_SEQ]
        first_pos = meta_ref[w, common.META_FIRST_POS]
        nrows = meta_ref[w, common.META_NROWS]
        kv_len = meta_ref[w, common.META_KV_LEN]
        end = jnp.where(nrows > 0, jnp.minimum(first_pos + 1, kv_len), 0)  # keys at positions < end
        if sliding_window is None:
            lo = jnp.int32(0)
        else:
            lo = jnp.maximum(first_pos - sliding_window + 1, 0)
        lo_blk = lo // bk
        hi_blk = (end + bk - 1) // bk
        # The item's own split count when planned (meta's SPLITS column), else the static one; a split past
        # it starts at or after hi_blk, so it takes no steps.
        n_split = jnp.maximum(meta_ref[w, common.META_SPLITS], 1) if cfg.split_programs else splits
        per_split = (jnp.maximum(hi_blk - lo_blk, 0) + n_split - 1) // n_split
        b0 = lo_blk + s * per_split
        steps = jnp.maximum(jnp.minimum(b0 + per_split, hi_blk) - b0, 0)
        return g, s, w, seq, lo, end, b0, steps

    @pl.when(wg == consumers)
    def _producer():
        plgpu.set_max_registers(40, action="decrease")

        def item_body(k, step):
            g, _, w, seq, _, end, b0, steps = item(k)
            qb = lax.rem(k, 2)
            col0 = g * hd

            def blk_body(i, step):
                slot = lax.rem(step, stages)

                @pl.when(step >= stages)
                def _():
                    plgpu.barrier_wait(free_bar.at[slot])

                # Pages wholly past the item's keys are not copied (the copy still arrives, with no bytes):
                # their stage rows keep older data, masked out of S and zeroed in V by the consumer.
                for p in range(pages_per_blk):
                    page = pt_ref[seq, (b0 + i) * pages_per_blk + p]
                    live = ((b0 + i) * pages_per_blk + p) * page_size < end
                    rows = pl.ds(p * page_size, page_size)
                    for ref, smem, bar in ((k_ref, k_smem, k_bar), (v_ref, v_smem, v_bar)):
                        if cfg.copy_only == "head-pages":  # ref: [num_pages, Hkv, page_size, D]
                            # 8 rows per copy: a column block of the tiled stage is contiguous 8 rows at a time.
                            for j, r in itertools.product(range(heads), range(page_size // 8)):
                                plgpu.copy_gmem_to_smem(
                                    ref.at[page, g * heads + j, pl.ds(8 * r, 8)],
                                    smem.at[
                                        slot, pl.ds(p * page_size + 8 * r, 8), pl.ds(j * head_dim, head_dim)
                                    ],
                                    bar.at[slot],
                                    predicate=live,
                                )
                        else:
                            plgpu.copy_gmem_to_smem(
                                ref.at[page, slice(None), pl.ds(col0, hd)],
                                smem.at[slot, rows],
                                bar.at[slot],
                                predicate=live,
                            )
                return step + 1

            # The query tile first: issuing it after the item's first K/V blocks (which wait for free
            # stages) put its latency on the consumer's path at every item start (2-5% slower on an H100).
            s0, _ = _tile_rows(g, heads, group)
            s0 = pl.multiple_of(s0, 8)
            plgpu.barrier_wait(q_free.at[qb])
            # Kv head j's slab goes to rows [j * slab, ...) and columns [j * D, ...) of the tile, 8 rows
            # per copy (an 8 x 64 piece is one contiguous swizzled tile of shared memory).
            for j, r in itertools.product(range(heads), range(slab // 8)):
                plgpu.copy_gmem_to_smem(
                    q_ref.at[w, pl.ds(s0 + 8 * r, 8)],
                    q_smem.at[qb, pl.ds(j * slab + 8 * r, 8), pl.ds(j * head_dim, head_dim)],
                    q_bar.at[qb],
                )
            return lax.fori_loop(0, steps, blk_body, step)

        lax.fori_loop(0, my_items, item_body, jnp.int32(0))

    @pl.when(wg < consumers)
    def _consumer():
        me = wg  # this consumer's index
        if consumers > 1:
            plgpu.set_max_registers(232, action="increase")
        if heads > 1:  # off-diagonal blocks of the query tiles stay zero: copies only write diagonal ones

            @pl.when(me == 0)
            def _():
                q_smem[...] = jnp.zeros(q_smem.shape, q_smem.dtype)
                plgpu.commit_smem()

        plgpu.barrier_arrive(q_free.at[0])
        plgpu.barrier_arrive(q_free.at[1])
        if consumers > 1:
            macc_smem, mml_smem, merge_full, merge_free = merge_refs

            @pl.when(me == 0)
            def _():
                plgpu.barrier_arrive(merge_free)

        if soft_cap is None:
            scale = sm_scale * LOG2E

        def item_body(k, step0):
            # The item's blocks were issued at steps [step0, step0 + steps); this consumer takes those
            # with step % consumers == me, i.e. block indices first, first + consumers, ...
            g, s, w, _, lo, end, b0, steps = item(k)
            qb = lax.rem(k, 2)
            plgpu.barrier_wait(q_bar.at[qb])
            m_i = plgpu.layout_cast(jnp.full((ROWS,), _MASK, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            l_i = plgpu.layout_cast(jnp.full((ROWS,), 0.0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            acc = plgpu.layout_cast(jnp.full((ROWS, hd), 0.0, jnp.float32), plgpu.Layout.WGMMA)
            if consumers > 1:
                first = lax.rem(me - lax.rem(step0, consumers) + consumers, consumers)
                mine = jnp.maximum(steps - first + consumers - 1, 0) // consumers
            else:
                first, mine = jnp.int32(0), steps

            def blk_body(j, carry):
                acc, m_i, l_i = carry
                i = first + j * consumers
                step = step0 + i
                slot = lax.rem(step, stages)
                blk = b0 + i
                plgpu.barrier_wait(k_bar.at[slot])
                if cfg.copy_only:
                    plgpu.barrier_wait(v_bar.at[slot])
                    plgpu.barrier_arrive(free_bar.at[slot])
                    return carry

                def qk(acc_ref):
                    plgpu.wgmma(acc_ref, q_smem.at[qb], k_smem.at[slot].transpose((1, 0)))
                    return acc_ref[...]

                s_ij = pl.run_scoped(qk, plgpu.ACC((ROWS, bk), jnp.float32))
                if soft_cap is not None:
                    s_ij = (soft_cap * LOG2E) * jnp.tanh(s_ij * (sm_scale / soft_cap))
                else:
                    s_ij = s_ij * scale
                pos = blk * bk + plgpu.broadcasted_iota(jnp.int32, (ROWS, bk), 1, layout=plgpu.Layout.WGMMA)
                ok = (pos < end) & (pos >= lo)
                s_ij = jnp.where(ok, s_ij, _MASK)
                m_new = jnp.maximum(m_i, s_ij.max(axis=1))
                alpha = jnp.exp2(m_i - m_new)
                p = jnp.where(ok, jnp.exp2(s_ij - lax.broadcast_in_dim(m_new, s_ij.shape, [0])), 0.0)
                l_i = l_i * alpha + p.sum(axis=1)
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                plgpu.barrier_wait(v_bar.at[slot])

                # The last block's slots past `end` may hold anything: P is 0 there, but 0 * NaN is NaN.
                @pl.when(blk * bk + bk > end)
                def _():
                    rows = plgpu.broadcasted_iota(jnp.int32, (bk, hd), 0, layout=plgpu.Layout.WGMMA)
                    vt = v_smem.at[slot][...]
                    v_smem.at[slot][...] = jnp.where(blk * bk + rows < end, vt, jnp.zeros_like(vt))
                    plgpu.commit_smem()

                def pv(acc_ref):
                    plgpu.wgmma(acc_ref, p.astype(v_smem.dtype), v_smem.at[slot])

                acc = pl.run_state(pv)(plgpu.ACC.init(acc))
                plgpu.barrier_arrive(free_bar.at[slot])
                return acc, m_new, l_i

            acc, m_i, l_i = lax.fori_loop(0, mine, blk_body, (acc, m_i, l_i))
            plgpu.barrier_arrive(q_free.at[qb])
            if consumers == 1:
                finish(k, g, s, w, acc, m_i, l_i)
            else:

                @pl.when(me == 1)
                def _():  # hand over the unnormalised partial; consumer 0 frees the buffer once read
                    plgpu.barrier_wait(merge_free)
                    macc_smem[...] = acc
                    mml_smem.at[0][...] = m_i
                    mml_smem.at[1][...] = l_i
                    plgpu.barrier_arrive(merge_full)

                @pl.when(me == 0)
                def _():
                    plgpu.barrier_wait(merge_full)
                    acc1 = plgpu.load(macc_smem, (), layout=plgpu.Layout.WGMMA)
                    m1 = plgpu.load(mml_smem.at[0], (), layout=plgpu.Layout.WGMMA.reduce(1))
                    l1 = plgpu.load(mml_smem.at[1], (), layout=plgpu.Layout.WGMMA.reduce(1))
                    plgpu.barrier_arrive(merge_free)
                    m = jnp.maximum(m_i, m1)
                    a0, a1 = jnp.exp2(m_i - m), jnp.exp2(m1 - m)
                    merged = acc * lax.broadcast_in_dim(a0, acc.shape, [0]) + acc1 * lax.broadcast_in_dim(
                        a1, acc.shape, [0]
                    )
                    finish(k, g, s, w, merged, m, l_i * a0 + l1 * a1)

            return step0 + steps

        def finish(k, g, s, w, acc, m_i, l_i):
            # Normalised here also when split: the partials are merged with their (m, l) weights in XLA.
            inv = 1.0 / jnp.where(l_i == 0.0, 1.0, l_i)
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous item's output has left o_smem
            o = acc * lax.broadcast_in_dim(inv, acc.shape, [0])
            for j in range(heads):  # kv head j's column block, untiled: its q heads' rows are contiguous
                o_smem.at[j][...] = o[:, j * head_dim : (j + 1) * head_dim].astype(o_smem.dtype)
            if split_out:
                ml_smem.at[0][...] = m_i
                ml_smem.at[1][...] = l_i
            plgpu.commit_smem()
            s0, off = _tile_rows(g, heads, group)
            for j in range(heads):
                rows = pl.ds(j * slab + off + j * group, group)  # kv head j's q heads in block j
                heads_out = pl.ds(s0 + off + j * group, group)
                if split_out:
                    plgpu.copy_smem_to_gmem(o_smem.at[j, rows], o_ref.at[s, w, heads_out])
                    plgpu.copy_smem_to_gmem(ml_smem.at[0, rows], m_ref.at[s, w, heads_out])
                    plgpu.copy_smem_to_gmem(ml_smem.at[1, rows], l_ref.at[s, w, heads_out])
                else:
                    plgpu.copy_smem_to_gmem(o_smem.at[j, rows], o_ref.at[w, heads_out])

        lax.fori_loop(0, my_items, item_body, jnp.int32(0))

        @pl.when(me == 0)
        def _():
            plgpu.wait_smem_to_gmem(0)


def decode_attention_mgpu(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    meta: jax.Array,
    page_table: jax.Array,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    config: MosaicConfig = MosaicConfig(),
    num_sms: int | None = None,
) -> jax.Array:
    """q [T, Hq, D]; k_pages / v_pages [num_pages, page_size, Hkv, D] bf16; meta [T, >=4] int32 per token
    (``_pallas_common`` columns SEQ, FIRST_POS, NROWS, KV_LEN of a ``block_q=1`` plan); page_table
    [max_num_seqs, pt_cols] int32 (padded here to whole ``block_kv`` blocks). -> [T, Hq, D].

    Runs on Hopper GPUs only: the Pallas GPU interpreter cannot run this kernel, so there is no CPU path
    (``tests/kernels/test_mosaic_gpu.py`` lowers it for CUDA on any machine). num_sms: programs are sized
    for this many SMs (default: the device's).
    """
    num_tokens, num_q_heads, head_dim = q.shape
    num_pages, page_size, num_kv_heads, _ = k_pages.shape
    cfg = config
    heads = cfg.heads
    group = num_q_heads // num_kv_heads
    groups = num_kv_heads // heads
    hd = heads * head_dim
    split_out = cfg.num_splits > 1
    gp = padded_group(heads, group, split_out)
    slab = slab_rows(heads, gp)
    if hd > 256 or heads * slab > ROWS or num_kv_heads % heads:
        raise ValueError(f"heads={heads} does not fit head_dim {head_dim} / group {group}")
    if cfg.block_kv % 64 or cfg.block_kv % page_size:
        raise ValueError(f"block_kv {cfg.block_kv} must be a multiple of 64 and of page_size {page_size}")
    if cfg.consumers not in (1, 2) or cfg.stages % cfg.consumers:
        raise ValueError(f"consumers={cfg.consumers} must be 1 or 2 and divide stages={cfg.stages}")
    dtype = k_pages.dtype
    qk = q.astype(dtype)
    if gp != group:
        qk = qk.reshape(num_tokens, num_kv_heads, group, head_dim)
        qk = jnp.pad(qk, ((0, 0), (0, 0), (0, gp - group), (0, 0))).reshape(num_tokens, -1, head_dim)
    if qk.shape[1] % 8:  # the last slab's rows past the q heads are read: keep them in bounds
        qk = jnp.pad(qk, ((0, 0), (0, 8 - qk.shape[1] % 8), (0, 0)))
    # The head-pages diagnostic reads the same bytes as if they were a head-major pool (values scrambled).
    pool_shape = (
        (num_pages, num_kv_heads, page_size, head_dim)
        if cfg.copy_only == "head-pages"
        else (num_pages, page_size, num_kv_heads * head_dim)
    )
    k2, v2 = k_pages.reshape(pool_shape), v_pages.reshape(pool_shape)
    copies_per_page = heads * (page_size // 8) if cfg.copy_only == "head-pages" else 1
    pages_per_blk = cfg.block_kv // page_size
    page_table = common.pad_page_table(page_table, pages_per_blk)  # the producer reads whole blocks of ids
    swz = min(128, hd * jnp.dtype(dtype).itemsize)
    transforms = (plgpu.TilingTransform((8, swz // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swz))
    if split_out:
        out_type = (
            jax.ShapeDtypeStruct((cfg.num_splits, num_tokens, num_kv_heads * gp, head_dim), dtype),
            jax.ShapeDtypeStruct((cfg.num_splits, num_tokens, num_kv_heads * gp), jnp.float32),
            jax.ShapeDtypeStruct((cfg.num_splits, num_tokens, num_kv_heads * gp), jnp.float32),
        )
    else:
        out_type = jax.ShapeDtypeStruct((num_tokens, num_kv_heads * gp, head_dim), dtype)
    smem = smem_bytes(cfg, head_dim, jnp.dtype(dtype).itemsize)
    if smem > SMEM_BUDGET:
        raise ValueError(f"{cfg} needs {smem} bytes of shared memory per program (> {SMEM_BUDGET})")
    num_items = num_tokens * groups * cfg.num_splits
    num_ctas = max(1, min(num_items, max(1, SMEM_BUDGET // smem) * (num_sms or common.num_sms())))
    kernel = functools.partial(
        _kernel,
        cfg=cfg,
        groups=groups,
        num_items=num_items,
        head_dim=head_dim,
        page_size=page_size,
        group=gp,
        sm_scale=float(sm_scale),
        soft_cap=None if soft_cap is None else float(soft_cap),
        sliding_window=None if sliding_window is None else int(sliding_window),
        split_out=split_out,
    )

    def entry(meta_ref, q_ref, k_ref, v_ref, pt_ref, *outs):
        if split_out:
            o_ref, m_ref, l_ref = outs
        else:
            (o_ref,), m_ref, l_ref = outs, None, None

        def scoped(*scratch):
            merge = tuple(scratch[10:]) if cfg.consumers > 1 else None
            kernel(meta_ref, q_ref, k_ref, v_ref, pt_ref, o_ref, m_ref, l_ref, *scratch[:10], merge)

        merge_scratch = ()
        if cfg.consumers > 1:
            merge_scratch = (
                plgpu.SMEM((ROWS, hd), jnp.float32),
                plgpu.SMEM((2, ROWS), jnp.float32),
                plgpu.Barrier(num_arrivals=1),
                plgpu.Barrier(num_arrivals=1),
            )
        pl.run_scoped(
            scoped,
            plgpu.SMEM((2, ROWS, hd), dtype, transforms=transforms),
            plgpu.SMEM((heads, ROWS, head_dim), dtype),
            plgpu.SMEM((cfg.stages, cfg.block_kv, hd), dtype, transforms=transforms),
            plgpu.SMEM((cfg.stages, cfg.block_kv, hd), dtype, transforms=transforms),
            plgpu.SMEM((2, ROWS), jnp.float32),
            plgpu.Barrier(num_arrivals=heads * slab // 8, num_barriers=2),
            plgpu.Barrier(num_arrivals=cfg.consumers, num_barriers=2),
            plgpu.Barrier(num_arrivals=pages_per_blk * copies_per_page, num_barriers=cfg.stages),
            plgpu.Barrier(num_arrivals=pages_per_blk * copies_per_page, num_barriers=cfg.stages),
            plgpu.Barrier(num_arrivals=1, num_barriers=cfg.stages),
            *merge_scratch,
            collective_axes="wg",
        )

    out = plgpu.kernel(
        entry,
        out_type=out_type,
        grid=(num_ctas,),
        grid_names=("c",),
        num_threads=cfg.consumers + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        kernel_name=f"jaxrt_rpa_mgpu_h{heads}_kv{cfg.block_kv}_st{cfg.stages}_s{cfg.num_splits}_c{cfg.consumers}"
        + ("_planned" if cfg.split_programs and split_out else "")
        + (f"_copy_{cfg.copy_only.replace('-', '_')}" if cfg.copy_only else ""),
    )(meta, qk, k2, v2, page_table)

    def unpad(x, head_axis):  # padded groups: [..., Hkv * gp, ...] -> [..., Hq, ...]
        if gp == group:
            return x
        shape = x.shape
        x = x.reshape(*shape[:head_axis], num_kv_heads, gp, *shape[head_axis + 1 :])
        x = lax.slice_in_dim(x, 0, group, axis=head_axis + 1)
        return x.reshape(*shape[:head_axis], num_q_heads, *shape[head_axis + 1 :])

    if not split_out:
        return unpad(out, 1).astype(q.dtype)
    o_s, m, l = out  # o_s normalised per split: acc = l * o_s
    o_s, m, l = unpad(o_s, 2).astype(jnp.float32), unpad(m, 2), unpad(l, 2)
    return common.combine_splits(l[..., None] * o_s, m, l).astype(q.dtype)


def make_plan(q, kv_lens, cu_q_lens, num_seqs) -> common.Plan:
    """The kernel's work list: one item per query token (``block_q=1``) of a ragged batch; ``.meta`` is the
    ``meta`` argument of ``decode_attention_mgpu`` (its SEQ, FIRST_POS, NROWS and KV_LEN columns are read)."""
    num_tokens, num_q_heads, _ = q.shape
    return common.make_plan(
        num_tokens=num_tokens,
        num_q_heads=num_q_heads,
        num_kv_heads=1,  # the items do not depend on the heads
        block_q=1,
        block_kv=64,  # nor on block_kv, except in the LO/HI_BLK columns, which this kernel does not read
        kv_lens=kv_lens,
        cu_q_lens=cu_q_lens,
        num_seqs=num_seqs,
        sliding_window=None,
        token_map=False,
    )
