"""Fresh prompts' attention through cuDNN's fused flash attention, on NVIDIA GPUs.

When a step's sequences are all prompts with nothing cached before them (new prompts, or their first chunks:
what sets the time to first token of long prompts), each one's keys and values are exactly its own tokens in
the step, so the paging buys nothing: the K/V rows the step has just written are gathered back from their
pages in the order of ``q`` and the prompts attended as cuDNN's packed segments (causal within each; jax's
cuDNN module, since ``jax.nn.dot_product_attention`` has no packed form). On an H200 at Llama-3.2-1B's heads
cuDNN's kernel takes 0.55-0.6x the paged Triton kernel's time per layer at 1k-8k tokens; the gathers, the
offsets and the masking of padding rows cost ~10-130 us per layer, so a step gains from about 2k tokens of
prompts on (benchmarks/RESULTS.md, "Engine", nineteenth and twentieth rounds).

The host makes the choice: the engine compiles a second model program for each token bucket of at least
``MIN_TOKENS`` (``ForwardBatch.fresh`` set, a static field; in the background after start-up) and runs it for
a step that ``prefers_fresh`` (``batch_is_fresh``: 1 to ``MAX_SEQS`` fresh prompts; with at least
``MIN_WORK`` of causal work); its attention calls pass ``ragged_paged_attention(fresh_prompt=...)``. Any other
step (a prefix from the radix cache, a later chunk, decodes, many short prompts) runs the paged kernel as
before. A first form chose on the device with a ``lax.cond`` in every layer; its steps had 0.26-0.9 ms more
idle gaps, and at 512 and 1k tokens it lost more than cuDNN gained.

Static scope (``supports``): bf16/f16 queries and pools of one dtype, head_dim a multiple of 8 up to 256 (128
before Hopper), no logit soft-cap and no sliding window; layers out of scope keep the paged kernel
inside a fresh-prompt program. ``JAXRT_CUDNN_PREFILL=0`` turns it off.
"""

from __future__ import annotations

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
) -> jax.Array:
    """Causal attention of a batch of fresh prompts (``batch_is_fresh``: at most ``MAX_SEQS`` sequences, each
    one's keys exactly its query tokens), in the ragged layout of ``ragged_paged_attention`` (padding rows
    returned as zeros).

    The K/V rows of the step's tokens are gathered from their pages into the order of ``q``, so the batch is
    cuDNN's packed layout: one row of segments at offsets ``cu_q_lens`` (``implementation="cudnn"``); "xla"
    computes the same with a dense segment mask, for the interpreter and tests. A one-row page table (one
    sequence at most) takes ``jax.nn.dot_product_attention``'s public padded form instead."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_pages, page_size, num_kv_heads, _ = k_pages.shape
    n = num_seqs.reshape(())
    total = cu_q_lens[n]
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    valid = t < total
    # Token t's sequence: how many sequences end at or before it, counted in one fused comparison (a
    # searchsorted of the default method is a device loop, whose trips cost a host round trip each on GPUs).
    ends = jnp.where(jnp.arange(cu_q_lens.shape[0] - 1) < n, cu_q_lens[1:], num_tokens)
    seq_ids = jnp.where(valid, jnp.sum(ends[None, :] <= t[:, None], axis=1, dtype=jnp.int32), 0)
    positions = jnp.where(valid, t - cu_q_lens[seq_ids], 0)  # fresh: kv position = position in the prompt
    pages = page_indices[seq_ids, jnp.minimum(positions // page_size, page_indices.shape[1] - 1)]
    slots = jnp.where(valid, pages * page_size + positions % page_size, 0)
    live = valid[None, :, None, None]

    def gather(pool):  # [1, T, Hkv, D]; padding rows zeroed (a stale or NaN slot: 0 * NaN would leak)
        rows = pool.reshape(num_pages * page_size, num_kv_heads * head_dim)
        kv = _wide(rows)[slots]
        kv = kv if kv.dtype == rows.dtype else lax.bitcast_convert_type(kv, rows.dtype)
        kv = kv.reshape(1, num_tokens, num_kv_heads, head_dim)
        return jnp.where(live, kv, jnp.zeros((), kv.dtype))

    k, v = gather(k_pages), gather(v_pages)
    if implementation == "xla":
        same = (seq_ids[:, None] == seq_ids[None, :]) & (positions[:, None] >= positions[None, :])
        mask = (same & valid[:, None] & valid[None, :])[None, None]
        o = jax.nn.dot_product_attention(q[None], k, v, mask=mask, scale=sm_scale, implementation="xla")[0]
    elif page_indices.shape[0] == 1:
        # At least 1: an empty batch (the warm-up run) attends one zero row, returned as zeros.
        lens = jnp.reshape(jnp.maximum(total, 1), (1,)).astype(jnp.int32)
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
        o = _packed_cudnn(q, k, v, cu_q_lens, n, sm_scale)
    return jnp.where(valid[:, None, None], o, jnp.zeros((), o.dtype)).astype(q.dtype)


def _wide(rows: jax.Array) -> jax.Array:
    """``rows [N, W]`` of 2-byte elements as ``[N, W // 2]`` 4-byte words where W allows (a row gather of 4-byte
    elements moves half the elements of one of bf16), else unchanged."""
    n, w = rows.shape
    if rows.dtype.itemsize != 2 or w % 2:
        return rows
    return lax.bitcast_convert_type(rows.reshape(n, w // 2, 2), jnp.uint32)


def _packed_cudnn(q, k, v, cu_q_lens, n, sm_scale):
    """cuDNN's flash attention over the packed segments ``[cu_q_lens[i], cu_q_lens[i + 1])``, ``i < n``
    (jax's cuDNN module: the packed layout is not in ``jax.nn.dot_product_attention``)."""
    from jax._src.cudnn import fused_attention_stablehlo as fa

    m = min(cu_q_lens.shape[0] - 1, MAX_SEQS)
    cu_q_lens = cu_q_lens[: m + 1]
    # An empty batch (the warm-up run) attends one zero row as one segment, returned as zeros.
    n = jnp.maximum(n, 1)
    seg = jnp.arange(m + 1, dtype=jnp.int32)
    lens = jnp.maximum(cu_q_lens[1:] - cu_q_lens[:-1], 1)
    lens = jnp.where(seg[:m] < n, lens, -1)[None].astype(jnp.int32)
    # Starts of the real segments; -1 past them (cuDNN's packed-layout convention in jax).
    offsets = jnp.where(seg < n, cu_q_lens, -1)[None].astype(jnp.int32)
    return fa.dot_product_attention(
        q[None],
        k,
        v,
        q_seqlen=lens,
        kv_seqlen=lens,
        q_offsets=offsets,
        kv_offsets=offsets,
        scale=sm_scale,
        mask_type=fa.MaskType.PADDING_CAUSAL,
    )[0]


def batch_is_fresh(kv_lens, cu_q_lens, num_seqs) -> bool:
    """Whether a laid-out batch (host arrays) is what a fresh-prompt program (``ForwardBatch.fresh``) can run:
    1 to ``MAX_SEQS`` sequences, each a prompt whose keys are exactly its query tokens (no cached prefix, no
    decode)."""
    n = int(num_seqs[0])
    q_lens = np.diff(np.asarray(cu_q_lens[: n + 1]))
    fresh = bool((q_lens > 0).all()) and bool((q_lens == np.asarray(kv_lens[:n])).all())
    return 0 < n <= MAX_SEQS and fresh


def prefers_fresh(kv_lens, cu_q_lens, num_seqs) -> bool:
    """The host's choice: a fresh batch (``batch_is_fresh``) whose causal attention is at least ``MIN_WORK``
    query-key pairs' worth (sum of squared prompt lengths), where cuDNN's kernel saves more than the gathers
    and the packing cost."""
    if not batch_is_fresh(kv_lens, cu_q_lens, num_seqs):
        return False
    q_lens = np.diff(np.asarray(cu_q_lens[: int(num_seqs[0]) + 1])).astype(np.int64)
    return int((q_lens**2).sum()) >= MIN_WORK
