"""On-device sampling, inside the jitted step: penalties, temperature, top-k/top-p/min-p, per-request seeds."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxrt.batch import MAX_TOP_LOGPROBS, SampleMode, SamplingBatch, StepOutput

NEG_INF = -jnp.inf


def apply_penalties(logits: jax.Array, sb: SamplingBatch) -> jax.Array:
    """Repetition penalty over prompt+output (transformers' rule), frequency/presence over output (OpenAI's).

    logits: [num_seqs, vocab] f32.
    """
    num_seqs, vocab = logits.shape
    rows = jnp.arange(num_seqs)[:, None]
    ids = jnp.where(sb.history < 0, vocab, sb.history)  # padding -> out of range, dropped
    seen = jnp.zeros((num_seqs, vocab), jnp.bool_).at[rows, ids].set(True, mode="drop")
    out_counts = (
        jnp.zeros((num_seqs, vocab), jnp.float32)
        .at[rows, ids]
        .add(sb.history_is_output.astype(jnp.float32), mode="drop")
    )
    rep = sb.repetition_penalty[:, None]
    penalized = jnp.where(logits > 0, logits / rep, logits * rep)
    logits = jnp.where(seen, penalized, logits)
    logits = logits - sb.frequency_penalty[:, None] * out_counts
    logits = logits - sb.presence_penalty[:, None] * (out_counts > 0)
    return logits


def suppress_stops(logits: jax.Array, sb: SamplingBatch) -> jax.Array:
    """Stop ids of rows under min_new_tokens can't be drawn: -inf there.

    A comparison of each vocab index with the row's few stop ids, elementwise, so XLA fuses it into the
    reductions that read the logits (argmax, the sort); a scatter would first copy the whole logits array.
    """
    stop = jnp.where(sb.suppress_stop[:, None], sb.stop_ids, -1)  # -1 never matches a vocab index
    ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1)
    hit = functools.reduce(jnp.logical_or, [ids == stop[:, j : j + 1] for j in range(stop.shape[1])])
    return jnp.where(hit, NEG_INF, logits)


def _sample(logits: jax.Array, sb: SamplingBatch) -> jax.Array:
    """Temperature, top-k, top-p, min-p, then a Gumbel-max draw keyed by (seed, sample_index) per row."""
    num_seqs, vocab = logits.shape
    temp = jnp.where(sb.temperature > 0, sb.temperature, 1.0)[:, None]
    x = logits / temp
    order = jnp.argsort(-x, axis=-1)
    xs = jnp.take_along_axis(x, order, axis=-1)
    probs = jax.nn.softmax(xs, axis=-1)
    rank = jnp.arange(vocab)[None, :]
    keep = rank < sb.top_k[:, None]
    cum_before = jnp.cumsum(probs, axis=-1) - probs
    keep &= cum_before < sb.top_p[:, None]
    keep &= probs >= sb.min_p[:, None] * probs[:, :1]
    keep = keep.at[:, 0].set(True)  # the most likely token always survives
    xs = jnp.where(keep, xs, NEG_INF)

    def gumbel(seed, index):
        key = jax.random.fold_in(jax.random.key(seed), index)
        return jax.random.gumbel(key, (vocab,), jnp.float32)

    g = jax.vmap(gumbel)(sb.seeds, sb.sample_index)
    choice = jnp.argmax(xs + g, axis=-1)
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def sample(logits: jax.Array, sb: SamplingBatch, mode: SampleMode = SampleMode()) -> StepOutput:
    """logits: [num_seqs, vocab] -> next tokens and their log-probabilities under the raw distribution.

    ``mode`` is static: each variant is its own program, and none branches on a device value.
    """
    logits = logits.astype(jnp.float32)
    num_seqs, vocab = logits.shape
    penalties = sb.history.shape[1] > 1
    lse = jax.nn.logsumexp(logits, axis=-1)  # normaliser of the raw distribution
    top_ids = jnp.zeros((num_seqs, MAX_TOP_LOGPROBS), jnp.int32)
    top_lp = jnp.zeros((num_seqs, MAX_TOP_LOGPROBS), jnp.float32)
    if mode.top_logprobs:
        top_lp, ids = jax.lax.top_k(logits, MAX_TOP_LOGPROBS)
        top_ids, top_lp = ids.astype(jnp.int32), top_lp - lse[:, None]
    raw = logits if penalties else None  # penalties change the chosen token's logit: keep the raw ones

    if penalties:
        logits = apply_penalties(logits, sb)
    logits = suppress_stops(logits, sb)

    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if mode.sampling:
        tokens = jnp.where(sb.temperature > 0, _sample(logits, sb), greedy)
    else:
        tokens = greedy
    # Without penalties the chosen token's logit is unchanged (a suppressed stop id is never chosen).
    chosen = jnp.take_along_axis(raw if penalties else logits, tokens[:, None], axis=-1)[:, 0]
    return StepOutput(tokens=tokens, logprobs=chosen - lse, top_ids=top_ids, top_logprobs=top_lp)
