"""A lone decode token's attention input in one Pallas kernel (Triton lowering), for NVIDIA GPUs: the RMSNorm
before attention, the q/k/v projection, rope, and the KV write.

At batch 1 every op of a layer is one kernel of its own, and each small kernel costs ~1.2-2 us whatever it
does (launch, ramp, tail). Before attention XLA ran four (Llama-3.2-1B on an H200, per layer): the norm's
sum of squares (1.2 us), its scaling (1.3), the q/k/v product as a reduction (4.7 us for 12.6 MB of weights)
and ``kv_write``'s rope + KV write (2.2). Here they are one kernel: 6.1 us in that step, which it shortens
from 1.008-1.010 to 0.965-0.971 ms (benchmarks/RESULTS.md, "Engine", seventeenth round).

Program ``(h, g)`` owns ``pairs`` rows of head ``h``'s first rotary half and the same rows of its second half
(rotate-half pairs row ``r`` with ``r + half``), so it can rope its outputs itself. Heads are numbered as
the projection's rows: q heads, then k heads, then v heads; a v head's programs use the same row split and
skip the rope. A program issues all its loads at once, with no loop: its two ``[pairs, hidden]`` slabs of
``W_qkv`` (stored ``[out, in]``: each row contiguous; ``PAIRS`` rows each) and the
token's row of ``x`` (a few KiB, from L2 for all but the first program), which it normalises itself.

Arithmetic, in XLA's order: ``kernels.reference.rms_norm`` (statistic in f32, the family's order of cast and
scale), the product of the normed row and the weights accumulated in f32 and rounded to the activations'
dtype, the bias added in that dtype, rope in f32 (``kernels.reference.apply_rope``), k and v written to
their pool slot (none for a padding token, slot < 0). The sums run in another order than XLA's reductions:
results are within rounding of the jnp composition, not bitwise.

Several tokens keep XLA's norm, cuBLAS's product and ``kv_write``'s kernel: three Triton forms for 2-16
tokens (this kernel's reductions looped over the tokens; tensor-core products in a loop over column steps; the
same unrolled) were all slower on an H200 (benchmarks/RESULTS.md, "Engine", eighteenth round).

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

from jaxrt.kernels import _pallas_common as common
from jaxrt.kernels.reference import rms_scale

NUM_WARPS = 4
# Rotate-half row pairs per program (``supports`` keeps head_dim a multiple of 16). Small programs stream best:
# each is one round trip of loads, and more of them are in flight at once. On an H200 (benchmarks/RESULTS.md)
# 2 pairs were the fastest of 1-8 for Llama-3.2-1B (hidden 2048: 6.2 us per layer, 768 programs of 16 KiB;
# 8 pairs 7.4) and Llama-3.1-8B (4096: 18.0 us), and within 0.3 us of 1 pair for Qwen2.5-0.5B.
PAIRS = 2


def supports(num_tokens: int, hidden: int, head_dim: int, rotary_dim: int, qk_norm) -> str | None:
    """None if the kernel takes this call, else why the norm / product / ``rope_write_kv`` path runs."""
    if num_tokens != 1:
        return f"{num_tokens} tokens (the kernel is for one)"
    if qk_norm is not None:
        return "q/k norms"
    if rotary_dim != head_dim:
        return f"rotary_dim {rotary_dim} != head_dim {head_dim}"
    if head_dim % 16:
        return f"head_dim {head_dim} is not a multiple of 16"
    if hidden % 16:
        return f"hidden size {hidden} is not a multiple of 16"
    return None


def _kernel(*refs, hq, hkv, half, hidden, pairs, eps, offset, scale_f32, has_bias, num_slots):
    if has_bias:
        x_ref, nw_ref, w_ref, b_ref, cos_ref, sin_ref, slot_ref, _k_in, _v_in, q_ref, k_ref, v_ref = refs
    else:
        x_ref, nw_ref, w_ref, cos_ref, sin_ref, slot_ref, _k_in, _v_in, q_ref, k_ref, v_ref = refs
        b_ref = None
    h = pl.program_id(0)
    g = pl.program_id(1)
    dtype = x_ref.dtype
    pieces = common.pow2_pieces(hidden)
    r1 = h * (2 * half) + g * pairs  # the program's rows of W_qkv: r1.. (first half), r1 + half.. (second)
    # Every load is issued up front, the weights' first: no loop, so each program has its whole slab (and
    # the token's row) in flight at once.
    w1 = [w_ref[pl.ds(r1, pairs), pl.ds(k0, n)] for k0, n in pieces]
    w2 = [w_ref[pl.ds(r1 + half, pairs), pl.ds(k0, n)] for k0, n in pieces]
    xs = [x_ref[0, pl.ds(k0, n)].astype(jnp.float32) for k0, n in pieces]
    nws = [nw_ref[pl.ds(k0, n)] for k0, n in pieces]
    inv = lax.rsqrt(sum(jnp.sum(x * x) for x in xs) / hidden + eps)
    a1 = a2 = None
    for x, nw, p1, p2 in zip(xs, nws, w1, w2, strict=True):
        xn = rms_scale(x * inv, nw, dtype, offset=offset, scale_f32=scale_f32)
        xn = xn.astype(w_ref.dtype).astype(jnp.float32)[None, :]
        s1 = jnp.sum(p1.astype(jnp.float32) * xn, axis=1)
        s2 = jnp.sum(p2.astype(jnp.float32) * xn, axis=1)
        a1, a2 = (s1, s2) if a1 is None else (a1 + s1, a2 + s2)
    y1, y2 = a1.astype(dtype), a2.astype(dtype)  # the projection's output, in the activations' dtype
    if b_ref is not None:
        y1 = (y1 + b_ref[pl.ds(r1, pairs)]).astype(dtype)
        y2 = (y2 + b_ref[pl.ds(r1 + half, pairs)]).astype(dtype)
    f1, f2 = y1.astype(jnp.float32), y2.astype(jnp.float32)
    c = cos_ref[0, pl.ds(g * pairs, pairs)]
    s = sin_ref[0, pl.ds(g * pairs, pairs)]
    o1 = (f1 * c - f2 * s).astype(dtype)  # apply_rope: rot * cos + rotate_half(rot) * sin
    o2 = (f2 * c + f1 * s).astype(dtype)
    lo, hi = pl.ds(g * pairs, pairs), pl.ds(half + g * pairs, pairs)

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
        "pairs",
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
    pairs: int | None = None,
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
    pairs = pairs or PAIRS

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
            pairs=pairs,
            eps=eps,
            offset=norm_offset,
            scale_f32=norm_scale_f32,
            has_bias=bias is not None,
            num_slots=num_slots,
        ),
        grid=(hq + 2 * hkv, half // pairs),
        in_specs=[whole(a.shape) for a in operands] + [whole(flat_k.shape), whole(flat_v.shape)],
        out_specs=[whole((1, hq, d)), whole(flat_k.shape), whole(flat_v.shape)],
        out_shape=[
            jax.ShapeDtypeStruct((1, hq, d), x.dtype),
            jax.ShapeDtypeStruct(flat_k.shape, flat_k.dtype),
            jax.ShapeDtypeStruct(flat_v.shape, flat_v.dtype),
        ],
        input_output_aliases={pools: 1, pools + 1: 2},
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="jaxrt_norm_qkv_rope_write",
    )(*operands, flat_k, flat_v)
    return q, flat_k.reshape(pool_shape), flat_v.reshape(pool_shape)
