"""The jitted step, in two programs run back to back without a host sync: the model
``(params, kv pool, batch, prev tokens) -> (logits, kv pool)`` and the sampler
``(logits, sampling arrays) -> (next tokens, logprobs)``. The sampler is separate so that its variants
(greedy / sampling / top log-probs / penalties) are small programs of their own, not copies of the model.

The model enters as a pure ``ForwardFn(params, kv_caches, batch) -> (logits, kv_caches)``: native nnx models
provide one through :func:`nnx_forward`; the transformers fallback provides its own. Either way the weights are
jit inputs, never constants. The runner calls these programs through :func:`make_packed_programs`, which feeds
each its host data as one packed buffer and folds the page-table update into the model programs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrt.batch import (
    DecodeLoopOutput,
    ForwardBatch,
    SampleMode,
    SamplingBatch,
    StepOutput,
    prompt_logprobs,
)
from jaxrt.models.layers import KVCache
from jaxrt.sampler import sample

# ``kv_caches``: one (k_pages, v_pages) per attention layer, then the model's recurrent-state arrays
# ``[num_state_slots, *StateSpec.shape]`` (none for attention-only models); returned updated.
ForwardFn = Callable[
    [Any, list[KVCache | jax.Array], ForwardBatch], tuple[jax.Array, list[KVCache | jax.Array]]
]


def nnx_forward(graphdef: nnx.GraphDef) -> ForwardFn:
    """Forward function of a native model split once into ``(graphdef, state)``; ``state`` is the params."""

    def forward(state: nnx.State, kv_caches: list[KVCache], batch: ForwardBatch):
        return nnx.merge(graphdef, state)(batch, kv_caches)

    return forward


def _feed_prev(batch: ForwardBatch, prev_tokens: jax.Array) -> ForwardBatch:
    """Token ``t``'s input is ``prev_tokens[prev_index[t]]`` (sampled by the step still in flight, on the
    device) where ``prev_index[t] >= 0``, else ``input_ids[t]``."""
    from_prev = prev_tokens[jnp.maximum(batch.prev_index, 0)]
    return dataclasses.replace(batch, input_ids=jnp.where(batch.prev_index >= 0, from_prev, batch.input_ids))


def _with_pages(batch: ForwardBatch, page_table: jax.Array) -> ForwardBatch:
    """The batch's ``page_indices`` read from the device page table (``[rows, pages_per_seq]``, the runner's)
    at its ``page_rows``; a batch that carries them from the host is left as it is."""
    if batch.page_indices is not None:
        return batch
    return dataclasses.replace(batch, page_indices=page_table[batch.page_rows])


def _pad_rows(x: jax.Array, rows: int) -> jax.Array:
    """Pad the leading axis to ``rows`` (every program hands the next one ``max_num_seqs`` rows)."""
    return jnp.pad(x, [(0, rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1))


def make_forward_step(forward: ForwardFn) -> Callable:
    """Jit the model half of a step:
    ``(params, kv pool[donated], batch, prev_tokens, page_table) -> (logits, kv pool)``.

    ``page_table`` ([rows, pages_per_seq] int32, on device) holds every running request's page ids in its
    row; the batch names rows (``page_rows``), so no per-step table crosses from the host.

    ``prev_tokens`` ([max_num_seqs] int32, on device) is the previous step's ``tokens``: decode inputs can
    come from it without a round trip to the host, so the host schedules step N+1 while step N runs.
    The KV pool is donated, so XLA updates it in place. Logits are ``[num_seqs, vocab]`` in the model's
    dtype (the sampler computes in f32).
    """

    def step(params: Any, kv_caches: list[KVCache], batch: ForwardBatch, prev_tokens: jax.Array, page_table):
        return forward(params, kv_caches, _with_pages(_feed_prev(batch, prev_tokens), page_table))

    return jax.jit(step, donate_argnums=(1,))


def make_sample_step(max_num_seqs: int) -> Callable:
    """Jit the sampler half: ``(logits, sampling, mode=SampleMode) -> StepOutput`` padded to ``max_num_seqs``
    rows, so every bucket hands the next step's ``prev_tokens`` the same shape. ``mode`` is static: one
    small program per variant, no device-side branch (see :class:`jaxrt.batch.SampleMode`)."""

    def step(logits: jax.Array, sampling: SamplingBatch, mode: SampleMode) -> StepOutput:
        return jax.tree.map(lambda x: _pad_rows(x, max_num_seqs), sample(logits, sampling, mode))

    return jax.jit(step, static_argnames=("mode",))


def make_decode_loop(forward: ForwardFn, max_num_seqs: int, num_steps: int, page_size: int) -> Callable:
    """Jit ``num_steps`` decode steps in one program (continuous decode):
    ``(params, kv pool[donated], batch, sampling, prev_tokens, steps, page_table, mode=SampleMode) ->
    (DecodeLoopOutput, kv pool)``.

    ``batch`` is an all-decode batch (token ``t`` is sequence ``t``'s one new token); step ``j`` feeds each row
    the token step ``j - 1`` sampled for it, at the next position, with the sampler's output index advanced
    by ``j`` (so seeded rows draw exactly what single steps would). Row ``i`` runs ``steps[i]`` steps; later
    steps leave its KV untouched (its token's ``slot_mapping`` is -1, which recurrent layers also read as "do
    not advance this sequence's state") and their tokens are not used. The loop has a static trip count, so XLA
    runs it without reading anything back to the host.
    """

    def loop(
        params, kv_caches, batch: ForwardBatch, sampling: SamplingBatch, prev_tokens, steps, page_table, mode
    ):
        batch = _with_pages(batch, page_table)
        num_tokens = batch.input_ids.shape[0]
        num_seqs = steps.shape[0]
        ids0 = _feed_prev(batch, prev_tokens).input_ids
        # Per token row (decode: row t is sequence t; rows past num_seqs are padding with 0 steps).
        row_steps = (
            jnp.pad(steps, (0, num_tokens - num_seqs)) if num_tokens > num_seqs else steps[:num_tokens]
        )
        seq = jnp.minimum(jnp.arange(num_tokens), num_seqs - 1)
        page_indices = batch.page_indices

        def body(j, carry):
            kv, ids, all_tokens, all_logprobs = carry
            active = j < row_steps
            positions = batch.positions + jnp.minimum(j, jnp.maximum(row_steps - 1, 0))
            page = page_indices[seq, positions // page_size]
            slots = jnp.where(active, page * page_size + positions % page_size, -1)
            kv_lens = batch.kv_lens + jnp.minimum(j, jnp.maximum(steps - 1, 0))
            fb = dataclasses.replace(
                batch, input_ids=ids, positions=positions, slot_mapping=slots, kv_lens=kv_lens
            )
            logits, kv = forward(params, kv, fb)
            out = sample(logits, dataclasses.replace(sampling, sample_index=sampling.sample_index + j), mode)
            all_tokens = all_tokens.at[j].set(out.tokens)
            all_logprobs = all_logprobs.at[j].set(out.logprobs)
            new_ids = out.tokens[:num_tokens]
            if num_tokens > num_seqs:
                new_ids = jnp.pad(new_ids, (0, num_tokens - num_seqs))
            return kv, jnp.where(active, new_ids, ids), all_tokens, all_logprobs

        init = (
            kv_caches,
            ids0,
            jnp.zeros((num_steps, num_seqs), jnp.int32),
            jnp.zeros((num_steps, num_seqs), jnp.float32),
        )
        kv_caches, _, all_tokens, all_logprobs = jax.lax.fori_loop(0, num_steps, body, init)
        last = all_tokens[jnp.maximum(steps - 1, 0), jnp.arange(num_seqs)]
        pad = ((0, 0), (0, max_num_seqs - num_seqs))  # [num_steps, rows]: rows are the second axis here
        out = DecodeLoopOutput(
            tokens=_pad_rows(last, max_num_seqs),
            all_tokens=jnp.pad(all_tokens, pad),
            all_logprobs=jnp.pad(all_logprobs, pad),
        )
        return out, kv_caches

    return jax.jit(loop, donate_argnums=(1,), static_argnames=("mode",))


def _apply_delta(table: jax.Array, delta: jax.Array) -> jax.Array:
    """Write ``delta`` ([3, capacity] int32: rows, cols, page ids; out-of-range rows are padding) into the
    page table."""
    return table.at[delta[0], delta[1]].set(delta[2], mode="drop")


def make_packed_programs(forward_step: Callable, sample_step: Callable, decode_loop: Callable | None):
    """The programs above as the runner calls them (``decode_loop`` may be None). Each takes all of its host
    data as ONE int32 buffer (:class:`jaxrt.batch.PackedLayout`, a static argument) and unpacks it on the
    device: one host-to-device copy per call instead of one per array. The model programs also take the page
    table (donated), write the step's page-table delta (``[3, capacity]``: rows, cols, page ids) into it
    first, and return it.

    - forward: ``(params, kv[donated], buf = (ForwardBatch, delta), prev_tokens, page_table[donated]) ->
      (logits, kv, page_table)``, and a ``PromptLogprobs`` after them for a batch with ``targets``;
      ``fresh``, ``prefix_capacity`` and ``decodes`` (static) set ``ForwardBatch``'s fields of those names: a
      program for batches of a few prompts, after decodes with ``decodes`` (``kernels.cudnn_prefill.choose``)
    - sample: ``(logits, buf = SamplingBatch) -> StepOutput`` (``mode`` static)
    - decode loop: ``(params, kv[donated], buf = (ForwardBatch, SamplingBatch, steps, delta), prev_tokens,
      page_table[donated]) -> (DecodeLoopOutput, kv, page_table)`` (``mode`` static)
    """

    def forward(
        params, kv_caches, buf, prev_tokens, page_table, layout, fresh=None, prefix_capacity=0, decodes=False
    ):
        fb, delta = layout.unpack(buf)
        page_table = _apply_delta(page_table, delta)
        if fresh is not None:
            fb = dataclasses.replace(fb, fresh=fresh, prefix_capacity=prefix_capacity, decodes=decodes)
        if fb.targets is not None:  # prompt log-probabilities: the logits of every token row
            rows = jnp.arange(fb.input_ids.shape[0], dtype=jnp.int32)
            every, kv_caches = forward_step(
                params, kv_caches, dataclasses.replace(fb, logits_indices=rows), prev_tokens, page_table
            )
            return every[fb.logits_indices], kv_caches, page_table, prompt_logprobs(every, fb.targets)
        logits, kv_caches = forward_step(params, kv_caches, fb, prev_tokens, page_table)
        return logits, kv_caches, page_table

    def sample(logits, buf, layout, mode):
        return sample_step(logits, layout.unpack(buf), mode)

    def loop(params, kv_caches, buf, prev_tokens, page_table, layout, mode):
        fb, sb, steps, delta = layout.unpack(buf)
        page_table = _apply_delta(page_table, delta)
        out, kv_caches = decode_loop(params, kv_caches, fb, sb, prev_tokens, steps, page_table, mode)
        return out, kv_caches, page_table

    return (
        jax.jit(
            forward, donate_argnums=(1, 4), static_argnames=("layout", "fresh", "prefix_capacity", "decodes")
        ),
        jax.jit(sample, static_argnames=("layout", "mode")),
        jax.jit(loop, donate_argnums=(1, 4), static_argnames=("layout", "mode"))
        if decode_loop is not None
        else None,
    )
