"""Ragged paged attention for NVIDIA GPUs: a Pallas kernel lowered through Triton.

On Hopper, decode batches that fill at least 3/4 of the SMs, with up to 4 kv splits per token, go to
the Mosaic GPU kernel instead (``kernels/mosaic_gpu.py``, chosen by ``default_config`` through
``mosaic_decode_config``; 1.08-1.15x faster per layer at batch >= 32 and context >= 1k on an H100, and
1.2-1.5x with splits at 8-16 tokens on an H200). Its plan is a one-token-per-item work list
and the page table padded to whole 64-token blocks; the rest of this module is the Triton kernel.

One ``pallas_call`` serves a mixed batch of prefill chunks and decodes. The grid is
``(work item, kv head, kv split)`` (see ``_pallas_common``): a work item is a block of up to ``block_q``
query tokens of one sequence, and its ``block_q * group_pad`` query rows (tokens x the q heads sharing
the kv head) form the M dimension of both dots, so K/V pages are read once per kv head. Each program
walks the sequence's page table ``block_kv`` tokens at a time (an online softmax in base 2), gathering
whole pages straight from the token-major pool, and stops at the last block its causal / sliding-window
range needs; blocks that every query row sees in full skip all masking. For decode batches that would not
fill the GPU the kv range is also split across programs ("flash decoding"): the grid has room for the
splits one sequence alone would take, each step's plan gives every work item its own split count from the
real kv lengths (``plan_splits``), programs past it return at once, and a small Pallas kernel merges each
token's live splits (``merge_splits_direct``; XLA for gathered tiles).
When the GQA group is a power of two, programs read their q rows from, and write their output rows to,
the ``[T, Hq, D]`` arrays directly (masked loads / stores); otherwise the wrapper gathers padded q tiles.
Decode tilings carry the next block's K/V tiles through the loop (software prefetch, with the page ids read
one block further ahead), which is what moved decode from ~50% to ~80% of HBM bandwidth on an H100, and
with head_dim 64 a program serves two kv heads, reading 256 contiguous bytes per token instead of 128
(benchmarks/RESULTS.md, "Kernels"). Every output row, padding included, is written by the kernel, and the
planning (``gpu_metadata``) can be made once per batch and shared by every layer (``attention_metadata``).

Triton constraints honoured here (interpret mode does not check them): grid of 3 dims, no scalar prefetch
(metadata travels as ordinary int32 inputs), power-of-two load shapes, 2-D dots with M, N, K >= 16.
The backend runs the kernel only for what was validated on an H100 (head_dim 64/128/256, page_size
16/32/64/128, bf16/f32 K/V; any GQA group, groups 1, 3, 4, 8 validated) and falls back to the jnp reference
otherwise (``supports``).
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
from jaxrt.kernels import mosaic_gpu
from jaxrt.kernels.attention import register_backend
from jaxrt.kernels.reference import MASK_VALUE

LOG2E = math.log2(math.e)
_KV_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
# K/V pool layouts the kernel reads. "nhd" [num_pages, page_size, num_kv_heads, head_dim] is the layout of
# the public API (write_kv, the reference, the models). "hnd" [num_pages, num_kv_heads, page_size, head_dim]
# (one kv head's page contiguous) is accepted by ``ragged_paged_attention_gpu(kv_layout="hnd")`` only, to
# measure what a head-major pool would gain (benchmarks/bench_kernels.py); it always runs one kv head per
# program.
KV_LAYOUTS = ("nhd", "hnd")


def pool_dims(k_shape, kv_layout: str = "nhd") -> tuple[int, int, int, int]:
    """(num_pages, page_size, num_kv_heads, head_dim) of a K/V pool of shape ``k_shape``."""
    if kv_layout not in KV_LAYOUTS:
        raise ValueError(f"kv_layout must be one of {KV_LAYOUTS}, got {kv_layout!r}")
    num_pages, a, b, head_dim = k_shape
    return (num_pages, a, b, head_dim) if kv_layout == "nhd" else (num_pages, b, a, head_dim)


@dataclasses.dataclass(frozen=True)
class GpuConfig:
    """Static tiling of the GPU kernel.

    block_rows: target rows of the query tile (query tokens x kv_heads x padded GQA group), a power of two
      >= 16.
    block_kv: kv tokens per inner step, a power of two >= 16 (whole pages are gathered when it is >= the
      page size, else a slice of one page is read).
    num_splits: kv splits per work item (1 = no split-K); with ``split_programs`` the most a work item takes.
    split_programs: 0: every work item is split ``num_splits`` ways. > 0: the plan gives each work item its
      own split count (``plan_splits``) from the batch's real kv lengths, so that about this many programs
      have kv blocks to read (empty split programs return at once). A static grid sized for a full bucket
      leaves most of the GPU idle when a decode bucket holds one long sequence; planned splits spread that
      sequence over the SMs instead.
    heads_fastest: launch order; True puts the kv heads of one work item in adjacent programs, so the
      token-major pages they read are fetched at about the same time.
    prefetch: software-pipeline the K/V loads one block ahead in the loop carry (on top of, or instead of,
      Triton's own ``num_stages`` pipelining).
    kv_heads: kv heads per program (a power of two dividing num_kv_heads; needs a power-of-two GQA group,
      else 1 is used). The program reads ``kv_heads * head_dim`` contiguous elements per token instead of
      ``head_dim``, and its query tile holds ``kv_heads * group_pad`` rows per query token. K/V tiles and
      the accumulator grow ``kv_heads`` times: large values spill registers or exceed shared memory
      (64-row prefill tiles with kv_heads 4 and f32 head_dim >= 128 did not compile on the H100).
    """

    block_rows: int = 16
    block_kv: int = 128
    num_splits: int = 1
    num_warps: int = 4
    num_stages: int = 2
    heads_fastest: bool = False  # grid (kv head, work item, split): a sequence's kv heads run side by side
    prefetch: bool = False  # issue block b+1's loads before block b's math (tiles carried in registers)
    kv_heads: int = 1
    page_lookahead: bool = False  # with prefetch: read block b+2's page ids while block b+1's K/V load
    split_programs: int = 0  # > 0: per-item split counts planned per batch (plan_splits)
    # Decode batches on Hopper: run the Mosaic GPU kernel (``kernels/mosaic_gpu.py``) with this tiling
    # instead of the Triton one; every other field is then unused.
    mosaic: mosaic_gpu.MosaicConfig | None = None


# What benchmarks/bench_kernels.py --check compiled and ran correctly on an H100 (jax 0.11.2, Triton path):
# every combination of these head dims, page sizes and dtypes, with and without window / soft cap, GQA
# groups 1, 3, 4, 8 and MQA, on mixed and decode batches, in both the default and the prefetch tilings.
VALIDATED_HEAD_DIMS = (64, 128, 256)
VALIDATED_PAGE_SIZES = (16, 32, 64, 128)
VALIDATED_KV_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))


def supports(
    q_shape, k_shape, kv_dtype, *, validated_only: bool = True, kv_layout: str = "nhd"
) -> str | None:
    """None if the kernel takes these shapes, else the reason it falls back to the reference.

    validated_only: also require head_dim / page_size / dtype validated on a GPU (the backend's setting);
    False admits anything the kernel can express (power-of-two head_dim >= 16 and page_size, bf16 / f16 /
    f32), e.g. for interpret-mode tests of other shapes.
    """
    _, _, head_dim = q_shape
    _, page_size, _, _ = pool_dims(k_shape, kv_layout)
    if not common.is_pow2(head_dim) or head_dim < 16:
        return f"head_dim {head_dim} is not a power of two >= 16"
    if not common.is_pow2(page_size):
        return f"page_size {page_size} is not a power of two"
    if jnp.dtype(kv_dtype) not in _KV_DTYPES:
        return f"kv dtype {kv_dtype} not supported"
    if validated_only:
        if head_dim not in VALIDATED_HEAD_DIMS:
            return f"head_dim {head_dim} not validated on GPU"
        if page_size not in VALIDATED_PAGE_SIZES:
            return f"page_size {page_size} not validated on GPU"
        if jnp.dtype(kv_dtype) not in VALIDATED_KV_DTYPES:
            return f"kv dtype {kv_dtype} not validated on GPU"
    return None


def decode_splits(programs: int, max_blocks: int, num_sms: int | None = None) -> int:
    """Split-K factor: the largest power of two (<= 16 and <= the kv blocks) that keeps the grid within
    two programs per SM. Two per SM was the best decode grid at every batch >= 32 point of the H100
    sweeps; a third wave of programs cost 5-10% (benchmarks/RESULTS.md, "Kernels")."""
    target = 2 * (num_sms or common.num_sms())
    splits = 1
    while programs * splits * 2 <= target and splits * 2 <= min(16, max_blocks):
        splits *= 2
    return splits


_MOSAIC_DECODE = True

# The most kv splits per work item ``mosaic_decode_config`` gives a small decode batch (the H200 sweep's best
# went from 4 down as the batch grew; 8 was never the fastest once the merge was counted).
MOSAIC_MAX_SPLITS = 4


def set_mosaic_decode(enabled: bool) -> None:
    """Let ``default_config`` pick the Mosaic GPU decode kernel on Hopper (the default) or not."""
    global _MOSAIC_DECODE
    _MOSAIC_DECODE = bool(enabled)


def mosaic_decode_config(
    *,
    num_tokens: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    kv_dtype,
    num_sms: int,
) -> mosaic_gpu.MosaicConfig | None:
    """Tiling of the Mosaic GPU decode kernel for a decode batch, or None where the Triton kernel is
    the better choice: for shapes the Mosaic kernel does not take (head_dim other than 64 / 128, f32 pools),
    and when the batch has so few (token, kv head group) items that even ``MOSAIC_MAX_SPLITS`` kv splits
    per item leave more than a quarter of the SMs idle (the Triton kernel's planned splits spread a lone
    sequence over the whole GPU).

    Two kv heads per program for head_dim 64 (128 contiguous elements per token, like the Triton tiling),
    64-token stages, 3 stages with two heads and 4 with one: the best of the H100 sweep at batch 32-256
    and context 128-4k (benchmarks/RESULTS.md, "Kernels"). For head_dim 128, two consumer warpgroups
    (0-1.1% faster on the H100 at batch 32-256, context 1k-16k; with head_dim 64 they were equal with two
    heads and up to 35% slower with one).

    Batches with fewer items than 3/4 of the SMs split every item's kv range the fewest power-of-two ways
    (at most ``MOSAIC_MAX_SPLITS``) that give 3/4 of the SMs a program. On an H200 that beat the Triton
    kernel by 1.2-1.5x from 32 items up (Llama-3.2-1B heads at 8 and 16 tokens, Llama-3.1-8B heads at 4
    and 8, context 1k-16k), and the count it picks was the fastest of 2, 4 and 8 at each point
    (benchmarks/RESULTS.md, "Kernels", twelfth round). Split batches keep one consumer warpgroup: with
    head_dim 128 two were 0.5-0.7 µs slower there.
    """
    if mosaic_gpu.supports(
        (num_tokens, num_q_heads, head_dim), (0, page_size, num_kv_heads, head_dim), kv_dtype
    ):
        return None
    group = num_q_heads // num_kv_heads
    heads = 1
    if head_dim == 64 and num_kv_heads % 2 == 0:
        gp = mosaic_gpu.padded_group(2, group, split=True)  # the larger of the two paddings
        if 2 * mosaic_gpu.slab_rows(2, gp) <= mosaic_gpu.ROWS:
            heads = 2
    items = num_tokens * (num_kv_heads // heads)
    splits = 1
    while splits < MOSAIC_MAX_SPLITS and 4 * items * splits < 3 * num_sms:
        splits *= 2
    if 4 * items * splits < 3 * num_sms:
        return None
    block_kv = max(64, page_size)
    stages = 3 if heads > 1 else 4
    itemsize = jnp.dtype(kv_dtype).itemsize
    while (
        stages > 1
        and mosaic_gpu.smem_bytes(mosaic_gpu.MosaicConfig(heads, block_kv, stages), head_dim, itemsize)
        > mosaic_gpu.SMEM_BUDGET
    ):
        stages -= 1
    if stages < 2:
        return None
    consumers = 2 if head_dim == 128 and stages % 2 == 0 and splits == 1 else 1
    cfg = mosaic_gpu.MosaicConfig(heads, block_kv, stages, num_splits=splits, consumers=consumers)
    if mosaic_gpu.smem_bytes(cfg, head_dim, itemsize) > mosaic_gpu.SMEM_BUDGET:
        cfg = dataclasses.replace(cfg, consumers=1)
    return cfg


# Up to this many tokens a call takes the decode tiling whatever its sequence slots: the prefill tiling's
# 64-row tiles and single split took 30 us per layer for a lone decode token in an 8-token bucket with
# Qwen3-0.6B heads on an H200 (8.3 us + a 2.1 us merge with the decode tiling; benchmarks/RESULTS.md).
SMALL_BATCH_TOKENS = 16


def default_config(
    *,
    num_tokens: int,
    max_num_seqs: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    pages_per_seq: int,
    itemsize: int = 2,
    num_sms: int | None = None,
    kv_layout: str = "nhd",
    kv_dtype=None,
) -> GpuConfig:
    """Heuristic tiling from static shapes.

    A batch with no more tokens than sequences, or of at most ``SMALL_BATCH_TOKENS`` tokens (the decode
    buckets of an engine that runs fewer requests than its smallest bucket holds, e.g.
    ``max_running_requests=1``: 8 token rows, 1 sequence), is treated as decode: 16-row query tiles, 32 KiB
    of K+V per kv step, split-K planned per step for about two programs per SM (room for up to 16 splits of
    one sequence), software prefetch with page-id lookahead, and two kv heads
    per program where one head's row of a page is only 128 bytes (head_dim 64 in bf16), so that each token
    read is 256 contiguous bytes, once the batch is large enough (from 16 tokens for Llama-3.2-1B heads on
    an H100). Anything else is prefill / mixed (64-row query tiles, no split).
    These are the best tilings of the H100 decode sweeps (benchmarks/RESULTS.md, "Kernels").
    On Hopper, decode batches that fill the GPU go to the Mosaic GPU kernel (``mosaic_decode_config``).
    """
    group = num_q_heads // num_kv_heads
    group_pad = common.next_pow2(group)
    sms = num_sms or common.num_sms()
    if num_tokens <= max(max_num_seqs, SMALL_BATCH_TOKENS):
        if _MOSAIC_DECODE and kv_layout == "nhd" and kv_dtype is not None and mosaic_gpu.hopper_available():
            mcfg = mosaic_decode_config(
                num_tokens=num_tokens,
                num_q_heads=num_q_heads,
                num_kv_heads=num_kv_heads,
                head_dim=head_dim,
                page_size=page_size,
                kv_dtype=kv_dtype,
                num_sms=sms,
            )
            if mcfg is not None:
                return GpuConfig(mosaic=mcfg)
        heads = 1
        num_work = common.num_work_items(num_tokens, max_num_seqs, 16 // min(16, group_pad))
        if (
            kv_layout == "nhd"  # a head-major pool runs one kv head per program
            and head_dim * itemsize <= 128
            and group == group_pad
            and 2 * group_pad <= 16
            and num_kv_heads % 2 == 0
            # At most 16 splits must still give 4 programs per SM. With the L2 cold, one kv head per program
            # (128-token blocks) was faster up to 8 tokens (Llama-3.2-1B heads, context 1k: 7.6 / 9.1 / 12.7 µs
            # at batch 1 / 4 / 8 in an 8-token bucket, against 8.8 / 10.3 / 13.8 with two heads), two heads
            # from 16 tokens (19.6 against 23.4 µs; benchmarks/RESULTS.md, "Kernels", seventh round).
            and num_work * (num_kv_heads // 2) * 16 >= 4 * sms
        ):
            heads = 2
        rows = max(16, heads * group_pad)
        block_kv = max(16, min(128, 32768 // (2 * heads * head_dim * itemsize)))  # 32 KiB of K+V per step
        block_q = max(1, rows // (heads * group_pad))
        num_work = common.num_work_items(num_tokens, max_num_seqs, block_q)
        max_blocks = common.cdiv(pages_per_seq * page_size, block_kv)
        # Planned splits: the grid has room for the splits one sequence alone would take, and each step's plan
        # gives every work item its share from the real kv lengths (plan_splits), so a bucket holding fewer
        # or shorter sequences than it has room for still spreads its kv blocks over the SMs. The grid is
        # kept within 16 programs per SM (empty programs return at once, but are launched).
        groups = num_kv_heads // heads
        splits = decode_splits(groups, max_blocks, sms)
        while splits > 1 and num_work * groups * splits > 16 * sms:
            splits //= 2
        return GpuConfig(
            block_rows=rows,
            block_kv=block_kv,
            num_splits=splits,
            num_warps=4,
            num_stages=2,
            # Adjacent programs on the kv heads of one sequence: 1-11% faster for head_dim 128 (bf16) at
            # batch 1-64, within noise for head_dim 64 with two heads per program.
            heads_fastest=heads == 1 and head_dim * itemsize > 128,
            prefetch=True,
            kv_heads=heads,
            page_lookahead=True,
            split_programs=2 * sms if splits > 1 else 0,
        )
    rows = max(64, group_pad)
    block_kv = 64
    # Keep the q tile plus two K/V stages within ~160 KiB of shared memory (f32 with head_dim 256).
    while block_kv > 16 and rows * head_dim * itemsize + 2 * 2 * block_kv * head_dim * itemsize > 160 * 1024:
        block_kv //= 2
    return GpuConfig(
        block_rows=rows,
        block_kv=block_kv,
        num_splits=1,
        num_warps=8 if rows * head_dim > 8192 else 4,
        num_stages=2,
    )


def config_for(q, k_pages, page_indices, kv_layout: str = "nhd") -> GpuConfig:
    """The default tiling for these operands (anything with .shape / .dtype)."""
    num_tokens, num_q_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = pool_dims(k_pages.shape, kv_layout)
    max_num_seqs, pages_per_seq = page_indices.shape
    return default_config(
        num_tokens=num_tokens,
        max_num_seqs=max_num_seqs,
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        page_size=page_size,
        pages_per_seq=pages_per_seq,
        itemsize=jnp.dtype(k_pages.dtype).itemsize,
        kv_layout=kv_layout,
        kv_dtype=k_pages.dtype,
    )


@dataclasses.dataclass(frozen=True)
class _Tiling:
    """A GpuConfig resolved against the static shapes of a call."""

    group: int
    group_pad: int
    direct: bool  # q / out tiles are plain strided slices of q / out (power-of-two group)
    heads: int  # kv heads per program
    rows: int  # query tile rows = block_q * heads * group_pad
    block_q: int
    block_kv: int
    pages_per_blk: int
    num_splits: int


def _tiling(
    config: GpuConfig,
    num_q_heads: int,
    num_kv_heads: int,
    page_size: int,
    kv_layout: str = "nhd",
):
    group = num_q_heads // num_kv_heads
    group_pad = common.next_pow2(group)
    direct = group == group_pad
    heads = int(config.kv_heads)
    if kv_layout != "nhd" or not (direct and common.is_pow2(heads) and num_kv_heads % heads == 0):
        heads = 1  # several heads per program need direct q / out tiles and whole head groups
    rows = max(16, common.next_pow2(config.block_rows), heads * group_pad)
    block_kv = max(common.next_pow2(config.block_kv), 16)
    pages_per_blk = max(1, block_kv // page_size)
    return _Tiling(
        group=group,
        group_pad=group_pad,
        direct=direct,
        heads=heads,
        rows=rows,
        block_q=rows // (heads * group_pad),
        block_kv=block_kv,
        pages_per_blk=pages_per_blk,
        num_splits=max(1, int(config.num_splits)),
    )


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["work", "page_table", "token_splits"],
    meta_fields=["config", "key"],
)
@dataclasses.dataclass(frozen=True)
class GpuPlan:
    """The "pallas_gpu" planning of one batch (``attention_metadata``): work list and padded page table.

    Independent of sm_scale, sliding window and soft cap (the kernel derives the window's first block from
    the work item's positions), so one plan serves every layer of a model whose layers share head shapes.
    """

    config: GpuConfig
    key: tuple  # static shapes it was made for (_plan_key)
    work: common.Plan
    page_table: jax.Array  # [max_num_seqs, pt_cols] int32, padded to whole kv blocks of page ids
    # Split-K with direct q / out tiles: [num_tokens] int32, the split count of each token's work item (0 for
    # padding rows). Split programs past their item's count store nothing; the merge reads only the rest.
    token_splits: jax.Array | None = None


def _plan_key(q, k_pages, page_indices, kv_layout: str = "nhd") -> tuple:
    return (
        tuple(q.shape),
        tuple(k_pages.shape[1:]),
        str(jnp.dtype(k_pages.dtype)),
        tuple(page_indices.shape),
        kv_layout,
    )


def gpu_metadata(
    q,
    k_pages,
    kv_lens,
    page_indices,
    cu_q_lens,
    num_seqs,
    *,
    config: GpuConfig | None = None,
    kv_layout: str = "nhd",
) -> GpuPlan:
    """Plan a batch for ``ragged_paged_attention_gpu`` (q, k_pages: arrays or shape/dtype structs)."""
    num_tokens, num_q_heads, _ = q.shape
    _, page_size, num_kv_heads, _ = pool_dims(k_pages.shape, kv_layout)
    if config is None:
        config = config_for(q, k_pages, page_indices, kv_layout)
    key = _plan_key(q, k_pages, page_indices, kv_layout)
    if config.mosaic is not None:  # one work item per query token; whole kv blocks of page ids
        mcfg = config.mosaic
        work = mosaic_gpu.make_plan(q, kv_lens, cu_q_lens, num_seqs)
        if mcfg.num_splits > 1 and mcfg.split_programs:  # each item's split count, from the kv lengths
            meta = plan_splits(work.meta, num_kv_heads // mcfg.heads, mcfg.num_splits, mcfg.split_programs)
            work = dataclasses.replace(work, meta=meta)
        pt = common.pad_page_table(page_indices, max(1, mcfg.block_kv // page_size))
        return GpuPlan(config=config, key=key, work=work, page_table=pt)
    t = _tiling(config, num_q_heads, num_kv_heads, page_size, kv_layout)
    work = common.make_plan(
        num_tokens=num_tokens,
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        block_q=t.block_q,
        block_kv=t.block_kv,
        kv_lens=kv_lens,
        cu_q_lens=cu_q_lens,
        num_seqs=num_seqs,
        sliding_window=None,
        # Gathered tiles map tokens to (work item, row) to scatter the output back; with split-K, direct
        # tiles use the map to give each token its work item's split count (token_splits).
        token_map=not t.direct or t.num_splits > 1,
    )
    token_splits = None
    if t.num_splits > 1:
        meta = plan_splits(work.meta, num_kv_heads // t.heads, t.num_splits, int(config.split_programs))
        work = dataclasses.replace(work, meta=meta)
        if t.direct:
            token_splits = jnp.where(work.token_valid, meta[work.token_work, common.META_SPLITS], 0)
    pt = common.pad_page_table(page_indices, t.pages_per_blk)
    return GpuPlan(config=config, key=key, work=work, page_table=pt, token_splits=token_splits)


def plan_splits(meta: jax.Array, num_groups: int, max_splits: int, split_programs: int) -> jax.Array:
    """Write each work item's kv split count into ``meta[:, META_SPLITS]``.

    split_programs 0: every item takes ``max_splits``. Otherwise the kv blocks of the batch (over its
    ``num_groups`` kv head groups) are cut into chunks of ``ceil(total / split_programs)`` blocks and each
    item takes one split per chunk of its own blocks, at least 1 and at most ``max_splits``: a lone long
    sequence gets all the splits the grid has, a full bucket of equal sequences about
    ``split_programs / (items * groups)`` each, and in a mixed batch the long sequences more than the short.
    """
    if split_programs <= 0:
        splits = jnp.full((meta.shape[0],), max_splits, jnp.int32)
    else:
        blocks = jnp.maximum(meta[:, common.META_HI_BLK] - meta[:, common.META_LO_BLK], 0)
        total = blocks.sum() * num_groups
        chunk = jnp.maximum(1, common.cdiv(total, split_programs))
        splits = jnp.clip(common.cdiv(blocks, chunk), 1, max_splits).astype(jnp.int32)
    return meta.at[:, common.META_SPLITS].set(splits)


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
    t: _Tiling,
    page_size: int,
    num_pages: int,
    heads_fastest: bool,
    prefetch: bool,
    page_lookahead: bool,
    precision,
):
    """One program: one work item, ``t.heads`` kv heads, one kv split (``program_id(2)``).

    direct=True: q_ref / outputs are whole ``[T, Hq, ...]`` arrays and the program loads / stores its
    ``[block_q, heads * group, ...]`` tile with row masks (needs a power-of-two group). direct=False: q_ref
    and the outputs are this program's ``[rows, ...]`` tiles, gathered / scattered by the wrapper.

    With ``heads`` > 1 the K/V tiles are ``[block_kv, heads * head_dim]`` (each token's heads are adjacent
    in the token-major page, so the rows read are ``heads`` times longer) and the query tile is spread
    block-diagonally over the ``heads * head_dim`` columns: row r (kv head j) holds its q in column block
    j and zeros elsewhere, so one dot gives every head's scores, and column block j of ``p @ v`` is head
    j's output.
    """
    head_dim = k_ref.shape[-1]
    group, group_pad, block_q, block_kv, rows, heads = (
        t.group,
        t.group_pad,
        t.block_q,
        t.block_kv,
        t.rows,
        t.heads,
    )
    num_splits, pages_per_blk = t.num_splits, t.pages_per_blk
    blocks_per_page = max(1, page_size // block_kv)
    width = heads * head_dim
    pt_cols = pt_ref.shape[1]
    hg = pl.program_id(0) if heads_fastest else pl.program_id(1)
    seq = meta_ref[common.META_SEQ]
    first_pos = meta_ref[common.META_FIRST_POS]
    nrows = meta_ref[common.META_NROWS]
    kv_len = meta_ref[common.META_KV_LEN]
    hi_blk = meta_ref[common.META_HI_BLK]
    q_start = meta_ref[common.META_Q_START]
    out_rows = meta_ref[common.META_OUT_ROWS]
    if sliding_window is None:
        lo_blk = jnp.zeros_like(hi_blk)
    else:
        lo_blk = jnp.minimum(jnp.maximum(first_pos - sliding_window + 1, 0) // block_kv, hi_blk)
    if num_splits > 1:  # this item's own split count (plan_splits); programs past it have no blocks
        item_splits = meta_ref[common.META_SPLITS]
        per = (hi_blk - lo_blk + item_splits - 1) // item_splits
        b0 = jnp.minimum(lo_blk + pl.program_id(2) * per, hi_blk)
        b1 = jnp.minimum(hi_blk, b0 + per)
    else:
        b0, b1 = lo_blk, hi_blk

    q_cols = pl.ds(hg * heads * group, heads * group)
    if heads > 1:
        row_head = lax.rem(lax.div(lax.broadcasted_iota(jnp.int32, (rows, heads, 1), 0), group_pad), heads)
        on_diag = row_head == lax.broadcasted_iota(jnp.int32, (rows, heads, 1), 1)  # [rows, heads, 1]

    def load_q():  # the query tile (only programs with kv blocks to read load it)
        if t.direct:
            tok = lax.broadcasted_iota(jnp.int32, (block_q, 1, 1), 0)
            q = pltriton.load(q_ref.at[pl.ds(q_start, block_q), q_cols, :], mask=tok < nrows, other=0)
            q = q.reshape(rows, head_dim)
        else:
            q = q_ref[...]
        if heads > 1:
            zeros = jnp.zeros_like(q).reshape(rows, 1, head_dim)
            q = jnp.where(on_diag, q.reshape(rows, 1, head_dim), zeros).reshape(rows, width)
        return q

    q_pos = first_pos + lax.div(lax.broadcasted_iota(jnp.int32, (rows,), 0), heads * group_pad)
    # Scores are kept in base 2: s2 = log2(e) * s.
    s_scale = sm_scale * LOG2E if soft_cap is None else sm_scale / soft_cap

    def lookup(b):  # page ids of kv block b (a vector of whole pages, or the one page it slices)
        if block_kv >= page_size:
            start = jnp.minimum(b * pages_per_blk, pt_cols - pages_per_blk)
            return jnp.clip(pt_ref[seq, pl.ds(start, pages_per_blk)], 0, num_pages - 1)
        return jnp.clip(pt_ref[seq, jnp.minimum(lax.div(b, blocks_per_page), pt_cols - 1)], 0, num_pages - 1)

    def fetch(b, pages):
        if block_kv >= page_size:  # gather whole pages
            return k_ref[pages].reshape(block_kv, width), v_ref[pages].reshape(block_kv, width)
        off = lax.rem(b, blocks_per_page) * block_kv  # a slice of one page
        k = k_ref[pages, pl.ds(off, block_kv)].reshape(block_kv, width)
        return k, v_ref[pages, pl.ds(off, block_kv)].reshape(block_kv, width)

    def load(b):
        return fetch(b, lookup(b))

    def compute(q, b, k, v, carry, masked):
        m_prev, l_prev, acc_prev = carry
        s = lax.dot_general(
            q, k, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
        )
        s = s * s_scale
        if soft_cap is not None:
            s = jnp.tanh(s) * (soft_cap * LOG2E)
        if masked:
            k_pos = b * block_kv + lax.broadcasted_iota(jnp.int32, (block_kv,), 0)
            mask = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] < kv_len)
            if sliding_window is not None:
                mask = mask & (k_pos[None, :] > q_pos[:, None] - sliding_window)
            s = jnp.where(mask, s, MASK_VALUE)
        m_next = jnp.maximum(m_prev, s.max(axis=1))
        alpha = jnp.exp2(m_prev - m_next)
        p = jnp.exp2(s - m_next[:, None])
        if masked:
            p = jnp.where(mask, p, 0.0)
            # Slots past kv_len may hold anything (stale or never-written pages): keep them out of p @ v.
            v = jnp.where((k_pos < kv_len)[:, None], v, jnp.zeros_like(v))
        l_next = alpha * l_prev + p.sum(axis=1)
        pv = lax.dot_general(
            p.astype(v.dtype),
            v,
            (((1,), (0,)), ((), ())),
            precision=precision,
            preferred_element_type=jnp.float32,
        )
        return m_next, l_next, alpha[:, None] * acc_prev + pv

    last = jnp.maximum(b1 - 1, 0)

    def run(q, lo, hi, carry, masked):
        n = jnp.maximum(hi - lo, 0)
        if not prefetch:
            return lax.fori_loop(0, n, lambda i, c: compute(q, lo + i, *load(lo + i), c, masked), carry)

        # Software prefetch: the loads of block b + 1 are issued before block b's math (the last block's
        # "next" is itself again, an L2 hit). The tiles ride in the loop carry across the three loops.
        # With page_lookahead the page ids of block b + 2 are read one iteration earlier still, so the
        # K/V loads never wait on the page-table load they depend on.
        def body(i, c):
            b = lo + i
            if page_lookahead:
                kv, pages, state = c
                nxt = fetch(jnp.minimum(b + 1, last), pages)
                return nxt, lookup(jnp.minimum(b + 2, last)), compute(q, b, *kv, state, masked)
            kv, state = c
            return load(jnp.minimum(b + 1, last)), compute(q, b, *kv, state, masked)

        return lax.fori_loop(0, n, body, carry)

    # Blocks every real query row sees in full (below the causal diagonal of the first row, inside kv_len
    # and inside the window of the last row) skip all masking; the rest are masked.
    hi_full = jnp.minimum(first_pos + 1, kv_len)
    fb1 = jnp.clip(hi_full // block_kv, b0, b1)
    if sliding_window is None:
        fb0 = b0
    else:
        lo_full = jnp.maximum(first_pos + nrows - sliding_window, 0)
        fb0 = jnp.clip((lo_full + block_kv - 1) // block_kv, b0, fb1)
    fb1 = jnp.maximum(fb1, fb0)
    empty = (
        jnp.full((rows,), MASK_VALUE, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
        jnp.zeros((rows, width), jnp.float32),
    )

    def attend():
        carry = empty
        if prefetch and page_lookahead:
            carry = (load(jnp.minimum(b0, last)), lookup(jnp.minimum(b0 + 1, last)), carry)
        elif prefetch:
            carry = (load(jnp.minimum(b0, last)), carry)
        q = load_q()
        carry = run(q, b0, fb0, carry, True)
        carry = run(q, fb0, fb1, carry, False)
        carry = run(q, fb1, b1, carry, True)
        return carry[-1] if prefetch else carry

    # Programs with no kv blocks (padding work items, splits past the item's count) skip the loops and
    # their prefetch: they only write the empty result.
    m, l, acc = lax.cond(b1 > b0, attend, lambda: empty)
    if heads > 1:  # keep each row's own head's column block
        acc = jnp.where(on_diag, acc.reshape(rows, heads, head_dim), 0.0).sum(axis=1)
    if num_splits == 1:
        results = ((acc / jnp.where(l == 0.0, 1.0, l)[:, None]),)
    else:
        results = (acc, m, l)
    for ref, val in zip(out_refs, results, strict=True):
        val = val.astype(ref.dtype)
        if t.direct:
            # Empty work items write zeros over the padding rows they cover (META_OUT_ROWS). With split-K
            # the merge reads a token's first META_SPLITS partials only (the plan's token_splits), so split
            # programs past that count store nothing.
            ok = lax.broadcasted_iota(jnp.int32, (block_q, 1), 0) < out_rows
            if num_splits > 1:
                ok = ok & (pl.program_id(2) < item_splits)
            tile = (pl.ds(q_start, block_q), q_cols)
            if val.ndim == 2:
                val = val.reshape(block_q, heads * group, head_dim)
                ok = ok.reshape(block_q, 1, 1)
            else:
                val = val.reshape(block_q, heads * group)
            pltriton.store(ref.at[tile], val, mask=ok)
        else:
            ref[...] = val


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
    metadata: GpuPlan | None = None,
    config: GpuConfig | None = None,
    validated_only: bool = True,
    kv_layout: str = "nhd",
) -> jax.Array:
    """The "pallas_gpu" backend (signature of the reference plus ``interpret`` and ``metadata``).

    metadata: ``gpu_metadata`` of this batch (computed here when None). config: tiling (default:
    ``default_config`` from the static shapes; must match the metadata's when both are given).
    validated_only: refuse head_dim / page_size / dtype not validated on a GPU (see ``supports``);
    ``ragged_paged_attention`` sends such calls to the reference before they get here.
    kv_layout: "nhd" (the API's pool layout) or "hnd" (head-major pools ``[num_pages, num_kv_heads,
    page_size, head_dim]``, benchmarks only; see ``KV_LAYOUTS``).
    """
    reason = supports(
        q.shape, k_pages.shape, k_pages.dtype, validated_only=validated_only, kv_layout=kv_layout
    )
    if reason is not None:
        raise ValueError(f"pallas_gpu cannot run this call: {reason}")
    key = _plan_key(q, k_pages, page_indices, kv_layout)
    if metadata is None:
        metadata = gpu_metadata(
            q, k_pages, kv_lens, page_indices, cu_q_lens, num_seqs, config=config, kv_layout=kv_layout
        )
    elif metadata.key != key or config not in (None, metadata.config):
        raise ValueError(
            f"metadata was made for shapes {metadata.key} and tiling {metadata.config}, not for "
            f"{key} and {config}"
        )
    return _gpu_call(
        q,
        k_pages,
        v_pages,
        metadata,
        sm_scale=float(sm_scale),
        sliding_window=None if sliding_window is None else int(sliding_window),
        soft_cap=None if soft_cap is None else float(soft_cap),
        interpret=interpret,
        kv_layout=kv_layout,
    )


@functools.partial(
    jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap", "interpret", "kv_layout")
)
def _gpu_call(
    q, k_pages, v_pages, plan: GpuPlan, *, sm_scale, sliding_window, soft_cap, interpret, kv_layout
):
    if plan.config.mosaic is not None:
        if interpret or kv_layout != "nhd":
            raise ValueError(
                "the Mosaic GPU decode kernel runs on Hopper GPUs only, with the nhd pool layout"
            )
        return mosaic_gpu.decode_attention_mgpu(
            q,
            k_pages,
            v_pages,
            plan.work.meta,
            plan.page_table,
            sm_scale=sm_scale,
            sliding_window=sliding_window,
            soft_cap=soft_cap,
            config=plan.config.mosaic,
        )
    num_tokens, num_q_heads, head_dim = q.shape
    num_pages, page_size, num_kv_heads, _ = pool_dims(k_pages.shape, kv_layout)
    config = plan.config
    t = _tiling(config, num_q_heads, num_kv_heads, page_size, kv_layout)
    work, rows, num_splits = plan.work, t.rows, t.num_splits
    kv_dtype = k_pages.dtype
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
        t=t,
        page_size=page_size,
        num_pages=num_pages,
        heads_fastest=config.heads_fastest,
        prefetch=config.prefetch,
        page_lookahead=config.page_lookahead,
        precision=precision,
    )
    num_work, num_groups = work.num_work, num_kv_heads // t.heads
    if config.heads_fastest:
        grid = (num_groups, num_work, num_splits)

        def spec(block, index_map):
            return pl.BlockSpec(block, lambda h, w, s: index_map(w, h, s))
    else:
        grid = (num_work, num_groups, num_splits)
        spec = pl.BlockSpec
    if kv_layout == "nhd":
        kv_block = (num_pages, page_size, None if t.heads == 1 else t.heads, head_dim)
        kv_spec = spec(kv_block, lambda w, h, s: (0, 0, h, 0))
    else:  # one kv head's pages, [num_pages, page_size, head_dim] with contiguous pages
        kv_spec = spec((num_pages, None, page_size, head_dim), lambda w, h, s: (0, h, 0, 0))
    in_specs = [
        spec((None, common.META_COLS), lambda w, h, s: (w, 0)),
        None,  # q, below
        kv_spec,
        kv_spec,
        spec(plan.page_table.shape, lambda w, h, s: (0, 0)),
    ]
    if t.direct:
        q_in = q.astype(kv_dtype)
        in_specs[1] = spec((num_tokens, num_q_heads, head_dim), lambda w, h, s: (0, 0, 0))
        lead = (num_tokens, num_q_heads)
        o_block, o_map = (num_tokens, num_q_heads), lambda *i: (0, 0)
    else:
        q_in = common.gather_q(q, work, num_kv_heads, kv_dtype)  # [W, Hkv, rows, D]
        in_specs[1] = spec((None, None, rows, head_dim), lambda w, h, s: (w, h, 0, 0))
        lead = (num_work, num_kv_heads, rows)
        o_block, o_map = (None, None, rows), lambda w, h: (w, h, 0)
    if num_splits == 1:
        out_specs = [spec((*o_block, head_dim), lambda w, h, s: (*o_map(w, h), 0))]
        out_shape = [jax.ShapeDtypeStruct((*lead, head_dim), q.dtype)]
    else:
        out_specs = [
            spec((None, *o_block, head_dim), lambda w, h, s: (s, *o_map(w, h), 0)),
            spec((None, *o_block), lambda w, h, s: (s, *o_map(w, h))),
            spec((None, *o_block), lambda w, h, s: (s, *o_map(w, h))),
        ]
        out_shape = [
            jax.ShapeDtypeStruct((num_splits, *lead, head_dim), jnp.float32),
            jax.ShapeDtypeStruct((num_splits, *lead), jnp.float32),
            jax.ShapeDtypeStruct((num_splits, *lead), jnp.float32),
        ]
    out = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=pltriton.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name=f"jaxrt_rpa_r{rows}_kv{t.block_kv}_h{t.heads}_s{num_splits}{'_hnd' if kv_layout == 'hnd' else ''}",
    )(work.meta, q_in, k_pages, v_pages, plan.page_table)
    if t.direct:
        # Every row of the output, padding included, was written by some program (META_OUT_ROWS).
        if num_splits == 1:
            return out[0]
        return merge_splits_direct(*out, plan.token_splits, q.dtype, interpret=interpret)
    if num_splits == 1:
        return common.scatter_out(out[0], work, num_q_heads, q.dtype)
    acc, m, l = out
    return common.merge_splits(acc, m, l, work, num_q_heads, q.dtype)


def _live_splits(acc, m, l, live):
    """Mask the dead splits out of a flash-decoding merge with ``where`` (they may hold NaN / inf): m to
    MASK_VALUE, l and acc to 0. ``live``: broadcastable to ``m``'s shape."""
    return jnp.where(live[..., None], acc, 0.0), jnp.where(live, m, MASK_VALUE), jnp.where(live, l, 0.0)


def _merge_kernel(splits_ref, acc_ref, m_ref, l_ref, o_ref):
    """One token, a block of q heads: ``combine_splits`` over the token's first ``splits_ref[t]`` splits,
    every split loaded at once."""
    m = m_ref[...]  # [S, heads]
    live = lax.broadcasted_iota(jnp.int32, m.shape, 0) < splits_ref[pl.program_id(0)]
    o_ref[...] = common.combine_splits(*_live_splits(acc_ref[...], m, l_ref[...], live)).astype(o_ref.dtype)


def merge_splits_direct(acc, m, l, token_splits, out_dtype, *, interpret=False) -> jax.Array:
    """Flash-decoding merge of ``[S, T, Hq, D]`` partials (``m``, ``l``: ``[S, T, Hq]``) into ``[T, Hq, D]``,
    reading each token's first ``token_splits[t]`` splits only (zero rows where it is 0; the others may hold
    anything). One Pallas program per (token, block of q heads) loads all of its splits at once."""
    num_splits, num_tokens, num_q_heads, head_dim = acc.shape
    # Small blocks (<= 4 KiB of acc per program): the merge moves little data, so what bounds it is how many
    # SMs share the loads (a program per token with all Hq heads, 8 programs for 8 tokens, was slower than
    # XLA's reductions at S=4 on an H100).
    heads = num_q_heads & -num_q_heads  # the largest power of two dividing Hq
    while heads > 1 and num_splits * heads * head_dim > 1024:
        heads //= 2
    if not (common.is_pow2(num_splits) and common.is_pow2(head_dim)):
        live = jnp.arange(num_splits)[:, None, None] < token_splits[None, :, None]
        return common.combine_splits(*_live_splits(acc, m, l, live)).astype(out_dtype)
    return pl.pallas_call(
        _merge_kernel,
        grid=(num_tokens, num_q_heads // heads),
        in_specs=[
            pl.BlockSpec((num_tokens,), lambda t, h: (0,)),
            pl.BlockSpec((num_splits, None, heads, head_dim), lambda t, h: (0, t, h, 0)),
            pl.BlockSpec((num_splits, None, heads), lambda t, h: (0, t, h)),
            pl.BlockSpec((num_splits, None, heads), lambda t, h: (0, t, h)),
        ],
        out_specs=pl.BlockSpec((None, heads, head_dim), lambda t, h: (t, h, 0)),
        out_shape=jax.ShapeDtypeStruct((num_tokens, num_q_heads, head_dim), out_dtype),
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name=f"jaxrt_rpa_merge_s{num_splits}",
    )(token_splits, acc, m, l)


def _supports(q, k_pages) -> str | None:
    return supports(q.shape, k_pages.shape, k_pages.dtype)


# Preferred on GPU: every validated configuration passed on an H100 (benchmarks/RESULTS.md, "Kernels").
register_backend(
    "pallas_gpu", ragged_paged_attention_gpu, platforms=("gpu",), supports=_supports, metadata=gpu_metadata
)
