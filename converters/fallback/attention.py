"""transformers attention interface -> jaxrt paged attention.

`jaxrt_attention_forward` is registered as ``attn_implementation="jaxrt"``. transformers calls it from each
attention layer with torch-shaped ``query [1, Hq, T, D]``, ``key``/``value [1, Hkv, T, D]`` (torchax tensors
wrapping JAX tracers). The per-step state it needs (the KV pool, the `ForwardBatch`) arrives through the model's
``**kwargs`` as ``jaxrt_ctx`` (or, for layers that do not forward their kwargs, from the calling module, where the
fallback's forward puts it for the duration of the call): a `StepContext` that the fallback's forward creates
inside each traced call and drops afterwards, so nothing here is a module-level mutable global.

Each attention *call* gets a KV slot in call order (slot i is ``kv_caches[i]``); `StepContext` checks that the call
sequence matches the one recorded by the build-time probe, so a model whose layers route attention differently
between traces fails loudly instead of mixing up caches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

CTX_KWARG = "jaxrt_ctx"
ATTN_IMPLEMENTATION = "jaxrt"

# kwargs the attention interface may receive that carry nothing the paged kernel has to honour
_IGNORED_KWARGS = {
    CTX_KWARG,
    "dropout",
    "scaling",
    "sliding_window",
    "softcap",
    "is_causal",
    "position_ids",
    "cache_position",
    "position_embeddings",
    "output_attentions",
    "use_cache",
    "past_key_values",
    "past_key_value",
    "layer_idx",
    "head_mask",
    "return_dict",
    "output_hidden_states",
    "logits_to_keep",
    "token_type_ids",
}


class FallbackError(RuntimeError):
    """A transformers model cannot run on jaxrt's fallback; the message says what is missing."""


@dataclass(frozen=True)
class LayerSpec:
    """What one attention call looks like (static, recorded by the probe)."""

    module: str
    num_q_heads: int
    num_kv_heads: int
    qk_head_dim: int
    v_head_dim: int
    scaling: float
    sliding_window: int | None
    soft_cap: float | None
    has_sinks: bool = False
    has_alibi: bool = False


def _static_number(value: Any, name: str, module: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return value
    try:
        return float(value)  # python-number-like (numpy scalars)
    except Exception as e:  # a traced tensor: per-token values the kernel cannot take
        raise FallbackError(
            f"{module}: attention argument {name!r} is a traced tensor; jaxrt's paged attention needs it static"
        ) from e


class StepContext:
    """Per-traced-call state handed to the attention function through the model's kwargs.

    ``kv_caches is None`` is the probe mode used at build time: calls are recorded as `LayerSpec` and answered
    with zeros (shapes only, under ``jax.eval_shape``). Otherwise each call writes its new K/V into slot ``i``
    of the pool with ``jaxrt.kernels.write_kv`` and attends with ``jaxrt.kernels.ragged_paged_attention``.
    """

    def __init__(
        self,
        batch: Any,
        kv_caches: list | None,
        module_names: dict[int, str],
        expected: list[LayerSpec] | None = None,
        head_dim: int | None = None,
        num_kv_heads: int | None = None,
        backend: str | None = None,
        interpret: bool = False,
        states: list | None = None,
        expected_states: list | None = None,
    ) -> None:
        self.batch = batch
        self.kv_caches = None if kv_caches is None else list(kv_caches)
        # Recurrent-state arrays ([num_state_slots, *shape] each), claimed in call order by the mixer adapters
        # (``recurrent.py``) like KV slots are by attention calls; ``state_specs`` records the calls.
        self.states = None if states is None else list(states)
        self.expected_states = expected_states
        self.state_specs: list = []
        self.module_names = module_names
        self.expected = expected
        self.head_dim = head_dim
        self.num_kv_heads = num_kv_heads
        self.backend = backend
        self.interpret = interpret
        self.specs: list[LayerSpec] = []

    @property
    def probing(self) -> bool:
        return self.kv_caches is None

    @property
    def num_calls(self) -> int:
        return len(self.specs)

    def claim_state(self, module: Any, spec: Any) -> tuple[int, jax.Array | None]:
        """The next recurrent-state array for ``module``: ``(index, [num_state_slots, *spec.shape] array)``;
        ``None`` instead of the array while probing. ``spec`` is a `jaxrt.config.StateSpec`."""
        index = len(self.state_specs)
        self.state_specs.append(spec)
        if self.probing:
            return index, None
        want = (
            self.expected_states[index]
            if self.expected_states and index < len(self.expected_states)
            else None
        )
        if want != spec or self.states is None:
            raise FallbackError(
                f"{self.name_of(module)}: recurrent state {index} ({spec}) differs from the build-time probe "
                f"({want}); the model's layer pattern changed between traces"
            )
        return index, self.states[index]

    def set_state(self, index: int, value: jax.Array) -> None:
        if self.states is not None:
            self.states[index] = value

    def name_of(self, module: Any) -> str:
        return self.module_names.get(id(module), type(module).__name__)

    def attend(
        self, module, query, key, value, attention_mask, scaling, kwargs, sinks=None, alibi_slopes=None
    ) -> jax.Array:
        """``query [1, Hq, T, Dk]``, ``key [1, Hkv, T, Dk]``, ``value [1, Hkv, T, Dv]`` (jax) -> ``[1, T, Hq, Dv]``."""
        name = self.name_of(module)
        if query.ndim != 4 or query.shape[0] != 1:
            raise FallbackError(
                f"{name}: expected query [1, heads, tokens, head_dim], got {tuple(query.shape)}"
            )
        is_causal = kwargs.get("is_causal")
        if is_causal is None:
            is_causal = getattr(module, "is_causal", True)
        if is_causal is False:
            raise FallbackError(
                f"{name}: the layer asks for non-causal (bidirectional) attention, which jaxrt's causal paged "
                "attention does not provide (for BERT-style models: not a decoder)"
            )
        if attention_mask is not None:
            # transformers builds no mask for attn_implementation="jaxrt"; a mask here was made by the layer
            # itself (a learned or dynamic bias, ALiBi, a custom pattern) and would be silently dropped.
            raise FallbackError(
                f"{name}: the layer passes an attention mask / bias of its own making (shape "
                f"{tuple(getattr(attention_mask, 'shape', ()))}) that jaxrt's paged attention cannot apply"
            )
        for k, v in kwargs.items():
            if k not in _IGNORED_KWARGS and v is not None and hasattr(v, "shape"):
                raise FallbackError(
                    f"{name}: the attention call passes tensor argument {k!r} (e.g. a positional bias) that "
                    "jaxrt's paged attention cannot apply"
                )
        _, hq, t, dk = query.shape
        hkv, dv = key.shape[1], value.shape[3]
        if key.shape[2] != t or value.shape[2] != t:
            raise FallbackError(
                f"{name}: key/value cover {key.shape[2]} tokens but the query {t}; the layer concatenated a "
                "cache of its own (it must leave caching to the attention function)"
            )
        if hkv == 0 or hq % hkv:
            raise FallbackError(f"{name}: {hq} query heads are not a multiple of {hkv} kv heads")
        sm_scale = _static_number(scaling, "scaling", name)
        sliding_window = _static_number(kwargs.get("sliding_window"), "sliding_window", name)
        soft_cap = _static_number(kwargs.get("softcap"), "softcap", name)
        spec = LayerSpec(
            module=name,
            num_q_heads=int(hq),
            num_kv_heads=int(hkv),
            qk_head_dim=int(dk),
            v_head_dim=int(dv),
            scaling=float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(dk),
            sliding_window=int(sliding_window) if sliding_window else None,
            soft_cap=float(soft_cap) if soft_cap else None,
            has_sinks=sinks is not None,
            has_alibi=alibi_slopes is not None,
        )
        if sinks is not None and tuple(sinks.shape) != (hq,):
            raise FallbackError(f"{name}: attention sinks of shape {tuple(sinks.shape)}, expected ({hq},)")
        if alibi_slopes is not None and tuple(alibi_slopes.shape) != (hq,):
            raise FallbackError(
                f"{name}: ALiBi slopes of shape {tuple(alibi_slopes.shape)}, expected ({hq},)"
            )
        slot = len(self.specs)
        self.specs.append(spec)
        if self.probing:
            return jnp.zeros((1, t, hq, dv), query.dtype)
        if self.expected is None or slot >= len(self.expected) or self.expected[slot] != spec:
            want = self.expected[slot] if self.expected and slot < len(self.expected) else None
            raise FallbackError(
                f"attention call {slot} ({spec}) differs from the build-time probe ({want}); the model's "
                "attention pattern changed between traces"
            )
        return self._paged(slot, spec, query[0], key[0], value[0], sinks, alibi_slopes)

    def _paged(self, slot: int, spec: LayerSpec, q, k, v, sinks, alibi_slopes=None) -> jax.Array:
        from jaxrt.kernels import ragged_paged_attention, ragged_paged_attention_reference, write_kv

        b = self.batch
        d = self.head_dim
        q, k, v = (jnp.swapaxes(x, 0, 1) for x in (q, k, v))  # [T, heads, dim]
        q, k, v = (_pad_last(x, d) for x in (q, k, v))
        if self.num_kv_heads and spec.num_kv_heads != self.num_kv_heads:
            # fewer kv heads than the pool's layout: repeat each (query head i still reads its original kv head)
            k, v = (jnp.repeat(x, self.num_kv_heads // spec.num_kv_heads, axis=1) for x in (k, v))
        k_pages, v_pages = self.kv_caches[slot]
        k_pages, v_pages = write_kv(k_pages, v_pages, k, v, b.slot_mapping)
        self.kv_caches[slot] = (k_pages, v_pages)
        if sinks is not None or alibi_slopes is not None:
            # Sinks and ALiBi are only on the plain-XLA reference path (the Pallas kernels take neither).
            out = ragged_paged_attention_reference(
                q,
                k_pages,
                v_pages,
                b.kv_lens,
                b.page_indices,
                b.cu_q_lens,
                b.num_seqs,
                sm_scale=spec.scaling,
                sliding_window=spec.sliding_window,
                soft_cap=spec.soft_cap,
                sinks=sinks,
                alibi_slopes=alibi_slopes,
            )
            return out[None, :, :, : spec.v_head_dim]
        out = ragged_paged_attention(
            q,
            k_pages,
            v_pages,
            b.kv_lens,
            b.page_indices,
            b.cu_q_lens,
            b.num_seqs,
            sm_scale=spec.scaling,
            sliding_window=spec.sliding_window,
            soft_cap=spec.soft_cap,
            backend=self.backend,
            interpret=self.interpret,
            fresh_prompt=getattr(b, "fresh", None),
            prefix_capacity=getattr(b, "prefix_capacity", 0),
            decodes=getattr(b, "decodes", False),
        )
        return out[None, :, :, : spec.v_head_dim]  # [1, T, Hq, Dv]


def _pad_last(x: jax.Array, size: int) -> jax.Array:
    """Zero-pad the head dim: zeros add nothing to q.k and give zero output columns that are sliced off."""
    if x.shape[-1] == size:
        return x
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, size - x.shape[-1])])


def jaxrt_attention_forward(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs
) -> tuple[Any, None]:
    """The function registered with ``transformers.AttentionInterface`` under the name ``"jaxrt"``.

    The causal / sliding-window mask is applied inside the paged kernel from the batch layout. transformers builds
    no ``attention_mask`` for this implementation; a mask that arrives anyway was made by the layer itself and is
    refused (it could carry a bias the kernel cannot apply).
    """
    from torchax import interop

    ctx = kwargs.get(CTX_KWARG)
    if ctx is None:  # the layers dropped **kwargs: the model put the context on the module for this call
        ctx = getattr(module, "__dict__", {}).get(CTX_KWARG)
    if not isinstance(ctx, StepContext):
        raise FallbackError(
            f"{type(module).__name__}: the jaxrt attention function was called without the jaxrt step context "
            "(neither in **kwargs nor on the calling module): the call does not come from a layer of the model "
            "being run, so the paged KV cache cannot reach it"
        )
    kwargs = dict(kwargs)
    sinks = kwargs.pop("s_aux", None)  # per-head attention sinks (gpt-oss, Granite-SWA, DeepSeek-V4)
    q, k, v, sinks = interop.jax_view((query, key, value, sinks))
    out = ctx.attend(module, q, k, v, attention_mask, scaling, kwargs, sinks=sinks)
    return interop.torch_view(out), None


def attend_module(
    module, query, key, value, scaling: float, sliding_window: int | None = None, alibi_slopes=None
):
    """Paged causal attention for a layer that computes attention inline (see ``adapters.py``).

    ``query [1, Hq, T, Dk]``, ``key [1, Hkv, T, Dk]``, ``value [1, Hkv, T, Dv]`` (torch, after projections and
    rotary) -> ``[1, T, Hq, Dv]`` torch, exactly what the attention interface returns, in ``value``'s dtype.
    ``alibi_slopes [Hq]`` (torch) add ALiBi position biases (served by the plain-XLA reference loop).
    """
    import torch
    from torchax import interop

    ctx = getattr(module, "__dict__", {}).get(CTX_KWARG)
    if not isinstance(ctx, StepContext):
        raise FallbackError(f"{type(module).__name__}: adapted attention called outside a jaxrt step")
    q, k, v = interop.jax_view((query, key, value))
    slopes = alibi_slopes
    if slopes is not None:  # computed by the model from constants: a plain CPU tensor, or traced
        slopes = jnp.asarray(slopes.numpy()) if type(slopes) is torch.Tensor else interop.jax_view(slopes)
    q, k = q.astype(v.dtype), k.astype(v.dtype)
    out = ctx.attend(module, q, k, v, None, scaling, {"sliding_window": sliding_window}, alibi_slopes=slopes)
    return interop.torch_view(out)


def register_attention() -> None:
    """Register ``attn_implementation="jaxrt"`` with transformers (idempotent).

    transformers' interface registry is process-wide by design; what is registered is a pure function.
    """
    from transformers import AttentionInterface

    if AttentionInterface._global_mapping.get(ATTN_IMPLEMENTATION) is not jaxrt_attention_forward:
        AttentionInterface.register(ATTN_IMPLEMENTATION, jaxrt_attention_forward)
