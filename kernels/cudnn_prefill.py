"""Prompts' attention through cuDNN's fused flash attention, on NVIDIA GPUs.

When a step's sequences are all prompts with nothing cached before them (new prompts, or their first chunks:
what sets the time to first token of long prompts), each one's keys and values are exactly its own tokens in
the step, so the paging buys nothing: the K/V rows the step has just written are gathered back from their
pages in the order of ``q`` and the prompts attended as cuDNN's packed segments (causal within each; jax's
cuDNN module, since ``jax.nn.dot_product_attention`` has no packed form). On an H200 at Llama-3.2-1B's heads
cuDNN's kernel takes 0.55-0.6x the paged Triton kernel's time per layer at 1k-8k tokens; the gathers, the
offsets and the masking of padding rows cost ~10-130 us per layer, so a step gains from about 2k tokens of
prompts on (benchmarks/RESULTS.md, "Engine", nineteenth and twentieth rounds).

Prompts behind a cached prefix (a long prompt's later chunks, radix-cache hits) take cuDNN too
(``prefix_capacity > 0``): cuDNN's causal mask in the packed layout is aligned top-left, so each sequence's new
tokens are attended against their own rows (causal) and, in a second call, against its prefix rows gathered
into a packed buffer (no mask), and the two parts merged by cuDNN's log-sum-exps. 22-28% off an 8k chunk
behind 8k-24k cached tokens of a 1B model on an H200 (twenty-first round).

The host makes the choice: the engine compiles a second model program for each token bucket of at least
``MIN_TOKENS`` (``ForwardBatch.fresh`` set, a static field; in the background after start-up), and on the
largest of them one per prefix buffer size (``prefix_capacities``; ``ForwardBatch.prefix_capacity``), and runs
the one ``choose`` names (1 to ``MAX_SEQS`` sequences with at least ``MIN_WORK`` of causal work; behind
prefixes also ``MIN_TOKENS`` new tokens); its attention calls pass ``ragged_paged_attention(fresh_prompt=...,
prefix_capacity=...)``. Decodes laid out before those prompts (a prompt arriving while others decode: the
serving case under load) are attended apart by the paged kernel in a variant of each program
(``split_attention``, ``ForwardBatch.decodes``): -12% on an 8k step of a fresh prompt beside 255 decodes, -20%
behind 8k cached tokens (twenty-second round). Any other step (decodes alone, many short prompts) runs the
paged kernel as before. A first form chose on the device with a ``lax.cond`` in every layer; its steps had
0.26-0.9 ms more idle gaps, and at 512 and 1k tokens it lost more than cuDNN gained.

Static scope (``supports``): bf16/f16 queries and pools of one dtype, head_dim a multiple of 8 up to 256 (128
before Hopper), no logit soft-cap and no sliding window; layers out of scope keep the paged kernel
inside a fresh-prompt program. ``JAXRT_CUDNN_PREFILL=0`` turns it off.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# From 2k tokens it wins on an H200 (Llama-3.2-1B prefill 2k / 4k / 8k in two A/B pairs: -4.5 to -5.2 / -7.7 to
# -8.4 / -11.7 to -12.9%); at 512 and 1k the gathers cost more than cuDNN saves (+2-3%; benchmarks/RESULTS.md,
# "Engine", nineteenth round).
MIN_TOKENS = 2048
# Several fresh prompts share one step as cuDNN's packed segments. Its packed kernel and the offsets' fix-ups cost
# more with more segment slots (1B heads, 4 x 2048 tokens: 254 us per layer with 8 slots, 268 with 64), and many
# short prompts have little attention to save, so a step of more prompts keeps the paged kernel.
MAX_SEQS = 8
# Least causal work (sum of squared prompt lengths) for the fresh program: a 2048-token prompt's. Per 1B layer on
# an H200 the packed path saves 10 us at one prompt of 2048 tokens, 15 at eight of 1024, 68 at four of 2048, and
# loses 6 / 15 / 19 us at two of 1024 / four of 512 / eight of 256 (benchmarks/RESULTS.md, twentieth round).
MIN_WORK = 2048 * 2048
# The smallest packed prefix buffer (rows) of the programs for chunks behind a cached prefix; ``prefix_capacities``.
MIN_PREFIX_CAPACITY = 8192
_HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def supports(
    q_shape, q_dtype, k_shape, kv_dtype, sliding_window, soft_cap, max_head_dim: int = 256
) -> str | None:
    """None if a step of these static shapes may take the cuDNN path, else why the paged kernel runs."""
    num_tokens, num_q_heads, head_dim = q_shape
    num_kv_heads = k_shape[2]
    if num_tokens < MIN_TOKENS:
        return f"{num_tokens} tokens (< {MIN_TOKENS})"
    if jnp.dtype(q_dtype) not in _HALF or jnp.dtype(kv_dtype) != jnp.dtype(q_dtype):
        return f"dtypes q {q_dtype} / kv {kv_dtype} (cuDNN takes bf16 or f16, one dtype)"
    if head_dim % 8 or head_dim > max_head_dim:
        return f"head_dim {head_dim}"
    if num_q_heads % num_kv_heads:
        return f"{num_q_heads} q heads over {num_kv_heads} kv heads"
    if soft_cap is not None:
        return "logit soft-cap"
    if sliding_window is not None:
        return "sliding window"
    return None


@functools.cache
def cudnn_available() -> bool:
    """Whether the default device is an NVIDIA GPU with a cuDNN that has fused attention."""
    try:
        if jax.devices()[0].platform != "gpu":
            return False
        from jax._src.cudnn.fused_attention_stablehlo import check_cudnn_version

        check_cudnn_version()
        return True
    except Exception:  # noqa: BLE001 - no GPU, no cuDNN, or a jax without the module
        return False


def max_head_dim() -> int:
    """256 on Hopper and later, else 128 (cuDNN's flash attention limits)."""
    cc = str(getattr(jax.devices()[0], "compute_capability", "0"))
    return 256 if float(cc or 0) >= 9.0 else 128


def available(interpret: bool, dtype, kv_dtype) -> bool:
    """Whether fresh-prompt programs can be made for a model of this compute and KV dtype: a half-precision
    model with its pool in the same dtype, and cuDNN there (the interpreter runs the path with XLA's
    attention instead)."""
    half = jnp.dtype(dtype) in _HALF and jnp.dtype(kv_dtype) == jnp.dtype(dtype)
    return half and (interpret or cudnn_available())


def applies(q, k_pages, sliding_window, soft_cap) -> bool:
    """Whether a ``pallas_gpu`` call of these static shapes on a fresh prompt runs ``fresh_attention``
    (within ``supports``)."""
    head_max = max_head_dim() if cudnn_available() else 256
    return (
        supports(q.shape, q.dtype, k_pages.shape, k_pages.dtype, sliding_window, soft_cap, head_max) is None
    )


def fresh_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    kv_lens: jax.Array,
    page_indices: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array,
    *,
    sm_scale: float,
    implementation: str = "cudnn",
    prefix_capacity: int = 0,
) -> jax.Array:
    """Causal attention of a batch of at most ``MAX_SEQS`` prompts or prompt chunks, in the ragged layout of
    ``ragged_paged_attention`` (padding rows returned as zeros).

    ``prefix_capacity == 0``: the batch is fresh (``batch_is_fresh``: each sequence's keys are exactly its query
    tokens). The K/V rows of the step's tokens are gathered from their pages into the order of ``q``, so the
    batch is cuDNN's packed layout: one row of segments at offsets ``cu_q_lens`` (``implementation="cudnn"``);
    "xla" computes the same with a dense segment mask, for the interpreter and tests. A one-row page table (one
    sequence at most) takes ``jax.nn.dot_product_attention``'s public padded form instead.

    ``prefix_capacity > 0``: sequences may have a cached prefix (later chunks of long prompts, prompts that hit
    the radix cache), whose rows, ``sum(max(prefix, 1))`` of them, must fit in ``prefix_capacity``
    (``prefix_rows``). cuDNN's causal mask in the packed layout is aligned top-left (row ``i`` of a segment sees
    keys ``<= i``), which is right for a chunk's own tokens but not behind a prefix, so each sequence is
    attended in two parts: its chunk against its own new rows (causal, as above) and against its prefix rows,
    gathered into a packed buffer of ``prefix_capacity`` rows (no mask: every prefix key precedes every query);
    the two normalised parts are merged by their log-sum-exps (cuDNN returns them), as split-kv decoding does.
    """
    num_tokens = q.shape[0]
    n, valid, seq_ids, local = _token_layout(cu_q_lens, num_seqs, num_tokens)
    prefix = jnp.maximum(kv_lens - (cu_q_lens[1:] - cu_q_lens[:-1]), 0) if prefix_capacity else None
    positions = local if prefix is None else prefix[seq_ids] + local
    k, v = (_gather(pool, page_indices, seq_ids, positions, valid) for pool in (k_pages, v_pages))
    if implementation == "xla":  # the stand-in's mask of each token's own rows: its sequence's, up to itself
        own = (seq_ids[:, None] == seq_ids[None, :]) & (local[:, None] >= local[None, :])
        own &= valid[:, None] & valid[None, :]
    if prefix_capacity == 0:
        if implementation == "xla":
            o = jax.nn.dot_product_attention(
                q[None], k, v, mask=own[None, None], scale=sm_scale, implementation="xla"
            )[0]
        elif page_indices.shape[0] == 1:
            # At least 1: an empty batch (the warm-up run) attends one row, returned as zeros.
            lens = jnp.reshape(jnp.maximum(cu_q_lens[n], 1), (1,)).astype(jnp.int32)
            o = jax.nn.dot_product_attention(
                q[None],
                k,
                v,
                scale=sm_scale,
                is_causal=True,
                query_seq_lengths=lens,
                key_value_seq_lengths=lens,
                implementation="cudnn",
            )[0]
        else:
            o = _packed_cudnn(q, k, v, cu_q_lens, cu_q_lens, n, sm_scale, causal=True, stats=False)
        return jnp.where(valid[:, None, None], o, jnp.zeros((), o.dtype)).astype(q.dtype)

    # The prefix rows, packed: sequence i's at [starts[i], starts[i] + max(prefix[i], 1)); an empty prefix keeps
    # one row (cuDNN's segments are never empty; it holds a real row, see _gather), whose part the merge drops.
    m = min(cu_q_lens.shape[0] - 1, MAX_SEQS)
    has_prefix = prefix[:m] > 0
    seg = jnp.arange(m, dtype=jnp.int32)
    rows = jnp.where(seg < n, jnp.maximum(prefix[:m], 1), 0)
    starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(rows, dtype=jnp.int32)])
    r = jnp.arange(prefix_capacity, dtype=jnp.int32)
    r_valid = r < starts[m]
    r_seq = jnp.where(r_valid, jnp.sum(starts[None, 1:] <= r[:, None], axis=1, dtype=jnp.int32), 0)
    r_pos = jnp.where(r_valid, r - starts[r_seq], 0)
    r_live = r_valid & (r_pos < prefix[r_seq])
    kp, vp = (_gather(pool, page_indices, r_seq, r_pos, r_live) for pool in (k_pages, v_pages))
    if implementation == "xla":
        o_own, lse_own = _dense_attention(q, k[0], v[0], own, sm_scale)
        before = (seq_ids[:, None] == r_seq[None, :]) & valid[:, None] & r_live[None, :]
        o_pre, lse_pre = _dense_attention(q, kp[0], vp[0], before, sm_scale)
    else:
        o_own, stats = _packed_cudnn(q, k, v, cu_q_lens, cu_q_lens, n, sm_scale, causal=True, stats=True)
        lse_own = _token_stats(stats, seq_ids, local)
        o_pre, stats = _packed_cudnn(q, kp, vp, cu_q_lens, starts, n, sm_scale, causal=False, stats=True)
        lse_pre = _token_stats(stats, seq_ids, local)
    use_pre = (has_prefix[jnp.minimum(seq_ids, m - 1)] & valid)[:, None]
    lse_pre = jnp.where(use_pre, lse_pre, -jnp.inf)
    top = jnp.maximum(lse_own, lse_pre)
    w_own, w_pre = jnp.exp(lse_own - top)[..., None], jnp.exp(lse_pre - top)[..., None]
    o = (o_own.astype(jnp.float32) * w_own + o_pre.astype(jnp.float32) * w_pre) / (w_own + w_pre)
    return jnp.where(valid[:, None, None], o, 0.0).astype(q.dtype)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["decodes", "kv_lens", "page_indices", "cu_q_lens", "num_seqs"],
    meta_fields=[],
)
@dataclasses.dataclass(frozen=True)
class SplitPlan:
    """How ``split_attention`` divides a batch: its leading one-token sequences (``decodes``, ``[1]``) and the
    sequence arrays of the rest, shifted past them (``m = min(max_num_seqs, MAX_SEQS)`` rows; ``cu_q_lens``
    keeps absolute token offsets, so their rows start at the decodes' count). One per step
    (``attention_metadata(..., decodes=True)``), shared by every layer."""

    decodes: jax.Array
    kv_lens: jax.Array  # [m]
    page_indices: jax.Array  # [m, pages_per_seq]
    cu_q_lens: jax.Array  # [m + 1]
    num_seqs: jax.Array  # [1]


def plan_split(kv_lens: jax.Array, cu_q_lens: jax.Array, num_seqs: jax.Array, page_indices: jax.Array):
    """The ``SplitPlan`` of a batch (device arrays, traced)."""
    max_seqs = kv_lens.shape[0]
    m = min(max_seqs, MAX_SEQS)
    n = num_seqs.reshape(())
    lead = (jnp.arange(max_seqs, dtype=jnp.int32) < n) & (cu_q_lens[1:] - cu_q_lens[:-1] == 1)
    d = jnp.where(lead.all(), max_seqs, jnp.argmin(lead)).astype(jnp.int32)  # the leading run's length
    shift = jnp.minimum(d + jnp.arange(m + 1, dtype=jnp.int32), max_seqs)
    rest = jnp.minimum(shift[:m], max_seqs - 1)
    return SplitPlan(
        d.reshape(1), kv_lens[rest], page_indices[rest], cu_q_lens[shift], jnp.maximum(n - d, 0).reshape(1)
    )


def split_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    kv_lens: jax.Array,
    page_indices: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array,
    *,
    sm_scale: float,
    paged,
    implementation: str = "cudnn",
    prefix_capacity: int = 0,
    plan: SplitPlan | None = None,
) -> jax.Array:
    """``fresh_attention`` for a batch that may begin with one-token sequences (decodes): a step of one long
    prompt's chunk and many decodes is the serving case under load, and has more than ``MAX_SEQS`` sequences.
    The scheduler's order puts the decodes first: running requests before new ones, and a prompt still in
    chunks is the last one admitted (its chunk took the rest of the step's budget). A one-token sequence after
    a prompt is attended with the prompts, as a chunk behind its prefix (``choose`` counts it there).

    The leading one-token sequences, ``d`` of them, are attended by ``paged(q_rows, num_seqs)``: the paged
    kernel over the first ``min(T, max_num_seqs)`` rows of ``q`` (they hold the ``d`` tokens) with ``num_seqs``
    cut to ``d``, a decode batch's shape and so its tiling. The other sequences (at most ``MAX_SEQS``, with
    ``prefix_capacity`` as in ``fresh_attention``) take ``fresh_attention`` on the sequence arrays shifted past
    the decodes (``plan``, from ``plan_split`` when None), whose token rows then start at ``cu_q_lens[d]``.
    Rows are picked from the two results.
    """
    plan = plan_split(kv_lens, cu_q_lens, num_seqs, page_indices) if plan is None else plan
    o = fresh_attention(
        q,
        k_pages,
        v_pages,
        plan.kv_lens,
        plan.page_indices,
        plan.cu_q_lens,
        plan.num_seqs,
        sm_scale=sm_scale,
        implementation=implementation,
        prefix_capacity=prefix_capacity,
    )
    rows = min(q.shape[0], kv_lens.shape[0])
    o_dec = paged(q[:rows], plan.decodes)
    head = jnp.where((jnp.arange(rows) < plan.decodes[0])[:, None, None], o_dec.astype(o.dtype), o[:rows])
    return lax.dynamic_update_slice(o, head, (0, 0, 0))


def _token_layout(cu_q_lens, num_seqs, num_tokens):
    """(n, valid [T], seq_ids [T], local [T]): the batch's sequence count, which rows are its tokens (from
    ``cu_q_lens[0]``, 0 unless ``split_attention`` shifted the batch past its leading decodes, to
    ``cu_q_lens[n]``), and each token's sequence and index within the sequence's part of the step (0 for the
    other rows)."""
    n = num_seqs.reshape(())
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    valid = (t >= cu_q_lens[0]) & (t < cu_q_lens[n])
    # Token t's sequence: how many sequences end at or before it, counted in one fused comparison (a
    # searchsorted of the default method is a device loop, whose trips cost a host round trip each on GPUs).
    ends = jnp.where(jnp.arange(cu_q_lens.shape[0] - 1) < n, cu_q_lens[1:], num_tokens)
    seq_ids = jnp.where(valid, jnp.sum(ends[None, :] <= t[:, None], axis=1, dtype=jnp.int32), 0)
    local = jnp.where(valid, t - cu_q_lens[seq_ids], 0)
    return n, valid, seq_ids, local


def _gather(pool, page_indices, seq_ids, positions, live):
    """``[1, R, Hkv, D]``: the pool's K or V rows of sequences ``seq_ids`` at kv ``positions`` (``[R]`` each).
    Rows where ``live`` is false repeat sequence 0's first row instead (a slot of real data): cuDNN may read
    rows past a segment in its last tile and masks their scores, but a stale or NaN slot there would leak
    through ``0 * NaN`` in ``P @ V``. Pointing them at a real row costs nothing, where zeroing them was a pass
    of its own over the buffer (33 us per 1B layer for a 32768-row prefix buffer on an H200)."""
    num_pages, page_size, num_kv_heads, head_dim = pool.shape
    pages = page_indices[seq_ids, jnp.minimum(positions // page_size, page_indices.shape[1] - 1)]
    slots = jnp.where(live, pages * page_size + positions % page_size, page_indices[0, 0] * page_size)
    rows = pool.reshape(num_pages * page_size, num_kv_heads * head_dim)
    kv = _wide(rows)[slots]
    kv = kv if kv.dtype == rows.dtype else lax.bitcast_convert_type(kv, rows.dtype)
    return kv.reshape(1, slots.shape[0], num_kv_heads, head_dim)


def _dense_attention(q, k, v, mask, sm_scale):
    """Reference attention with its log-sum-exp, f32: ``q [T, Hq, D]``, ``k, v [S, Hkv, D]``, ``mask [T, S]``
    -> (``o [T, Hq, D]``, ``lse [T, Hq]``; -inf and zeros for rows that see no key). The interpreter's stand-in
    for cuDNN's two calls."""
    group = q.shape[1] // k.shape[1]
    k, v = (jnp.repeat(x.astype(jnp.float32), group, axis=1) for x in (k, v))
    s = jnp.einsum("thd,shd->hts", q.astype(jnp.float32), k) * sm_scale
    s = jnp.where(mask[None], s, -jnp.inf)
    lse = jax.nn.logsumexp(s, axis=-1)  # [Hq, T]
    p = jnp.where(mask[None], jnp.exp(s - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None]), 0.0)
    return jnp.einsum("hts,shd->thd", p, v), lse.T


def _token_stats(stats, seq_ids, local):
    """cuDNN's log-sum-exps of a packed call, ``[segments, Hq, T]`` with segment ``i``'s rows from 0, as
    ``[T, Hq]`` for the step's tokens."""
    return stats[seq_ids, :, local]


def _wide(rows: jax.Array) -> jax.Array:
    """``rows [N, W]`` of 2-byte elements as ``[N, W // 2]`` 4-byte words where W allows (a row gather of 4-byte
    elements moves half the elements of one of bf16), else unchanged."""
    n, w = rows.shape
    if rows.dtype.itemsize != 2 or w % 2:
        return rows
    return lax.bitcast_convert_type(rows.reshape(n, w // 2, 2), jnp.uint32)


def _packed_cudnn(q, k, v, cu_q_lens, kv_starts, n, sm_scale, *, causal, stats):
    """cuDNN's flash attention over packed segments: query segment ``i < n`` is ``[cu_q_lens[i], cu_q_lens[i +
    1])``, its keys ``[kv_starts[i], kv_starts[i + 1])``, causal (aligned top-left) or unmasked. Returns
    ``o [T, Hq, D]``, and with ``stats`` also cuDNN's log-sum-exps (``_token_stats``). Through jax's cuDNN
    module: the packed layout is not in ``jax.nn.dot_product_attention``."""
    from jax._src.cudnn import fused_attention_stablehlo as fa

    m = min(cu_q_lens.shape[0] - 1, MAX_SEQS)
    cu_q_lens, kv_starts = cu_q_lens[: m + 1], kv_starts[: m + 1]
    # An empty batch (the warm-up run) attends one row as one segment, returned as zeros.
    n = jnp.maximum(n, 1)
    seg = jnp.arange(m + 1, dtype=jnp.int32)

    def lens(cu):  # segment lengths, at least 1; -1 past the real segments
        return jnp.where(seg[:m] < n, jnp.maximum(cu[1:] - cu[:-1], 1), -1)[None].astype(jnp.int32)

    def offsets(cu):  # starts of the real segments; -1 past them (cuDNN's packed-layout convention in jax)
        return jnp.where(seg < n, cu, -1)[None].astype(jnp.int32)

    out = fa.dot_product_attention(
        q[None],
        k,
        v,
        q_seqlen=lens(cu_q_lens),
        kv_seqlen=lens(kv_starts),
        q_offsets=offsets(cu_q_lens),
        kv_offsets=offsets(kv_starts),
        scale=sm_scale,
        mask_type=fa.MaskType.PADDING_CAUSAL if causal else fa.MaskType.PADDING,
        return_residual=stats,
    )
    return (out[0][0], out[1]) if stats else out[0]


def batch_is_fresh(kv_lens, cu_q_lens, num_seqs) -> bool:
    """Whether a laid-out batch (host arrays) is what a fresh-prompt program (``ForwardBatch.fresh``) can run:
    leading one-token sequences (decodes; ``split_attention``), then 1 to ``MAX_SEQS`` prompts whose keys are
    exactly their query tokens (no cached prefix)."""
    q_lens, prefix = _prompts(*_lens(kv_lens, cu_q_lens, num_seqs))
    return _packable(q_lens, prefix) and not prefix.any()


def prefix_rows(kv_lens, cu_q_lens, num_seqs) -> int:
    """Rows of the packed prefix buffer a batch needs (``fresh_attention``'s ``prefix_capacity``): each cached
    prefix of a sequence after the leading one-token ones, at least one row."""
    return _rows(_prompts(*_lens(kv_lens, cu_q_lens, num_seqs))[1])


def prefix_capacities(context_length: int) -> list[int]:
    """The prefix buffer sizes the engine compiles programs for: ``MIN_PREFIX_CAPACITY`` rows, then x4 until
    one holds a context. A batch takes the smallest that fits, so the gather moves at most 4x its prefix (cuDNN
    reads no row past the segments)."""
    caps = [MIN_PREFIX_CAPACITY]
    while caps[-1] < context_length:
        caps.append(caps[-1] * 4)
    return caps


def bucket_capacities(fresh_buckets, context_length: int) -> dict[int, list[int]]:
    """The prefixed programs the engine compiles: token bucket -> prefix buffer sizes. Every size of
    ``prefix_capacities`` on the largest bucket (where a long prompt's chunks land), and the smallest on the
    smaller buckets that hold more than ``MIN_TOKENS`` new tokens (a turn of a few thousand tokens behind a
    cached conversation or system prompt, or beside decodes); a bucket of ``MIN_TOKENS`` could only take a
    chunk of exactly that many. So start-up compiles a few more programs, not a few per bucket."""
    if not fresh_buckets:
        return {}
    caps, top = prefix_capacities(context_length), max(fresh_buckets)
    return {n: caps if n == top else caps[:1] for n in sorted(fresh_buckets) if n == top or n > MIN_TOKENS}


def choose(kv_lens, cu_q_lens, num_seqs, capacities=()) -> int | None:
    """The host's choice for a laid-out batch (host arrays): None (the paged kernel), 0 (the fresh program) or
    the smallest of ``capacities`` that holds the batch's ``prefix_rows`` (the program for prompts behind a
    cached prefix). Leading one-token sequences (decodes) take the paged kernel inside either program
    (``split_attention``) and do not count below. cuDNN takes the others, at most ``MAX_SEQS``, and only pays
    for its gathers and packing with at least ``MIN_WORK`` of attention: twice the query-key pairs of their
    causal attention (``sum(q * q + 2 * q * prefix)``); behind prefixes, also at least ``MIN_TOKENS`` new
    tokens (on an H200, 1B heads, 2048-token bucket: 1100 new tokens behind 1500 / 4096 cached lost 8 / 2%,
    2048 behind 1500 gained 7%; benchmarks/RESULTS.md, "Engine", twenty-first round)."""
    q_lens, prefix = _prompts(*_lens(kv_lens, cu_q_lens, num_seqs))
    if not _packable(q_lens, prefix) or int((q_lens * (q_lens + 2 * prefix)).sum()) < MIN_WORK:
        return None
    if not prefix.any():
        return 0
    if int(q_lens.sum()) < MIN_TOKENS:
        return None
    need = _rows(prefix)
    return next((c for c in sorted(capacities) if c >= need), None)


def _lens(kv_lens, cu_q_lens, num_seqs) -> tuple[np.ndarray, np.ndarray]:
    """(query lengths, cached prefix lengths) of a laid-out batch's sequences, int64."""
    n = int(num_seqs[0])
    q_lens = np.diff(np.asarray(cu_q_lens[: n + 1])).astype(np.int64)
    return q_lens, np.asarray(kv_lens[:n]).astype(np.int64) - q_lens


def leading_decodes(kv_lens, cu_q_lens, num_seqs) -> int:
    """How many one-token sequences (decodes) a laid-out batch (host arrays) begins with: what a program for it
    must attend apart (``split_attention``; ``ForwardBatch.decodes``)."""
    return _lead(_lens(kv_lens, cu_q_lens, num_seqs)[0])


def _lead(q_lens) -> int:
    return len(q_lens) if (q_lens == 1).all() else int(np.argmin(q_lens == 1))


def _prompts(q_lens, prefix) -> tuple[np.ndarray, np.ndarray]:
    """The sequences after the leading one-token ones (what ``split_attention`` gives cuDNN)."""
    d = _lead(q_lens)
    return q_lens[d:], prefix[d:]


def _rows(prefix) -> int:
    """Packed prefix buffer rows for these prefix lengths: each at least one (cuDNN's segments are never empty)."""
    return int(np.maximum(prefix, 1).sum())


def _packable(q_lens, prefix) -> bool:
    return 0 < len(q_lens) <= MAX_SEQS and bool((q_lens > 0).all()) and bool((prefix >= 0).all())
