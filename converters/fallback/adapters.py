"""Per-class adapters for transformers modules that cannot run on jaxrt as written, with the same math.

- **Inline attention.** Older architectures compute attention in the layer (``_attn`` with a ``[T, T]`` causal
  mask buffer) or pick attention classes from a fixed ``attn_implementation`` table, so the attention interface
  never sees them. Their adapter replaces only the attention *core*: q/k/v after the layer's own projections and
  rotary go to `attention.attend_module` (paged KV write + ragged paged attention) with the layer's scaling and
  local window; the projections, rotary and output projection stay the model's code.
- **MoE experts** dispatched with data-dependent Python (``.tolist()``, ``nonzero`` loops, ``.cpu()`` group
  sizes): a static-shape equivalent built on `experts.route` / `experts.grouped`.

`install_adapters` replaces methods *on the instances of the fallback's own meta model* (never on the class:
transformers' models elsewhere in the process are untouched). Adapters are keyed by class name and only apply to
classes defined in transformers itself (``transformers.models.*``), whose code they were checked against: a
remote-code class that happens to share a name is left alone. Every adapted architecture is verified token-exact
against transformers by the coverage sweep (``tests/fallback/fallback_sweep.py``).
"""

from __future__ import annotations

import math
import sys
import types
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

from jaxrt.converters.fallback.attention import FallbackError, attend_module
from jaxrt.converters.fallback.experts import _j, _t, grouped, route

# ------------------------------------------------------------------------------------------- inline attention


def _core_attn(scaling: Callable[[Any], float], window: Callable[[Any], int | None] = lambda m: None):
    """An ``_attn(query, key, value, attention_mask)`` for layers that hand it ``[1, H, T, D]`` q/k/v (after
    rotary) and take back ``([1, H, T, D], weights)``. The ``[T, T]`` mask (causal / local) is the kernel's."""

    def _attn(self, query, key, value, attention_mask=None, *args, **kwargs):
        out = attend_module(self, query, key, value, scaling(self), window(self))
        return out.transpose(1, 2), None

    return _attn


def _openai_attn(self, q, k, v, attention_mask=None, output_attentions=False):
    """OpenAI GPT: ``k`` arrives transposed ``[1, H, D, T]``; scores scaled by 1/sqrt(D) only if ``self.scale``."""
    scaling = 1.0 / math.sqrt(v.size(-1)) if self.scale else 1.0
    return [attend_module(self, q, k.transpose(-1, -2), v, scaling).transpose(1, 2)]


def _xglm_attention(
    self, hidden_states, key_value_states=None, past_key_values=None, attention_mask=None, **kw
):
    """XGLM self-attention (query pre-scaled, as the original); cross-attention has no place in a decoder-only
    runtime."""
    if key_value_states is not None:
        raise FallbackError(f"{type(self).__name__}: cross-attention (encoder states) is not supported")
    b, t, _ = hidden_states.size()
    q = (self.q_proj(hidden_states) * self.scaling).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
    k = self.k_proj(hidden_states).view(b, t, -1, self.head_dim).transpose(1, 2)
    v = self.v_proj(hidden_states).view(b, t, -1, self.head_dim).transpose(1, 2)
    out = attend_module(self, q, k, v, 1.0).reshape(b, t, self.embed_dim)
    return self.out_proj(out), None


def _falcon_attention(
    self,
    hidden_states,
    alibi,
    attention_mask,
    position_ids=None,
    layer_past=None,
    use_cache=False,
    output_attentions=False,
    position_embeddings=None,
    **kwargs,
):
    """Falcon (rotary variants). ALiBi variants are refused: the paged kernel takes no positional bias."""
    if alibi is not None:
        raise FallbackError(
            f"{type(self).__name__}: ALiBi position bias (config.alibi=True) that jaxrt's paged attention cannot "
            "apply"
        )
    q, k, v = self._split_heads(self.query_key_value(hidden_states))
    b, t = q.shape[:2]
    kv_heads = self.num_heads if self.new_decoder_architecture else self.num_kv_heads
    q = q.transpose(1, 2).reshape(b, self.num_heads, t, self.head_dim)
    k = k.transpose(1, 2).reshape(b, kv_heads, t, self.head_dim)
    v = v.transpose(1, 2).reshape(b, kv_heads, t, self.head_dim)
    cos, sin = position_embeddings
    q, k = sys.modules[type(self).__module__].apply_rotary_pos_emb(q, k, cos, sin)
    if self.new_decoder_architecture and self.num_kv_heads < self.num_heads:
        # _split_heads broadcast each kv head over its query group (head h = kv * group + g): cache one copy
        group = self.num_heads // self.num_kv_heads
        k, v = k[:, ::group], v[:, ::group]
    out = attend_module(self, q, k, v, 1.0 / math.sqrt(self.head_dim))
    return self.dense(out.reshape(b, t, self.num_heads * self.head_dim)), None


def _bloom_attention(
    self, hidden_states, residual, alibi, attention_mask, layer_past=None, use_cache=False, **kwargs
):
    """BLOOM: ALiBi slopes from the model's own ``build_alibi_tensor`` (bias ``slope * j`` at key j), unscaled."""
    import torch

    b, t, _ = hidden_states.shape
    q, k, v = self._reshape(self.query_key_value(hidden_states))
    ones = torch.ones(1, 2, dtype=torch.long)
    slopes = sys.modules[type(self).__module__].build_alibi_tensor(ones, self.num_heads, torch.float32)
    out = attend_module(self, q, k, v, self.inv_norm_factor, alibi_slopes=slopes[:, 0, 1])
    out = self.dense(out.reshape(b, t, self.num_heads * self.head_dim))
    return residual + out, None  # dropout_add in eval mode


def _mpt_attention(self, hidden_states, position_bias, past_key_values=None, attention_mask=None, **kwargs):
    """MPT: the ALiBi slopes are read off the ``position_bias`` the model passes (``[H, 1, L]``, last two
    columns ``-slope, 0``)."""
    b, t = hidden_states.shape[:2]
    qkv = self.Wqkv(hidden_states)
    if self.clip_qkv:
        qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
    q, k, v = (x.reshape(b, t, self.n_heads, self.head_dim).transpose(1, 2) for x in qkv.chunk(3, dim=2))
    slopes = None
    if position_bias is not None:
        slopes = position_bias[:, 0, -1] - position_bias[:, 0, -2]
    out = attend_module(self, q, k, v, self.softmax_scale, alibi_slopes=slopes)
    return self.out_proj(out.reshape(b, t, -1)), None


# ---------------------------------------------------------------------------------------------- MoE experts


def _dbrx_experts(self, hidden_states, top_k_index, top_k_weights):
    """``DbrxExperts``: GLU experts stored as ``w1``/``v1``/``w2`` of ``[E * ffn, hidden]``."""
    batch = hidden_states.shape[0]
    h, idx, weights = _j((hidden_states, top_k_index, top_k_weights))
    e, f, d = self.num_experts, self.ffn_hidden_size, self.hidden_size
    w1, v1, w2 = (_j(w).reshape(e, f, d) for w in (self.mlp.w1, self.mlp.v1, self.mlp.w2))

    def expert_fn(x, group_sizes, _):
        gate = _j(self.mlp.activation_fn(_t(grouped(x, w1, group_sizes, transposed=False))))
        up = grouped(x, v1, group_sizes, transposed=False)
        return grouped(gate * up, w2, group_sizes, transposed=True)  # (gate * up) @ w2[e]

    out = route(h.reshape(-1, d), idx, weights, e, expert_fn)
    return _t(out.reshape(batch, -1, d))


def _longcat_experts(self, hidden_states, top_k_index, top_k_weights):
    """``LongcatFlashExperts``: routed experts plus "zero-compute" experts (index >= n_routed) that are the
    identity."""
    h, idx, weights = _j((hidden_states, top_k_index, top_k_weights))
    n = self.num_routed_experts
    if n == 0 or self.gate_up_proj is None:
        return _t(route(h, idx, weights, 0, lambda x, gs, eo: x))
    gate_up = _j(self.gate_up_proj)[:n]
    down = _j(self.down_proj)

    def expert_fn(x, group_sizes, expert_of):
        gate, up = jnp.split(grouped(x, gate_up, group_sizes, transposed=False), 2, axis=-1)
        y = grouped(_j(self.act_fn(_t(gate))) * up, down, group_sizes, transposed=False)
        return jnp.where((expert_of >= n)[:, None], x, y)

    return _t(route(h, idx, weights, n, expert_fn))


def _aria_grouped_gemm(self, input, tokens_per_expert):
    """``AriaGroupedExpertsGemm``: rows already sorted by expert, ``weight [E, in, out]``; the group sizes stay on
    the device instead of ``.cpu()``."""
    x, sizes = _j((input, tokens_per_expert))
    return _t(grouped(x, _j(self.weight), sizes.astype(jnp.int32), transposed=True))


def _jetmoe_gating(self, hidden_states):
    """``JetMoeTopKGating`` with ``expert_size`` left a device array (the original calls ``.tolist()``)."""
    import torch

    logits = self.layer(hidden_states).float()
    top_k_logits, top_k_indices = logits.topk(self.top_k, dim=1)
    top_k_gates = torch.softmax(top_k_logits, dim=1).type_as(hidden_states)
    flat = _j(top_k_indices).reshape(-1).astype(jnp.int32)
    expert_size = jnp.bincount(flat, length=self.num_experts).astype(jnp.int32)
    order = jnp.argsort(flat, stable=True)
    index_sorted_experts = _t(order)
    batch_index = _t(order // self.top_k)
    batch_gates = top_k_gates.flatten()[index_sorted_experts]
    return index_sorted_experts, batch_index, batch_gates, _t(expert_size), logits


def _jetmoe_parallel_experts(self, inputs, expert_size):
    """``JetMoeParallelExperts``: rows sorted by expert, ``weight [E, out, in]``, ``expert_size`` a device array."""
    return _t(grouped(_j(inputs), _j(self.weight), _j(expert_size), transposed=False))


# ------------------------------------------------------------------------------------------------- registry

# class name -> {method name: replacement}; all replacements of a class are installed together.
ATTENTION_ADAPTERS: dict[str, dict[str, Callable[..., Any]]] = {
    "GPTJAttention": {"_attn": _core_attn(lambda m: 1.0 / m.scale_attn)},
    "CodeGenAttention": {"_attn": _core_attn(lambda m: 1.0 / m.scale_attn)},
    "GPTNeoXJapaneseAttention": {"_attn": _core_attn(lambda m: 1.0 / m.norm_factor)},
    # GPT-Neo does not scale its scores; "local" layers see the last window_size tokens (self included)
    "GPTNeoSelfAttention": {
        "_attn": _core_attn(
            lambda m: 1.0, lambda m: m.config.window_size if m.attention_type == "local" else None
        )
    },
    "Attention": {"_attn": _openai_attn},  # transformers.models.openai
    "XGLMAttention": {"forward": _xglm_attention},
    "FalconAttention": {"forward": _falcon_attention},
    "BloomAttention": {"forward": _bloom_attention},
    "MptAttention": {"forward": _mpt_attention},
}
# Models whose forward builds its [T, T] mask with eager code only (MPT: ``create_causal_mask(...).to(bool)``):
# built with attn_implementation="eager"; the adapted layers ignore that mask (and XLA drops it).
EAGER_MASK_CLASSES = frozenset({"MptAttention"})
_ADAPTER_MODULES = {"Attention": "transformers.models.openai."}  # generic class names: only in that model
ADAPTERS: dict[str, dict[str, Callable[..., Any]]] = {
    **ATTENTION_ADAPTERS,
    "DbrxExperts": {"forward": _dbrx_experts},
    "LongcatFlashExperts": {"forward": _longcat_experts},
    "AriaGroupedExpertsGemm": {"forward": _aria_grouped_gemm},
    "JetMoeTopKGating": {"forward": _jetmoe_gating},
    "JetMoeParallelExperts": {"forward": _jetmoe_parallel_experts},
}


def _is_transformers_class(cls: type) -> bool:
    return cls.__module__.startswith(_ADAPTER_MODULES.get(cls.__name__, "transformers.models."))


def install_adapters(model: Any) -> list[str]:
    """Bind the adapters to the matching submodules of ``model`` (instance attributes). Returns the adapted
    class names."""
    adapted = set()
    for _, m in model.named_modules():
        cls = type(m)
        methods = ADAPTERS.get(cls.__name__)
        if methods is None or not _is_transformers_class(cls):
            continue
        for name, fn in methods.items():
            m.__dict__[name] = types.MethodType(fn, m)
        adapted.add(cls.__name__)
    return sorted(adapted)
