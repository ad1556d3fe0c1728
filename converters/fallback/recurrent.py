"""Recurrent / state-space mixers over jaxrt's flattened ragged batch, with per-request state slots.

transformers' recurrent mixers (Mamba, Mamba-2, short convolutions, gated delta-net) run their projections,
norms and gates in their own ``forward`` and hand the sequence-mixing core to a few module-level functions:
``causal_conv1d_fn`` (depthwise causal convolution), ``mamba2_chunk_scan`` (Mamba-2 SSD scan),
``mamba_selective_scan`` (Mamba selective scan), ``torch_chunk_gated_delta_rule``. With ``use_cache=False``
(what the fallback passes) they run over ``[1, num_tokens]`` as if it were one sequence, from a zero state.

`install_mixer_adapters` rebinds each mixer instance's ``forward`` to the same code object with those globals
replaced by the ragged, stateful versions below, so the family's own forward (its multipliers, norms, gating,
head layout) runs unchanged around them. Each replacement:

- splits the flat batch into its sequences (``cu_q_lens``) and never mixes tokens across their boundaries;
- starts a sequence from its state slot (``ForwardBatch.state_slots``), or from zeros when its first token here
  is at position 0 (a new or recomputed request);
- leaves a sequence's state untouched for tokens with ``slot_mapping == -1`` (padding, and rows of a continuous
  decode dispatch that already stopped);
- writes each sequence's final state back to its slot (padding sequences use the scratch slot, the last).

Each call claims the next state array of the step (`StepContext.claim_state`), in call order, exactly as
attention calls claim KV layers; the build-time probe records the shapes, which become
``ModelConfig.state_specs``. The recurrences are a ``lax.scan`` over tokens (correct for any mix of prefill
chunks and decodes); a fast prefill needs a chunked (SSD / WY) form with resets at sequence starts.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxrt.config import StateSpec
from jaxrt.converters.fallback.attention import FallbackError, StepContext
from jaxrt.converters.fallback.ragged import (
    RaggedLayout,
    check_single_batch,
    layout_of,
    ragged_conv1d,
    ragged_history,
    ragged_scan,
    ragged_ssd,
    ragged_window,
    read_states,
    step_context,
    write_states,
)

# ------------------------------------------------------------------------------------- replacements


def _activation(name: str | None, module: Any) -> Callable[[jax.Array], jax.Array]:
    if name is None:
        return lambda x: x
    if name in ("silu", "swish"):
        return jax.nn.silu
    raise FallbackError(f"{type(module).__name__}: causal convolution activation {name!r} is not supported")


def _causal_conv1d_fn(module: Any) -> Callable:
    """``causal_conv1d_fn(x [1, channels, T], weight [channels, kernel], bias, activation)`` per sequence."""

    def causal_conv1d_fn(hidden_states, weight, bias=None, activation=None, **kwargs):
        from torchax import interop

        check_single_batch(module, hidden_states=hidden_states)
        ctx = step_context(module)
        x, w, b = interop.jax_view((hidden_states, weight, bias))
        channels, kernel = w.shape
        if kernel < 2:
            raise FallbackError(f"{type(module).__name__}: causal convolution of width {kernel}")
        spec = StateSpec((channels, kernel - 1), str(jnp.dtype(x.dtype)))
        index, pool = ctx.claim_state(module, spec)
        layout = layout_of(ctx)
        init = read_states(pool, layout, spec.shape, x.dtype)
        y, new = ragged_conv1d(x[0].T.astype(w.dtype), w, b, init, layout)
        write_states(ctx, index, pool, layout, new)
        y = _activation(activation, module)(y)
        return interop.torch_view(y.T[None].astype(x.dtype))

    return causal_conv1d_fn


# Mamba-2's chunked form (`ragged_ssd`): rows per chunk; steps with more rows than this use it on accelerators,
# where a token-by-token scan is one sequential step per row. On the CPU the scan is faster (2048 rows, 16 heads:
# 58 ms scan, 86 ms chunked), so it stays the CPU path unless SSD_ON_CPU.
SSD_CHUNK = 64
SSD_ON_CPU = False


def _use_ssd(num_tokens: int) -> bool:
    return num_tokens > SSD_CHUNK and (SSD_ON_CPU or jax.default_backend() != "cpu")


def _mamba2_chunk_scan(module: Any) -> Callable:
    """Mamba-2 SSD: ``(x [1, T, H, P], dt [1, T, H], A [H], B/C [1, T, G, N], chunk_size, D, dt_bias, ...)`` ->
    ``y [1, T, H, P]`` f32; state ``[H, P, N]`` f32 per slot."""

    def mamba2_chunk_scan(
        hidden_states,
        dt,
        A,
        B,
        C,
        chunk_size=None,
        D=None,
        dt_bias=None,
        initial_states=None,
        dt_softplus=False,
        dt_limit=(0.0, float("inf")),
        return_final_states=False,
        z=None,
        **kwargs,
    ):
        from torchax import interop

        check_single_batch(module, hidden_states=hidden_states)
        if initial_states is not None or return_final_states or z is not None:
            raise FallbackError(f"{type(module).__name__}: unexpected cached / gated call of the SSD scan")
        ctx = step_context(module)
        x, dt, A, B, C, D, dt_bias = interop.jax_view((hidden_states, dt, A, B, C, D, dt_bias))
        _, _, heads, head_dim = x.shape
        groups, state_size = B.shape[2], B.shape[3]
        if dt_bias is not None:
            dt = dt + dt_bias.astype(dt.dtype)
        if dt_softplus:
            dt = jax.nn.softplus(dt)
        dt = jnp.clip(dt, dt_limit[0], dt_limit[1])[0].astype(jnp.float32)  # [T, H]
        x = x[0].astype(jnp.float32)
        rep = heads // groups
        B = jnp.repeat(B[0].astype(jnp.float32), rep, axis=1)  # [T, H, N]
        C = jnp.repeat(C[0].astype(jnp.float32), rep, axis=1)
        A = A.astype(jnp.float32)
        spec = StateSpec((heads, head_dim, state_size), "float32")
        index, pool = ctx.claim_state(module, spec)
        layout = layout_of(ctx)
        init = read_states(pool, layout, spec.shape, jnp.float32)

        def step(h, inp):
            x_t, dt_t, b_t, c_t = inp
            h = h * jnp.exp(dt_t * A)[:, None, None] + (x_t * dt_t[:, None])[:, :, None] * b_t[:, None, :]
            return h, jnp.sum(h * c_t[:, None, :], axis=-1)

        if _use_ssd(x.shape[0]):  # prefill-sized steps: one sequential step per chunk, not per row
            y, finals = ragged_ssd(x, dt, A, B, C, init, layout, SSD_CHUNK)
        else:
            y, finals = ragged_scan(step, init, (x, dt, B, C), layout)
        write_states(ctx, index, pool, layout, finals)
        if D is not None:
            y = y + D.astype(jnp.float32)[:, None] * x
        return interop.torch_view(y[None])

    return mamba2_chunk_scan


def _mamba_selective_scan(module: Any) -> Callable:
    """Mamba selective scan: ``(x [1, I, T], dt [1, I, T], A [I, N], B/C [1, N, T], D, z, delta_bias, ...)`` ->
    ``y [1, I, T]``; state ``[I, N]`` f32 per slot."""

    def mamba_selective_scan(
        hidden_states,
        dt,
        A,
        B,
        C,
        D=None,
        z=None,
        delta_bias=None,
        delta_softplus=False,
        return_last_state=False,
        **kwargs,
    ):
        from torchax import interop

        check_single_batch(module, hidden_states=hidden_states)
        if return_last_state:
            raise FallbackError(f"{type(module).__name__}: unexpected cached call of the selective scan")
        ctx = step_context(module)
        x, dt, A, B, C, D, z, delta_bias = interop.jax_view((hidden_states, dt, A, B, C, D, z, delta_bias))
        in_dtype = x.dtype
        if delta_bias is not None:
            dt = dt + delta_bias.astype(dt.dtype)[..., None]
        if delta_softplus:
            dt = jax.nn.softplus(dt)
        x_t, dt_t = x[0].T, dt[0].T.astype(jnp.float32)  # [T, I]
        B_t, C_t = B[0].T.astype(jnp.float32), C[0].T.astype(in_dtype)  # [T, N]
        A = A.astype(jnp.float32)
        inner, state_size = A.shape
        spec = StateSpec((inner, state_size), "float32")
        index, pool = ctx.claim_state(module, spec)
        layout = layout_of(ctx)
        init = read_states(pool, layout, spec.shape, jnp.float32)

        def step(h, inp):
            xs, dts, bs, cs = inp
            h = jnp.exp(A * dts[:, None]) * h + (dts[:, None] * bs[None, :]) * xs.astype(jnp.float32)[:, None]
            return h, h.astype(in_dtype) @ cs

        y, finals = ragged_scan(step, init, (x_t, dt_t, B_t, C_t), layout)
        write_states(ctx, index, pool, layout, finals)
        y = y.T[None]  # [1, I, T]
        if D is not None:
            y = y + x * D[None, :, None]
        if z is not None:
            y = y * jax.nn.silu(z)
        return interop.torch_view(y)

    return mamba_selective_scan


def _l2norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def _gated_delta_rule(module: Any) -> Callable:
    """Gated delta rule: ``(q/k [1, T, H, Dk], v [1, T, H, Dv], g [1, T, H] (per head) or [1, T, H, Dk] (per key
    channel: Kimi delta attention), beta [1, T, H], ...)`` -> ``(o [1, T, H, Dv], None)``; state ``[H, Dk, Dv]``
    f32 per slot."""

    def gated_delta_rule(
        query,
        key,
        value,
        g,
        beta,
        chunk_size=64,
        initial_state=None,
        output_final_state=False,
        use_qk_l2norm_in_kernel=False,
        **kwargs,
    ):
        from torchax import interop

        check_single_batch(module, query=query)
        if initial_state is not None or output_final_state:
            raise FallbackError(f"{type(module).__name__}: unexpected cached call of the gated delta rule")
        ctx = step_context(module)
        q, k, v, g, beta = interop.jax_view((query, key, value, g, beta))
        out_dtype = q.dtype
        q, k, v, g, beta = (a[0].astype(jnp.float32) for a in (q, k, v, g, beta))
        if use_qk_l2norm_in_kernel:
            q, k = _l2norm(q), _l2norm(k)
        q = q / (q.shape[-1] ** 0.5)
        heads, dk, dv = v.shape[1], k.shape[2], v.shape[2]
        spec = StateSpec((heads, dk, dv), "float32")
        index, pool = ctx.claim_state(module, spec)
        layout = layout_of(ctx)
        init = read_states(pool, layout, spec.shape, jnp.float32)

        def step(s, inp):
            q_t, k_t, v_t, g_t, b_t = inp
            decay = jnp.exp(g_t)
            s = s * (decay[:, None, None] if decay.ndim == 1 else decay[:, :, None])
            kv_mem = jnp.sum(s * k_t[:, :, None], axis=1)
            delta = (v_t - kv_mem) * b_t[:, None]
            s = s + k_t[:, :, None] * delta[:, None, :]
            return s, jnp.sum(s * q_t[:, :, None], axis=1)

        o, finals = ragged_scan(step, init, (q, k, v, g, beta), layout)
        write_states(ctx, index, pool, layout, finals)
        return interop.torch_view(o[None].astype(out_dtype)), None

    return gated_delta_rule


# ------------------------------------------------------------------------------- whole-forward adapters


def _lightning_attention_forward(
    self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs
):
    """MiniMax lightning attention (``MiniMaxLightningAttention``): linear attention with a per-head decay,
    ``S_t = exp(-slope) S_{t-1} + k_t^T v_t``, ``o_t = q_t S_t`` (what the layer's block form computes); the
    layer's projections, norm and output gate run as written. State ``[H, D, D]`` f32 per slot."""
    from torchax import interop

    check_single_batch(self, hidden_states=hidden_states)
    ctx = step_context(self)
    b, t, _ = hidden_states.shape
    qkv = self.act_fn(self.qkv_proj(hidden_states)).reshape(b, t, self.num_attention_heads, 3 * self.head_dim)
    q, k, v = (interop.jax_view(x)[0] for x in qkv.split(self.head_dim, dim=3))  # [T, H, D]
    out_dtype = v.dtype
    decay = jnp.exp(-interop.jax_view(self.slope_rate).reshape(-1).astype(jnp.float32))  # [H]
    spec = StateSpec((self.num_attention_heads, self.head_dim, self.head_dim), "float32")
    index, pool = ctx.claim_state(self, spec)
    layout = layout_of(ctx)
    init = read_states(pool, layout, spec.shape, jnp.float32)

    def step(state, inp):
        q_t, k_t, v_t = (x.astype(jnp.float32) for x in inp)
        state = decay[:, None, None] * state + k_t[:, :, None] * v_t[:, None, :]
        return state, jnp.sum(q_t[:, :, None] * state, axis=1)

    o, finals = ragged_scan(step, init, (q, k, v), layout)
    write_states(ctx, index, pool, layout, finals)
    out = interop.torch_view(o.astype(out_dtype).reshape(1, t, -1))
    out = self.norm(out)
    out = self.output_gate(hidden_states).sigmoid() * out
    return self.out_proj(out), None


def _zaya_cca_forward(self, hidden_states, past_key_values=None, conv_mask=None):
    """ZAYA's convolutional q/k/v projection (``ZayaCCAProjection``): q/k go through two stacked causal
    convolutions (depthwise, then grouped) and half of each value head is the previous token's delayed
    projection. Per sequence, the convolutions run on each token's window of the last ``conv_kernel_size`` + 1
    q/k inputs (the layer's own ``Conv1d`` modules over a batch of windows), and the delayed value is the row
    before, from the slot at a chunk's start. States: the q/k window and the last delayed value, per slot."""
    import torch
    from torchax import interop

    check_single_batch(self, hidden_states=hidden_states)
    if conv_mask is not None:
        raise FallbackError(f"{type(self).__name__}: a convolution mask is not supported")
    ctx = step_context(self)
    layout = layout_of(ctx)
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    projected_queries = self.q_proj(hidden_states)
    projected_keys = self.k_proj(hidden_states)
    qk = interop.jax_view(torch.cat([projected_queries, projected_keys], dim=-1))[0]  # [T, C]
    query_residual = projected_queries.view(*hidden_shape)
    key_residual = projected_keys.view(*hidden_shape).repeat_interleave(self.num_key_value_groups, dim=2)
    query_residual = (query_residual + key_residual) * 0.5
    key_residual = query_residual.view(*input_shape, -1, self.num_key_value_groups, self.head_dim).mean(
        dim=-2
    )

    width = self.conv_kernel_size
    spec = StateSpec((qk.shape[1], width), str(jnp.dtype(qk.dtype)))
    index, pool = ctx.claim_state(self, spec)
    init = read_states(pool, layout, spec.shape, qk.dtype)
    windows = jnp.stack([ragged_history(qk, init, layout, back) for back in range(width, -1, -1)], axis=-1)
    write_states(ctx, index, pool, layout, ragged_window(qk, init, layout))
    qk_states = self.conv_qk_grouped(self.conv_qk_depthwise(interop.torch_view(windows)))  # [T, C, 1]
    qk_states = qk_states[:, :, 0][None]
    query_hidden_size = query_residual.shape[-2] * query_residual.shape[-1]
    query = qk_states[..., :query_hidden_size].view(*hidden_shape) + query_residual
    key = qk_states[..., query_hidden_size:].view(*hidden_shape) + key_residual

    value_current = self.v_proj_current(hidden_states)
    delayed = interop.jax_view(self.v_proj_delayed(hidden_states))[0]  # [T, C/2]
    first = interop.jax_view(self.v_proj_delayed(hidden_states.new_zeros(1, 1, self.hidden_size)))[0, 0]
    spec = StateSpec((delayed.shape[1], 1), str(jnp.dtype(delayed.dtype)))
    index, pool = ctx.claim_state(self, spec)
    init = read_states(pool, layout, spec.shape, delayed.dtype)
    # a fresh sequence's "previous delayed value" is the projection of zeros (the bias), as in the layer
    init = jnp.where(layout.fresh[:, None, None], first[None, :, None], init)
    value_delayed = ragged_history(delayed, init, layout, 1)
    write_states(ctx, index, pool, layout, ragged_window(delayed, init, layout))
    value = torch.cat([value_current, interop.torch_view(value_delayed[None])], dim=-1).view(*hidden_shape)
    return query, key, value


def _token_shift(module: Any, ctx: StepContext, layout: RaggedLayout, hidden):
    """The previous token's input (zeros before a sequence's first token, as the layer's ``ZeroPad2d`` shift),
    from the slot at a chunk's start; the last input goes back to the slot."""
    from torchax import interop

    x = interop.jax_view(hidden)[0]  # [T, C]
    spec = StateSpec((x.shape[1], 1), str(jnp.dtype(x.dtype)))
    index, pool = ctx.claim_state(module, spec)
    init = read_states(pool, layout, spec.shape, x.dtype)
    write_states(ctx, index, pool, layout, ragged_window(x, init, layout))
    return interop.torch_view(ragged_history(x, init, layout, 1)[None])


def _rwkv_attention_forward(self, hidden, state=None, use_cache=False):
    """RWKV (v4) time mixing (``RwkvSelfAttention``): token shift, then the WKV recurrence with its running
    numerator, denominator and max (the layer's ``rwkv_linear_attention_cpu``). States: the shifted input and
    ``[3, attention_hidden]`` f32 per slot."""
    from torchax import interop

    check_single_batch(self, hidden=hidden)
    ctx = step_context(self)
    layout = layout_of(ctx)
    shifted = _token_shift(self, ctx, layout, hidden)
    key = hidden * self.time_mix_key + shifted * (1 - self.time_mix_key)
    value = hidden * self.time_mix_value + shifted * (1 - self.time_mix_value)
    receptance = hidden * self.time_mix_receptance + shifted * (1 - self.time_mix_receptance)
    k, v = interop.jax_view((self.key(key), self.value(value)))
    receptance = self.receptance(receptance).sigmoid()
    out_dtype = k.dtype
    time_decay = -jnp.exp(interop.jax_view(self.time_decay).astype(jnp.float32))
    time_first = interop.jax_view(self.time_first).astype(jnp.float32)
    spec = StateSpec((3, k.shape[2]), "float32")
    index, pool = ctx.claim_state(self, spec)
    init = read_states(pool, layout, spec.shape, jnp.float32)
    init = init.at[:, 2].set(jnp.where(layout.fresh[:, None], -1e38, init[:, 2]))  # fresh max: -1e38

    def step(st, inp):
        num, den, mx = st[0], st[1], st[2]
        k_t, v_t = inp[0].astype(jnp.float32), inp[1]
        m_out = jnp.maximum(mx, k_t + time_first)
        e1, e2 = jnp.exp(mx - m_out), jnp.exp(k_t + time_first - m_out)
        y = ((e1 * num + e2 * v_t) / (e1 * den + e2)).astype(out_dtype)
        m_st = jnp.maximum(mx + time_decay, k_t)
        e1, e2 = jnp.exp(mx + time_decay - m_st), jnp.exp(k_t - m_st)
        return jnp.stack([e1 * num + e2 * v_t, e1 * den + e2, m_st]), y

    wkv, finals = ragged_scan(step, init, (k[0], v[0]), layout)
    write_states(ctx, index, pool, layout, finals)
    return self.output(receptance * interop.torch_view(wkv[None])), None


def _rwkv_feed_forward(self, hidden, state=None):
    """RWKV channel mixing (``RwkvFeedForward``): only its token shift carries state."""
    import torch

    check_single_batch(self, hidden=hidden)
    ctx = step_context(self)
    shifted = _token_shift(self, ctx, layout_of(ctx), hidden)
    key = hidden * self.time_mix_key + shifted * (1 - self.time_mix_key)
    receptance = hidden * self.time_mix_receptance + shifted * (1 - self.time_mix_receptance)
    key = torch.square(torch.relu(self.key(key)))
    return self.receptance(receptance).sigmoid() * self.value(key), None


def _recurrent_gemma_block(self, input_states, position_ids, attention_mask=None, use_cache=True, **kwargs):
    """Griffin's recurrent block (``RecurrentGemmaRecurrentBlock``): its causal convolution per sequence (state:
    the last ``conv1d_width - 1`` inputs), then the layer's RG-LRU, whose linear scan is ragged too."""
    from torchax import interop

    check_single_batch(self, input_states=input_states)
    ctx = step_context(self)
    layout = layout_of(ctx)
    y_branch = self.act_fn(self.linear_y(input_states))
    x = interop.jax_view(self.linear_x(input_states))[0]  # [T, W]
    w, b = interop.jax_view((self.conv_1d.weight, self.conv_1d.bias))
    spec = StateSpec((x.shape[1], self.conv1d_width - 1), str(jnp.dtype(x.dtype)))
    index, pool = ctx.claim_state(self, spec)
    init = read_states(pool, layout, spec.shape, x.dtype)
    conv, new = ragged_conv1d(x, w[:, 0, :], b, init, layout)
    write_states(ctx, index, pool, layout, new)
    x_branch = self.rg_lru(interop.torch_view(conv.astype(x.dtype)[None]), position_ids)
    return self.linear_out(x_branch * y_branch), None


def _rglru_scan(self, hidden_states, recurrent_gate, reset, recurrent_states=None, acc_dtype=None):
    """The RG-LRU's linear recurrence ``h_t = a_t h_{t-1} + x_t`` (``a_t = 0`` where the layer resets, at position
    0) per sequence; state ``[W]`` f32 per slot."""
    from torchax import interop

    ctx = step_context(self)
    layout = layout_of(ctx)
    x, a, r = interop.jax_view((hidden_states, recurrent_gate, reset))
    a = jnp.where(r, 0.0, a)[0].astype(jnp.float32)
    x = x[0]
    spec = StateSpec((x.shape[1],), "float32")
    index, pool = ctx.claim_state(self, spec)
    init = read_states(pool, layout, spec.shape, jnp.float32)

    def step(h, inp):
        a_t, x_t = inp
        h = a_t * h + x_t.astype(jnp.float32)
        return h, h.astype(x.dtype)

    y, finals = ragged_scan(step, init, (a, x), layout)
    write_states(ctx, index, pool, layout, finals)
    return interop.torch_view(y[None]), None


def _mlstm_backend(
    self, query, key, value, igate, fgate, c_initial=None, n_initial=None, m_initial=None, **kwargs
):
    """xLSTM's mLSTM cell (``xLSTMBackend``), as its native recurrent step: a matrix memory ``C``, a normaliser
    ``n`` and a stabiliser ``m`` per head (all zero at a sequence's start). ``query/key [1, H, T, Dqk]``, ``value
    [1, H, T, Dv]``, ``igate/fgate [1, H, T]`` -> ``(h [1, H, T, Dv], None)``."""
    from torchax import interop

    check_single_batch(self, query=query)
    if c_initial is not None or n_initial is not None or m_initial is not None:
        raise FallbackError(f"{type(self).__name__}: unexpected cached call of the mLSTM cell")
    ctx = step_context(self)
    layout = layout_of(ctx)
    q, k, v, ig, fg = interop.jax_view((query, key, value, igate, fgate))
    qkv_dtype = q.dtype
    q, k, v = (jnp.swapaxes(x[0], 0, 1) for x in (q, k, v))  # [T, H, D]
    ig, fg = (jnp.swapaxes(x[0], 0, 1) for x in (ig, fg))  # [T, H]
    heads, dqk, dv = q.shape[1], q.shape[2], v.shape[2]
    eps = self.config.eps
    spec = StateSpec((heads, dqk * dv + dqk + 1), "float32")  # C, n and m of each head, packed
    index, pool = ctx.claim_state(self, spec)
    init = read_states(pool, layout, spec.shape, jnp.float32)

    def step(packed, inp):
        q_t, k_t, v_t, i_t, f_t = inp
        c = packed[:, : dqk * dv].reshape(heads, dqk, dv)
        n = packed[:, dqk * dv : dqk * dv + dqk]
        m = packed[:, -1]
        f_log = jax.nn.log_sigmoid(f_t)
        m_new = jnp.maximum(f_log + m, i_t)
        f_act, i_act = jnp.exp(f_log + m - m_new), jnp.exp(i_t - m_new)
        q_s = q_t * (dqk**-0.5)
        c = f_act[:, None, None] * c + i_act[:, None, None] * (k_t[:, :, None] * v_t[:, None, :])
        n = f_act[:, None] * n + i_act[:, None] * k_t
        h_num = jnp.einsum("hk,hkv->hv", q_s, c.astype(qkv_dtype)).astype(jnp.float32)
        qn = jnp.sum(q_s * n.astype(qkv_dtype), axis=-1, keepdims=True)
        h = h_num / (jnp.maximum(jnp.abs(qn), jnp.exp(-m_new)[:, None]) + eps).astype(jnp.float32)
        packed = jnp.concatenate([c.reshape(heads, -1), n, m_new[:, None]], axis=1)
        return packed, h.astype(qkv_dtype)

    h, finals = ragged_scan(step, init, (q, k, v, ig, fg), layout)
    write_states(ctx, index, pool, layout, finals)
    return interop.torch_view(jnp.swapaxes(h, 0, 1)[None]), None


def _no_rescale(self):
    """RWKV's inference-time rescaling divides weights in place (on a traced copy it would be lost, while the
    model's flag would keep halving hidden states): kept off. The rescaled model computes the same function
    (LayerNorms are scale invariant); it only avoids float16 overflow."""


def _cached_path(name: str) -> Callable[[Any], Callable]:
    """Stand-in for a cached-decode function: never reached with ``use_cache=False``; loud if it is."""

    def factory(module: Any) -> Callable:
        def refuse(*args, **kwargs):
            raise FallbackError(
                f"{type(module).__name__}: {name} (cached decode path) reached in a jaxrt step"
            )

        return refuse

    return factory


# ----------------------------------------------------------------------------------------------- registry

_CONV = {"causal_conv1d_fn": _causal_conv1d_fn, "causal_conv1d_update": _cached_path("causal_conv1d_update")}
_MAMBA2 = {
    **_CONV,
    "mamba2_chunk_scan": _mamba2_chunk_scan,
    "mamba2_selective_state_update": _cached_path("mamba2_selective_state_update"),
}
_MAMBA = {
    **_CONV,
    "mamba_selective_scan": _mamba_selective_scan,
    "mamba_selective_state_update": _cached_path("mamba_selective_state_update"),
}
_KDA = {
    **_CONV,
    "chunk_kimi_delta_attention": _gated_delta_rule,
    "recurrent_kimi_delta_attention": _cached_path("recurrent_kimi_delta_attention"),
}
_GDN = {
    **_CONV,
    "torch_chunk_gated_delta_rule": _gated_delta_rule,
    "torch_recurrent_gated_delta_rule": _cached_path("torch_recurrent_gated_delta_rule"),
}

# mixer class name (defined in transformers.models.*) -> {global name in its forward: replacement factory}.
# Each entry is verified token-exact against transformers by the coverage sweep.
MIXER_ADAPTERS: dict[str, dict[str, Callable[[Any], Callable]]] = {
    "Mamba2Mixer": _MAMBA2,
    "BambaMixer": _MAMBA2,
    "GraniteMoeHybridMambaLayer": _MAMBA2,
    "NemotronHMamba2Mixer": _MAMBA2,
    "FalconH1Mixer": _MAMBA2,
    "Zamba2MambaMixer": _MAMBA2,
    "Lfm2ShortConv": _CONV,
    "Lfm2MoeShortConv": _CONV,
    "MambaMixer": _MAMBA,
    "FalconMambaMixer": _MAMBA,
    "JambaMambaMixer": _MAMBA,
    "ZambaMambaMixer": _MAMBA,  # one selective scan (one state array) per Mamba head
    "Qwen3NextGatedDeltaNet": _GDN,
    "Qwen3_5GatedDeltaNet": _GDN,
    "Qwen3_5MoeGatedDeltaNet": _GDN,
    "OlmoHybridGatedDeltaNet": _GDN,
    "KimiLinearDeltaAttention": _KDA,
    "InklingShortConvolution": _CONV,
}


# mixer class name -> replacement forward (layers whose recurrence is inline in their forward)
MIXER_FORWARDS: dict[str, Callable[..., Any]] = {
    "MiniMaxLightningAttention": _lightning_attention_forward,
    "ZayaCCAProjection": _zaya_cca_forward,
    "RwkvSelfAttention": _rwkv_attention_forward,
    "RwkvFeedForward": _rwkv_feed_forward,
    "RecurrentGemmaRecurrentBlock": _recurrent_gemma_block,
    "xLSTMBackend": _mlstm_backend,
}


def _rebind(fn: Callable, overrides: dict[str, Any]) -> Callable:
    """``fn``'s code with some of its module globals replaced (a copy of the globals dict: the module itself,
    and every other model in the process, keep the originals)."""
    fn = inspect.unwrap(fn)
    new_globals = {**fn.__globals__, **overrides}
    new = types.FunctionType(fn.__code__, new_globals, fn.__name__, fn.__defaults__, fn.__closure__)
    new.__kwdefaults__ = fn.__kwdefaults__
    return new


def install_mixer_adapters(model: Any) -> list[str]:
    """Rebind the forward of every known recurrent mixer of ``model`` (instance attribute) to use the ragged,
    stateful functions. Returns the adapted module names (in module order)."""
    adapted = []
    for name, m in model.named_modules():
        cls = type(m)
        if not cls.__module__.startswith("transformers.models."):
            continue
        if cls.__name__ == "RecurrentGemmaRglru":  # inside an adapted RecurrentGemmaRecurrentBlock
            m.__dict__["_rnn_scan"] = types.MethodType(_rglru_scan, m)
        if cls.__name__ == "RwkvModel":
            m.__dict__["_rescale_layers"] = types.MethodType(_no_rescale, m)
        if cls.__name__ in MIXER_FORWARDS:
            m.__dict__["forward"] = types.MethodType(MIXER_FORWARDS[cls.__name__], m)
            adapted.append(name)
            continue
        table = MIXER_ADAPTERS.get(cls.__name__)
        if table is None:
            continue
        forward = inspect.unwrap(cls.forward)
        used = set(forward.__code__.co_names)
        overrides = {g: factory(m) for g, factory in table.items() if g in used}
        m.__dict__["forward"] = types.MethodType(_rebind(forward, overrides), m)
        adapted.append(name)
    return adapted
