"""A fresh prompt's attention through cuDNN's fused flash attention, on NVIDIA GPUs.

When a step is one sequence's prefill with nothing cached before it (a new prompt, or its first chunk: the
case that sets the time to first token of a long prompt), its keys and values are exactly the step's own
tokens, so the paging buys nothing: the pages the step has just written are gathered back into one
contiguous ``[S, Hkv, D]`` pair and attended with ``jax.nn.dot_product_attention(implementation="cudnn")``
(causal, the slots past the prompt zeroed and masked). On an H200 at Llama-3.2-1B's heads cuDNN's kernel takes
0.63-0.73x the paged Triton kernel's time per layer (1k tokens 26.9 against 37.1 us, 8k 835 against 1245);
the gathers cost two small kernels per layer, so the whole step gains from 2k tokens on (benchmarks/RESULTS.md,
"Engine", nineteenth round).

The host makes the choice: the engine compiles a second model program for each token bucket of at least
``MIN_TOKENS`` (``ForwardBatch.fresh`` set, a static field; in the background after start-up) and runs it for
a step that ``batch_is_fresh``; its attention calls pass ``ragged_paged_attention(fresh_prompt=...)``. Any
other step (a prefix from the radix cache, a later chunk, decodes, several sequences) runs the paged kernel
as before. A first form chose on the device with a ``lax.cond`` in every layer; its steps had 0.26-0.9 ms
more idle gaps, and at 512 and 1k tokens it lost more than cuDNN gained.

Static scope (``supports``): bf16/f16 queries and pools of one dtype, head_dim a multiple of 8 up to 256 (128
before Hopper), no logit soft-cap and no sliding window, whole pages; layers out of scope keep the paged kernel
inside a fresh-prompt program. ``JAXRT_CUDNN_PREFILL=0`` turns it off.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# From 2k tokens it wins on an H200 (Llama-3.2-1B prefill 2k / 4k / 8k in two A/B pairs: -4.5 to -5.2 / -7.7 to
# -8.4 / -11.7 to -12.9%); at 512 and 1k the gathers cost more than cuDNN saves (+2-3%; benchmarks/RESULTS.md,
# "Engine", nineteenth round).
MIN_TOKENS = 2048
_HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def supports(
    q_shape, q_dtype, k_shape, kv_dtype, pages_per_seq: int, sliding_window, soft_cap, max_head_dim: int = 256
) -> str | None:
    """None if a step of these static shapes may take the cuDNN path, else why the paged kernel runs."""
    num_tokens, num_q_heads, head_dim = q_shape
    _, page_size, num_kv_heads, _ = k_shape
    if num_tokens < MIN_TOKENS:
        return f"{num_tokens} tokens (< {MIN_TOKENS})"
    if jnp.dtype(q_dtype) not in _HALF or jnp.dtype(kv_dtype) != jnp.dtype(q_dtype):
        return f"dtypes q {q_dtype} / kv {kv_dtype} (cuDNN takes bf16 or f16, one dtype)"
    if head_dim % 8 or head_dim > max_head_dim:
        return f"head_dim {head_dim}"
    if num_q_heads % num_kv_heads:
        return f"{num_q_heads} q heads over {num_kv_heads} kv heads"
    if soft_cap is not None:
        return "logit soft-cap"
    if sliding_window is not None:
        return "sliding window"
    if num_tokens % page_size or pages_per_seq < 1:
        return f"{num_tokens} tokens in pages of {page_size}"
    return None


@functools.cache
def cudnn_available() -> bool:
    """Whether the default device is an NVIDIA GPU with a cuDNN that has fused attention."""
    try:
        if jax.devices()[0].platform != "gpu":
            return False
        from jax._src.cudnn.fused_attention_stablehlo import check_cudnn_version

        check_cudnn_version()
        return True
    except Exception:  # noqa: BLE001 - no GPU, no cuDNN, or a jax without the module
        return False


def max_head_dim() -> int:
    """256 on Hopper and later, else 128 (cuDNN's flash attention limits)."""
    cc = str(getattr(jax.devices()[0], "compute_capability", "0"))
    return 256 if float(cc or 0) >= 9.0 else 128


def available(interpret: bool, dtype, kv_dtype) -> bool:
    """Whether fresh-prompt programs can be made for a model of this compute and KV dtype: a half-precision
    model with its pool in the same dtype, and cuDNN there (the interpreter runs the path with XLA's
    attention instead)."""
    half = jnp.dtype(dtype) in _HALF and jnp.dtype(kv_dtype) == jnp.dtype(dtype)
    return half and (interpret or cudnn_available())


def applies(q, k_pages, page_indices, sliding_window, soft_cap) -> bool:
    """Whether a ``pallas_gpu`` call of these static shapes on a fresh prompt runs ``fresh_attention``
    (within ``supports``)."""
    head_max = max_head_dim() if cudnn_available() else 256
    why = supports(
        q.shape,
        q.dtype,
        k_pages.shape,
        k_pages.dtype,
        page_indices.shape[1],
        sliding_window,
        soft_cap,
        head_max,
    )
    return why is None


def fresh_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    kv_lens: jax.Array,
    page_indices: jax.Array,
    *,
    sm_scale: float,
    implementation: str = "cudnn",
) -> jax.Array:
    """Causal attention of one sequence whose ``kv_lens[0]`` keys are its ``kv_lens[0]`` query tokens, q rows
    ``[0, kv_lens[0])`` (the rest padding, returned as zeros), reading its pages through ``page_indices[0]``.
    ``implementation``: ``jax.nn.dot_product_attention``'s ("xla" runs the same gather and masks anywhere)."""
    num_tokens, num_q_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_pages.shape
    pages = min(num_tokens // page_size, page_indices.shape[1])
    s = pages * page_size
    n = kv_lens[0]
    ids = page_indices[0, :pages]
    live = (jnp.arange(s) < n)[None, :, None, None]

    def gather(pool):  # [1, S, Hkv, D]; slots past the prompt zeroed (stale or NaN: 0 * NaN would leak)
        kv = pool[ids].reshape(1, s, num_kv_heads, head_dim)
        return jnp.where(live, kv, jnp.zeros((), kv.dtype))

    # At least 1: an empty batch (the warm-up run) attends one zero row, returned as zeros.
    lens = jnp.reshape(jnp.maximum(n, 1), (1,)).astype(jnp.int32)
    o = jax.nn.dot_product_attention(
        q[None],
        gather(k_pages),
        gather(v_pages),
        scale=sm_scale,
        is_causal=True,
        query_seq_lengths=lens,
        key_value_seq_lengths=lens,
        implementation=implementation,
    )[0]
    return jnp.where((jnp.arange(num_tokens) < n)[:, None, None], o, jnp.zeros((), o.dtype)).astype(q.dtype)


def batch_is_fresh(kv_lens, cu_q_lens, num_seqs) -> bool:
    """Whether a laid-out batch (host arrays) is one sequence whose keys are all its own query tokens: what a
    fresh-prompt program (``ForwardBatch.fresh``) requires of every batch it runs."""
    n = int(kv_lens[0])
    return int(num_seqs[0]) == 1 and n > 0 and int(cu_q_lens[1]) == n
