"""The one jitted function: (params, kv pool, batch, sampling arrays) -> (next tokens, logprobs, kv pool).

The model enters as a pure ``ForwardFn(params, kv_caches, batch) -> (logits, kv_caches)``: native nnx models
provide one through :func:`nnx_forward`; the transformers fallback provides its own. Either way the weights are
jit inputs, never constants.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
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


def make_step(forward: ForwardFn) -> Callable:
    """Build the jitted step. The KV pool (argument 1) is donated, so XLA updates it in place."""

    def step(
        params: Any, kv_caches: list[KVCache], batch: ForwardBatch, sampling: SamplingBatch
    ) -> tuple[StepOutput, list[KVCache]]:
        logits, kv_caches = forward(params, kv_caches, batch)
        return sample(logits, sampling), kv_caches

    return jax.jit(step, donate_argnums=(1,))
