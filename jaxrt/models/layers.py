"""Building blocks shared by the model families: norms, rotary embeddings, paged attention, gated MLPs."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrt.batch import ForwardBatch
from jaxrt.config import ModelConfig, RopeConfig
from jaxrt.kernels import ragged_paged_attention, write_kv

KVCache = tuple[jax.Array, jax.Array]  # (k_pages, v_pages): [num_pages, page_size, num_kv_heads, head_dim]


def as_dtype(name: str) -> jnp.dtype:
    return jnp.dtype(name)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, dtype: jnp.dtype, rngs: nnx.Rngs) -> None:
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (self.weight[...].astype(jnp.float32) * xf).astype(x.dtype)


def rope_inv_freq(rope: RopeConfig, rotary_dim: int) -> np.ndarray:
    """Inverse frequencies [rotary_dim // 2] for transformers' rope types (computed at trace time, in numpy)."""
    inv_freq = 1.0 / (rope.theta ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim))
    if rope.rope_type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.rope_type == "llama3":
        old_len = rope.original_max_position_embeddings or 8192
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled)
    return inv_freq.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate-half rotary embedding (transformers' Llama convention).

    x: [num_tokens, num_heads, head_dim]; positions: [num_tokens] int32.
    """
    rotary_dim = 2 * inv_freq.shape[0]
    freqs = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]
    cos = jnp.cos(freqs)[:, None, :]
    sin = jnp.sin(freqs)[:, None, :]
    xf = x.astype(jnp.float32)
    rot, rest = xf[..., :rotary_dim], xf[..., rotary_dim:]
    x1, x2 = rot[..., : rotary_dim // 2], rot[..., rotary_dim // 2 :]
    cos2 = jnp.concatenate([cos, cos], axis=-1)
    sin2 = jnp.concatenate([sin, sin], axis=-1)
    rotated = rot * cos2 + jnp.concatenate([-x2, x1], axis=-1) * sin2
    return jnp.concatenate([rotated, rest], axis=-1).astype(x.dtype)


def linear(din: int, dout: int, bias: bool, dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(din, dout, use_bias=bias, dtype=dtype, param_dtype=dtype, rngs=rngs)


class PagedAttention(nnx.Module):
    """Multi-head attention with GQA whose K/V live in the paged pool and are read by `ragged_paged_attention`."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        dtype: jnp.dtype,
        rngs: nnx.Rngs,
        attention_backend: str = "auto",
        interpret: bool = False,
        sliding_window: int | None = None,
    ) -> None:
        h, hd = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
        self.q_proj = linear(h, cfg.num_heads * hd, cfg.attention_bias, dtype, rngs)
        self.k_proj = linear(h, cfg.num_kv_heads * hd, cfg.attention_bias, dtype, rngs)
        self.v_proj = linear(h, cfg.num_kv_heads * hd, cfg.attention_bias, dtype, rngs)
        self.o_proj = linear(cfg.num_heads * hd, h, cfg.attention_bias, dtype, rngs)
        self.rope = cfg.rope
        self.sm_scale = cfg.sm_scale
        self.sliding_window = sliding_window
        self.attention_backend = attention_backend
        self.interpret = interpret

    def __call__(self, x: jax.Array, batch: ForwardBatch, kv: KVCache) -> tuple[jax.Array, KVCache]:
        t = x.shape[0]
        q = self.q_proj(x).reshape(t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(t, self.num_kv_heads, self.head_dim)
        rotary_dim = int(self.head_dim * self.rope.partial_rotary_factor)
        inv_freq = rope_inv_freq(self.rope, rotary_dim)
        q = apply_rope(q, batch.positions, inv_freq)
        k = apply_rope(k, batch.positions, inv_freq)
        k_pages, v_pages = write_kv(kv[0], kv[1], k, v, batch.slot_mapping)
        o = ragged_paged_attention(
            q,
            k_pages,
            v_pages,
            batch.kv_lens,
            batch.page_indices,
            batch.cu_q_lens,
            batch.num_seqs,
            sm_scale=self.sm_scale,
            sliding_window=self.sliding_window,
            backend=self.attention_backend,
            interpret=self.interpret,
        )
        return self.o_proj(o.reshape(t, self.num_heads * self.head_dim)), (k_pages, v_pages)


class GatedMLP(nnx.Module):
    """down(act(gate(x)) * up(x)) — SwiGLU for Llama-style models."""

    def __init__(self, cfg: ModelConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs) -> None:
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = linear(h, i, cfg.mlp_bias, dtype, rngs)
        self.up_proj = linear(h, i, cfg.mlp_bias, dtype, rngs)
        self.down_proj = linear(i, h, cfg.mlp_bias, dtype, rngs)
        self.act = cfg.hidden_act

    def __call__(self, x: jax.Array) -> jax.Array:
        gate = self.gate_proj(x)
        if self.act == "silu":
            gate = jax.nn.silu(gate)
        elif self.act in ("gelu_pytorch_tanh", "gelu_tanh"):
            gate = jax.nn.gelu(gate, approximate=True)
        elif self.act == "gelu":
            gate = jax.nn.gelu(gate, approximate=False)
        else:
            raise ValueError(f"unsupported hidden_act {self.act!r}")
        return self.down_proj(gate * self.up_proj(x))
