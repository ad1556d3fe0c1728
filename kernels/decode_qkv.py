"""A lone decode token's attention input in one Pallas kernel (Triton lowering), for NVIDIA GPUs: the RMSNorm
before attention, the q/k/v projection, rope, and the KV write.

At batch 1 every op of a layer is one kernel of its own, and each small kernel costs ~1.2-2 us whatever it
does (launch, ramp, tail). Before attention XLA ran four (Llama-3.2-1B on an H200, per layer): the norm's
sum of squares (1.2 us), its scaling (1.3), the q/k/v product as a reduction (4.7 us for 12.6 MB of weights)
and ``kv_write``'s rope + KV write (2.2). Here they are one kernel.

Program ``(h, g)`` owns rows ``g * PAIRS .. + PAIRS`` of head ``h``'s first rotary half and the same rows of
its second half (rotate-half pairs row ``r`` with ``r + half``), so it can rope its outputs itself. Heads
are numbered as the projection's rows: q heads, then k heads, then v heads; a v head's programs use the same
row split and skip the rope. Each program first reads the token's ``x`` (a few KiB, from L2 for all but
the first) for the RMSNorm statistic, then streams its two ``[PAIRS, hidden]`` slabs of ``W_qkv`` (stored
``[out, in]``: each row contiguous) in ``block_k``-column steps, normalising each step's piece of ``x`` on
the way, and accumulates in f32.

Arithmetic, in XLA's order: ``kernels.reference.rms_norm`` (statistic in f32, the family's order of cast and
scale), the product of the normed row and the weights accumulated in f32 and rounded to the activations'
dtype, the bias added in that dtype, rope in f32 (``kernels.reference.apply_rope``), k and v written to
their pool slot (none for a padding token, slot < 0). The sums run in another order than XLA's reductions:
results are within rounding of the jnp composition, not bitwise.

Scope (``supports``): one token, full rotary, no q/k norms (Llama, Mistral, Qwen2, Granite; Qwen3, Gemma 3,
OLMo 2 and partial-rotary models keep the norm, the product and ``kv_write``'s kernel). ``kernels.attention.
norm_qkv_rope_write`` validates and dispatches.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

PAIRS = 8  # rotate-half row pairs of a head per program
MAX_BLOCK_K = 512
NUM_WARPS = 4
NUM_STAGES = 3


def supports(num_tokens: int, hidden: int, head_dim: int, rotary_dim: int, qk_norm) -> str | None:
    """None if the kernel takes this call, else why the norm / product / ``rope_write_kv`` path runs."""
    if num_tokens != 1:
        return f"{num_tokens} tokens (the kernel is for one)"
    if qk_norm is not None:
        return "q/k norms"
    if rotary_dim != head_dim:
        return f"rotary_dim {rotary_dim} != head_dim {head_dim}"
    if (head_dim // 2) % PAIRS or head_dim % 2:
        return f"head_dim {head_dim} is not a multiple of {2 * PAIRS}"
    if hidden % 16:
        return f"hidden size {hidden} is not a multiple of 16"
    return None


def block_k(hidden: int) -> int:
    """Columns of ``W_qkv`` per step: the largest power of two up to ``MAX_BLOCK_K`` that divides hidden."""
    bk = MAX_BLOCK_K
    while hidden % bk:
        bk //= 2
    return bk


def _kernel(*refs, hq, hkv, half, hidden, bk, eps, offset, scale_f32, has_bias, num_slots):
    if has_bias:
        x_ref, nw_ref, w_ref, b_ref, cos_ref, sin_ref, slot_ref, _k_in, _v_in, q_ref, k_ref, v_ref = refs
    else:
        x_ref, nw_ref, w_ref, cos_ref, sin_ref, slot_ref, _k_in, _v_in, q_ref, k_ref, v_ref = refs
        b_ref = None
    h = pl.program_id(0)
    g = pl.program_id(1)
    dtype = x_ref.dtype
    steps = hidden // bk

    def sum_sq(i, acc):
        xs = x_ref[0, pl.ds(pl.multiple_of(i * bk, bk), bk)].astype(jnp.float32)
        return acc + jnp.sum(xs * xs)

    inv = lax.rsqrt(lax.fori_loop(0, steps, sum_sq, jnp.float32(0.0)) / hidden + eps)
    r1 = h * (2 * half) + g * PAIRS  # the program's rows of W_qkv: r1.. (first half), r1 + half.. (second)

    def step(i, accs):
        a1, a2 = accs
        k0 = pl.multiple_of(i * bk, bk)
        xs = x_ref[0, pl.ds(k0, bk)].astype(jnp.float32) * inv
        nw = nw_ref[pl.ds(k0, bk)]
        if scale_f32 or offset:
            xn = (xs * (nw.astype(jnp.float32) + offset)).astype(dtype)
        else:
            xn = (xs.astype(dtype) * nw).astype(dtype)
        xn = xn.astype(w_ref.dtype).astype(jnp.float32)[None, :]
        w1 = w_ref[pl.ds(r1, PAIRS), pl.ds(k0, bk)].astype(jnp.float32)
        w2 = w_ref[pl.ds(r1 + half, PAIRS), pl.ds(k0, bk)].astype(jnp.float32)
        return a1 + jnp.sum(w1 * xn, axis=1), a2 + jnp.sum(w2 * xn, axis=1)

    zero = jnp.zeros((PAIRS,), jnp.float32)
    a1, a2 = lax.fori_loop(0, steps, step, (zero, zero))
    y1, y2 = a1.astype(dtype), a2.astype(dtype)  # the projection's output, in the activations' dtype
    if b_ref is not None:
        y1 = (y1 + b_ref[pl.ds(r1, PAIRS)]).astype(dtype)
        y2 = (y2 + b_ref[pl.ds(r1 + half, PAIRS)]).astype(dtype)
    f1, f2 = y1.astype(jnp.float32), y2.astype(jnp.float32)
    c = cos_ref[0, pl.ds(g * PAIRS, PAIRS)]
    s = sin_ref[0, pl.ds(g * PAIRS, PAIRS)]
    o1 = (f1 * c - f2 * s).astype(dtype)  # apply_rope: rot * cos + rotate_half(rot) * sin
    o2 = (f2 * c + f1 * s).astype(dtype)
    lo, hi = pl.ds(g * PAIRS, PAIRS), pl.ds(half + g * PAIRS, PAIRS)

    @pl.when(h < hq)
    def _():
        q_ref[0, h, lo] = o1.astype(q_ref.dtype)
        q_ref[0, h, hi] = o2.astype(q_ref.dtype)

    slot = slot_ref[0]
    valid = (slot >= 0) & (slot < num_slots)

    @pl.when(valid & (h >= hq) & (h < hq + hkv))
    def _():
        k_ref[slot, h - hq, lo] = o1.astype(k_ref.dtype)
        k_ref[slot, h - hq, hi] = o2.astype(k_ref.dtype)

    @pl.when(valid & (h >= hq + hkv))
    def _():
        v_ref[slot, h - hq - hkv, lo] = y1.astype(v_ref.dtype)
        v_ref[slot, h - hq - hkv, hi] = y2.astype(v_ref.dtype)


@functools.partial(
    jax.jit,
    static_argnames=(
        "num_q_heads",
        "num_kv_heads",
        "head_dim",
        "eps",
        "norm_offset",
        "norm_scale_f32",
        "interpret",
        "num_warps",
        "num_stages",
    ),
)
def norm_qkv_rope_write_gpu(
    x: jax.Array,
    norm_weight: jax.Array,
    w_qkv: jax.Array,
    bias: jax.Array | None,
    cos: jax.Array,
    sin: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    slot_mapping: jax.Array,
    *,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    eps: float,
    norm_offset: float = 0.0,
    norm_scale_f32: bool = False,
    interpret: bool = False,
    num_warps: int = NUM_WARPS,
    num_stages: int = NUM_STAGES,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x [1, hidden]; norm_weight [hidden]; w_qkv [(Hq + 2 * Hkv) * D, hidden] (``[out, in]``); bias
    [(Hq + 2 * Hkv) * D] or None; cos, sin [1, D // 2] f32; k_pages, v_pages [P, page_size, Hkv, D];
    slot_mapping [1] int32. Returns (roped q [1, Hq, D] in x.dtype, k_pages, v_pages). Unchecked:
    ``kernels.attention.norm_qkv_rope_write`` validates and dispatches."""
    hidden = x.shape[1]
    hq, hkv, d = num_q_heads, num_kv_heads, head_dim
    pool_shape = k_pages.shape
    num_slots = pool_shape[0] * pool_shape[1]
    flat_k = k_pages.reshape(num_slots, hkv, d)
    flat_v = v_pages.reshape(num_slots, hkv, d)
    half = d // 2
    bk = block_k(hidden)

    def whole(shape):
        return pl.BlockSpec(shape, lambda h, g: (0,) * len(shape))

    operands = [x, norm_weight, w_qkv] + ([] if bias is None else [bias]) + [cos, sin, slot_mapping]
    pools = len(operands)  # operand index of k_pages
    q, flat_k, flat_v = pl.pallas_call(
        functools.partial(
            _kernel,
            hq=hq,
            hkv=hkv,
            half=half,
            hidden=hidden,
            bk=bk,
            eps=eps,
            offset=norm_offset,
            scale_f32=norm_scale_f32,
            has_bias=bias is not None,
            num_slots=num_slots,
        ),
        grid=(hq + 2 * hkv, half // PAIRS),
        in_specs=[whole(a.shape) for a in operands] + [whole(flat_k.shape), whole(flat_v.shape)],
        out_specs=[whole((1, hq, d)), whole(flat_k.shape), whole(flat_v.shape)],
        out_shape=[
            jax.ShapeDtypeStruct((1, hq, d), x.dtype),
            jax.ShapeDtypeStruct(flat_k.shape, flat_k.dtype),
            jax.ShapeDtypeStruct(flat_v.shape, flat_v.dtype),
        ],
        input_output_aliases={pools: 1, pools + 1: 2},
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="jaxrt_norm_qkv_rope_write",
    )(*operands, flat_k, flat_v)
    return q, flat_k.reshape(pool_shape), flat_v.reshape(pool_shape)
