"""Llama-family decoder (Llama 2/3, SmolLM, Mistral without sliding window) as a Flax nnx module."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrt.batch import ForwardBatch
from jaxrt.config import ModelConfig
from jaxrt.models.layers import GatedMLP, KVCache, PagedAttention, RMSNorm


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs, **attn_kwargs) -> None:
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.self_attn = PagedAttention(
            cfg, dtype=dtype, rngs=rngs, sliding_window=cfg.sliding_window, **attn_kwargs
        )
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.mlp = GatedMLP(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, batch: ForwardBatch, kv: KVCache) -> tuple[jax.Array, KVCache]:
        h, kv = self.self_attn(self.input_layernorm(x), batch, kv)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, kv


class LlamaModel(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs, **attn_kwargs) -> None:
        self.embed_tokens = nnx.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=dtype, rngs=rngs
        )
        self.layers = nnx.List(
            [LlamaDecoderLayer(cfg, dtype=dtype, rngs=rngs, **attn_kwargs) for _ in range(cfg.num_layers)]
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, rngs=rngs)

    def __call__(self, batch: ForwardBatch, kv_caches: list[KVCache]) -> tuple[jax.Array, list[KVCache]]:
        x = self.embed_tokens(batch.input_ids)
        new_caches = []
        for layer, kv in zip(self.layers, kv_caches, strict=True):
            x, kv = layer(x, batch, kv)
            new_caches.append(kv)
        return self.norm(x), new_caches


class LlamaForCausalLM(nnx.Module):
    """Forward over a ragged batch; returns logits of each sequence's last token only."""

    def __init__(self, cfg: ModelConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs, **attn_kwargs) -> None:
        self.config = cfg
        self.model = LlamaModel(cfg, dtype=dtype, rngs=rngs, **attn_kwargs)
        if not cfg.tie_word_embeddings:
            self.lm_head = nnx.Linear(
                cfg.hidden_size, cfg.vocab_size, use_bias=False, dtype=dtype, param_dtype=dtype, rngs=rngs
            )

    def __call__(self, batch: ForwardBatch, kv_caches: list[KVCache]) -> tuple[jax.Array, list[KVCache]]:
        hidden, kv_caches = self.model(batch, kv_caches)
        last = hidden[batch.logits_indices]  # [num_seqs, hidden]
        return self.compute_logits(last), kv_caches

    def compute_logits(self, hidden: jax.Array) -> jax.Array:
        if self.config.tie_word_embeddings:
            logits = self.model.embed_tokens.attend(hidden)
        else:
            logits = self.lm_head(hidden)
        return logits.astype(jnp.float32)
