"""``residual + h @ w`` for a few rows of ``h`` on Hopper GPUs: one Mosaic GPU kernel in which each program
owns a slab of output columns.

At decode a projection sees a handful of token rows, so it is bound by reading ``w``. Splitting its K
dimension over the SMs (as cuBLAS's split-K or the MLP kernel's items do) leaves a partial output per split
that must be added up: f32 partials written and read again, TMA reductions whose order varies, and a final
rounding as a kernel of its own. Here each program owns ``cols`` (16, 32 or 64) output columns and streams
the whole K extent of its slab of ``w`` (``[K, cols]``, a ``[256, cols]`` tile per stage) together with the
matching columns of ``h`` (small, read from L2 by every program), so its f32 accumulator is the final sum:
it adds the residual and writes the bf16 output itself. Results are the same from run to run.

The A operand of wgmma is 64 rows; ``h``'s few rows are laid out as in the MLP kernel: the ``rows`` rows of
each 64-column chunk of a stage follow one another in a ``[4 * rows + 64 - rows, 64]`` buffer, and the A
operand of chunk ``c`` is the 64 rows from ``c * rows``; accumulator rows past ``rows`` hold garbage that
is never stored. wgmma takes one tiling for both operands, so ``h``'s stage buffer is tiled like the
``[256, cols]`` weight tile (``(8, cols)``, a ``2 * cols``-byte swizzle).

With ``SkinnyConfig.splits > 1`` each slab's K extent is split over that many programs: split ``j > 0``
stores its f32 partial with plain stores and releases the slab's GMEM semaphore (``pl.get_global``), split
0 waits on it, adds the partials in split order and writes the output. The sums are still the same from run
to run; every program must be resident at once (slabs x splits <= SMs), and the interpreter has no GMEM
semaphores, so this form runs on the GPU only.

Status: correct in the Pallas GPU interpreter (unsplit), lowered for CUDA (tests/kernels/test_mosaic_skinny.py)
and correct and bitwise stable on an H200 against float64, split or not (benchmarks/RESULTS.md, "Engine",
fifteenth round). Unsplit, ``N / 132`` columns per program make 16-column slabs for a 2048-wide output:
32-byte rows of ``w``, too short for the memory system (Llama-3.2-1B's down projection 19.3-20.2 µs, 1.7
TB/s). 64-column slabs in 4 K splits (``split_config``) take it to 12.8 µs and its o projection to 6.0 µs
at 1-8 rows, against cuBLAS's 11.8 and 5.6. Nothing in the model calls it (``JAXRT_FUSED_MLP=columns``
only, which takes ``split_config``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxrt.kernels import _pallas_common as common

try:  # Mosaic GPU ships with jax; CPU-only installs still import this module
    from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # pragma: no cover
    plgpu = None

ROWS = 64  # wgmma M
K_STAGE = 256  # rows of w per stage
COLS = (16, 32, 64)
MAX_ROWS = 16
MAX_STAGES = 6
SMEM_BUDGET = 227 * 1024


@dataclasses.dataclass(frozen=True)
class SkinnyConfig:
    """stages: depth of the ring of ``[256, cols]`` tiles of ``w`` (with the matching columns of ``h``;
    None: the deepest up to ``MAX_STAGES`` that fits shared memory); cols: output columns per program (16,
    32 or 64; None: the fewest that keep the programs within the SMs). pdl: programmatic dependent launch:
    the kernel may start before the kernel ahead of it ends (if that one signals its dependents, as the MLP
    kernel's phase 1 does in ``MlpConfig.overlap_down``), issue its first stages of ``w``, then wait for it
    (``griddepcontrol.wait``) before it reads ``h`` or the residual. Off in the interpreter, which has no
    such instructions. splits: K splits per output slab (1: none). Split ``j > 0``'s program stores its f32
    partial and signals a GMEM semaphore; split 0's program waits for the others, adds their partials in
    split order to its own, and writes the output, so results are the same from run to run. Every program
    must be resident at once (slabs x splits <= SMs); GPU only (the interpreter has no GMEM semaphores)."""

    stages: int | None = None
    cols: int | None = None
    pdl: bool = False
    splits: int = 1

    def __post_init__(self) -> None:
        if self.cols is not None and self.cols not in COLS:
            raise ValueError(f"cols must be one of {COLS}, got {self.cols}")
        if self.splits < 1:
            raise ValueError(f"splits must be >= 1, got {self.splits}")


def _h_rows(rows: int) -> int:
    return (K_STAGE // 64) * rows + ROWS - rows


def choose_cols(n: int, num_sms: int) -> int | None:
    """The fewest output columns per program that divide ``n`` and need at most ``num_sms`` programs, else
    the most that divide ``n`` (programs then take several slabs); None if none divides ``n``."""
    fits = [c for c in COLS if n % c == 0]
    for c in fits:
        if n // c <= num_sms:
            return c
    return fits[-1] if fits else None


def split_config(k: int, n: int, num_sms: int, pdl: bool = False) -> SkinnyConfig:
    """64-column slabs (128-byte rows of ``w``) with the most K splits, up to 4, that keep every program
    resident; else the unsplit default. On an H200 at 1-8 rows, 64 columns in 4 splits took Llama-3.2-1B's
    down projection from 20.2 to 12.8 us and its o projection from 7.0 to 6.0 (benchmarks/RESULTS.md)."""
    slabs = n // 64 if n % 64 == 0 else 0
    for splits in (4, 2):
        if slabs and slabs * splits <= num_sms and (k // K_STAGE) % splits == 0:
            return SkinnyConfig(cols=64, splits=splits, pdl=pdl)
    return SkinnyConfig(pdl=pdl)


def smem_bytes(stages: int, rows: int, cols: int) -> int:
    stage = _h_rows(rows) * 64 * 2 + K_STAGE * cols * 2
    return stages * stage + ROWS * cols * 4 + 2 * rows * cols * 2 + 1024


def default_stages(rows: int, cols: int) -> int:
    """The deepest ring, up to ``MAX_STAGES``, that fits shared memory (at least 2 fit every shape)."""
    return next(s for s in range(MAX_STAGES, 1, -1) if smem_bytes(s, rows, cols) <= SMEM_BUDGET)


def supports(num_rows: int, k: int, n: int, dtype) -> str | None:
    """None if the kernel takes ``[num_rows, k] @ [k, n]``, else why (the hardware check is
    ``mosaic_gpu.hopper_available``)."""
    if plgpu is None:
        return "jax has no Mosaic GPU"
    if jnp.dtype(dtype) != jnp.dtype(jnp.bfloat16):
        return f"dtype {dtype} (the kernel takes bf16)"
    if num_rows > MAX_ROWS:
        return f"{num_rows} rows (the kernel is for at most {MAX_ROWS})"
    if k % K_STAGE:
        return f"K = {k} is not a multiple of {K_STAGE}"
    if n % COLS[0]:
        return f"N = {n} is not a multiple of {COLS[0]}"
    return None


def _kernel(
    h_ref,  # [rows, K] bf16, GMEM
    w_ref,  # [K, N] bf16
    res_ref,  # [rows, N] bf16 or None
    out_ref,  # [rows, N] bf16
    part_ref,  # [splits - 1, rows, N] f32: the partials of splits 1.. (None without splits)
    h_smem,  # [stages, h_rows, 64], tiled and swizzled as w_smem (wgmma takes one tiling for A and B)
    w_smem,  # [stages, 256, cols], tiled and swizzled
    acc_smem,  # [64, cols] f32, untiled
    r_smem,  # [rows, cols] bf16, untiled: the residual's slab
    o_smem,  # [rows, cols] bf16, untiled: the output's slab
    full_bar,  # [stages]
    free_bar,  # [stages]
    r_bar,
    *,
    stages: int,
    rows: int,
    k: int,
    n: int,
    cols: int,
    pdl: bool,
    splits: int,
    wait_h=None,
):
    """wait_h: called by the producer of every program with work after it has issued its first stages of
    ``w`` and before it copies any of ``h`` (``gated_mlp_mgpu``'s one-kernel columns form waits there for
    the grid's phase 1 to have written ``h``); with ``splits > 1`` the grid may then hold more programs than
    slabs x splits, and the extra ones have no work."""
    c = lax.axis_index("c")
    num_programs = lax.axis_size("c")
    wg = lax.axis_index("wg")
    chunks = K_STAGE // 64
    if splits == 1:  # program c takes slabs c, c + programs, ...: all of K for each
        first_slab, slab_stride, part = c, num_programs, 0
        my_slabs = (n // cols - c + num_programs - 1) // num_programs
        nk = k // K_STAGE
    else:  # program c takes split c % splits of slab c // splits: K / splits rows of it
        first_slab, slab_stride, part = c // splits, 0, c % splits
        my_slabs = jnp.where(c < (n // cols) * splits, 1, 0)
        nk = k // K_STAGE // splits
    k_first = part * nk  # the first stage of K this program reads

    @pl.when(wg == 1)
    def _producer():
        plgpu.set_max_registers(40, action="decrease")

        def copy_w(s, t, slot):
            k0 = (k_first + t) * K_STAGE
            k0 = k0 if isinstance(k0, int) else pl.multiple_of(k0, K_STAGE)
            ks = pl.ds(k0, K_STAGE)
            plgpu.copy_gmem_to_smem(w_ref.at[ks, pl.ds(s * cols, cols)], w_smem.at[slot], full_bar.at[slot])

        def copy_h(t, slot):
            for ch in range(chunks):
                plgpu.copy_gmem_to_smem(
                    h_ref.at[:, pl.ds((k_first + t) * K_STAGE + ch * 64, 64)],
                    h_smem.at[slot, pl.ds(ch * rows, rows)],
                    full_bar.at[slot],
                )

        # With PDL the first slab's first stages of w (which no earlier kernel writes) are in flight before
        # this program waits for the kernel that writes h (every program has at least one slab).
        early = pdl or wait_h is not None
        prefetch = min(stages, nk) if early else 0

        @pl.when(my_slabs > 0)
        def _():
            for t in range(prefetch):
                copy_w(first_slab, t, t)
            if pdl:
                plgpu.griddepcontrol_wait()
            if wait_h is not None:
                wait_h()
            for t in range(prefetch):
                copy_h(t, t)

        def slab_body(i, carry):
            s = first_slab + i * slab_stride

            def stage(t, carry):
                step = i * nk + t
                slot = lax.rem(step, stages)

                @pl.when(step >= stages)
                def _():
                    plgpu.barrier_wait(free_bar.at[slot])

                copy_w(s, t, slot)
                copy_h(t, slot)
                return carry

            lax.fori_loop(jnp.where(i == 0, prefetch, 0), nk, stage, None)
            return carry

        lax.fori_loop(0, my_slabs, slab_body, None)
        total = my_slabs * nk
        for i in range(stages):  # every barrier phase is waited on before the kernel ends
            step = total - 1 - i

            @pl.when(step >= 0)
            def _(step=step):
                plgpu.barrier_wait(free_bar.at[lax.rem(step, stages)])

    # One semaphore per output slab in GMEM, zeroed before the call; each wait takes back what was signalled.
    sem = pl.get_global(plgpu.SemaphoreType.REGULAR((n // cols,))) if splits > 1 else None

    @pl.when(wg == 0)
    def _consumer():
        if pdl:  # the residual may come from the kernel before
            plgpu.griddepcontrol_wait()

        def slab_body(i, carry):
            s = first_slab + i * slab_stride
            out_cols = pl.ds(s * cols, cols)
            if res_ref is not None:
                # The previous slab's output store has read r_smem's neighbour o_smem; r_smem is free.
                plgpu.copy_gmem_to_smem(res_ref.at[:, out_cols], r_smem, r_bar.at[0])

            def products(acc_ref):
                def stage(t, carry):
                    slot = lax.rem(i * nk + t, stages)
                    plgpu.barrier_wait(full_bar.at[slot])
                    for ch in range(chunks):
                        plgpu.wgmma(
                            acc_ref,
                            h_smem.at[slot, pl.ds(ch * rows, ROWS)],
                            w_smem.at[slot, pl.ds(ch * 64, 64)],
                        )
                    # Stage t's products are in flight; those of stage t - 1 have read their operands.
                    plgpu.wgmma_wait(chunks)

                    @pl.when(t > 0)
                    def _():
                        plgpu.barrier_arrive(free_bar.at[lax.rem(i * nk + t - 1, stages)])

                    return carry

                lax.fori_loop(0, nk, stage, None)
                acc = acc_ref[...]
                plgpu.barrier_arrive(free_bar.at[lax.rem(i * nk + nk - 1, stages)])
                return acc

            acc_smem[...] = pl.run_scoped(products, plgpu.ACC((ROWS, cols), jnp.float32))
            # The output slab is rows x cols elements: one (or two) per thread of the warpgroup.
            strided = plgpu.Layout.WG_STRIDED((rows, cols), vec_size=1)
            out = plgpu.load(acc_smem.at[pl.ds(0, rows)], layout=strided, optimized=False)
            if res_ref is not None:
                plgpu.barrier_wait(r_bar.at[0])

            def finish(out):
                if res_ref is not None:
                    out = out + plgpu.load(r_smem, layout=strided, optimized=False).astype(jnp.float32)
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous slab's store read o_smem
                o_smem[...] = out.astype(o_smem.dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(o_smem, out_ref.at[:, out_cols])

            if splits == 1:
                finish(out)
            else:

                @pl.when(part > 0)
                def _():  # plain stores, then a release of the slab's semaphore (after a warpgroup barrier)
                    part_ref[part - 1, :, out_cols] = out
                    pl.semaphore_signal(sem.at[s])

                @pl.when(part == 0)
                def _():
                    pl.semaphore_wait(sem.at[s], splits - 1)
                    total = out
                    for q in range(splits - 1):  # a fixed order: the same sums every run
                        total = total + plgpu.load(
                            part_ref.at[q, :, out_cols], layout=strided, optimized=False
                        )
                    finish(total)

            return carry

        lax.fori_loop(0, my_slabs, slab_body, None)
        plgpu.wait_smem_to_gmem(0)


def scratch_shapes(stages: int, rows: int, cols: int, dtype) -> tuple:
    """The shared memory and barriers of ``_kernel``, in its argument order."""
    w_swizzle = (plgpu.TilingTransform((8, cols)), plgpu.SwizzleTransform(cols * 2))
    return (
        plgpu.SMEM((stages, _h_rows(rows), 64), dtype, transforms=w_swizzle),
        plgpu.SMEM((stages, K_STAGE, cols), dtype, transforms=w_swizzle),
        plgpu.SMEM((ROWS, cols), jnp.float32),
        plgpu.SMEM((rows, cols), dtype),
        plgpu.SMEM((rows, cols), dtype),
        plgpu.Barrier(num_arrivals=1 + K_STAGE // 64, num_barriers=stages),
        plgpu.Barrier(num_arrivals=1, num_barriers=stages),
        plgpu.Barrier(num_arrivals=1, num_barriers=1),
    )


def fence_proxy_async_global() -> None:
    """Order this thread's generic-proxy accesses to global memory before its later async-proxy (TMA) ones
    (PTX ``fence.proxy.async.global``): data published by other programs through a semaphore and then read
    with TMA."""
    from jax.experimental.mosaic.gpu import utils as mgpu_utils

    @plgpu.inline_mgpu()
    def fence(ctx):
        del ctx
        mgpu_utils.inline_ptx("fence.proxy.async.global;", has_side_effects=True)

    fence()


@dataclasses.dataclass(frozen=True)
class Launch:
    """A checked tiling of ``[num_rows, k] @ [k, n]`` on ``num_programs`` programs."""

    rows: int  # token rows of the tiles
    k: int
    n: int
    cols: int
    stages: int
    splits: int
    num_programs: int

    def kernel(self, **kw):
        """``_kernel`` with this tiling bound (its refs and scratch are the remaining arguments)."""
        s = self
        return functools.partial(
            _kernel, stages=s.stages, rows=s.rows, k=s.k, n=s.n, cols=s.cols, splits=s.splits, **kw
        )

    def out_types(self, dtype) -> list:
        """The output, then (with K splits) the f32 partials of splits 1.."""
        out = [jax.ShapeDtypeStruct((self.rows, self.n), dtype)]
        if self.splits > 1:
            out.append(jax.ShapeDtypeStruct((self.splits - 1, self.rows, self.n), jnp.float32))
        return out


def plan_launch(num_rows: int, k: int, n: int, dtype, cfg: SkinnyConfig, sms: int, interpret: bool) -> Launch:
    """Check ``cfg`` against the product and ``sms`` resident programs and fill in its defaults."""
    why = supports(num_rows, k, n, dtype)
    if why is not None:
        raise ValueError(f"skinny_matmul_mgpu does not take this product: {why}")
    cols = cfg.cols or choose_cols(n, sms)
    if n % cols:
        raise ValueError(f"N = {n} is not a multiple of cols = {cols}")
    rows = common.token_rows(num_rows)
    stages = cfg.stages or default_stages(rows, cols)
    smem = smem_bytes(stages, rows, cols)
    if smem > SMEM_BUDGET:
        raise ValueError(
            f"{stages} stages of cols {cols} need {smem} bytes of shared memory (> {SMEM_BUDGET})"
        )
    splits = cfg.splits
    num_programs = max(1, min(n // cols, sms))
    if splits > 1:
        if interpret:
            raise ValueError("splits > 1 needs a GPU (the interpreter has no GMEM semaphores)")
        if (k // K_STAGE) % splits:
            raise ValueError(f"K = {k} does not split into {splits} parts of whole {K_STAGE}-row stages")
        if (n // cols) * splits > sms:
            raise ValueError(
                f"{n // cols} slabs x {splits} splits need {(n // cols) * splits} programs resident at once "
                f"(> {sms} SMs)"
            )
        num_programs = (n // cols) * splits
    return Launch(rows, k, n, cols, stages, splits, num_programs)


def skinny_matmul_mgpu(
    h: jax.Array,
    w: jax.Array,
    *,
    residual: jax.Array | None = None,
    config: SkinnyConfig | None = None,
    num_sms: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """``residual + h @ w`` with an f32 accumulator per output element, rounded once to ``h``'s dtype.

    h: [num_rows, K] bf16 (num_rows <= 16); w: [K, N] bf16; residual: [num_rows, N] or None. ``supports``
    says which shapes the kernel takes. Runs on Hopper GPUs; ``interpret=True`` runs it in the Pallas GPU
    interpreter (CPU tests).
    """
    num_rows, k = h.shape
    if w.ndim != 2 or w.shape[0] != k:
        raise ValueError(f"w {w.shape} does not match h {h.shape} (expected ({k}, N))")
    n = w.shape[1]
    if residual is not None and residual.shape != (num_rows, n):
        raise ValueError(f"residual {residual.shape} does not match the output ({num_rows}, {n})")
    cfg = config or SkinnyConfig()
    plan = plan_launch(num_rows, k, n, h.dtype, cfg, num_sms or common.num_sms(), interpret)
    dtype, rows = h.dtype, plan.rows
    scratch = scratch_shapes(plan.stages, rows, plan.cols, dtype)
    kernel = plan.kernel(pdl=cfg.pdl and not interpret)
    mesh_kwargs = dict(
        grid=(plan.num_programs,),
        grid_names=("c",),
        num_threads=2,
        thread_name="wg",
        kernel_name=f"jaxrt_skinny_mgpu_r{rows}_c{plan.cols}_st{plan.stages}"
        + (f"_k{plan.splits}" if plan.splits > 1 else "")
        + ("_pdl" if cfg.pdl else ""),
    )
    if interpret:
        mesh_kwargs["interpret"] = plgpu.InterpretGPUParams()

    def entry(h_ref, w_ref, *refs):
        res_ref = refs[0] if residual is not None else None
        out_ref, *part = refs[1:] if residual is not None else refs
        body = functools.partial(kernel, h_ref, w_ref, res_ref, out_ref, part[0] if part else None)
        pl.run_scoped(body, *scratch, collective_axes="wg")

    args = [common.pad_rows(h, rows), w]
    if residual is not None:
        args.append(common.pad_rows(residual.astype(dtype), rows))
    out = plgpu.kernel(entry, out_type=tuple(plan.out_types(dtype)), **mesh_kwargs)(*args)
    return out[0][:num_rows]
