"""transformers MoE experts interface -> a static-shape JAX implementation (``experts_implementation="jaxrt"``).

transformers' default experts paths either loop over the experts that were hit (data-dependent shapes: not
traceable by JAX) or gather one weight matrix per (token, expert) pair (``batched_mm``: memory grows with
tokens x top_k x expert size). This one sorts the (token, expert) pairs by expert and runs
``jax.lax.ragged_dot`` over the expert groups: static shapes, each weight read once per group, and XLA's grouped
GEMM on accelerators.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

EXPERTS_IMPLEMENTATION = "jaxrt"


def _j(x):
    from torchax import interop

    return interop.jax_view(x)


def _t(x):
    from torchax import interop

    return interop.torch_view(x)


def _grouped(x: jax.Array, w: jax.Array, group_sizes: jax.Array, transposed: bool) -> jax.Array:
    """``x [S, in]`` rows sorted by expert; ``w [E, out, in]`` (``[E, in, out]`` if transposed) -> ``[S, out]``."""
    rhs = w if transposed else jnp.swapaxes(w, 1, 2)
    return jax.lax.ragged_dot(x, rhs.astype(x.dtype), group_sizes, preferred_element_type=jnp.float32).astype(
        x.dtype
    )


def jaxrt_experts_forward(self: Any, hidden_states: Any, top_k_index: Any, top_k_weights: Any) -> Any:
    h, idx, weights = _j((hidden_states, top_k_index, top_k_weights))
    num_tokens, top_k = idx.shape
    num_experts = self.num_experts
    flat = jnp.clip(idx.reshape(-1).astype(jnp.int32), 0, num_experts - 1)
    order = jnp.argsort(flat, stable=True)
    expert_of = flat[order]
    x = h[order // top_k]  # [S, hidden], rows grouped by expert
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)

    has_gate = getattr(self, "has_gate", True)
    transposed = getattr(self, "is_transposed", False)
    has_bias = getattr(self, "has_bias", False)
    up_w = _j(self.gate_up_proj if has_gate else self.up_proj)
    y = _grouped(x, up_w, group_sizes, transposed)
    if has_bias:
        y = y + _j(self.gate_up_proj_bias if has_gate else self.up_proj_bias)[expert_of].astype(y.dtype)
    y = _j(self._apply_gate(_t(y)) if has_gate else self.act_fn(_t(y)))
    z = _grouped(y, _j(self.down_proj), group_sizes, transposed)
    if has_bias:
        z = z + _j(self.down_proj_bias)[expert_of].astype(z.dtype)
    z = z * weights.reshape(-1)[order][:, None].astype(z.dtype)
    out = jnp.zeros_like(z).at[order].set(z).reshape(num_tokens, top_k, -1).sum(axis=1)
    return _t(out.astype(h.dtype))


def register_experts() -> None:
    """Register ``experts_implementation="jaxrt"`` with transformers (idempotent)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

    if ExpertsInterface._global_mapping.get(EXPERTS_IMPLEMENTATION) is not jaxrt_experts_forward:
        ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, jaxrt_experts_forward)
