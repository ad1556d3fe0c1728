"""``residual + h @ w`` for a few rows as one Mosaic GPU kernel whose programs own output columns
(``kernels.mosaic_skinny``).

- On CPU with jax >= 0.11 (CI's Python 3.12 step): the kernel runs in the Pallas GPU interpreter against a
  float64 product (one and several column slabs per program, each column width, padded rows, with and
  without the residual), and is lowered for CUDA (``jax.export``) at the decode projections' shapes;
- anywhere: the shapes it refuses, its validation, the choice of column width;
- on a Hopper GPU: the kernel against the float64 product, and bitwise the same from run to run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxrt_testing import f64 as _f64
from jaxrt_testing import mosaic_gpu_marks

from jaxrt.kernels import mosaic_skinny
from jaxrt.kernels.mosaic_skinny import SkinnyConfig

needs_interpreter, needs_mgpu_api, on_hopper = mosaic_gpu_marks()


def _inputs(seed, rows, k, n, residual):
    key = jax.random.split(jax.random.key(seed), 3)
    h = jax.random.normal(key[0], (rows, k), jnp.float32).astype(jnp.bfloat16)
    w = (jax.random.normal(key[1], (k, n)) * k**-0.5).astype(jnp.bfloat16)
    res = jax.random.normal(key[2], (rows, n)).astype(jnp.bfloat16) if residual else None
    return h, w, res


def _rel_err(got, h, w, res) -> float:
    want = _f64(h) @ _f64(w) + (0 if res is None else _f64(res))
    return float(np.abs(_f64(got) - want).max() / np.abs(want).max())


INTERPRET_CASES = [
    # (rows, K, N, residual, num_sms, config)
    (8, 512, 64, True, 2, SkinnyConfig(stages=2)),  # cols 32: one slab per program
    (5, 256, 96, False, 3, SkinnyConfig(stages=2)),  # cols 32, padded rows
    (16, 768, 32, True, 1, SkinnyConfig(stages=2)),  # cols 32, one program, 3 stages through 2 slots
    (1, 512, 128, True, 2, SkinnyConfig(stages=3, cols=16)),  # 8 slabs over 2 programs
    (3, 256, 128, True, 2, SkinnyConfig(stages=2, cols=64)),
    (8, 512, 64, True, 1, SkinnyConfig(stages=2, pdl=True)),  # interpreted without its PDL instructions
]


@needs_interpreter
@pytest.mark.parametrize("rows,k,n,residual,num_sms,cfg", INTERPRET_CASES)
def test_interpreted_kernel_matches_float64(rows, k, n, residual, num_sms, cfg):
    h, w, res = _inputs(rows + k + n, rows, k, n, residual)
    # The interpreter fills unwritten memory with NaN: an output element the kernel skips fails below.
    out = mosaic_skinny.skinny_matmul_mgpu(h, w, residual=res, config=cfg, num_sms=num_sms, interpret=True)
    assert out.shape == (rows, n) and out.dtype == jnp.bfloat16
    assert np.isfinite(_f64(out)).all()
    assert _rel_err(out, h, w, res) < 8e-3


LOWER_CASES = [
    # (name, rows, K, N, residual): Llama-3.2-1B's q/k/v, o and down at 8 tokens; 8B's down at 16; 3B's o
    ("qkv-1b", 8, 2048, 3072, False),
    ("o-1b", 8, 2048, 2048, True),
    ("down-1b", 8, 8192, 2048, True),
    ("down-8b-16", 16, 14336, 4096, True),
    ("o-3b-1", 1, 3072, 3072, True),
    ("down-1b-pdl", 8, 8192, 2048, True),
    # K splits summed in the kernel (64-column slabs: 128-byte rows of w)
    ("o-1b-k4", 8, 2048, 2048, True),
    ("down-1b-k4", 8, 8192, 2048, True),
    ("qkv-1b-k2", 1, 2048, 3072, False),
]


@needs_mgpu_api
@pytest.mark.parametrize("name,rows,k,n,residual", LOWER_CASES, ids=[c[0] for c in LOWER_CASES])
def test_lowers_for_cuda(name, rows, k, n, residual):
    from jax import export

    s = jax.ShapeDtypeStruct

    splits = int(name.rsplit("-k", 1)[1]) if "-k" in name else 1
    cfg = SkinnyConfig(pdl=name.endswith("pdl"), cols=64 if splits > 1 else None, splits=splits)

    def f(h, w, r):
        return mosaic_skinny.skinny_matmul_mgpu(
            h, w, residual=r if residual else None, config=cfg, num_sms=132
        )

    args = (s((rows, k), jnp.bfloat16), s((k, n), jnp.bfloat16), s((rows, n), jnp.bfloat16))
    exp = export.export(jax.jit(f), platforms=["cuda"])(*args)
    assert exp.out_avals[0].shape == (rows, n)
    assert "mosaic_gpu" in exp.mlir_module()


def test_split_config_keeps_every_program_resident():
    """64-column slabs with the most K splits (<= 4) whose programs all fit on the SMs at once (split 0
    waits for the others, so a program that cannot start would hang its slab)."""
    for k, n, sms, want in [
        (8192, 2048, 132, 4),  # 32 slabs x 4
        (2048, 3072, 132, 2),  # 48 slabs x 2
        (14336, 4096, 132, 2),  # 64 slabs x 2 (56 stages split in 2)
        (2048, 16384, 132, 1),  # 256 slabs: no split fits
        (256 * 3, 2048, 132, 1),  # 3 stages do not split in 2 or 4
        (2048, 2080, 132, 1),  # N not a multiple of 64
    ]:
        cfg = mosaic_skinny.split_config(k, n, sms)
        assert cfg.splits == want, (k, n, cfg)
        if want > 1:
            assert cfg.cols == 64 and (n // 64) * cfg.splits <= sms and (k // 256) % cfg.splits == 0


def test_column_width_keeps_programs_within_the_sms():
    assert mosaic_skinny.choose_cols(2048, 132) == 16  # 128 programs
    assert mosaic_skinny.choose_cols(3072, 132) == 32  # 96 programs
    assert mosaic_skinny.choose_cols(4096, 132) == 32  # 128 programs
    assert mosaic_skinny.choose_cols(16384, 132) == 64  # 256 slabs: programs take two
    assert mosaic_skinny.choose_cols(40, 132) is None


@pytest.mark.parametrize(
    "rows,k,n,dtype,why",
    [
        (8, 2048, 2048, jnp.float32, "dtype"),
        (17, 2048, 2048, jnp.bfloat16, "rows"),
        (8, 2000, 2048, jnp.bfloat16, "K = 2000"),
        (8, 2048, 2040, jnp.bfloat16, "N = 2040"),
    ],
)
def test_kernel_refuses_what_it_cannot_run(rows, k, n, dtype, why):
    if mosaic_skinny.plgpu is None:
        pytest.skip("jax has no Mosaic GPU")
    assert why in mosaic_skinny.supports(rows, k, n, dtype)
    assert mosaic_skinny.supports(8, 2048, 2048, jnp.bfloat16) is None


def test_bad_input_is_a_clear_error():
    if mosaic_skinny.plgpu is None:
        pytest.skip("jax has no Mosaic GPU")
    h, w, res = _inputs(0, 4, 256, 64, True)
    with pytest.raises(ValueError, match="does not match h"):
        mosaic_skinny.skinny_matmul_mgpu(h, w[:128])
    with pytest.raises(ValueError, match="residual"):
        mosaic_skinny.skinny_matmul_mgpu(h, w, residual=res[:, :32])
    with pytest.raises(ValueError, match="K = 200"):
        mosaic_skinny.skinny_matmul_mgpu(h[:, :200], w[:200])
    with pytest.raises(ValueError, match="cols"):
        SkinnyConfig(cols=24)


@on_hopper
@pytest.mark.parametrize("rows,k,n", [(1, 2048, 3072), (8, 8192, 2048), (16, 14336, 4096), (5, 3072, 3072)])
def test_matches_float64_on_hopper(rows, k, n):
    h, w, res = _inputs(rows, rows, k, n, True)
    f = jax.jit(lambda h, w, r: mosaic_skinny.skinny_matmul_mgpu(h, w, residual=r))
    out = f(h, w, res)
    assert _rel_err(out, h, w, res) < 8e-3
    assert np.array_equal(_f64(out), _f64(f(h, w, res)))


@on_hopper
@pytest.mark.parametrize(
    "rows,k,n,splits", [(8, 2048, 2048, 4), (1, 8192, 2048, 4), (16, 14336, 4096, 2), (5, 2048, 3072, 2)]
)
def test_k_splits_match_float64_and_repeat_on_hopper(rows, k, n, splits):
    """K splits summed behind GMEM semaphores: against float64, and bitwise the same on every run."""
    h, w, res = _inputs(rows, rows, k, n, True)
    cfg = SkinnyConfig(cols=64, splits=splits)
    f = jax.jit(lambda h, w, r: mosaic_skinny.skinny_matmul_mgpu(h, w, residual=r, config=cfg))
    out = f(h, w, res)
    assert _rel_err(out, h, w, res) < 8e-3
    assert all(np.array_equal(_f64(out), _f64(f(h, w, res))) for _ in range(4))
