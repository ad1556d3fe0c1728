"""Pure-jnp reference implementations of every jaxrt attention op.

These run on any backend (they are plain XLA), define the semantics the Pallas kernels must match, and are
the attention path on CPU.

Layout contract (shared by the model, the KV write and every attention backend):

- ``q``: ``[num_tokens, num_q_heads, head_dim]``. Tokens of all sequences are concatenated; sequence ``i``
  owns rows ``cu_q_lens[i]:cu_q_lens[i + 1]``. Rows past ``cu_q_lens[num_seqs]`` are padding.
- ``k_pages`` / ``v_pages``: ``[num_pages, page_size, num_kv_heads, head_dim]`` (token-major pages, as in
  vLLM's flash-attention layout). Token ``j`` of sequence ``i`` lives at
  ``k_pages[page_indices[i, j // page_size], j % page_size]``.
- ``kv_lens``: ``[max_num_seqs] int32``, the KV length of each sequence *including* its new tokens.
- ``page_indices``: ``[max_num_seqs, pages_per_seq] int32``.
- ``cu_q_lens``: ``[max_num_seqs + 1] int32``, cumulative query lengths.
- ``num_seqs``: ``[1] int32``, how many leading rows of the per-sequence arrays are real.

The new tokens of a sequence are its *last* ``q_len`` KV positions: query row ``r`` of sequence ``i`` sits at
absolute position ``kv_lens[i] - q_len + r`` and attends causally to positions ``<=`` its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

# Large negative instead of -inf keeps fully masked rows finite (they are padding and are zeroed later).
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def token_metadata(
    num_tokens: int, cu_q_lens: jax.Array, kv_lens: jax.Array, num_seqs: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-token sequence id, absolute position and validity from the ragged batch description.

    Returns ``seq_ids [num_tokens] int32`` (clamped to a real sequence for padding rows),
    ``positions [num_tokens] int32`` and ``valid [num_tokens] bool``.
    """
    n = num_seqs.reshape(())
    token_idx = jnp.arange(num_tokens, dtype=jnp.int32)
    # seq of token t = number of sequence starts <= t, minus one.
    seq_ids = jnp.searchsorted(cu_q_lens[1:], token_idx, side="right").astype(jnp.int32)
    valid = (token_idx < cu_q_lens[n]) & (seq_ids < n)
    seq_ids = jnp.where(valid, seq_ids, 0)
    q_start = cu_q_lens[seq_ids]
    q_len = cu_q_lens[seq_ids + 1] - q_start
    positions = kv_lens[seq_ids] - q_len + (token_idx - q_start)
    return seq_ids, jnp.where(valid, positions, 0), valid


def write_kv_reference(
    k_pages: jax.Array,
    v_pages: jax.Array,
    k: jax.Array,
    v: jax.Array,
    slot_mapping: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Scatter new K/V rows into their pages.

    k, v: ``[num_tokens, num_kv_heads, head_dim]``; slot_mapping: ``[num_tokens] int32`` flat slot
    ``page * page_size + offset``, or ``-1`` for padding rows (dropped).
    """
    k_pages, v_pages, k, v, slot_mapping = map(jnp.asarray, (k_pages, v_pages, k, v, slot_mapping))
    num_pages, page_size, num_kv_heads, head_dim = k_pages.shape
    num_slots = num_pages * page_size
    # Padding rows go out of range (dropped), each to its own index: every index of the scatter is then
    # distinct (a step never writes one slot twice), which lets XLA store without atomics.
    pad = num_slots + jnp.arange(slot_mapping.shape[0], dtype=slot_mapping.dtype)
    slots = jnp.where(slot_mapping < 0, pad, slot_mapping)
    flat_k = k_pages.reshape(num_slots, num_kv_heads, head_dim)
    flat_v = v_pages.reshape(num_slots, num_kv_heads, head_dim)
    flat_k = flat_k.at[slots].set(k.astype(k_pages.dtype), mode="drop", unique_indices=True)
    flat_v = flat_v.at[slots].set(v.astype(v_pages.dtype), mode="drop", unique_indices=True)
    return flat_k.reshape(k_pages.shape), flat_v.reshape(v_pages.shape)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half rotary embedding (transformers' convention) on the first ``2 * cos.shape[-1]`` dims.

    x: [num_tokens, num_heads, head_dim]; cos, sin: [num_tokens, rotary_dim // 2]. In f32, cast back to
    x.dtype: first half ``x1 * cos - x2 * sin``, second half ``x2 * cos + x1 * sin``, the rest unchanged.
    """
    half = cos.shape[-1]
    rotary_dim = 2 * half
    cos2 = jnp.concatenate([cos, cos], axis=-1)[:, None, :]
    sin2 = jnp.concatenate([sin, sin], axis=-1)[:, None, :]
    xf = x.astype(jnp.float32)
    rot, rest = xf[..., :rotary_dim], xf[..., rotary_dim:]
    x1, x2 = rot[..., :half], rot[..., half:]
    rotated = rot * cos2 + jnp.concatenate([-x2, x1], axis=-1) * sin2
    return jnp.concatenate([rotated, rest], axis=-1).astype(x.dtype)


def rms_norm(
    x: jax.Array, weight: jax.Array, eps: float, *, offset: float = 0.0, scale_f32: bool = False
) -> jax.Array:
    """RMSNorm over the last axis with statistics in f32, cast back to x.dtype.

    ``offset=1`` scales by ``1 + weight`` (Gemma's weights are stored around zero) and implies
    ``scale_f32``. With ``scale_f32`` the normalised f32 activations are multiplied by the weight before the
    cast (Gemma, OLMo 2); otherwise they are cast to x.dtype first and then scaled (Llama, Qwen, Mistral).
    The two orders differ only below f32.
    """
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return rms_scale(xf, weight, x.dtype, offset=offset, scale_f32=scale_f32)


def rms_scale(xf: jax.Array, weight: jax.Array, dtype, *, offset: float = 0.0, scale_f32: bool = False):
    """RMSNorm's last step: the normalised f32 rows ``xf`` times ``weight`` (``+ offset``), in ``dtype``, in
    ``rms_norm``'s order of cast and scale. Plain jnp, so the Pallas kernels that norm inside call it too."""
    if scale_f32 or offset:
        return (xf * (weight.astype(jnp.float32) + offset)).astype(dtype)
    return (xf.astype(dtype) * weight).astype(dtype)


@dataclass(frozen=True)
class QKNorm:
    """RMSNorm of q and k between the projection and rope (``rms_norm`` with these settings).

    mode: ``"head"`` normalises each head over its head_dim (Qwen3, Gemma 3; weights ``[head_dim]``),
    ``"full"`` all heads of a token together (OLMo 2; weights ``[num_heads * head_dim]`` for q and
    ``[num_kv_heads * head_dim]`` for k).
    """

    mode: str
    eps: float
    offset: float = 0.0
    scale_f32: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ("head", "full"):
            raise ValueError(f"QKNorm.mode must be 'head' or 'full', got {self.mode!r}")

    def __call__(self, x: jax.Array, weight: jax.Array) -> jax.Array:
        """Norm ``x [num_tokens, num_heads, head_dim]`` (heads of q or of k) with its weight."""
        if self.mode == "head":
            return rms_norm(x, weight, self.eps, offset=self.offset, scale_f32=self.scale_f32)
        flat = x.reshape(x.shape[0], -1)
        return rms_norm(flat, weight, self.eps, offset=self.offset, scale_f32=self.scale_f32).reshape(x.shape)


def rope_write_kv_reference(
    qkv: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    slot_mapping: jax.Array,
    *,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    qk_norm: QKNorm | None = None,
    qk_norm_weights: tuple[jax.Array, jax.Array] | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Split the q/k/v projection output ``qkv [num_tokens, (num_q_heads + 2 * num_kv_heads) * head_dim]``
    (q columns, then k, then v), norm q and k (``qk_norm`` with ``qk_norm_weights = (q weight, k weight)``,
    when given), rope them (``apply_rope``), write k and v into their slots (``write_kv_reference``).
    Returns (q [num_tokens, num_q_heads, head_dim], k_pages, v_pages)."""
    t = qkv.shape[0]
    q_width, kv_width = num_q_heads * head_dim, num_kv_heads * head_dim
    q, k, v = jnp.split(qkv, [q_width, q_width + kv_width], axis=-1)
    q = q.reshape(t, num_q_heads, head_dim)
    k = k.reshape(t, num_kv_heads, head_dim)
    if qk_norm is not None:
        q, k = qk_norm(q, qk_norm_weights[0]), qk_norm(k, qk_norm_weights[1])
    q = apply_rope(q, cos, sin)
    k = apply_rope(k, cos, sin)
    k_pages, v_pages = write_kv_reference(
        k_pages, v_pages, k, v.reshape(t, num_kv_heads, head_dim), slot_mapping
    )
    return q, k_pages, v_pages


def ragged_paged_attention_reference(
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
    sinks: jax.Array | None = None,
    alibi_slopes: jax.Array | None = None,
) -> jax.Array:
    """Ragged paged attention in plain XLA: an online-softmax loop over the pages of each token's sequence.

    Memory is O(num_tokens * page_size) per iteration and the loop runs only as many pages as the longest
    sequence needs, so it is usable as the CPU attention path, not just as a test oracle.
    Returns ``[num_tokens, num_q_heads, head_dim]`` in ``q.dtype``; padding rows are zero.

    Two extras the Pallas backends do not take (transformers-fallback layers use them through this path):
    ``sinks [num_q_heads]``, per-head raw logits that join the softmax denominator only (gpt-oss' ``s_aux``);
    ``alibi_slopes [num_q_heads]``, which add ``slope * (kv_pos - q_pos)`` to the scaled scores.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_pages.shape
    group = num_q_heads // num_kv_heads
    q, k_pages, v_pages = jnp.asarray(q), jnp.asarray(k_pages), jnp.asarray(v_pages)
    kv_lens, page_indices, cu_q_lens, num_seqs = map(
        jnp.asarray, (kv_lens, page_indices, cu_q_lens, num_seqs)
    )
    seq_ids, positions, valid = token_metadata(num_tokens, cu_q_lens, kv_lens, num_seqs)
    n = num_seqs.reshape(())
    max_kv = jnp.max(jnp.where(jnp.arange(kv_lens.shape[0]) < n, kv_lens, 0))
    num_iters = (max_kv + page_size - 1) // page_size

    qf = q.astype(jnp.float32).reshape(num_tokens, num_kv_heads, group, head_dim) * sm_scale
    token_pages = page_indices[seq_ids]  # [num_tokens, pages_per_seq]
    if alibi_slopes is not None:
        slopes = jnp.asarray(alibi_slopes, jnp.float32).reshape(num_kv_heads, group)

    def body(p, carry):
        m, l, acc = carry
        page = token_pages[:, p]  # [num_tokens]
        k = k_pages[page].astype(jnp.float32)  # [num_tokens, page_size, num_kv_heads, head_dim]
        v = v_pages[page].astype(jnp.float32)
        s = jnp.einsum("tkgd,tskd->tkgs", qf, k)
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        kv_pos = p * page_size + jnp.arange(page_size, dtype=jnp.int32)  # [page_size]
        if alibi_slopes is not None:
            rel = (kv_pos[None, :] - positions[:, None]).astype(jnp.float32)  # [num_tokens, page_size]
            s = s + slopes[None, :, :, None] * rel[:, None, None, :]
        mask = kv_pos[None, :] <= positions[:, None]
        if sliding_window is not None:
            mask &= kv_pos[None, :] > positions[:, None] - sliding_window
        mask &= valid[:, None]
        s = jnp.where(mask[:, None, None, :], s, MASK_VALUE)
        m_new = jnp.maximum(m, s.max(axis=-1))
        alpha = jnp.exp(m - m_new)
        pexp = jnp.exp(s - m_new[..., None])
        pexp = jnp.where(mask[:, None, None, :], pexp, 0.0)
        l_new = alpha * l + pexp.sum(axis=-1)
        # Zero masked V rows too: 0 * NaN (a stale slot of a reused page) must not poison the sum.
        v = jnp.where(mask[:, :, None, None], v, 0.0)
        acc_new = alpha[..., None] * acc + jnp.einsum("tkgs,tskd->tkgd", pexp, v)
        return m_new, l_new, acc_new

    init = (
        jnp.full((num_tokens, num_kv_heads, group), MASK_VALUE, jnp.float32),
        jnp.zeros((num_tokens, num_kv_heads, group), jnp.float32),
        jnp.zeros((num_tokens, num_kv_heads, group, head_dim), jnp.float32),
    )
    m, l, acc = jax.lax.fori_loop(0, num_iters, body, init)
    if sinks is not None:
        sink = jnp.asarray(sinks, jnp.float32).reshape(num_kv_heads, group)[None]
        m_all = jnp.maximum(m, sink)
        rescale = jnp.exp(m - m_all)
        acc, l = acc * rescale[..., None], l * rescale + jnp.exp(sink - m_all)
    out = acc / jnp.where(l == 0.0, 1.0, l)[..., None]
    out = jnp.where(valid[:, None, None, None], out, 0.0)
    return out.reshape(num_tokens, num_q_heads, head_dim).astype(q.dtype)


def greedy_row_stats_reference(
    logits: jax.Array, stop_ids: jax.Array, suppress: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """What ``kernels.greedy.greedy_row_stats`` computes, in plain jnp: for logits [R, V], stop_ids [R, K]
    (-1 unused) and suppress [R], the logsumexp of each raw row (f32), and the argmax (lowest index on ties)
    and max of each row with its stop ids at -inf where ``suppress``."""
    raw = logits.astype(jnp.float32)
    ids = jnp.arange(raw.shape[1], dtype=jnp.int32)
    hit = jnp.any(ids[None, :, None] == stop_ids[:, None, :], axis=-1) & suppress[:, None]
    masked = jnp.where(hit, -jnp.inf, raw)
    return jax.nn.logsumexp(raw, axis=-1), jnp.argmax(masked, axis=-1).astype(jnp.int32), masked.max(axis=-1)


MLP_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_tanh": lambda g: jax.nn.gelu(g, approximate=True),
}


def gated_mlp_reference(
    x: jax.Array,
    w_gate_up: jax.Array,
    w_down: jax.Array,
    *,
    act: str = "silu",
    residual: jax.Array | None = None,
) -> jax.Array:
    """``residual + down(act(x @ W_gate) * (x @ W_up))`` in x's dtype, each product rounded as a model's
    layers round it. x: [num_tokens, hidden]; w_gate_up: [hidden, 2 * intermediate] (gate columns, then up
    columns); w_down: [intermediate, hidden]; residual: [num_tokens, hidden] or None."""
    gate, up = jnp.split(x @ w_gate_up, 2, axis=-1)
    out = (MLP_ACTIVATIONS[act](gate) * up) @ w_down
    return out if residual is None else residual + out
