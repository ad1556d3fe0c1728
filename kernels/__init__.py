"""jaxrt kernels: ragged paged attention over a paged KV pool, the KV write, the greedy sampler's statistics
(``kernels.greedy``, GPU), and their pure-jnp references."""

from jaxrt.kernels.attention import (
    BACKEND_NAMES,
    AttentionMetadata,
    attention_metadata,
    ragged_paged_attention,
    register_backend,
    resolve_backend,
    write_kv,
)
from jaxrt.kernels.reference import (
    greedy_row_stats_reference,
    ragged_paged_attention_reference,
    write_kv_reference,
)

__all__ = [
    "BACKEND_NAMES",
    "AttentionMetadata",
    "attention_metadata",
    "greedy_row_stats_reference",
    "ragged_paged_attention",
    "ragged_paged_attention_reference",
    "register_backend",
    "resolve_backend",
    "write_kv",
    "write_kv_reference",
]
