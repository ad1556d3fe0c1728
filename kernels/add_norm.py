"""The residual add and the RMSNorm after it in one Pallas kernel (Triton lowering), for NVIDIA GPUs:
``s = x + h`` and ``rms_norm(s)``, both written.

Between a pre-norm layer's attention and its MLP the stream is ``x + attention(x)`` and the MLP's input is
its RMSNorm. XLA runs that as two kernels at one row: the add with the norm's sum of squares, then the add
again with the scaling (~1.2-1.3 us each on an H200, launch-bound). Here each program owns a row: it loads
it whole, adds, takes the statistic and scales, with no loop. On an H200 that is one kernel fewer per layer
and 23 us less kernel time in a Llama-3.2-1B batch-1 step (0.965 against 0.996 ms); at batch 64 XLA already
runs one kernel there and nothing changes (benchmarks/RESULTS.md, "Engine", eighteenth round).

Arithmetic, in XLA's order: the sum rounded to the activations' dtype, then ``kernels.reference.rms_norm`` of
it (statistic in f32, the family's order of cast and scale). The statistic's sum runs in another order than
XLA's reduction: results are within rounding of the jnp composition, not bitwise.
``add_rms_norm`` validates and dispatches (``kernels.add_rms_norm``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jaxrt.kernels import _pallas_common as common
from jaxrt.kernels.attention import _FLOATS, resolve_backend
from jaxrt.kernels.reference import rms_norm, rms_scale

MAX_TOKENS = 256  # decode batches; longer calls (prefill) keep XLA's kernels
ROWS = 1  # rows per program
NUM_WARPS = 4


def supports(num_tokens: int, hidden: int) -> str | None:
    """None if the kernel takes this call, else why XLA's kernels run."""
    if not 1 <= num_tokens <= MAX_TOKENS:
        return f"{num_tokens} tokens (the kernel takes 1 to {MAX_TOKENS})"
    if hidden % 16:
        return f"hidden size {hidden} is not a multiple of 16"
    return None


def _kernel(x_ref, h_ref, w_ref, s_ref, n_ref, *, hidden, rows, eps, offset, scale_f32):
    r0 = pl.program_id(0) * rows
    dtype = x_ref.dtype
    pieces = common.pow2_pieces(hidden)
    xs = [x_ref[pl.ds(r0, rows), pl.ds(k0, n)] for k0, n in pieces]
    hs = [h_ref[pl.ds(r0, rows), pl.ds(k0, n)] for k0, n in pieces]
    ws = [w_ref[pl.ds(k0, n)] for k0, n in pieces]
    ss = [(x + h).astype(dtype) for x, h in zip(xs, hs, strict=True)]
    fs = [s.astype(jnp.float32) for s in ss]
    inv = lax.rsqrt(sum(jnp.sum(f * f, axis=1, keepdims=True) for f in fs) / hidden + eps)
    for (k0, n), s, f, w in zip(pieces, ss, fs, ws, strict=True):
        s_ref[pl.ds(r0, rows), pl.ds(k0, n)] = s
        n_ref[pl.ds(r0, rows), pl.ds(k0, n)] = rms_scale(
            f * inv, w, dtype, offset=offset, scale_f32=scale_f32
        )


@functools.partial(
    jax.jit, static_argnames=("eps", "norm_offset", "norm_scale_f32", "interpret", "rows", "num_warps")
)
def add_rms_norm_gpu(
    x: jax.Array,
    h: jax.Array,
    weight: jax.Array,
    *,
    eps: float,
    norm_offset: float = 0.0,
    norm_scale_f32: bool = False,
    interpret: bool = False,
    rows: int = ROWS,
    num_warps: int = NUM_WARPS,
) -> tuple[jax.Array, jax.Array]:
    """x, h [T, hidden] (one dtype); weight [hidden]. Returns (x + h, rms_norm(x + h)), both in x.dtype.
    Unchecked: ``add_rms_norm`` validates and dispatches. ``rows`` must divide T."""
    t, hidden = x.shape
    whole = pl.BlockSpec(x.shape, lambda i: (0, 0))
    out = jax.ShapeDtypeStruct(x.shape, x.dtype)
    return pl.pallas_call(
        functools.partial(
            _kernel, hidden=hidden, rows=rows, eps=eps, offset=norm_offset, scale_f32=norm_scale_f32
        ),
        grid=(t // rows,),
        in_specs=[whole, whole, pl.BlockSpec(weight.shape, lambda i: (0,))],
        out_specs=[whole, whole],
        out_shape=[out, out],
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="jaxrt_add_rms_norm",
    )(x, h, weight)


def add_rms_norm_kernel_applies(num_tokens: int, hidden: int, backend: str | None) -> bool:
    """Whether ``add_rms_norm`` runs its one kernel for this call on ``backend`` (an attention backend name,
    as the layer has it); else XLA's ops."""
    return resolve_backend(backend) == "pallas_gpu" and supports(num_tokens, hidden) is None


def add_rms_norm(
    x: jax.Array,
    h: jax.Array,
    weight: jax.Array,
    eps: float,
    *,
    offset: float = 0.0,
    scale_f32: bool = False,
    backend: str | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """``s = x + h`` (rounded to x.dtype) and ``rms_norm(s, weight, eps, offset=..., scale_f32=...)``.

    x, h: ``[num_tokens, hidden]`` of one float dtype; weight: ``[hidden]`` of that dtype. Returns (s, the
    normed s). On the "pallas_gpu" backend (``backend`` as ``kernels.resolve_backend`` takes it) up to
    ``MAX_TOKENS`` tokens run one Pallas kernel; everything else XLA's ops (``kernels.reference.rms_norm``).
    """
    if x.ndim != 2:
        raise ValueError(f"x must be [num_tokens, hidden], got shape {x.shape}")
    if h.shape != x.shape:
        raise ValueError(f"h must have x's shape {x.shape}, got {h.shape}")
    t, hidden = x.shape
    if weight.shape != (hidden,):
        raise ValueError(f"weight must be [{hidden}], got {weight.shape}")
    if x.dtype not in _FLOATS:
        raise ValueError(f"x dtype {x.dtype} not supported")
    if h.dtype != x.dtype or weight.dtype != x.dtype:
        raise ValueError(f"x {x.dtype}, h {h.dtype} and weight {weight.dtype} must share one dtype")
    if add_rms_norm_kernel_applies(t, hidden, backend):
        return add_rms_norm_gpu(
            x,
            h,
            weight,
            eps=float(eps),
            norm_offset=float(offset),
            norm_scale_f32=bool(scale_f32),
            interpret=interpret,
        )
    s = x + h
    return s, rms_norm(s, weight, eps, offset=offset, scale_f32=scale_f32)
