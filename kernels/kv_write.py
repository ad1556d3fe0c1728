"""Rotary embedding of q and k plus the KV write in one Pallas kernel (Triton lowering), for NVIDIA GPUs.

After the fused q/k/v projection a decode step ran, per layer, three small XLA kernels: rope on q, and two
scatters of the new K (with its rope fused in) and V rows into the paged pools, each mostly launch and tail
at small batches. This kernel does all of it in one launch: program ``t`` reads row ``t`` of the projection
output ``qkv [T, (Hq + 2 * Hkv) * D]`` (q columns, then k, then v; viewed as ``[T, Hq + 2 * Hkv, D]``, a free
reshape), applies the rotate-half rope in f32 to its q and k heads (``kernels.reference.apply_rope``'s
arithmetic), stores the roped q to the output and, when ``slot_mapping[t]`` is a slot of the pool, the roped
k and the v row into that slot of ``k_pages`` / ``v_pages``. The pools pass through ``input_output_aliases``:
with the pools donated to the step they update in place, as the XLA scatter did. Padding rows (slot < 0)
and slots past the pool write nothing, as in ``kernels.reference.write_kv_reference``. Outputs are bitwise
those of the jnp composition (checked on an H200, bf16 and f32). On an H200, in a synthetic chain of 16
layers (qkv GEMM, this, o GEMM; Llama 3.2 1B shapes, bf16) it saved 1.4-2.7 us per layer against XLA's ops
at 1 to 2048 tokens (wall clock of the jitted chain, not the engine's step).

Models that RMSNorm q and k before rope (Qwen3 and Gemma 3 per head, OLMo 2 over all heads of a token:
``kernels.reference.QKNorm``) norm them here too, in f32 with the family's order of cast and scale, so their
two norm kernels join the three. The sum of squares runs in another order than XLA's reduction: results are
within an ulp of the jnp composition, not bitwise.

Triton loads power-of-two tiles: each of the three head counts is read as its binary decomposition (14
heads: tiles of 8, 4 and 2 heads), and so are the columns: the two rotated halves and the pass-through
columns of partial rotary (Phi-4-mini: head_dim 128, 96 rotary dims, halves of 48 = 32 + 16 columns, 32
passed through), so any head count, head_dim (a multiple of 8) and rotary_dim work without masks.
``kernels.attention.rope_write_kv`` checks this (``supports``) and runs the jnp composition otherwise.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jaxrt.kernels import _pallas_common as common
from jaxrt.kernels.reference import QKNorm, rms_scale

NUM_WARPS = 4


def supports(num_tokens: int, cos_shape, head_dim: int) -> str | None:
    """None if the kernel takes these shapes, else the reason the jnp composition runs instead (dtypes:
    ``kernels.attention.rope_write_kv`` admits f32 / bf16 / f16 only, all of which the kernel takes). Any
    head_dim and rotary_dim are tiled (in power-of-two column pieces); no rotary dims at all is the jnp
    composition's (nothing to rope: a plain scatter), and so is an empty batch (a grid of zero programs does
    not lower)."""
    if num_tokens == 0:
        return "no tokens"
    if cos_shape[-1] == 0:
        return "no rotary dims"
    if head_dim % 8:
        return f"head_dim {head_dim} is not a multiple of 8"
    return None


def _kernel(*refs, hq, hkv, half, head_dim, num_slots, norm):
    if norm is None:
        qkv_ref, cos_ref, sin_ref, slot_ref, _k_in, _v_in, q_ref, k_ref, v_ref = refs
        wq_ref = wk_ref = None
    else:
        qkv_ref, cos_ref, sin_ref, slot_ref, wq_ref, wk_ref, _k_in, _v_in, q_ref, k_ref, v_ref = refs
    t = pl.program_id(0)
    dtype = qkv_ref.dtype
    slot = slot_ref[t]
    # Column pieces (first column, width), each a power of two: the rotated halves [0, half) and
    # [half, 2 * half) piece by piece (rotate-half pairs column c with c + half), then the columns past the
    # rotary dims, which pass through (partial rotary).
    rot = common.pow2_pieces(half, 0)
    rest = common.pow2_pieces(head_dim - 2 * half, 2 * half)
    cos = [cos_ref[pl.ds(t, 1), pl.ds(c0, w)] for c0, w in rot]  # [1, w] f32 each
    sin = [sin_ref[pl.ds(t, 1), pl.ds(c0, w)] for c0, w in rot]

    def heads(start, count, w_ref):
        """[(first head, n, first halves, second halves, rest)] of heads ``start .. start + count``: f32
        column pieces, normed (``reference.QKNorm``'s arithmetic, cast to the input dtype and back) when the
        model norms q / k."""

        def load(h0, n, c0, w):
            return qkv_ref[t, pl.ds(h0, n), pl.ds(c0, w)].astype(jnp.float32)

        tiles = [
            (
                h0,
                n,
                [load(h0, n, c0, w) for c0, w in rot],
                [load(h0, n, half + c0, w) for c0, w in rot],
                [load(h0, n, c0, w) for c0, w in rest],
            )
            for h0, n in common.pow2_pieces(count, start)
        ]
        if norm is None:
            return tiles

        def sum_sq(*parts):  # [n, 1]
            return sum(jnp.sum(x * x, axis=1, keepdims=True) for part in parts for x in part)

        if norm.mode == "full":  # one statistic over all the token's heads of q (or of k)
            total = sum(jnp.sum(sum_sq(*tile[2:])) for tile in tiles)
            invs = [lax.rsqrt(total / (count * head_dim) + norm.eps)] * len(tiles)
        else:
            invs = [lax.rsqrt(sum_sq(*tile[2:]) / head_dim + norm.eps) for tile in tiles]

        def scale(x, inv, h0, n, c0, w):
            rows = pl.ds(h0 - start, n) if norm.mode == "full" else pl.ds(0, 1)
            wt = w_ref[rows, pl.ds(c0, w)]
            return rms_scale(x * inv, wt, dtype, offset=norm.offset, scale_f32=norm.scale_f32).astype(
                jnp.float32
            )

        out = []
        for (h0, n, x1, x2, xr), inv in zip(tiles, invs, strict=True):
            x1 = [scale(x, inv, h0, n, c0, w) for x, (c0, w) in zip(x1, rot, strict=True)]
            x2 = [scale(x, inv, h0, n, half + c0, w) for x, (c0, w) in zip(x2, rot, strict=True)]
            xr = [scale(x, inv, h0, n, c0, w) for x, (c0, w) in zip(xr, rest, strict=True)]
            out.append((h0, n, x1, x2, xr))
        return out

    def store(ref, row, dst, x1, x2, xr):
        """Rope a tile's halves (apply_rope: rot * cos + rotate_half(rot) * sin, rotate_half = concat(-x2,
        x1)) and store them and the pass-through columns to ``ref[row, dst]``."""
        for (c0, w), a, b, c, s in zip(rot, x1, x2, cos, sin, strict=True):
            ref[row, dst, pl.ds(c0, w)] = (a * c - b * s).astype(dtype).astype(ref.dtype)
            ref[row, dst, pl.ds(half + c0, w)] = (b * c + a * s).astype(dtype).astype(ref.dtype)
        for (c0, w), x in zip(rest, xr, strict=True):
            ref[row, dst, pl.ds(c0, w)] = x.astype(dtype).astype(ref.dtype)

    for h0, n, x1, x2, xr in heads(0, hq, wq_ref):
        store(q_ref, t, pl.ds(h0, n), x1, x2, xr)

    @pl.when((slot >= 0) & (slot < num_slots))
    def _():
        for h0, n, x1, x2, xr in heads(hq, hkv, wk_ref):
            store(k_ref, slot, pl.ds(h0 - hq, n), x1, x2, xr)
        for (h0, n), (c0, w) in itertools.product(
            common.pow2_pieces(hkv, hq + hkv), common.pow2_pieces(head_dim, 0)
        ):
            v = qkv_ref[t, pl.ds(h0, n), pl.ds(c0, w)]
            v_ref[slot, pl.ds(h0 - hq - hkv, n), pl.ds(c0, w)] = v.astype(v_ref.dtype)


@functools.partial(
    jax.jit,
    static_argnames=("num_q_heads", "num_kv_heads", "head_dim", "qk_norm", "interpret", "num_warps"),
)
def rope_write_kv_gpu(
    qkv: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    slot_mapping: jax.Array,
    *,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    qk_norm: QKNorm | None = None,
    qk_norm_weights: tuple[jax.Array, jax.Array] | None = None,
    interpret: bool = False,
    num_warps: int = NUM_WARPS,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """qkv [T, (Hq + 2 * Hkv) * D]; cos, sin [T, rotary_dim // 2] f32; k_pages, v_pages [P, page_size, Hkv, D];
    slot_mapping [T] int32 (flat slot, -1 = padding); qk_norm / qk_norm_weights: q and k normed first, as
    ``kernels.reference.rope_write_kv_reference``. Returns (roped q [T, Hq, D] in qkv.dtype, k_pages,
    v_pages). Unchecked: ``kernels.attention.rope_write_kv`` validates and dispatches."""
    num_tokens = qkv.shape[0]
    hq, hkv, d = num_q_heads, num_kv_heads, head_dim
    pool_shape = k_pages.shape
    num_slots = pool_shape[0] * pool_shape[1]
    x = qkv.reshape(num_tokens, hq + 2 * hkv, d)
    flat_k = k_pages.reshape(num_slots, hkv, d)
    flat_v = v_pages.reshape(num_slots, hkv, d)

    def whole(shape):
        return pl.BlockSpec(shape, lambda t: (0,) * len(shape))

    weights = ()
    if qk_norm is not None:  # [1, D] per-head weights, or [H, D] rows of a "full" norm's weight
        rows = (hq, hkv) if qk_norm.mode == "full" else (1, 1)
        weights = tuple(w.reshape(r, d) for w, r in zip(qk_norm_weights, rows, strict=True))
    pools = 4 + len(weights)  # operand index of k_pages
    q, flat_k, flat_v = pl.pallas_call(
        functools.partial(
            _kernel, hq=hq, hkv=hkv, half=cos.shape[1], head_dim=d, num_slots=num_slots, norm=qk_norm
        ),
        grid=(num_tokens,),
        in_specs=[
            whole(x.shape),
            whole(cos.shape),
            whole(sin.shape),
            whole(slot_mapping.shape),
            *(whole(w.shape) for w in weights),
            whole(flat_k.shape),
            whole(flat_v.shape),
        ],
        out_specs=[whole((num_tokens, hq, d)), whole(flat_k.shape), whole(flat_v.shape)],
        out_shape=[
            jax.ShapeDtypeStruct((num_tokens, hq, d), qkv.dtype),
            jax.ShapeDtypeStruct(flat_k.shape, flat_k.dtype),
            jax.ShapeDtypeStruct(flat_v.shape, flat_v.dtype),
        ],
        input_output_aliases={pools: 1, pools + 1: 2},
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="jaxrt_rope_write_kv",
    )(x, cos, sin, slot_mapping, *weights, flat_k, flat_v)
    return q, flat_k.reshape(pool_shape), flat_v.reshape(pool_shape)
