"""jaxrt kernels: ragged paged attention over a paged KV pool, the KV write (alone, or with the rope (and norm)
of q and k: ``rope_write_kv``; for a lone decode token also with the RMSNorm and the q/k/v projection before
it: ``norm_qkv_rope_write``), the residual add with the RMSNorm after it (``add_rms_norm``), the greedy
sampler's statistics (``kernels.greedy``, GPU), the gated MLP block at a few tokens (``gated_mlp``: one Mosaic
GPU kernel on Hopper), and their pure-jnp references."""

from jaxrt.kernels.add_norm import add_rms_norm, add_rms_norm_kernel_applies
from jaxrt.kernels.attention import (
    BACKEND_NAMES,
    AttentionMetadata,
    attention_metadata,
    norm_qkv_kernel_applies,
    norm_qkv_rope_write,
    ragged_paged_attention,
    register_backend,
    resolve_backend,
    rope_write_kv,
    write_kv,
)
from jaxrt.kernels.mlp import MLP_BACKENDS, gated_mlp, mlp_kernel_applies, norm_gate_up, norm_gate_up_applies
from jaxrt.kernels.reference import (
    QKNorm,
    apply_rope,
    gated_mlp_reference,
    greedy_row_stats_reference,
    ragged_paged_attention_reference,
    rope_write_kv_reference,
    write_kv_reference,
)

__all__ = [
    "add_rms_norm",
    "add_rms_norm_kernel_applies",
    "BACKEND_NAMES",
    "MLP_BACKENDS",
    "AttentionMetadata",
    "QKNorm",
    "apply_rope",
    "attention_metadata",
    "gated_mlp",
    "gated_mlp_reference",
    "greedy_row_stats_reference",
    "mlp_kernel_applies",
    "norm_gate_up",
    "norm_gate_up_applies",
    "norm_qkv_kernel_applies",
    "norm_qkv_rope_write",
    "ragged_paged_attention",
    "ragged_paged_attention_reference",
    "register_backend",
    "resolve_backend",
    "rope_write_kv",
    "rope_write_kv_reference",
    "write_kv",
    "write_kv_reference",
]
