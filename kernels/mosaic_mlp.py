"""Gated MLP for a few tokens on Hopper GPUs: one Mosaic GPU kernel streams the gate/up and down weights.

At decode the MLP sees a handful of tokens (the engine's 8- and 16-row buckets), so its three products are
bound by reading the weights (100 MB per layer for Llama-3.2-1B). With XLA they are three to four kernels
(the gate/up GEMM, the activation, the down GEMM and its split-K reduce), and a kernel that reads 8-67 MB on
its own stays well below the card's bandwidth: each pays a ramp-up and a tail (benchmarks/RESULTS.md,
"Engine", eleventh round). Here the whole block is one kernel, and the weights stream without a gap.

Work: the intermediate dimension is cut into blocks of 64 columns (items). An item computes, for its 64
columns ``J``, ``h = act(x @ W_gate[:, J]) * (x @ W_up[:, J])`` (phase 1, reading ``2 * hidden * 64``
weights), then ``h @ W_down[J, :]`` (phase 2, reading ``64 * hidden``): a ``[tokens, hidden]`` partial of
the output, which it adds into the f32 output with TMA reductions (``reduction_op="add"``), so the items
need no other synchronisation. ``deterministic=True`` stores each item's partial instead and XLA sums them
in a fixed order (run-to-run identical results, at the cost of writing and reading ``items * tokens *
hidden`` f32; also the only mode the Pallas GPU interpreter runs, as it has no TMA reductions).

Programs are persistent (one per SM), each taking items ``c, c + num_programs, ...``. A producer warpgroup
copies the tokens' rows of ``x`` into shared memory once, then walks its items issuing four TMA copies of
``[64, 64]`` bf16 tiles per stage into a ring of ``stages`` stages: in phase 1 a stage holds 128 rows of
the item's gate columns and the same rows of its up columns (two tiles each), in phase 2 the item's 64
rows of ``W_down`` for 256 output columns. One ring across phases and items keeps the next weights in
flight while the consumer finishes the current product.

The consumer warpgroup computes on the tensor cores. Phase 1 by default multiplies 64-row A operands
(wgmma's M): ``x``'s chunk ``c`` (64 columns of the hidden dimension) lies at rows ``[c * rows, c * rows +
rows)`` of one ``[chunks * rows + 64 - rows, 64]`` buffer, and the A operand of chunk ``c`` is the 64 rows
from there: rows past ``rows`` are other chunks' data (or never written), so accumulator rows past the
tokens hold garbage that no copy ever stores (a product's row ``r`` depends on row ``r`` of A only).
``MlpConfig.transposed_gate_up`` computes ``gate^T`` instead, with the tokens as wgmma's N. Phase 2 is
always transposed, ``out^T = W_down^T h^T`` (M: 64 output columns, N: the token rows); each ``[64, rows]``
accumulator is moved to the transposed register layout (a shuffle between lane pairs) and stored through a
transposed view, so a stage's partial is ``[rows, 256]`` f32 in shared memory and the output is ``[rows,
hidden]``, as the next kernel reads it. Program ``c`` starts phase 2 at output block ``c`` (``rotate_down``),
so the programs' reductions spread over the output.

``MlpConfig.down_by_columns`` is a two-kernel form: this kernel runs phase 1 only and writes ``h``, and
``mosaic_skinny.skinny_matmul_mgpu`` computes the down projection with each program owning output columns,
so there are no partials to add and no f32 output to round in another kernel.

Measured on an H200 (benchmarks/RESULTS.md, "Engine", fourteenth round): 31.7 µs per Llama-3.2-1B layer at
8 tokens (68% of the bandwidth; XLA's four to five kernels 34.4), 29.6 µs inside the decode step; the
weights' stream alone takes 29.0 µs, and phase 2 is what slows it (it streams at 3.8 TB/s where its copies
alone reach 4.3). Not the model's default (``JAXRT_FUSED_MLP``). The two-kernel form is correct on the
GPU and bitwise stable, but was slower with 16-column slabs in the down kernel (37.7 µs at 8 tokens;
fifteenth round); with 64-column slabs in K splits (``mosaic_skinny.split_config``) it ties XLA: 33.6 µs
per layer at one token against 32.4 (sixteenth round).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxrt.kernels import _pallas_common as common
from jaxrt.kernels import mosaic_skinny

try:  # Mosaic GPU ships with jax; CPU-only installs still import this module
    from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # pragma: no cover
    plgpu = None

ROWS = 64  # wgmma M
BLOCK_I = 64  # intermediate columns per item
K_STAGE = 128  # phase 1: hidden rows of W_gate / W_up per stage
N_STAGE = 256  # phase 2: output columns of W_down per stage
SMEM_BUDGET = 227 * 1024
ACTIVATIONS = ("silu", "gelu_tanh")
MAX_ROWS = 16


COPY_ONLY_MODES = ("", "all", "down")  # MlpConfig.copy_only


@dataclasses.dataclass(frozen=True)
class MlpConfig:
    """stages: depth of the weight ring (each stage 32 KiB); out_buffers: f32 staging tiles of the output
    reduction (1 or 2; with 2 the next tile is written while the previous one is still being added).
    copy_only: a diagnostic for benchmarks, never for models (the output is wrong): "" (off), "all": the
    producer streams every weight tile as usual and the consumer only waits for each stage and frees it;
    "down": the consumer computes phase 1 but only waits for and frees phase 2's stages. Their times
    against the full kernel's split it into the weights' stream, phase 1's products and phase 2's (each
    mode still stores one zero tile per item, so XLA keeps the kernel).
    transposed_gate_up: phase 1 as ``gate^T = W_gate^T x^T`` (wgmma's N is the token rows, not a 64-row
    tile of which only the tokens are used: 8x less tensor work at 8 tokens, [64, tokens] accumulators),
    with ``h`` stored transposed for phase 2. On an H200 it takes the same time (phase 1's products are
    hidden behind the weights' stream either way; benchmarks/RESULTS.md).
    pdl: programmatic dependent launch. The kernel may start while the kernel before it finishes: the
    producer issues the first stages of weight copies (which depend on no earlier kernel), then waits for
    the earlier kernels (``griddepcontrol.wait``) before it reads ``x`` and before any output is added.
    Off in the interpreter, which has no such instruction.
    rotate_down: program ``c`` walks phase 2's blocks of 256 output columns starting at block ``c``, so the
    programs' TMA reductions are spread over the output instead of all adding into the same block.
    down_by_columns: two kernels instead of one. This kernel runs phase 1 only and writes ``h`` ([tokens,
    intermediate] bf16, 128 KiB for 8 tokens of Llama-3.2-1B); then ``mosaic_skinny.skinny_matmul_mgpu``
    computes ``residual + h @ W_down`` with each program owning output columns: no partial outputs, no f32
    output to convert, the same result from run to run (``deterministic`` does not apply).
    overlap_down (with down_by_columns): phase 1's programs signal their dependents as they start
    (``griddepcontrol.launch_dependents``) and the down projection's kernel is launched with PDL, so its
    programs take the SMs that phase 1 frees and stream their first weight stages before ``h`` is complete.
    Off in the interpreter.
    fused_columns: the columns form as one kernel. Phase 1 writes ``h`` to global memory and each program
    then signals a GMEM semaphore; phase 2 is ``mosaic_skinny``'s body on the same programs (64-column slabs
    in K splits, ``split_config``), whose producers issue their first weight stages and then wait until
    every program has signalled before they copy ``h``. One launch, no f32 output, the same result from
    run to run. GPU only (the interpreter has no GMEM semaphores). Not offered to models: on an H200 it is
    correct and bitwise repeatable, but slower than the TMA-reduction form (30.2 against 28.5 us of kernel
    per Llama-3.2-1B layer at one token; XLA's kernels 31.2 in all) and each instance takes ~4-7 s to
    compile (one block 6.7 s, two 10.8 s; ``benchmarks/bench_mlp.py +fused``). Its grid barrier needs every
    program resident at once."""

    stages: int = 3
    out_buffers: int = 2
    copy_only: str = ""
    transposed_gate_up: bool = False
    pdl: bool = False
    down_by_columns: bool = False
    overlap_down: bool = False
    rotate_down: bool = True
    fused_columns: bool = False

    def __post_init__(self) -> None:
        if self.fused_columns and (self.down_by_columns or self.copy_only or self.pdl):
            raise ValueError("fused_columns is its own form: no down_by_columns, copy_only or pdl")
        if self.copy_only not in COPY_ONLY_MODES:
            raise ValueError(f"copy_only must be one of {COPY_ONLY_MODES}, got {self.copy_only!r}")
        if self.copy_only and self.down_by_columns:
            raise ValueError("copy_only applies to the one-kernel form, not to down_by_columns")
        if self.overlap_down and not self.down_by_columns:
            raise ValueError("overlap_down applies to the two-kernel form (down_by_columns=True)")


def _x_rows(hidden: int, rows: int) -> int:
    return (hidden // 64) * rows + ROWS - rows


def smem_bytes(cfg: MlpConfig, hidden: int, rows: int) -> int:
    x = _x_rows(hidden, rows) * 64 * 2
    ring = cfg.stages * K_STAGE * 128 * 2
    h = ROWS * BLOCK_I * 2
    out = cfg.out_buffers * rows * N_STAGE * 4
    return x + ring + h + out + 1024


def default_config(hidden: int, num_tokens: int) -> MlpConfig | None:
    """The deepest ring (up to 4 stages, then 2 output buffers before 1) that fits shared memory."""
    rows = common.token_rows(num_tokens)
    for stages, bufs in ((4, 2), (3, 2), (3, 1), (2, 2), (2, 1)):
        cfg = MlpConfig(stages=stages, out_buffers=bufs)
        if smem_bytes(cfg, hidden, rows) <= SMEM_BUDGET:
            return cfg
    return None


def supports(num_tokens: int, hidden: int, intermediate: int, dtype, act: str) -> str | None:
    """None if the kernel takes this MLP (the hardware check is ``mosaic_gpu.hopper_available``), else why."""
    if plgpu is None:
        return "jax has no Mosaic GPU"
    if jnp.dtype(dtype) != jnp.dtype(jnp.bfloat16):
        return f"dtype {dtype} (the kernel takes bf16)"
    if act not in ACTIVATIONS:
        return f"activation {act!r} not in {ACTIVATIONS}"
    if num_tokens > MAX_ROWS:
        return f"{num_tokens} tokens (the kernel is for at most {MAX_ROWS})"
    if hidden % N_STAGE:
        return f"hidden size {hidden} is not a multiple of {N_STAGE}"
    if intermediate % BLOCK_I:
        return f"intermediate size {intermediate} is not a multiple of {BLOCK_I}"
    if default_config(hidden, num_tokens) is None:
        return f"hidden size {hidden} with {num_tokens} tokens does not fit shared memory"
    return None


def _activate(g, act: str):
    if act == "silu":
        return g / (1.0 + jnp.exp(-g))
    # gelu, tanh approximation (transformers' gelu_pytorch_tanh / gelu_new)
    return 0.5 * g * (1.0 + jnp.tanh(0.7978845608028654 * (g + 0.044715 * g * g * g)))


def _kernel(
    x_ref,  # [rows, hidden] bf16, GMEM
    wgu_ref,  # [hidden, 2 * intermediate] bf16: gate columns, then up columns
    wd_ref,  # [intermediate, hidden] bf16
    out_ref,  # reduce: [rows, hidden] f32 (added into); deterministic: [items, rows, hidden] f32
    x_smem,  # [x_rows, 64], tiled and swizzled
    w_smem,  # [stages, 4, 64, 64], tiled and swizzled
    h_smem,  # [64, 64], tiled and swizzled
    o_smem,  # [out_buffers, rows, 256] f32, untiled: a stage's partial
    x_bar,
    full_bar,  # [stages]
    free_bar,  # [stages]
    *,
    cfg: MlpConfig,
    rows: int,
    hidden: int,
    intermediate: int,
    act: str,
    deterministic: bool,
    interleaved: bool,
    h_only: bool,
    after_h=None,
):
    c = lax.axis_index("c")
    num_programs = lax.axis_size("c")
    wg = lax.axis_index("wg")
    num_items = intermediate // BLOCK_I
    my_items = (num_items - c + num_programs - 1) // num_programs
    chunks = hidden // 64
    nk = hidden // K_STAGE
    nn = 0 if h_only else hidden // N_STAGE  # h_only: no phase 2
    per_item = nk + nn
    stages = cfg.stages

    def down_block(t):  # phase 2's t-th block of 256 output columns
        # Programs start at different blocks, so their reductions do not all hit the same 256 columns.
        return lax.rem(t + c, nn) if cfg.rotate_down else t

    @pl.when(wg == 1)
    def _producer():
        plgpu.set_max_registers(40, action="decrease")

        def issue(step, tiles):
            slot = lax.rem(step, stages)
            if not isinstance(step, int) or step >= stages:

                @pl.when(step >= stages)
                def _():
                    plgpu.barrier_wait(free_bar.at[slot])

            for q, src in enumerate(tiles):  # four [64, 64] tiles per stage
                plgpu.copy_gmem_to_smem(src, w_smem.at[slot, q], full_bar.at[slot])

        def gate_up_col(j, up):
            if interleaved:  # [gate block 0 | up block 0 | gate block 1 | ...]
                return (2 * j + up) * BLOCK_I
            return up * intermediate + j * BLOCK_I

        def gate_up_tiles(j, t):  # rows of chunks 2t and 2t + 1: gate's, then up's
            return [
                wgu_ref.at[pl.ds((2 * t + q % 2) * 64, 64), pl.ds(gate_up_col(j, q // 2), 64)]
                for q in range(4)
            ]

        # The first item's first stages depend on no earlier kernel: with PDL they are in flight before
        # this program waits for the kernels before it (every program has at least one item).
        prefetch = min(stages, nk) if cfg.pdl else 0
        for t in range(prefetch):
            issue(t, gate_up_tiles(c, t))
        if cfg.pdl:
            plgpu.griddepcontrol_wait()
        for ch in range(chunks):
            plgpu.copy_gmem_to_smem(
                x_ref.at[:, pl.ds(ch * 64, 64)], x_smem.at[pl.ds(ch * rows, rows)], x_bar.at[0]
            )

        def item_body(k, carry):
            j = c + k * num_programs
            base = k * per_item

            def gate_up(t, carry):
                issue(base + t, gate_up_tiles(j, t))
                return carry

            def down(t, carry):
                rows_j = pl.ds(j * BLOCK_I, BLOCK_I)
                n0 = down_block(t) * N_STAGE
                issue(base + nk + t, [wd_ref.at[rows_j, pl.ds(n0 + q * 64, 64)] for q in range(4)])
                return carry

            lax.fori_loop(jnp.where(k == 0, prefetch, 0), nk, gate_up, None)
            if not h_only:
                lax.fori_loop(0, nn, down, None)
            return carry

        lax.fori_loop(0, my_items, item_body, None)
        # Observe the last stages' releases too: every barrier phase is waited on before the kernel ends.
        total = my_items * per_item
        for i in range(stages):
            step = total - 1 - i

            @pl.when(step >= 0)
            def _(step=step):
                plgpu.barrier_wait(free_bar.at[lax.rem(step, stages)])

    @pl.when(wg == 0)
    def _consumer():
        if cfg.pdl:  # the output's initial value is written by an earlier kernel
            plgpu.griddepcontrol_wait()
        if cfg.overlap_down:  # the down projection's kernel may start taking the SMs this kernel frees
            plgpu.griddepcontrol_launch_dependents()
        plgpu.barrier_wait(x_bar.at[0])

        def item_body(k, carry):
            j = c + k * num_programs
            base = k * per_item

            def gate_up(gate_ref, up_ref):  # phase 1: the item's 64 gate and 64 up columns
                def stage(t, carry):
                    slot = lax.rem(base + t, stages)
                    plgpu.barrier_wait(full_bar.at[slot])
                    if cfg.copy_only == "all":
                        plgpu.barrier_arrive(free_bar.at[slot])
                        return carry
                    for half in range(2):
                        if cfg.transposed_gate_up:  # gate^T += W_tile^T x_chunk^T: N is the token rows
                            x_t = x_smem.at[pl.ds(pl.multiple_of((2 * t + half) * rows, 8), rows)]
                            x_t = x_t.transpose((1, 0))
                            plgpu.wgmma(gate_ref, w_smem.at[slot, half].transpose((1, 0)), x_t)
                            plgpu.wgmma(up_ref, w_smem.at[slot, 2 + half].transpose((1, 0)), x_t)
                        else:
                            x_chunk = x_smem.at[pl.ds(pl.multiple_of((2 * t + half) * rows, 8), ROWS)]
                            plgpu.wgmma(gate_ref, x_chunk, w_smem.at[slot, half])
                            plgpu.wgmma(up_ref, x_chunk, w_smem.at[slot, 2 + half])
                    # Stage t's products are in flight; those of stage t - 1 have read their operands.
                    plgpu.wgmma_wait(4)

                    @pl.when(t > 0)
                    def _():
                        plgpu.barrier_arrive(free_bar.at[lax.rem(base + t - 1, stages)])

                    return carry

                lax.fori_loop(0, nk, stage, None)
                gate, up = gate_ref[...], up_ref[...]
                if cfg.copy_only != "all":
                    plgpu.barrier_arrive(free_bar.at[lax.rem(base + nk - 1, stages)])
                return gate, up

            acc_shape = (BLOCK_I, rows) if cfg.transposed_gate_up else (ROWS, BLOCK_I)
            gate, up = pl.run_scoped(
                gate_up, plgpu.ACC(acc_shape, jnp.float32), plgpu.ACC(acc_shape, jnp.float32)
            )
            h = (_activate(gate, act) * up).astype(h_smem.dtype)
            if h_only:  # the previous item's h has been read out of h_smem by its store
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            # (Else the previous item's down products have completed: their accumulators were read.)
            if cfg.transposed_gate_up:
                h_smem.at[pl.ds(0, rows)].transpose((1, 0))[...] = h
            else:
                h_smem[...] = h
            plgpu.commit_smem()
            if h_only:  # h's rows for the item's 64 columns: out_ref is h, [rows, intermediate]
                plgpu.copy_smem_to_gmem(
                    h_smem.at[pl.ds(0, rows)],
                    out_ref.at[:, pl.ds(pl.multiple_of(j * BLOCK_I, BLOCK_I), BLOCK_I)],
                )
                return carry

            def down_stage(t, carry):  # phase 2: the item's rows of W_down for 256 output columns
                slot = lax.rem(base + nk + t, stages)
                plgpu.barrier_wait(full_bar.at[slot])
                if cfg.copy_only:
                    plgpu.barrier_arrive(free_bar.at[slot])
                    return carry

                # Transposed (out^T = W_down^T h^T): M is 64 output columns, N the token rows, so the
                # partial is four [64, rows] tiles per stage, not a 64-row tile per 64 columns. They are
                # stored transposed, so the output is [rows, hidden].
                def down(*acc_refs):
                    h_t = h_smem.at[pl.ds(0, rows)].transpose((1, 0))
                    for q, acc_ref in enumerate(acc_refs):
                        plgpu.wgmma(acc_ref, w_smem.at[slot, q].transpose((1, 0)), h_t)
                    return tuple(acc_ref[...] for acc_ref in acc_refs)

                outs = pl.run_scoped(down, *(plgpu.ACC((64, rows), jnp.float32) for _ in range(4)))
                plgpu.barrier_arrive(free_bar.at[slot])
                buf = lax.rem(t, cfg.out_buffers)
                # The reduction that last read this buffer has finished reading it.
                plgpu.wait_smem_to_gmem(cfg.out_buffers - 1, wait_read_only=True)
                for q, o in enumerate(outs):
                    o = plgpu.layout_cast(o, plgpu.Layout.WGMMA_TRANSPOSED)
                    o_smem.at[buf, :, pl.ds(q * 64, 64)].transpose((1, 0))[...] = o
                plgpu.commit_smem()
                cols = pl.ds(pl.multiple_of(down_block(t) * N_STAGE, N_STAGE), N_STAGE)
                if deterministic:
                    plgpu.copy_smem_to_gmem(o_smem.at[buf], out_ref.at[j, :, cols])
                else:
                    plgpu.copy_smem_to_gmem(o_smem.at[buf], out_ref.at[:, cols], reduction_op="add")
                return carry

            lax.fori_loop(0, nn, down_stage, None)
            if cfg.copy_only:  # one store per item keeps the output live (else XLA drops the kernel)
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                o_smem[...] = jnp.zeros(o_smem.shape, o_smem.dtype)
                plgpu.commit_smem()
                cols = pl.ds(0, N_STAGE)
                dst = out_ref.at[j, :, cols] if deterministic else out_ref.at[:, cols]
                plgpu.copy_smem_to_gmem(o_smem.at[0], dst)
            return carry

        lax.fori_loop(0, my_items, item_body, None)
        plgpu.wait_smem_to_gmem(0)
        if after_h is not None:  # h_only: this program's h has landed in global memory
            after_h()


def _down_config(intermediate: int, hidden: int, sms: int, pdl: bool, interpret: bool):
    """The columns forms' down projection: 64-column slabs in K splits (``mosaic_skinny.split_config``),
    unsplit in the interpreter, which has no GMEM semaphores."""
    if interpret:
        return mosaic_skinny.SkinnyConfig(pdl=pdl)
    return mosaic_skinny.split_config(intermediate, hidden, sms, pdl)


def _smem_then_barriers(scratch: tuple) -> tuple[tuple, tuple]:
    """A kernel's scratch operands split into (shared memory, barriers); every barrier must come last."""
    first = next((i for i, x in enumerate(scratch) if isinstance(x, plgpu.Barrier)), len(scratch))
    if not all(isinstance(x, plgpu.Barrier) for x in scratch[first:]):
        raise ValueError("the scratch operands must list every barrier after the shared memory")
    return scratch[:first], scratch[first:]


def _fused_columns(xr, w_gate_up, w_down, residual, phase1, scratch1, mesh_kwargs, num_programs):
    """``MlpConfig.fused_columns``: phase 1 (``phase1``, writing ``h``), a grid-wide barrier on a GMEM
    semaphore, then ``mosaic_skinny``'s down projection on the same programs. -> [rows, hidden]."""
    if "interpret" in mesh_kwargs:
        raise ValueError("fused_columns needs a GPU (its barrier is a GMEM semaphore)")
    intermediate, hidden = w_down.shape
    rows, dtype = xr.shape[0], xr.dtype
    down_cfg = _down_config(intermediate, hidden, num_programs, False, False)
    plan = mosaic_skinny.plan_launch(rows, intermediate, hidden, dtype, down_cfg, num_programs, False)
    phase2 = plan.kernel(pdl=False)
    scratch2 = mosaic_skinny.scratch_shapes(plan.stages, rows, plan.cols, dtype)
    out_types = plan.out_types(dtype)
    out_types.insert(1, jax.ShapeDtypeStruct((rows, intermediate), dtype))  # h
    m1_shapes, b1 = _smem_then_barriers(scratch1)
    m2_shapes, b2 = _smem_then_barriers(scratch2)

    def entry(x_ref, wgu_ref, wd_ref, *refs):
        res_ref = refs[0] if residual is not None else None
        out_ref, h_ref, *part = refs[1:] if residual is not None else refs
        h_ready = pl.get_global(plgpu.SemaphoreType.REGULAR)  # zeroed before the call

        def signal():  # h's TMA stores have completed (wait_smem_to_gmem(0) just before)
            mosaic_skinny.fence_proxy_async_global()
            pl.semaphore_signal(h_ready)

        def wait_h():
            pl.semaphore_wait(h_ready, num_programs, decrement=False)
            mosaic_skinny.fence_proxy_async_global()

        # Mosaic GPU initialises every barrier once, at kernel start, and hands the same one to scopes that
        # run one after the other; each thread tracks its phase itself. Phase 2's warpgroups would then wait
        # on phase 1's barriers in phases they never saw, so both phases' barriers are reserved together
        # here (distinct barriers, each used by one phase's roles) and only shared memory is reused.
        def phases(*bars):
            bars1, bars2 = bars[: len(b1)], bars[len(b1) :]
            pl.run_scoped(
                lambda *m1: phase1(x_ref, wgu_ref, wd_ref, h_ref, *m1, *bars1, after_h=signal),
                *m1_shapes,
                collective_axes="wg",
            )
            pl.run_scoped(
                lambda *m2: phase2(
                    h_ref, wd_ref, res_ref, out_ref, part[0] if part else None, *m2, *bars2, wait_h=wait_h
                ),
                *m2_shapes,
                collective_axes="wg",
            )

        pl.run_scoped(phases, *b1, *b2, collective_axes="wg")

    args = [xr, w_gate_up, w_down]
    if residual is not None:
        args.append(common.pad_rows(residual.astype(dtype), rows))
    return plgpu.kernel(entry, out_type=tuple(out_types), **mesh_kwargs)(*args)[0]


def gated_mlp_mgpu(
    x: jax.Array,
    w_gate_up: jax.Array,
    w_down: jax.Array,
    *,
    act: str = "silu",
    residual: jax.Array | None = None,
    deterministic: bool = False,
    interleaved: bool = False,
    config: MlpConfig | None = None,
    num_sms: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """``residual + down(act(x @ W_gate) * (x @ W_up))``, accumulated in f32 and rounded once.

    x: [num_tokens, hidden] bf16 (num_tokens <= 16); w_gate_up: [hidden, 2 * intermediate] bf16 (gate
    columns, then up columns; with ``interleaved``, blocks of 64 gate columns and 64 up columns alternate,
    so an item's rows are 256 contiguous bytes); w_down: [intermediate, hidden] bf16; residual:
    [num_tokens, hidden] or None.
    -> [num_tokens, hidden] in x's dtype. ``supports`` says which shapes the kernel takes. Runs on Hopper
    GPUs; ``interpret=True`` runs the deterministic mode in the Pallas GPU interpreter (CPU tests).
    """
    num_tokens, hidden = x.shape
    intermediate = w_down.shape[0]
    if w_gate_up.shape != (hidden, 2 * intermediate) or w_down.shape != (intermediate, hidden):
        raise ValueError(
            f"w_gate_up {w_gate_up.shape} / w_down {w_down.shape} do not match x {x.shape} "
            f"(expected ({hidden}, {2 * intermediate}) / ({intermediate}, {hidden}))"
        )
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual {residual.shape} does not match x {x.shape}")
    why = supports(num_tokens, hidden, intermediate, x.dtype, act)
    if why is not None:
        raise ValueError(f"gated_mlp_mgpu does not take this MLP: {why}")
    if interpret and not deterministic:
        raise ValueError(
            "interpret mode runs deterministic=True only (the interpreter has no TMA reductions)"
        )
    rows = common.token_rows(num_tokens)
    cfg = config or default_config(hidden, num_tokens)
    if interpret:  # the interpreter has no griddepcontrol
        cfg = dataclasses.replace(cfg, pdl=False, overlap_down=False)
    if cfg.down_by_columns:
        why = mosaic_skinny.supports(num_tokens, intermediate, hidden, x.dtype)
        if why is not None:
            raise ValueError(f"down_by_columns: the down projection's kernel does not take it: {why}")
    smem = smem_bytes(cfg, hidden, rows)
    if smem > SMEM_BUDGET:
        raise ValueError(f"{cfg} needs {smem} bytes of shared memory per program (> {SMEM_BUDGET})")
    xr = common.pad_rows(x, rows)
    num_items = intermediate // BLOCK_I
    num_programs = max(1, min(num_items, num_sms or common.num_sms()))
    dtype = x.dtype
    swizzled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    kernel = functools.partial(
        _kernel,
        cfg=cfg,
        rows=rows,
        hidden=hidden,
        intermediate=intermediate,
        act=act,
        deterministic=deterministic,
        interleaved=interleaved,
        h_only=cfg.down_by_columns or cfg.fused_columns,
    )
    scratch = (
        plgpu.SMEM((_x_rows(hidden, rows), 64), dtype, transforms=swizzled),
        plgpu.SMEM((cfg.stages, 4, 64, 64), dtype, transforms=swizzled),
        plgpu.SMEM((ROWS, BLOCK_I), dtype, transforms=swizzled),
        plgpu.SMEM((cfg.out_buffers, rows, N_STAGE), jnp.float32),
        plgpu.Barrier(num_arrivals=hidden // 64, num_barriers=1),
        plgpu.Barrier(num_arrivals=4, num_barriers=cfg.stages),
        plgpu.Barrier(num_arrivals=1, num_barriers=cfg.stages),
    )
    mesh_kwargs = dict(
        grid=(num_programs,),
        grid_names=("c",),
        num_threads=2,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        kernel_name=f"jaxrt_mlp_mgpu_r{rows}_st{cfg.stages}_o{cfg.out_buffers}"
        + ("_det" if deterministic else "")
        + (f"_copy_{cfg.copy_only}" if cfg.copy_only else "")
        + ("_h" if cfg.down_by_columns else "")
        + ("_fused" if cfg.fused_columns else "")
        + ("_overlap" if cfg.overlap_down else ""),
    )

    def entry(x_ref, wgu_ref, wd_ref, out_ref):
        pl.run_scoped(
            functools.partial(kernel, x_ref, wgu_ref, wd_ref, out_ref), *scratch, collective_axes="wg"
        )

    if interpret:
        mesh_kwargs["interpret"] = plgpu.InterpretGPUParams()
    if cfg.fused_columns:
        return _fused_columns(xr, w_gate_up, w_down, residual, kernel, scratch, mesh_kwargs, num_programs)[
            :num_tokens
        ]
    if cfg.down_by_columns:
        h = plgpu.kernel(entry, out_type=jax.ShapeDtypeStruct((rows, intermediate), dtype), **mesh_kwargs)(
            xr, w_gate_up, w_down
        )
        res = None if residual is None else common.pad_rows(residual.astype(dtype), rows)
        out = mosaic_skinny.skinny_matmul_mgpu(
            h,
            w_down,
            residual=res,
            config=_down_config(
                intermediate, hidden, num_sms or common.num_sms(), cfg.overlap_down, interpret
            ),
            num_sms=num_sms,
            interpret=interpret,
        )
        return out[:num_tokens]
    if deterministic:
        parts = plgpu.kernel(
            entry, out_type=jax.ShapeDtypeStruct((num_items, rows, hidden), jnp.float32), **mesh_kwargs
        )(xr, w_gate_up, w_down)
        out = parts.sum(axis=0)[:num_tokens]
        if residual is not None:
            out = out + residual.astype(jnp.float32)
    else:
        if residual is None:
            init = jnp.zeros((rows, hidden), jnp.float32)
        else:
            init = common.pad_rows(residual.astype(jnp.float32), rows)
        out_ref = jax.new_ref(init)

        plgpu.kernel(entry, out_type=(), **mesh_kwargs)(xr, w_gate_up, w_down, out_ref)
        out = out_ref[...][:num_tokens]
    return out.astype(dtype)
