"""Host-independent work planning shared by the Pallas ragged paged attention kernels.

Both Pallas backends split a ragged batch into *work items*: one work item is a block of up to ``block_q``
consecutive query tokens of one sequence. All of it is plain ``jnp`` on static shapes, so it traces under
``jit`` and costs a few small XLA ops per call.

The searches default to ``method="compare_all"`` (one fused compare + reduce) rather than jnp's "scan", which
lowers to a loop of small kernels.

For a work item ``w`` and a kv head ``h`` the kernels see a dense ``[rows, head_dim]`` query tile whose row
``r * group_pad + g`` holds query token ``r`` of the block and q head ``h * group + g`` (zero for padding
rows and padding heads). ``group_pad`` is the GQA group rounded up to a power of two, so the tile has a
power-of-two row count as the Triton lowering requires.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

# Columns of the int32 per-work-item metadata table ``meta [num_work, META_COLS]``.
META_SEQ = 0  # sequence id (clamped to 0 for empty work items)
META_FIRST_POS = 1  # absolute KV position of the block's first query token
META_NROWS = 2  # number of real query tokens in the block (0 = empty work item)
META_KV_LEN = 3  # kv_lens[seq]
META_LO_BLK = 4  # first kv compute block the block needs (sliding window start)
META_HI_BLK = 5  # one past the last kv compute block the block needs (causal end)
META_Q_START = 6  # row of q (token index) holding the block's first query token
# Rows of the output tile the work item writes: nrows for a real work item; for an empty one, the number of
# padding rows (past cu_q_lens[num_seqs]) it zero-fills from META_Q_START on, so that kernels which store
# straight into the [num_tokens, ...] output leave no row unwritten.
META_OUT_ROWS = 7
# kv splits of the work item (>= 1): kernels with a split grid axis divide the item's kv blocks among this
# many of their split programs (the rest have nothing to do). ``make_plan`` writes 1; a backend may plan
# more (``pallas_gpu.plan_splits``).
META_SPLITS = 8
META_COLS = 9


DEFAULT_NUM_SMS = 132  # H100 SXM


def num_sms() -> int:
    """Streaming multiprocessors of the default GPU (``DEFAULT_NUM_SMS`` when it is not a GPU)."""
    try:
        dev = jax.devices()[0]
        if dev.platform == "gpu":
            return int(getattr(dev, "core_count", DEFAULT_NUM_SMS) or DEFAULT_NUM_SMS)
    except Exception:  # pragma: no cover - no backend
        pass
    return DEFAULT_NUM_SMS


def token_rows(num_rows: int) -> int:
    """Rows of the few-token Mosaic kernels' tiles (MLP, skinny projections): a multiple of 8, at least 8."""
    return max(8, -(-num_rows // 8) * 8)


def pad_rows(a: jax.Array, rows: int) -> jax.Array:
    """``a`` ([n, ...]) with zero rows appended up to ``rows`` (a no-op when it has them)."""
    return a if a.shape[0] == rows else jnp.pad(a, ((0, rows - a.shape[0]),) + ((0, 0),) * (a.ndim - 1))


def next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def pow2_pieces(count: int, start: int = 0) -> list[tuple[int, int]]:
    """(first, size) pieces covering ``start .. start + count``, each size a power of two, largest first
    (Triton loads power-of-two tiles: 14 heads are tiles of 8, 4 and 2; 576 columns 512 and 64)."""
    out, first = [], start
    for bit in reversed(range(count.bit_length())):
        if count >> bit & 1:
            out.append((first, 1 << bit))
            first += 1 << bit
    return out


def is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def cdiv(a, b):
    return (a + b - 1) // b


def num_work_items(num_tokens: int, max_num_seqs: int, block_q: int) -> int:
    """Static bound on the work items of a batch of ``num_tokens`` tokens, padding blocks included.

    Real work items: sum_i ceil(q_i / B) <= sum_i floor(q_i / B) + k (k <= min(max_num_seqs, num_tokens)
    sequences with q_i >= 1); the padding rows P = num_tokens - sum_i q_i need ceil(P / B) more, and
    sum_i floor(q_i / B) + ceil(P / B) <= ceil(num_tokens / B) <= num_tokens // B + 1. With num_tokens
    items the bound also holds, since every real item holds >= 1 token and every padding item >= 1 row.
    """
    return max(1, min(num_tokens, num_tokens // block_q + 1 + min(max_num_seqs, num_tokens)))


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["meta", "token_work", "token_row", "token_valid"],
    meta_fields=["block_q", "group", "group_pad", "block_kv", "num_work"],
)
@dataclasses.dataclass(frozen=True)
class Plan:
    """Static tiling of a call plus the traced per-work-item / per-token index arrays."""

    block_q: int  # query tokens per work item
    group: int  # q heads per kv head
    group_pad: int  # group rounded up to a power of two
    block_kv: int  # kv tokens per compute block (a multiple of page_size)
    num_work: int
    meta: jax.Array  # [num_work, META_COLS] int32
    # Token -> tile maps (None when make_plan was asked for no token map):
    token_work: jax.Array | None  # [num_tokens] int32, work item of each token (0 for padding rows)
    token_row: jax.Array | None  # [num_tokens] int32, row of the token inside its work item
    token_valid: jax.Array | None  # [num_tokens] bool

    @property
    def rows(self) -> int:
        return self.block_q * self.group_pad


def make_plan(
    *,
    num_tokens: int,
    num_q_heads: int,
    num_kv_heads: int,
    block_q: int,
    block_kv: int,
    kv_lens: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array,
    sliding_window: int | None,
    search_method: str = "compare_all",
    token_map: bool = True,
) -> Plan:
    group = num_q_heads // num_kv_heads
    group_pad = next_pow2(group)
    max_num_seqs = kv_lens.shape[0]
    num_work = num_work_items(num_tokens, max_num_seqs, block_q)

    n = num_seqs.reshape(()).astype(jnp.int32)
    seq_idx = jnp.arange(max_num_seqs, dtype=jnp.int32)
    live = seq_idx < n
    q_lens = jnp.where(live, jnp.maximum(cu_q_lens[1:] - cu_q_lens[:-1], 0), 0)
    blocks = (q_lens + block_q - 1) // block_q
    cum = jnp.cumsum(blocks).astype(jnp.int32)  # inclusive
    first_block = cum - blocks  # exclusive

    w = jnp.arange(num_work, dtype=jnp.int32)
    w_seq = jnp.minimum(
        jnp.searchsorted(cum, w, side="right", method=search_method).astype(jnp.int32), max_num_seqs - 1
    )
    w_valid = w < cum[-1]
    w_blk = w - first_block[w_seq]
    w_qlen = q_lens[w_seq]
    nrows = jnp.where(w_valid, jnp.clip(w_qlen - w_blk * block_q, 0, block_q), 0)
    kv_len = jnp.where(w_valid, kv_lens[w_seq], 0)
    first_pos = kv_len - w_qlen + w_blk * block_q
    hi = jnp.clip(first_pos + nrows, 0, kv_len)  # keys needed: positions < hi
    if sliding_window is None:
        lo = jnp.zeros_like(hi)
    else:
        lo = jnp.maximum(first_pos - sliding_window + 1, 0)
    lo_blk = lo // block_kv
    hi_blk = jnp.where(nrows > 0, (hi + block_kv - 1) // block_kv, 0)
    lo_blk = jnp.minimum(lo_blk, hi_blk)
    # Work items past the real ones cover the padding rows, block_q rows each (see num_work_items).
    pad_start = cu_q_lens[n] + (w - cum[-1]) * block_q
    pad_rows = jnp.clip(num_tokens - pad_start, 0, block_q)
    q_start = jnp.where(w_valid, cu_q_lens[w_seq] + w_blk * block_q, jnp.clip(pad_start, 0, num_tokens))
    out_rows = jnp.where(w_valid, nrows, pad_rows)
    ones = jnp.ones_like(nrows)
    meta = jnp.stack(
        [jnp.where(w_valid, w_seq, 0), first_pos, nrows, kv_len, lo_blk, hi_blk, q_start, out_rows, ones],
        axis=1,
    ).astype(jnp.int32)
    if not token_map:
        return Plan(block_q, group, group_pad, block_kv, num_work, meta, None, None, None)

    # Token -> (work item, row) for scattering results back.
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    # Entries of cu_q_lens past num_seqs may hold anything: mask them so the search stays sorted.
    cu_end = jnp.where(live, cu_q_lens[1:], jnp.iinfo(jnp.int32).max)
    t_seq = jnp.minimum(
        jnp.searchsorted(cu_end, t, side="right", method=search_method).astype(jnp.int32), max_num_seqs - 1
    )
    t_valid = (t < cu_q_lens[n]) & (t_seq < n) & (t >= cu_q_lens[t_seq])
    t_off = t - cu_q_lens[t_seq]
    token_work = jnp.where(t_valid, first_block[t_seq] + t_off // block_q, 0)
    token_row = jnp.where(t_valid, t_off % block_q, 0)
    return Plan(
        block_q=block_q,
        group=group,
        group_pad=group_pad,
        block_kv=block_kv,
        num_work=num_work,
        meta=meta,
        token_work=jnp.clip(token_work, 0, num_work - 1),
        token_row=token_row,
        token_valid=t_valid,
    )


def pad_page_table(page_table: jax.Array, multiple: int) -> jax.Array:
    """[max_num_seqs, pages_per_seq] -> columns padded (with page 0, never read as keys) to a multiple of
    ``multiple``, so that kernels can read whole kv blocks of page ids."""
    cols = page_table.shape[1]
    if cols % multiple == 0:
        return page_table
    return jnp.pad(page_table, ((0, 0), (0, multiple - cols % multiple)))


def gather_q(q: jax.Array, plan: Plan, num_kv_heads: int, dtype) -> jax.Array:
    """q [T, Hq, D] -> per work item and kv head query tiles [num_work, Hkv, rows, D] (padding zeroed)."""
    num_tokens, _, head_dim = q.shape
    bq, g, gp = plan.block_q, plan.group, plan.group_pad
    nrows = plan.meta[:, META_NROWS]
    first_tok = plan.meta[:, META_Q_START]
    r = jnp.arange(bq, dtype=jnp.int32)
    row_ok = r[None, :] < nrows[:, None]  # [W, bq]
    tok = jnp.where(row_ok, first_tok[:, None] + r[None, :], 0)
    tok = jnp.clip(tok, 0, num_tokens - 1)
    qg = q[tok]  # [W, bq, Hq, D]
    qg = jnp.where(row_ok[:, :, None, None], qg, 0).astype(dtype)
    qg = qg.reshape(plan.num_work, bq, num_kv_heads, g, head_dim)
    if gp != g:
        qg = jnp.pad(qg, ((0, 0), (0, 0), (0, 0), (0, gp - g), (0, 0)))
    qg = qg.transpose(0, 2, 1, 3, 4)  # [W, Hkv, bq, gp, D]
    return qg.reshape(plan.num_work, num_kv_heads, bq * gp, head_dim)


def _token_index(plan: Plan, num_kv_heads: int):
    hk = jnp.arange(num_kv_heads, dtype=jnp.int32)
    return plan.token_work[:, None], hk[None, :], plan.token_row[:, None]


def scatter_out(o: jax.Array, plan: Plan, num_q_heads: int, out_dtype) -> jax.Array:
    """[num_work, Hkv, rows, D] tiles -> [T, Hq, D], padding rows zero."""
    num_work, num_kv_heads, _, head_dim = o.shape
    o5 = o.reshape(num_work, num_kv_heads, plan.block_q, plan.group_pad, head_dim)
    w, h, r = _token_index(plan, num_kv_heads)
    ot = o5[w, h, r][:, :, : plan.group]  # [T, Hkv, g, D]
    ot = jnp.where(plan.token_valid[:, None, None, None], ot, 0)
    return ot.reshape(-1, num_q_heads, head_dim).astype(out_dtype)


def combine_splits(acc: jax.Array, m: jax.Array, l: jax.Array) -> jax.Array:
    """Flash-decoding merge of K splits: acc [K, ..., D] unnormalised (sum of p * v), m [K, ...] the base-2 row
    max, l [K, ...] the row sum of p. Rows no split saw (l = 0 everywhere) come out zero. -> [..., D]."""
    m_max = m.max(axis=0)
    alpha = jnp.exp2(m - m_max[None])
    l_tot = (alpha * l).sum(axis=0)
    return (alpha[..., None] * acc).sum(axis=0) / jnp.where(l_tot == 0.0, 1.0, l_tot)[..., None]


def merge_splits(
    acc: jax.Array, m: jax.Array, l: jax.Array, plan: Plan, num_q_heads: int, out_dtype
) -> jax.Array:
    """Flash-decoding merge. acc [K, W, Hkv, rows, D] (unnormalised), m, l [K, W, Hkv, rows] (base-2 max)."""
    k, num_work, num_kv_heads, _, head_dim = acc.shape
    w, h, r = _token_index(plan, num_kv_heads)
    acc = acc.reshape(k, num_work, num_kv_heads, plan.block_q, plan.group_pad, head_dim)[:, w, h, r]
    m = m.reshape(k, num_work, num_kv_heads, plan.block_q, plan.group_pad)[:, w, h, r]
    l = l.reshape(k, num_work, num_kv_heads, plan.block_q, plan.group_pad)[:, w, h, r]
    o = combine_splits(acc[..., : plan.group, :], m[..., : plan.group], l[..., : plan.group])
    o = jnp.where(plan.token_valid[:, None, None, None], o, 0)
    return o.reshape(-1, num_q_heads, head_dim).astype(out_dtype)
