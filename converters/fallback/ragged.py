"""The flattened ragged batch seen by recurrent layers: which sequence each token belongs to, where each
sequence's state lives, and per-sequence causal convolutions and scans that never cross a sequence boundary.

Used by the mixer adapters in ``recurrent.py``. A sequence starts from its slot's state (``ForwardBatch.state_slots``,
``-1``: the scratch slot, the last), or from zeros when its first token here is at position 0; rows whose
``slot_mapping`` is ``-1`` (padding, stopped rows of a continuous-decode dispatch) do not advance it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from jaxrt.converters.fallback.attention import CTX_KWARG, FallbackError, StepContext

# ----------------------------------------------------------------------------------------- ragged layout


@dataclass(frozen=True)
class RaggedLayout:
    """Where each token of the flat batch sits; derived from a `ForwardBatch` inside the trace."""

    seq: jax.Array  # [num_tokens] int32: the token's sequence (clipped to num_seqs - 1 for padding)
    offset: jax.Array  # [num_tokens] int32: index of the token within its sequence's rows of this batch
    valid: jax.Array  # [num_tokens] bool: a real token that advances its sequence's state
    first: jax.Array  # [num_tokens] bool: first row of its sequence
    last: jax.Array  # [num_tokens] bool: last row of its sequence
    starts: jax.Array  # [num_seqs] int32: first row of each sequence (cu_q_lens[:-1])
    num_valid: jax.Array  # [num_seqs] int32: valid rows of each sequence
    fresh: jax.Array  # [num_seqs] bool: the sequence starts at position 0 here (zero initial state)
    slots: jax.Array  # [num_seqs] int32: state slot (padding sequences: the scratch slot)

    @classmethod
    def from_batch(cls, batch: Any, num_slots: int) -> RaggedLayout:
        cu = jnp.asarray(batch.cu_q_lens)
        num_tokens = batch.input_ids.shape[0]
        num_seqs = cu.shape[0] - 1
        t = jnp.arange(num_tokens, dtype=jnp.int32)
        seq = jnp.minimum(jnp.searchsorted(cu[1:], t, side="right"), num_seqs - 1).astype(jnp.int32)
        total = cu[jnp.asarray(batch.num_seqs)[0]]
        valid = (t < total) & (jnp.asarray(batch.slot_mapping) >= 0)
        starts = cu[:-1]
        positions = jnp.asarray(batch.positions)
        fresh = positions[jnp.minimum(starts, num_tokens - 1)] == 0
        seg = jax.ops.segment_sum(valid.astype(jnp.int32), seq, num_segments=num_seqs)
        slots = jnp.asarray(batch.state_slots)
        return cls(
            seq=seq,
            offset=t - starts[seq],
            valid=valid,
            first=t == starts[seq],
            last=t == cu[1:][seq] - 1,
            starts=starts,
            num_valid=seg,
            fresh=fresh,
            slots=jnp.where(slots < 0, num_slots - 1, slots),
        )


def read_states(pool: jax.Array | None, layout: RaggedLayout, shape: tuple[int, ...], dtype) -> jax.Array:
    """``[num_seqs, *shape]``: each sequence's state from its slot, zeros for fresh sequences."""
    num_seqs = layout.starts.shape[0]
    if pool is None:  # probing: shapes only
        return jnp.zeros((num_seqs, *shape), dtype)
    init = pool[layout.slots].astype(dtype)
    return jnp.where(layout.fresh.reshape((-1,) + (1,) * len(shape)), jnp.zeros_like(init), init)


def write_states(
    ctx: StepContext, index: int, pool: jax.Array | None, layout: RaggedLayout, finals: jax.Array
):
    if pool is not None:
        ctx.set_state(index, pool.at[layout.slots].set(finals.astype(pool.dtype)))


def ragged_history(x: jax.Array, init: jax.Array, layout: RaggedLayout, back: int) -> jax.Array:
    """Each token's input ``back`` rows earlier in its sequence: ``x [num_tokens, channels]``, ``init [num_seqs,
    channels, width]`` (the ``width >= back`` inputs before this batch's rows, oldest first) -> ``[num_tokens,
    channels]``."""
    width = init.shape[2]
    in_batch = layout.offset >= back
    from_x = x[jnp.maximum(jnp.arange(x.shape[0]) - back, 0)]
    hist = jnp.clip(width - back + layout.offset, 0, width - 1)
    from_state = init[layout.seq, :, hist]
    return jnp.where(in_batch[:, None], from_x, from_state.astype(x.dtype))


def ragged_window(x: jax.Array, init: jax.Array, layout: RaggedLayout) -> jax.Array:
    """The state after this batch: each sequence's last ``width`` inputs (its valid rows, then its earlier state),
    ``[num_seqs, channels, width]`` like ``init``."""
    width = init.shape[2]
    j = jnp.arange(width)
    rel = layout.num_valid[:, None] - width + j[None, :]  # [num_seqs, width]
    rows = jnp.clip(layout.starts[:, None] + rel, 0, x.shape[0] - 1)
    from_x = jnp.swapaxes(x[rows], 1, 2)  # [num_seqs, channels, width]
    hist = jnp.clip(width + rel, 0, width - 1)
    from_state = jnp.take_along_axis(init, jnp.broadcast_to(hist[:, None, :], init.shape), axis=2)
    return jnp.where((rel >= 0)[:, None, :], from_x.astype(init.dtype), from_state)


def ragged_conv1d(
    x: jax.Array, weight: jax.Array, bias: jax.Array | None, init: jax.Array, layout: RaggedLayout
) -> tuple[jax.Array, jax.Array]:
    """Depthwise causal convolution per sequence.

    ``x [num_tokens, channels]``, ``weight [channels, kernel]``, ``bias [channels]``, ``init [num_seqs, channels,
    kernel - 1]`` (the inputs before this batch's rows, oldest first) -> ``(y [num_tokens, channels]`` before the
    activation, ``new state [num_seqs, channels, kernel - 1])``.
    """
    kernel = weight.shape[1]
    acc = jnp.zeros(x.shape, jnp.result_type(x.dtype, weight.dtype))
    for k in range(kernel):  # tap k reads the input kernel-1-k rows earlier
        acc = acc + ragged_history(x, init, layout, kernel - 1 - k) * weight[:, k]
    if bias is not None:
        acc = acc + bias
    return acc, ragged_window(x, init, layout)


def ragged_scan(step: Callable, init: Any, xs: Any, layout: RaggedLayout) -> tuple[Any, Any]:
    """Run ``step(state, x) -> (state, y)`` over the tokens, restarting from ``init[seq]`` at each sequence's
    first row and holding the state over invalid rows. ``init``: pytree of ``[num_seqs, ...]``; ``xs``: pytree of
    ``[num_tokens, ...]``. Returns ``(ys [num_tokens, ...], final states [num_seqs, ...])``."""

    def body(carry, inp):
        state, finals = carry
        x, s, first, last, valid = inp
        state = jax.tree.map(lambda i, c: jnp.where(first, i[s], c), init, state)
        new, y = step(state, x)
        new = jax.tree.map(lambda n, o: jnp.where(valid, n, o), new, state)
        finals = jax.tree.map(lambda f, n: f.at[s].set(jnp.where(last, n, f[s])), finals, new)
        return (new, finals), y

    state0 = jax.tree.map(lambda i: jnp.zeros_like(i[0]), init)
    (_, finals), ys = jax.lax.scan(
        body, (state0, init), (xs, layout.seq, layout.first, layout.last, layout.valid)
    )
    return ys, finals


# ------------------------------------------------------------------------------------- step context


def step_context(module: Any) -> StepContext:
    ctx = getattr(module, "__dict__", {}).get(CTX_KWARG)
    if not isinstance(ctx, StepContext):
        raise FallbackError(f"{type(module).__name__}: recurrent mixer called outside a jaxrt step")
    return ctx


def layout_of(ctx: StepContext) -> RaggedLayout:
    num_slots = ctx.states[0].shape[0] if ctx.states else 1
    return RaggedLayout.from_batch(ctx.batch, num_slots)


def check_single_batch(module: Any, **tensors: Any) -> None:
    for name, t in tensors.items():
        if t is not None and t.shape[0] != 1:
            raise FallbackError(
                f"{type(module).__name__}: {name} has batch {t.shape[0]}; the fallback runs one flat sequence"
            )
