"""The one jitted function: (params, kv pool, batch, sampling arrays) -> (next tokens, logprobs, kv pool).

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

from jaxrt.batch import ForwardBatch, SamplingBatch, StepOutput
from jaxrt.models.layers import KVCache
from jaxrt.sampler import sample

ForwardFn = Callable[[Any, list[KVCache], ForwardBatch], tuple[jax.Array, list[KVCache]]]


def nnx_forward(graphdef: nnx.GraphDef) -> ForwardFn:
    """Forward function of a native model split once into ``(graphdef, state)``; ``state`` is the params."""

    def forward(state: nnx.State, kv_caches: list[KVCache], batch: ForwardBatch):
        return nnx.merge(graphdef, state)(batch, kv_caches)

    return forward


def make_step(forward: ForwardFn, max_num_seqs: int) -> Callable:
    """Build the jitted step. The KV pool (argument 1) is donated, so XLA updates it in place.

    ``prev_tokens`` ([max_num_seqs] int32, on device) is the previous step's ``tokens``: decode inputs can
    come from it without a round trip to the host, so the host schedules step N+1 while step N runs.
    Outputs are padded to ``max_num_seqs`` rows so that every bucket hands the next one the same shape.
    """

    def step(
        params: Any,
        kv_caches: list[KVCache],
        batch: ForwardBatch,
        sampling: SamplingBatch,
        prev_tokens: jax.Array,
    ) -> tuple[StepOutput, list[KVCache]]:
        from_prev = prev_tokens[jnp.maximum(batch.prev_index, 0)]
        batch = dataclasses.replace(
            batch, input_ids=jnp.where(batch.prev_index >= 0, from_prev, batch.input_ids)
        )
        logits, kv_caches = forward(params, kv_caches, batch)
        out = sample(logits, sampling)
        pad = max_num_seqs - out.tokens.shape[0]
        out = jax.tree.map(lambda x: jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)), out)
        return out, kv_caches

    return jax.jit(step, donate_argnums=(1,))
