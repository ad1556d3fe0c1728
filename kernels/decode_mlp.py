"""A lone decode token's MLP input in one Pallas kernel (Triton lowering), for NVIDIA GPUs: the RMSNorm before
the MLP, the gate/up projection and the activation, ``act(gate) * up``.

At batch 1 XLA runs these as four kernels per layer (Llama-3.2-1B on an H200): the norm's statistic (1.2 us),
the norm's scaling with the residual add before it (1.3), cuBLAS's gate/up GEMM (18.9 us for 67 MB of
weights) and SiLU x up (1.3). Here they are one kernel; the down projection stays XLA's.

Program ``j`` owns ``block_n`` intermediate columns: the same columns of the gate and the up halves of
``W_gate_up`` (stored ``[in, out]``, gate columns then up columns; each row of a slab is ``block_n``
contiguous weights). It reads the token's row of ``x`` once for the RMSNorm statistic (a few KiB, from L2 for
all but the first program), then streams its two ``[hidden, block_n]`` slabs in ``block_k``-row steps
(Triton pipelines the loads ``num_stages`` deep), normalising each step's piece of ``x`` on the way, with
f32 accumulators of the steps' shape that it sums once at the end.

Arithmetic, in XLA's order: ``kernels.reference.rms_norm``, the products accumulated in f32 and rounded to
the activations' dtype (gate and up, as the GEMM returns them), then ``act(gate) * up`` in f32, rounded once
(XLA keeps the fused activation's intermediates in f32). The sums run in another order than cuBLAS's:
results are within rounding of the jnp composition, not bitwise.

``kernels.mlp.norm_gate_up`` validates and dispatches. Off in models by default (``JAXRT_FUSED_GATE_UP``):
on an H200 it is slower than the kernels it replaces (Llama-3.2-1B, 16 layers, ``benchmarks/
bench_decode_mlp.py``): 27.0 us per layer at the default tiling (64 columns, 256-row steps, 8 warps, 3
stages; 33-59 us at the six others tried) against 22.2 for XLA's four kernels, so its slabs stream at ~2.5
TB/s where cuBLAS's GEMM reaches 3.6 (benchmarks/RESULTS.md, "Engine", seventeenth round).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jaxrt.kernels import _pallas_common as common
from jaxrt.kernels.reference import MLP_ACTIVATIONS, rms_scale

BLOCK_N = 64
BLOCK_K = 256
NUM_WARPS = 8
NUM_STAGES = 3


def supports(num_tokens: int, hidden: int, intermediate: int, act: str, block_n: int = BLOCK_N) -> str | None:
    """None if the kernel takes this call, else why XLA's kernels run."""
    if num_tokens != 1:
        return f"{num_tokens} tokens (the kernel is for one)"
    if act not in MLP_ACTIVATIONS:
        return f"activation {act!r} not in {sorted(MLP_ACTIVATIONS)}"
    if intermediate % block_n:
        return f"intermediate size {intermediate} is not a multiple of {block_n}"
    if hidden % 16:
        return f"hidden size {hidden} is not a multiple of 16"
    return None


def block_k(hidden: int, limit: int = BLOCK_K) -> int:
    """Rows of a slab per step: the largest power of two up to ``limit`` that divides hidden."""
    bk = limit
    while hidden % bk:
        bk //= 2
    return bk


def _kernel(x_ref, nw_ref, w_ref, h_ref, *, hidden, intermediate, bn, bk, eps, offset, scale_f32, act):
    j = pl.program_id(0)
    dtype = x_ref.dtype
    xs = [x_ref[0, pl.ds(k0, n)].astype(jnp.float32) for k0, n in common.pow2_pieces(hidden)]
    inv = lax.rsqrt(sum(jnp.sum(x * x) for x in xs) / hidden + eps)
    gate_cols = pl.ds(pl.multiple_of(j * bn, bn), bn)
    up_cols = pl.ds(pl.multiple_of(intermediate + j * bn, bn), bn)

    def step(i, accs):
        ag, au = accs
        k0 = pl.multiple_of(i * bk, bk)
        xk = x_ref[0, pl.ds(k0, bk)].astype(jnp.float32) * inv
        xn = rms_scale(xk, nw_ref[pl.ds(k0, bk)], dtype, offset=offset, scale_f32=scale_f32)
        xn = xn.astype(w_ref.dtype).astype(jnp.float32)[:, None]
        wg = w_ref[pl.ds(k0, bk), gate_cols].astype(jnp.float32)
        wu = w_ref[pl.ds(k0, bk), up_cols].astype(jnp.float32)
        return ag + wg * xn, au + wu * xn

    zero = jnp.zeros((bk, bn), jnp.float32)
    ag, au = lax.fori_loop(0, hidden // bk, step, (zero, zero))
    gate = jnp.sum(ag, axis=0).astype(dtype).astype(jnp.float32)  # the GEMM's outputs, in the dtype
    up = jnp.sum(au, axis=0).astype(dtype).astype(jnp.float32)
    h_ref[0, gate_cols] = (MLP_ACTIVATIONS[act](gate) * up).astype(h_ref.dtype)


@functools.partial(
    jax.jit,
    static_argnames=(
        "eps",
        "norm_offset",
        "norm_scale_f32",
        "act",
        "interpret",
        "block_n",
        "block_k_rows",
        "num_warps",
        "num_stages",
    ),
)
def norm_gate_up_gpu(
    x: jax.Array,
    norm_weight: jax.Array,
    w_gate_up: jax.Array,
    *,
    eps: float,
    norm_offset: float = 0.0,
    norm_scale_f32: bool = False,
    act: str = "silu",
    interpret: bool = False,
    block_n: int = BLOCK_N,
    block_k_rows: int = BLOCK_K,
    num_warps: int = NUM_WARPS,
    num_stages: int = NUM_STAGES,
) -> jax.Array:
    """x [1, hidden]; norm_weight [hidden]; w_gate_up [hidden, 2 * intermediate] (gate columns, then up).
    Returns ``act(gate) * up`` [1, intermediate] in x.dtype. Unchecked: ``kernels.mlp.norm_gate_up``
    validates and dispatches."""
    hidden = x.shape[1]
    intermediate = w_gate_up.shape[1] // 2

    def whole(shape):
        return pl.BlockSpec(shape, lambda j: (0,) * len(shape))

    return pl.pallas_call(
        functools.partial(
            _kernel,
            hidden=hidden,
            intermediate=intermediate,
            bn=block_n,
            bk=block_k(hidden, block_k_rows),
            eps=eps,
            offset=norm_offset,
            scale_f32=norm_scale_f32,
            act=act,
        ),
        grid=(intermediate // block_n,),
        in_specs=[whole(x.shape), whole(norm_weight.shape), whole(w_gate_up.shape)],
        out_specs=whole((1, intermediate)),
        out_shape=jax.ShapeDtypeStruct((1, intermediate), x.dtype),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="jaxrt_norm_gate_up",
    )(x, norm_weight, w_gate_up)
