"""transformers MoE experts -> static-shape JAX (``experts_implementation="jaxrt"`` and per-class expert adapters).

transformers' default experts paths either loop over the experts that were hit (data-dependent shapes: not
traceable by JAX) or gather one weight matrix per (token, expert) pair (``batched_mm``: memory grows with
tokens x top_k x expert size). Here the (token, expert) pairs are sorted by expert and each projection runs as
``jax.lax.ragged_dot`` over the expert groups: static shapes, each weight read once per group, and XLA's grouped
GEMM on accelerators. `route` is that dispatch; ``jaxrt_experts_forward`` is the experts-interface function, and
``adapters.py`` uses `route` / `grouped` for MoE classes that do not go through the interface (DBRX, LongCat,
JetMoE, Aria).
"""

from __future__ import annotations

from collections.abc import Callable
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


def grouped(x: jax.Array, w: jax.Array, group_sizes: jax.Array, transposed: bool) -> jax.Array:
    """``x [S, in]`` rows sorted by expert; ``w [E, out, in]`` (``[E, in, out]`` if transposed) -> ``[S, out]``.

    Rows past ``sum(group_sizes)`` belong to no group; callers overwrite them."""
    rhs = w if transposed else jnp.swapaxes(w, 1, 2)
    return jax.lax.ragged_dot(x, rhs.astype(x.dtype), group_sizes, preferred_element_type=jnp.float32).astype(
        x.dtype
    )


def route(
    h: jax.Array,
    idx: jax.Array,
    weights: jax.Array,
    num_experts: int,
    expert_fn: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
) -> jax.Array:
    """Weighted sum of each token's top-k expert outputs, computed expert-grouped.

    ``h [num_tokens, hidden]``, ``idx [num_tokens, top_k]`` int, ``weights [num_tokens, top_k]`` ->
    ``[num_tokens, out]`` in ``h``'s dtype. ``expert_fn(x [S, hidden], group_sizes [num_experts], expert_of [S])``
    maps the pairs' rows, sorted by expert, to their expert outputs ``[S, out]``. Indices ``>= num_experts``
    (LongCat's identity experts) sort after every group and count in none; ``expert_fn`` handles those rows.
    """
    num_tokens, top_k = idx.shape
    flat = idx.reshape(-1).astype(jnp.int32)
    order = jnp.argsort(flat, stable=True)
    expert_of = flat[order]
    x = h[order // top_k]  # [S, hidden], rows grouped by expert
    group_sizes = jnp.bincount(jnp.minimum(flat, num_experts), length=num_experts + 1)[:num_experts]
    z = expert_fn(x, group_sizes.astype(jnp.int32), expert_of)
    z = z * weights.reshape(-1)[order][:, None].astype(z.dtype)
    out = jnp.zeros_like(z).at[order].set(z).reshape(num_tokens, top_k, -1).sum(axis=1)
    return out.astype(h.dtype)


def jaxrt_experts_forward(self: Any, hidden_states: Any, top_k_index: Any, top_k_weights: Any) -> Any:
    h, idx, weights = _j((hidden_states, top_k_index, top_k_weights))
    num_experts = self.num_experts
    has_gate = getattr(self, "has_gate", True)
    transposed = getattr(self, "is_transposed", False)
    has_bias = getattr(self, "has_bias", False)

    def expert_fn(x, group_sizes, expert_of):
        up_w = _j(self.gate_up_proj if has_gate else self.up_proj)
        y = grouped(x, up_w, group_sizes, transposed)
        if has_bias:
            y = y + _j(self.gate_up_proj_bias if has_gate else self.up_proj_bias)[expert_of].astype(y.dtype)
        y = _j(self._apply_gate(_t(y)) if has_gate else self.act_fn(_t(y)))
        z = grouped(y, _j(self.down_proj), group_sizes, transposed)
        if has_bias:
            z = z + _j(self.down_proj_bias)[expert_of].astype(z.dtype)
        return z

    idx = jnp.clip(idx, 0, num_experts - 1)
    return _t(route(h, idx, weights, num_experts, expert_fn))


def register_experts() -> None:
    """Register ``experts_implementation="jaxrt"`` with transformers (idempotent)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

    if ExpertsInterface._global_mapping.get(EXPERTS_IMPLEMENTATION) is not jaxrt_experts_forward:
        ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, jaxrt_experts_forward)
