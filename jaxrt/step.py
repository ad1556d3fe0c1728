"""The one jitted function: (params, kv pool, batch, sampling arrays) -> (next tokens, logprobs, kv pool)."""

from __future__ import annotations

from collections.abc import Callable

import jax
from flax import nnx

from jaxrt.batch import ForwardBatch, SamplingBatch, StepOutput
from jaxrt.models.layers import KVCache
from jaxrt.sampler import sample


def make_step(graphdef: nnx.GraphDef) -> Callable:
    """Build the jitted step for a model's graphdef. The KV pool (argument 1) is donated: updated in place."""

    def step(
        state: nnx.State, kv_caches: list[KVCache], batch: ForwardBatch, sampling: SamplingBatch
    ) -> tuple[StepOutput, list[KVCache]]:
        model = nnx.merge(graphdef, state)
        logits, kv_caches = model(batch, kv_caches)
        return sample(logits, sampling), kv_caches

    return jax.jit(step, donate_argnums=(1,))
