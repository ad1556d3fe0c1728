"""The greedy sampler's statistics over a batch of logits in one read: a Pallas kernel (Triton lowering).

For each row of ``logits [num_seqs, vocab]`` (the model's dtype): the logsumexp of the raw row (the
log-probability normaliser), and the argmax and max of the row with the row's suppressed stop ids at -inf
(``min_new_tokens``). XLA reads the logits once per reduction (``jax.nn.logsumexp`` then ``argmax``: three
reads). On an H100 at 256 rows x 128k vocabulary (bf16) this kernel takes 73 us against XLA's 95-99 us,
and 24.6 against 28-30 us at 64 rows (``benchmarks/bench_sampler.py``). Neither is bound by the read
(66 MB is ~21 us): the per-element work (conversion, exponential, the stop-id comparisons, four block
reductions per program) is.

Each program reads one ``chunk`` of one row (masked past the vocabulary), reduces it in f32 and writes four
partials; a small XLA step merges the ``cdiv(vocab, chunk)`` partials of each row. The argmax ties to the
lowest index, as ``jnp.argmax``. The pure-jnp definition is ``kernels.reference.greedy_row_stats_reference``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

CHUNK = 4096  # with NUM_WARPS the fastest of bench_sampler.py on an H100 (chunks 2k-16k x 4 / 8 warps)
NUM_WARPS = 4
_NONE = 2**31 - 1  # int32 max: "no index" (a Python int: Pallas kernels may not capture array constants)


def _kernel(
    x_ref, stop_ref, sup_ref, m_ref, s_ref, mm_ref, am_ref, *, vocab: int, chunk: int, num_stops: int
):
    r = pl.program_id(0)
    c = pl.program_id(1)
    idx = c * chunk + lax.broadcasted_iota(jnp.int32, (1, chunk), 1)
    valid = idx < vocab
    x = pltriton.load(x_ref.at[pl.ds(r, 1), pl.ds(c * chunk, chunk)], mask=valid, other=-jnp.inf)
    x = x.astype(jnp.float32)
    m = jnp.max(x)
    shift = jnp.where(m == -jnp.inf, 0.0, m)  # an all -inf chunk (the vocabulary's tail) sums to 0, not NaN
    s = jnp.sum(jnp.exp(x - shift))
    hit = jnp.zeros(idx.shape, jnp.bool_)
    suppress = sup_ref[r] != 0
    for j in range(num_stops):  # -1 (an unused slot) never matches a vocab index
        hit = hit | (idx == stop_ref[r, j])
    xm = jnp.where(hit & suppress, -jnp.inf, x)
    mm = jnp.max(xm)
    am = jnp.min(jnp.where((xm == mm) & valid, idx, _NONE))
    m_ref[r, c] = m
    s_ref[r, c] = s
    mm_ref[r, c] = mm
    am_ref[r, c] = am


@functools.partial(jax.jit, static_argnames=("chunk", "num_warps", "interpret"))
def greedy_row_stats(
    logits: jax.Array,
    stop_ids: jax.Array,
    suppress: jax.Array,
    *,
    chunk: int = CHUNK,
    num_warps: int = NUM_WARPS,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """logits [R, V]; stop_ids [R, K] int32 (-1 unused); suppress [R] bool (mask row r's stop ids).
    chunk: vocabulary entries per program (a power of two); num_warps: Triton warps per program.

    Returns (logsumexp of the raw rows [R] f32, argmax of the suppressed rows [R] int32, their max [R] f32).
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be [num_seqs, vocab], got shape {logits.shape}")
    num_rows, vocab = logits.shape
    if stop_ids.ndim != 2 or stop_ids.shape[0] != num_rows or not jnp.issubdtype(stop_ids.dtype, jnp.integer):
        raise ValueError(f"stop_ids must be integer [{num_rows}, K], got {stop_ids.dtype} {stop_ids.shape}")
    if suppress.shape != (num_rows,):
        raise ValueError(f"suppress must be [{num_rows}], got shape {suppress.shape}")
    if chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two >= 16, got {chunk}")
    if num_rows == 0:  # no rows: nothing for the grid to do (a grid of zero programs does not lower)
        return jnp.zeros((0,), jnp.float32), jnp.zeros((0,), jnp.int32), jnp.zeros((0,), jnp.float32)
    num_stops = stop_ids.shape[1]
    num_chunks = pl.cdiv(vocab, chunk)
    part = jax.ShapeDtypeStruct((num_rows, num_chunks), jnp.float32)
    m, s, mm, am = pl.pallas_call(
        functools.partial(_kernel, vocab=vocab, chunk=chunk, num_stops=num_stops),
        grid=(num_rows, num_chunks),
        in_specs=[
            pl.BlockSpec((num_rows, vocab), lambda r, c: (0, 0)),
            pl.BlockSpec((num_rows, num_stops), lambda r, c: (0, 0)),
            pl.BlockSpec((num_rows,), lambda r, c: (0,)),
        ],
        out_specs=[pl.BlockSpec((num_rows, num_chunks), lambda r, c: (0, 0))] * 4,
        out_shape=[part, part, part, jax.ShapeDtypeStruct((num_rows, num_chunks), jnp.int32)],
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="jaxrt_greedy_row_stats",
    )(logits, stop_ids.astype(jnp.int32), suppress.astype(jnp.int32))
    top = jnp.max(m, axis=1)
    shift = jnp.where(top == -jnp.inf, 0.0, top)
    lse = shift + jnp.log(jnp.sum(s * jnp.exp(m - shift[:, None]), axis=1))
    best = jnp.max(mm, axis=1)
    arg = jnp.min(jnp.where(mm == best[:, None], am, _NONE), axis=1)
    return lse, jnp.where(arg == _NONE, 0, arg), best
