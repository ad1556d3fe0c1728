"""Ragged paged attention with per-head attention sinks and/or ALiBi slopes, in plain XLA, for the fallback.

Attention sinks (gpt-oss, Granite-SWA, MiMo-V2-Flash: transformers passes them as ``s_aux``) add one learned
logit per head to every softmax denominator: ``out = sum_j e^{s_j} v_j / (sum_j e^{s_j} + e^{sink})``.
`jaxrt.kernels.ragged_paged_attention` takes no sinks and returns no log-sum-exp, so the denominator cannot be
corrected afterwards; this is the same online-softmax page loop as `jaxrt.kernels.reference` with the sink
folded into the final normalisation. It reads the same paged KV pool (written by `jaxrt.kernels.write_kv`).
A ``sinks=`` input on the kernels would let these layers use the fast backends too (see docs/fallback.md).

ALiBi layers (BLOOM, MPT) add ``slope[h] * (kv_pos - q_pos)`` to each scaled score. The models add
``slope[h] * kv_pos`` (or relative to the last key); per query row these differ by a constant, which softmax
ignores. The same loop serves them, with or without sinks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrt.kernels.reference import MASK_VALUE, token_metadata


def ragged_paged_attention_with_sinks(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    kv_lens: jax.Array,
    page_indices: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array,
    sinks: jax.Array | None,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    alibi_slopes: jax.Array | None = None,
) -> jax.Array:
    """Like `jaxrt.kernels.ragged_paged_attention`; ``sinks [num_q_heads]`` are raw (unscaled) logits (None: no
    sink); ``alibi_slopes [num_q_heads]`` add ``slope * (kv_pos - q_pos)`` to the scaled scores."""
    num_tokens, num_q_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_pages.shape
    group = num_q_heads // num_kv_heads
    seq_ids, positions, valid = token_metadata(num_tokens, cu_q_lens, kv_lens, num_seqs)
    n = num_seqs.reshape(())
    max_kv = jnp.max(jnp.where(jnp.arange(kv_lens.shape[0]) < n, kv_lens, 0))
    num_iters = (max_kv + page_size - 1) // page_size

    qf = q.astype(jnp.float32).reshape(num_tokens, num_kv_heads, group, head_dim) * sm_scale
    token_pages = page_indices[seq_ids]
    if alibi_slopes is not None:
        slopes = alibi_slopes.astype(jnp.float32).reshape(num_kv_heads, group)

    def body(p, carry):
        m, l, acc = carry
        page = token_pages[:, p]
        k = k_pages[page].astype(jnp.float32)
        v = v_pages[page].astype(jnp.float32)
        s = jnp.einsum("tkgd,tskd->tkgs", qf, k)
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        kv_pos = p * page_size + jnp.arange(page_size, dtype=jnp.int32)
        if alibi_slopes is not None:
            rel = (kv_pos[None, :] - positions[:, None]).astype(jnp.float32)  # [T, page_size]
            s = s + slopes[None, :, :, None] * rel[:, None, None, :]
        mask = kv_pos[None, :] <= positions[:, None]
        if sliding_window is not None:
            mask &= kv_pos[None, :] > positions[:, None] - sliding_window
        mask &= valid[:, None]
        s = jnp.where(mask[:, None, None, :], s, MASK_VALUE)
        m_new = jnp.maximum(m, s.max(axis=-1))
        alpha = jnp.exp(m - m_new)
        pexp = jnp.where(mask[:, None, None, :], jnp.exp(s - m_new[..., None]), 0.0)
        return (
            m_new,
            alpha * l + pexp.sum(axis=-1),
            alpha[..., None] * acc + jnp.einsum("tkgs,tskd->tkgd", pexp, v),
        )

    init = (
        jnp.full((num_tokens, num_kv_heads, group), MASK_VALUE, jnp.float32),
        jnp.zeros((num_tokens, num_kv_heads, group), jnp.float32),
        jnp.zeros((num_tokens, num_kv_heads, group, head_dim), jnp.float32),
    )
    m, l, acc = jax.lax.fori_loop(0, num_iters, body, init)
    if sinks is None:
        out = jnp.where(valid[:, None, None, None], acc / jnp.maximum(l, 1e-30)[..., None], 0.0)
        return out.reshape(num_tokens, num_q_heads, head_dim).astype(q.dtype)
    sink = sinks.astype(jnp.float32).reshape(num_kv_heads, group)[None]
    m_all = jnp.maximum(m, sink)
    scale = jnp.exp(m - m_all)
    out = acc * scale[..., None] / (l * scale + jnp.exp(sink - m_all))[..., None]
    out = jnp.where(valid[:, None, None, None], out, 0.0)
    return out.reshape(num_tokens, num_q_heads, head_dim).astype(q.dtype)
