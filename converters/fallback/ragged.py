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


def ragged_ssd(
    x: jax.Array,
    dt: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    init: jax.Array,
    layout: RaggedLayout,
    chunk: int = 64,
) -> tuple[jax.Array, jax.Array]:
    """Mamba-2's recurrence ``h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T``, ``y_t = C_t h_t`` (per head, scalar
    decay) in its chunked parallel form (SSD), restarting at every sequence start from ``init``.

    ``x [T, H, P]``, ``dt [T, H]`` (after bias, softplus, clamp), ``A [H]``, ``B/C [T, H, N]``, ``init [S, H, P,
    N]`` (zeros for fresh sequences), all f32 -> ``(y [T, H, P]`` without the ``D`` skip, ``final states [S, H,
    P, N])``. The same function as `ragged_scan` with that step: within a chunk of ``chunk`` rows the output is a
    masked "attention" over rows of the same sequence; chunk-end states are passed along by a scan over chunks
    (one step per chunk, not per token), and a sequence that starts inside a chunk enters from its own ``init``.
    Invalid rows get ``dt = 0`` (decay 1, no input): they hold the state.
    """
    num_tokens, heads, p = x.shape
    num_seqs = init.shape[0]
    n = B.shape[-1]
    q = chunk
    nc = -(-num_tokens // q)
    pad = nc * q - num_tokens
    dt = jnp.where(layout.valid[:, None], dt, 0.0)
    a = dt * A  # [T, H] log decay
    u = x * dt[..., None]  # [T, H, P]
    # C_t . init[seq_t] for every row: a grouped matmul over the (contiguous) rows of each sequence
    group_sizes = jax.ops.segment_sum(jnp.ones(num_tokens, jnp.int32), layout.seq, num_segments=num_seqs)
    # (a loop over heads: ragged_dot does not batch)
    c_init = jax.lax.map(
        lambda args: jax.lax.ragged_dot(args[0], args[1], group_sizes),
        (jnp.swapaxes(C, 0, 1), jnp.transpose(init, (1, 0, 3, 2))),
    )  # [H, T, P]
    c_init = jnp.swapaxes(c_init, 0, 1)

    def chunked(z, fill=0):
        z = jnp.pad(z, [(0, pad)] + [(0, 0)] * (z.ndim - 1), constant_values=fill)
        return z.reshape(nc, q, *z.shape[1:])

    a_c, u_c, b_c, c_c, ci_c = (chunked(z) for z in (a, u, B, C, c_init))
    first = chunked(layout.first, False)  # [nc, Q]
    seq_c = chunked(layout.seq, layout.seq[-1])
    idx = jnp.arange(q)
    cs = jnp.cumsum(a_c, axis=1)  # [nc, Q, H]
    start = jax.lax.cummax(jnp.where(first, idx, 0), axis=1)  # first row of each row's segment in the chunk
    cont = jax.lax.cummax(first.astype(jnp.int32), axis=1) == 0  # segment continues from the previous chunk
    segc = jnp.cumsum(first, axis=1)
    base = jnp.take_along_axis(cs - a_c, start[..., None], axis=1)  # log decay before the segment's first row
    decay_in = jnp.exp(cs - base)  # [nc, Q, H]: from the segment's incoming state to row i

    same = (segc[:, :, None] == segc[:, None, :]) & (idx[:, None] >= idx[None, :])  # [nc, Q(i), Q(j)]
    diff = cs[:, :, None, :] - cs[:, None, :, :]
    L = jnp.exp(jnp.where(same[..., None], diff, -jnp.inf))  # [nc, Q, Q, H]
    G = jnp.einsum("cihn,cjhn->cijh", c_c, b_c)
    y_intra = jnp.einsum("cijh,cjhp->cihp", G * L, u_c)

    # state at each chunk's end for its last segment: decayed incoming state + that segment's inputs
    in_last = (segc == segc[:, -1:])[..., None]
    w_end = jnp.where(in_last, jnp.exp(cs[:, -1:, :] - cs), 0.0)
    contrib = jnp.einsum("cjh,cjhp,cjhn->chpn", w_end, u_c, b_c)
    init_last = init[seq_c[:, -1]]  # [nc, H, P, N]

    def body(carry, inp):
        contrib_c, decay_c, cont_c, init_c = inp
        incoming = jnp.where(cont_c, carry, init_c)
        return decay_c[:, None, None] * incoming + contrib_c, carry

    _, carry_in = jax.lax.scan(
        body,
        jnp.zeros((heads, p, n), x.dtype),
        (contrib, decay_in[:, -1], cont[:, -1], init_last),
    )  # carry_in[c]: state entering chunk c (of the sequence continuing into it)
    y_carry = jnp.einsum("cihn,chpn->cihp", c_c, carry_in)
    y_in = decay_in[..., None] * jnp.where(cont[..., None, None], y_carry, ci_c)
    y = (y_intra + y_in).reshape(nc * q, heads, p)[:num_tokens]

    # final state of each sequence at its last row
    rows = jnp.arange(num_tokens)
    last = jax.ops.segment_max(jnp.where(layout.last, rows, -1), layout.seq, num_segments=num_seqs)
    last = jnp.clip(last, 0, num_tokens - 1)  # a sequence without rows (padding) reads row 0: scratch slot
    c_s, q_s = last // q, last % q
    seg_s = segc[c_s, q_s]
    mask = (segc[c_s] == seg_s[:, None]) & (idx[None, :] <= q_s[:, None])  # [S, Q]
    w = jnp.where(mask[..., None], jnp.exp(cs[c_s, q_s][:, None, :] - cs[c_s]), 0.0)  # [S, Q, H]
    finals = jnp.einsum("sjh,sjhp,sjhn->shpn", w, u_c[c_s], b_c[c_s])
    incoming = jnp.where(cont[c_s, q_s][:, None, None, None], carry_in[c_s], init)
    finals = finals + decay_in[c_s, q_s][:, :, None, None] * incoming
    return y, finals
