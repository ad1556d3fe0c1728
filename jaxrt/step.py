"""The jitted step, in two programs run back to back without a host sync: the model
``(params, kv pool, batch, prev tokens) -> (logits, kv pool)`` and the sampler
``(logits, sampling arrays) -> (next tokens, logprobs)``. The sampler is separate so that its variants
(greedy / sampling / top log-probs / penalties) are small programs of their own, not copies of the model.

The model enters as a pure ``ForwardFn(params, kv_caches, batch) -> (logits, kv_caches)``: native nnx models
provide one through :func:`nnx_forward`; the transformers fallback provides its own. Either way the weights are
jit inputs, never constants.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrt.batch import ForwardBatch, SampleMode, SamplingBatch, StepOutput
from jaxrt.models.layers import KVCache
from jaxrt.sampler import sample

ForwardFn = Callable[[Any, list[KVCache], ForwardBatch], tuple[jax.Array, list[KVCache]]]


def nnx_forward(graphdef: nnx.GraphDef) -> ForwardFn:
    """Forward function of a native model split once into ``(graphdef, state)``; ``state`` is the params."""

    def forward(state: nnx.State, kv_caches: list[KVCache], batch: ForwardBatch):
        return nnx.merge(graphdef, state)(batch, kv_caches)

    return forward


def make_forward_step(forward: ForwardFn) -> Callable:
    """Jit the model half of a step: ``(params, kv pool[donated], batch, prev_tokens) -> (logits, kv pool)``.

    ``prev_tokens`` ([max_num_seqs] int32, on device) is the previous step's ``tokens``: decode inputs can
    come from it without a round trip to the host, so the host schedules step N+1 while step N runs.
    The KV pool is donated, so XLA updates it in place. Logits are f32 ``[num_seqs, vocab]``.
    """

    def step(params: Any, kv_caches: list[KVCache], batch: ForwardBatch, prev_tokens: jax.Array):
        from_prev = prev_tokens[jnp.maximum(batch.prev_index, 0)]
        batch = dataclasses.replace(
            batch, input_ids=jnp.where(batch.prev_index >= 0, from_prev, batch.input_ids)
        )
        return forward(params, kv_caches, batch)

    return jax.jit(step, donate_argnums=(1,))


def make_sample_step(max_num_seqs: int) -> Callable:
    """Jit the sampler half: ``(logits, sampling, mode=SampleMode) -> StepOutput`` padded to ``max_num_seqs``
    rows, so every bucket hands the next step's ``prev_tokens`` the same shape. ``mode`` is static: one
    small program per variant, no device-side branch (see :class:`jaxrt.batch.SampleMode`)."""

    def step(logits: jax.Array, sampling: SamplingBatch, mode: SampleMode) -> StepOutput:
        out = sample(logits, sampling, mode)
        pad = max_num_seqs - out.tokens.shape[0]
        return jax.tree.map(lambda x: jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)), out)

    return jax.jit(step, static_argnames=("mode",))
