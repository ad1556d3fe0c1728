"""The Mosaic GPU decode kernel (Hopper): lowering and host-side logic anywhere, numbers on a Hopper GPU.

The kernel has no CPU execution path: the Pallas GPU interpreter does not run its wgmma pipeline. On CPU:
- the kernel is lowered for CUDA (``jax.export`` with ``platforms=["cuda"]``): the whole Pallas -> Mosaic
  GPU lowering runs, layout inference and the shared-memory budget included; only PTX generation does not.
  This needs jax >= 0.11 (``plgpu.kernel(out_type=...)``), i.e. the GPU machine's jax; CI runs it in its
  Python 3.12 / jax 0.11.2 step;
- the block-diagonal query rows (``_tile_rows``) are checked against their definition, the tiling choice
  against the shared-memory budget, and the GPU backend's routing of decode batches to the kernel;
- on a Hopper GPU (mark ``gpu``), outputs are compared with the float64 oracle on poisoned batches, as
  ``benchmarks/bench_kernels.py --check --variants mosaic`` does for the full grid.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrt.kernels import mosaic_gpu, pallas_gpu
from jaxrt.kernels._pallas_common import META_SPLITS
from jaxrt.kernels.mosaic_gpu import MosaicConfig
from jaxrt.kernels.pallas_gpu import GpuConfig
from jaxrt.kernels.testing import make_batch, oracle, rel_err

# jax 0.10's Mosaic GPU lacks lowerings this kernel uses; the GPU machine runs 0.11.
_HAS_KERNEL_API = mosaic_gpu.plgpu is not None and jax.__version_info__ >= (0, 11)
needs_mgpu_api = pytest.mark.skipif(not _HAS_KERNEL_API, reason="needs jax >= 0.11 Mosaic GPU (plgpu.kernel)")
on_hopper = pytest.mark.skipif(not mosaic_gpu.hopper_available(), reason="needs a Hopper GPU")

LLAMA_1B = dict(hq=32, hkv=8, d=64)
LLAMA_8B = dict(hq=32, hkv=8, d=128)


def _decode_args(*, tokens, hq, hkv, d, page, pages_per_seq, num_pages=64):
    s = jax.ShapeDtypeStruct
    return (
        s((tokens, hq, d), jnp.bfloat16),
        s((num_pages, page, hkv, d), jnp.bfloat16),
        s((num_pages, page, hkv, d), jnp.bfloat16),
        s((tokens,), jnp.int32),
        s((tokens, pages_per_seq), jnp.int32),
        s((tokens + 1,), jnp.int32),
        s((1,), jnp.int32),
    )


LOWER_CASES = [
    # (name, shape kwargs, page, MosaicConfig, window, soft cap)
    ("1b-default", LLAMA_1B, 16, MosaicConfig(heads=2, block_kv=64, stages=3), None, None),
    ("8b-default", LLAMA_8B, 16, MosaicConfig(heads=1, block_kv=64, stages=4), None, None),
    ("split", LLAMA_1B, 16, MosaicConfig(heads=2, stages=3, num_splits=4), None, None),
    ("page64-window-cap", dict(hq=8, hkv=2, d=64), 64, MosaicConfig(), 48, 30.0),
    ("page128", dict(hq=8, hkv=2, d=64), 128, MosaicConfig(block_kv=128, stages=2), None, None),
    ("group3-padded", dict(hq=9, hkv=3, d=64), 16, MosaicConfig(num_splits=2), None, None),
    ("group7-padded", dict(hq=14, hkv=2, d=64), 16, MosaicConfig(), None, None),
    ("mha-2heads", dict(hq=4, hkv=4, d=64), 16, MosaicConfig(heads=2), None, None),
    ("mqa", dict(hq=8, hkv=1, d=128), 32, MosaicConfig(stages=3), None, None),
    # split outputs store each kv head's (m, l) row by TMA: groups 1 and 2 are padded to 4 for that
    ("qwen3-0.6b-split", dict(hq=16, hkv=8, d=128), 16, MosaicConfig(stages=4, num_splits=2), None, None),
    ("mha-2heads-split", dict(hq=4, hkv=4, d=64), 16, MosaicConfig(heads=2, num_splits=4), None, None),
    ("mha-split", dict(hq=8, hkv=8, d=128), 16, MosaicConfig(stages=4, num_splits=2), None, None),
    ("1b-2consumers", LLAMA_1B, 16, MosaicConfig(heads=2, stages=4, consumers=2), None, None),
    ("8b-2consumers", LLAMA_8B, 16, MosaicConfig(heads=1, stages=4, consumers=2), None, None),
    (
        "2consumers-split-window-cap",
        dict(hq=9, hkv=3, d=64),
        32,
        MosaicConfig(stages=2, num_splits=2, consumers=2),
        100,
        30.0,
    ),
    (
        "1b-planned-splits",
        LLAMA_1B,
        16,
        MosaicConfig(heads=2, stages=3, num_splits=4, split_programs=264),
        None,
        None,
    ),
    ("1b-copy-pages", LLAMA_1B, 16, MosaicConfig(heads=2, stages=3, copy_only="pages"), None, None),
    ("1b-copy-head-pages", LLAMA_1B, 16, MosaicConfig(heads=2, stages=3, copy_only="head-pages"), None, None),
    ("8b-copy-head-pages", LLAMA_8B, 16, MosaicConfig(heads=1, stages=4, copy_only="head-pages"), None, None),
]


@needs_mgpu_api
@pytest.mark.parametrize("name,shape,page,cfg,window,cap", LOWER_CASES, ids=[c[0] for c in LOWER_CASES])
def test_lowers_for_cuda(name, shape, page, cfg, window, cap):
    from jax import export

    tokens = 24
    args = _decode_args(tokens=tokens, page=page, pages_per_seq=5, **shape)

    def f(q, k, v, kv_lens, pt, cu, ns):
        meta = mosaic_gpu.make_plan(q, kv_lens, cu, ns).meta
        return mosaic_gpu.decode_attention_mgpu(
            q, k, v, meta, pt, sm_scale=0.125, sliding_window=window, soft_cap=cap, config=cfg, num_sms=4
        )

    exp = export.export(jax.jit(f), platforms=["cuda"])(*args)
    assert exp.out_avals[0].shape == (tokens, shape["hq"], shape["d"])
    assert "mosaic_gpu" in exp.mlir_module()


@needs_mgpu_api
def test_over_budget_tiling_is_refused():
    args = _decode_args(tokens=8, page=16, pages_per_seq=4, **LLAMA_8B)
    cfg = MosaicConfig(heads=1, block_kv=64, stages=6)
    assert mosaic_gpu.smem_bytes(cfg, 128, 2) > mosaic_gpu.SMEM_BUDGET
    meta = jnp.zeros((8, 8), jnp.int32)
    odd = MosaicConfig(heads=1, block_kv=64, stages=3, consumers=2)  # two consumers own alternate stages
    for config, match in ((cfg, "shared memory"), (odd, "consumers")):
        with pytest.raises(ValueError, match=match):
            jax.eval_shape(
                lambda q, k, v, pt, c=config: mosaic_gpu.decode_attention_mgpu(
                    q, k, v, meta, pt, sm_scale=0.1, config=c
                ),
                args[0],
                args[1],
                args[2],
                args[4],
            )


def test_unknown_copy_only_mode_is_refused():
    with pytest.raises(ValueError, match="copy_only"):
        MosaicConfig(copy_only="everything")
    assert MosaicConfig(copy_only="head-pages").copy_only == "head-pages"


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("group", [1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 32])
def test_tile_rows_hold_each_kv_heads_q_heads(heads, group, split):
    """Block j of the tile is q rows [s0, s0 + slab) copied at tile rows [j * slab, ...); the rows the
    kernel stores for kv head j must be exactly its q heads, and the copies must stay 8-row aligned."""
    gp = mosaic_gpu.padded_group(heads, group, split)
    assert gp >= group
    if split:  # each kv head's (m, l) row is one TMA store of a multiple of 16 bytes
        assert gp * 4 % 16 == 0
    slab = mosaic_gpu.slab_rows(heads, gp)
    assert slab % 8 == 0
    if heads * slab > mosaic_gpu.ROWS:
        return  # such tilings are never chosen (mosaic_decode_config)
    num_kv_heads = 8 * heads
    for g in range(num_kv_heads // heads):
        s0, off = mosaic_gpu._tile_rows(g, heads, gp)
        assert s0 % 8 == 0
        for j in range(heads):
            tile_rows = np.arange(gp) + j * slab + off + j * gp
            assert np.all((tile_rows >= j * slab) & (tile_rows < (j + 1) * slab)), "rows outside block j"
            q_rows = s0 + tile_rows - j * slab  # the q row each tile row was copied from
            np.testing.assert_array_equal(q_rows, (g * heads + j) * gp + np.arange(gp))


def test_default_tilings_fit_and_match_the_sweep():
    kw = dict(page_size=16, kv_dtype=jnp.bfloat16, num_sms=132)
    # The H100 sweep's best (benchmarks/RESULTS.md, "Kernels").
    cfg_1b = pallas_gpu.mosaic_decode_config(
        num_tokens=256, num_q_heads=32, num_kv_heads=8, head_dim=64, **kw
    )
    cfg_8b = pallas_gpu.mosaic_decode_config(
        num_tokens=256, num_q_heads=32, num_kv_heads=8, head_dim=128, **kw
    )
    assert cfg_1b == MosaicConfig(heads=2, block_kv=64, stages=3, num_splits=1)
    assert cfg_8b == MosaicConfig(heads=1, block_kv=64, stages=4, num_splits=1, consumers=2)

    # Smaller batches split every item's kv range the fewest power-of-two ways (at most 4) that occupy 3/4
    # of the SMs, with one consumer warpgroup (the H200 sweep's best, "Kernels", twelfth round); batches
    # too small for that stay on the Triton kernel's planned splits; so do f32 pools and head_dim 256.
    def small(tokens, d):
        return pallas_gpu.mosaic_decode_config(
            num_tokens=tokens, num_q_heads=32, num_kv_heads=8, head_dim=d, **kw
        )

    assert small(8, 64) == MosaicConfig(heads=2, block_kv=64, stages=3, num_splits=4)
    assert small(16, 64) == MosaicConfig(heads=2, block_kv=64, stages=3, num_splits=2)
    assert small(32, 64) == cfg_1b
    assert small(4, 128) == MosaicConfig(heads=1, block_kv=64, stages=4, num_splits=4)
    assert small(8, 128) == MosaicConfig(heads=1, block_kv=64, stages=4, num_splits=2)
    assert small(16, 128) == cfg_8b
    assert small(4, 64) is None and small(2, 128) is None and small(1, 64) is None
    for tokens in range(1, 64):
        for d in (64, 128):
            cfg = small(tokens, d)
            if cfg is not None:
                items = tokens * 8 // cfg.heads
                assert 4 * items * cfg.num_splits >= 3 * 132, (tokens, d, cfg)
                assert cfg.num_splits == 1 or 4 * items * cfg.num_splits // 2 < 3 * 132, (tokens, d, cfg)
    f32 = dict(kw, kv_dtype=jnp.float32)
    assert (
        pallas_gpu.mosaic_decode_config(num_tokens=256, num_q_heads=32, num_kv_heads=8, head_dim=64, **f32)
        is None
    )
    assert (
        pallas_gpu.mosaic_decode_config(num_tokens=256, num_q_heads=8, num_kv_heads=4, head_dim=256, **kw)
        is None
    )
    for d in (64, 128):
        for page in (16, 32, 64, 128):
            for hq, hkv in ((4, 4), (8, 2), (9, 3), (14, 2), (32, 8), (8, 1), (64, 1)):
                cfg = pallas_gpu.mosaic_decode_config(
                    num_tokens=512,
                    num_q_heads=hq,
                    num_kv_heads=hkv,
                    head_dim=d,
                    page_size=page,
                    kv_dtype=jnp.bfloat16,
                    num_sms=132,
                )
                if cfg is None:
                    continue
                assert mosaic_gpu.smem_bytes(cfg, d, 2) <= mosaic_gpu.SMEM_BUDGET
                assert cfg.block_kv % 64 == 0 and cfg.block_kv % page == 0
                gp = mosaic_gpu.padded_group(cfg.heads, hq // hkv)
                assert cfg.heads * mosaic_gpu.slab_rows(cfg.heads, gp) <= mosaic_gpu.ROWS


def _batch(rng, q_lens, kv_lens, *, hq, hkv, d, page, tokens=None):
    return make_batch(
        rng,
        q_lens,
        kv_lens,
        num_q_heads=hq,
        num_kv_heads=hkv,
        head_dim=d,
        page_size=page,
        dtype=jnp.bfloat16,
        max_num_seqs=len(q_lens) + 2,
        num_tokens=tokens or len(q_lens) + 2,
    )


def test_gpu_backend_routes_decode_batches_on_hopper_only(monkeypatch):
    b = _batch(np.random.default_rng(0), (1,) * 6, (1, 15, 16, 17, 50, 5), hq=8, hkv=2, d=64, page=16)
    shapes = dict(
        num_tokens=200,
        max_num_seqs=200,
        num_q_heads=32,
        num_kv_heads=8,
        head_dim=64,
        page_size=16,
        pages_per_seq=64,
        kv_dtype=jnp.bfloat16,
        num_sms=132,
    )
    monkeypatch.setattr(mosaic_gpu, "hopper_available", lambda: False)
    assert pallas_gpu.default_config(**shapes).mosaic is None
    monkeypatch.setattr(mosaic_gpu, "hopper_available", lambda: True)
    assert pallas_gpu.default_config(**shapes).mosaic == MosaicConfig(heads=2, block_kv=64, stages=3)
    assert pallas_gpu.default_config(**dict(shapes, max_num_seqs=64)).mosaic is None  # a mixed batch
    # The engine's small decode programs: 8 / 16 token rows (any number of them live) split 4 / 2 ways; a
    # 1-token program stays on the Triton kernel's planned splits.
    small = dict(shapes, max_num_seqs=16)
    assert pallas_gpu.default_config(**dict(small, num_tokens=8)).mosaic.num_splits == 4
    assert pallas_gpu.default_config(**dict(small, num_tokens=16)).mosaic.num_splits == 2
    one = pallas_gpu.default_config(**dict(small, num_tokens=1))
    assert one.mosaic is None and one.split_programs > 0
    pallas_gpu.set_mosaic_decode(False)
    try:
        assert pallas_gpu.default_config(**shapes).mosaic is None
    finally:
        pallas_gpu.set_mosaic_decode(True)

    # The plan: one work item per token, page ids padded to whole kv blocks (block_kv 64 = 4 pages).
    args = tuple(map(jnp.asarray, b.args()))
    config = GpuConfig(mosaic=MosaicConfig(heads=1, block_kv=64, stages=4))
    plan = pallas_gpu.gpu_metadata(args[0], args[1], *args[3:], config=config)
    assert plan.work.meta.shape[0] == b.q.shape[0]
    assert plan.page_table.shape[1] % 4 == 0
    np.testing.assert_array_equal(plan.page_table[:, : b.page_indices.shape[1]], b.page_indices)
    with pytest.raises(ValueError, match="Hopper"):
        pallas_gpu.ragged_paged_attention_gpu(*args, sm_scale=0.1, interpret=True, metadata=plan)


GPU_CASES = [
    # (shape, page, config, window, cap, q_lens)
    (LLAMA_1B, 16, MosaicConfig(heads=2, block_kv=64, stages=3), None, None, None),
    (LLAMA_8B, 16, MosaicConfig(heads=1, block_kv=64, stages=4), None, None, None),
    (dict(hq=8, hkv=2, d=64), 16, MosaicConfig(num_splits=4), None, None, None),
    (dict(hq=8, hkv=2, d=64), 64, MosaicConfig(), 48, 30.0, None),
    (dict(hq=9, hkv=3, d=64), 32, MosaicConfig(num_splits=2), 100, None, None),
    (dict(hq=14, hkv=2, d=128), 128, MosaicConfig(block_kv=128, stages=2), None, None, None),
    (dict(hq=8, hkv=2, d=64), 16, MosaicConfig(), None, None, (3, 7, 1, 1, 1, 1, 1, 1, 1)),  # ragged
    # two consumer warpgroups: alternate blocks of each item, merged in shared memory
    (LLAMA_1B, 16, MosaicConfig(heads=2, block_kv=64, stages=4, consumers=2), None, None, None),
    (LLAMA_8B, 16, MosaicConfig(heads=1, block_kv=64, stages=4, consumers=2), None, None, None),
    (dict(hq=9, hkv=3, d=64), 32, MosaicConfig(stages=2, num_splits=2, consumers=2), 100, 30.0, None),
    (dict(hq=8, hkv=2, d=64), 16, MosaicConfig(consumers=2), None, None, (3, 7, 1, 1, 1, 1, 1, 1, 1)),
    # splits planned per item from the kv lengths (pallas_gpu.plan_splits): up to 8 for the long sequences
    (
        LLAMA_1B,
        16,
        MosaicConfig(heads=2, block_kv=64, stages=3, num_splits=8, split_programs=64),
        None,
        None,
        None,
    ),
    (dict(hq=9, hkv=3, d=64), 32, MosaicConfig(num_splits=4, split_programs=16), 100, 30.0, None),
    # the tilings mosaic_decode_config gives 8-token decode batches of Llama-3.2-1B / 3.1-8B heads
    (LLAMA_1B, 16, MosaicConfig(heads=2, block_kv=64, stages=3, num_splits=4), None, None, None),
    (LLAMA_8B, 16, MosaicConfig(heads=1, block_kv=64, stages=4, num_splits=2), None, 50.0, None),
    # groups 2 and 1 with split outputs (padded to 4 for the (m, l) stores): Qwen3-0.6B heads, MHA
    (dict(hq=16, hkv=8, d=128), 16, MosaicConfig(stages=4, num_splits=2), None, None, None),
    (dict(hq=4, hkv=4, d=64), 16, MosaicConfig(heads=2, stages=3, num_splits=4), 40, None, None),
    # a small bucket holding prefill chunks and decodes (the engine's 16-token program), split, windowed
    (LLAMA_8B, 16, MosaicConfig(heads=1, stages=4, num_splits=2), 50, None, (3, 7, 1, 1, 1, 1, 1, 1, 1)),
]


@pytest.mark.gpu
@on_hopper
@pytest.mark.parametrize("case", range(len(GPU_CASES)))
@pytest.mark.parametrize("num_sms", [None, 1])  # None: a program per SM; 1: every item in one program
def test_matches_oracle_on_hopper(case, num_sms):
    shape, page, cfg, window, cap, q_lens = GPU_CASES[case]
    kv_lens = (1, page - 1, page, page + 1, 63, 64, 65, 200, 333)
    q_lens = q_lens or (1,) * len(kv_lens)
    kv_lens = tuple(max(k, q) for k, q in zip(kv_lens, q_lens, strict=True))
    rng = np.random.default_rng(case)
    b = _batch(rng, q_lens, kv_lens, tokens=sum(q_lens) + 3, page=page, **shape)
    kw = dict(sm_scale=1 / math.sqrt(shape["d"]), sliding_window=window, soft_cap=cap)
    args = tuple(map(jnp.asarray, b.args()))
    meta = mosaic_gpu.make_plan(args[0], args[3], args[5], args[6]).meta
    if cfg.split_programs:
        groups = shape["hkv"] // cfg.heads
        meta = pallas_gpu.plan_splits(meta, groups, cfg.num_splits, cfg.split_programs)
        assert len(set(np.asarray(meta[:, META_SPLITS]).tolist())) > 1  # the items' split counts differ
    out = mosaic_gpu.decode_attention_mgpu(*args[:3], meta, args[4], config=cfg, num_sms=num_sms, **kw)
    out = np.asarray(out.astype(jnp.float32), np.float64)
    n = b.num_real_tokens
    assert np.all(np.isfinite(out)) and np.all(out[n:] == 0)
    assert rel_err(out[:n], oracle(b, **kw)[:n]) < 2e-2


def test_bench_kernels_sweep_syntax_names_mosaic_tilings():
    """``bench_kernels.py --sweep-configs mgpu/h2/64/4/1/c2`` measures exactly that tiling (and prints it back)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_kernels.py"
    spec = importlib.util.spec_from_file_location("bench_kernels_under_test", path)
    bk = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bk)
    shape = dict(b=32, hq=32, hkv=8, d=64, page=16, pages_per_seq=64)
    for text, want in [
        ("mgpu/h2/64/3/1", MosaicConfig(heads=2, block_kv=64, stages=3, num_splits=1)),
        ("mgpu/h1/64/4/2/c2", MosaicConfig(heads=1, block_kv=64, stages=4, num_splits=2, consumers=2)),
        (
            "mgpu/h2/64/3/4/sp264",
            MosaicConfig(heads=2, block_kv=64, stages=3, num_splits=4, split_programs=264),
        ),
    ]:
        cfg, layout = bk.parse_cfg(text, **shape)
        assert cfg.mosaic == want and layout == "nhd"
        assert bk.cfg_str(cfg) == text
