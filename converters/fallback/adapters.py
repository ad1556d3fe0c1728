"""Per-class adapters for transformers modules that cannot be traced as written, with the same math.

Some transformers classes dispatch MoE experts with data-dependent Python (``.tolist()``, ``nonzero`` loops,
``.cpu()`` group sizes). For those, `install_adapters` replaces ``forward`` *on the instances of the fallback's own
meta model* (never on the class: transformers' models elsewhere in the process are untouched) with a static-shape
equivalent built on `experts.route` / `experts.grouped`. Adapters are keyed by class name and only apply to
classes defined in transformers itself (``transformers.models.*``), whose code they were checked against: a
remote-code class that happens to share a name is left alone. Every adapted architecture is verified token-exact
against transformers by the coverage sweep (``tests/fallback/fallback_sweep.py``).
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

from jaxrt.converters.fallback.experts import _j, _t, grouped, route

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
ADAPTERS: dict[str, dict[str, Callable[..., Any]]] = {
    "DbrxExperts": {"forward": _dbrx_experts},
    "LongcatFlashExperts": {"forward": _longcat_experts},
    "AriaGroupedExpertsGemm": {"forward": _aria_grouped_gemm},
    "JetMoeTopKGating": {"forward": _jetmoe_gating},
    "JetMoeParallelExperts": {"forward": _jetmoe_parallel_experts},
}


def _is_transformers_class(cls: type) -> bool:
    return cls.__module__.startswith("transformers.models.")


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
