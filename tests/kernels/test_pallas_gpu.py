"""The "pallas_gpu" ragged paged attention backend, run on CPU in Pallas interpret mode.

Every case draws fresh random inputs, poisons (NaN) the pool pages no sequence references, the slots past
kv_len in each last page and the padding rows of q, and compares against a float64 numpy oracle and the jnp
reference. Interpret mode does not check Triton's lowering rules; benchmarks/bench_kernels.py --check does
that on a GPU.
"""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxrt_testing import export_triton_for_h100

from jaxrt.kernels import (
    AttentionMetadata,
    attention_metadata,
    pallas_gpu,
    ragged_paged_attention,
    ragged_paged_attention_reference,
    resolve_backend,
)
from jaxrt.kernels.pallas_gpu import GpuConfig, default_config, ragged_paged_attention_gpu
from jaxrt.kernels.testing import make_batch, oracle, rel_err

_REF = jax.jit(ragged_paged_attention_reference, static_argnames=("sm_scale", "sliding_window", "soft_cap"))


@dataclasses.dataclass(frozen=True)
class Case:
    q_lens: tuple
    kv_lens: tuple
    hq: int = 8
    hkv: int = 2
    d: int = 64
    page: int = 16
    dtype: str = "f32"
    window: int | None = None
    cap: float | None = None
    pad_tokens: int = 3  # padding rows after the last real token
    pad_seqs: int = 1  # unused sequence slots
    config: GpuConfig | None = None  # None: the backend's heuristic

    def __str__(self):
        cfg = "" if self.config is None else f"-cfg{dataclasses.astuple(self.config)}"
        return (
            f"q{list(self.q_lens)}-kv{list(self.kv_lens)}-h{self.hq}/{self.hkv}-d{self.d}-p{self.page}-{self.dtype}"
            f"-w{self.window}-cap{self.cap}{cfg}"
        )


DT = {"f32": np.float32, "bf16": jnp.bfloat16}


def _mixed(p):
    # decodes at kv 1, p-1, p, p+1; prefill chunks with and without a prefix
    return (1, 13, 1, 1, 1, 20), (1, p + 13, p - 1, p, p + 1, 20)


def _decode(p):
    return (1,) * 6, (1, p - 1, p, p + 1, 3 * p + 2, 5)


def run_case(case: Case, seed: int):
    rng = np.random.default_rng(seed)
    decode_like = case.pad_tokens < 0
    n_tok = sum(case.q_lens) + max(case.pad_tokens, 0)
    max_seqs = len(case.q_lens) + case.pad_seqs
    if decode_like:  # as many token rows as sequence slots: the backend picks its decode tiling
        n_tok = max_seqs
    b = make_batch(
        rng,
        case.q_lens,
        case.kv_lens,
        num_q_heads=case.hq,
        num_kv_heads=case.hkv,
        head_dim=case.d,
        page_size=case.page,
        dtype=DT[case.dtype],
        max_num_seqs=max_seqs,
        num_tokens=n_tok,
    )
    kw = dict(sm_scale=1 / math.sqrt(case.d), sliding_window=case.window, soft_cap=case.cap)
    out = ragged_paged_attention_gpu(
        *map(jnp.asarray, b.args()), interpret=True, config=case.config, validated_only=False, **kw
    )
    out = np.asarray(out.astype(jnp.float32), np.float64)
    assert out.shape == b.q.shape
    assert np.all(np.isfinite(out)), "non-finite output"
    n = b.num_real_tokens
    assert np.all(out[n:] == 0), "padding rows must be zero"
    want = oracle(b, **kw)
    ref = np.asarray(_REF(*map(jnp.asarray, b.clean_args()), **kw).astype(jnp.float32), np.float64)
    tol = 1e-5 if case.dtype == "f32" else 2e-2
    assert rel_err(out, want) < tol, f"vs numpy oracle: {rel_err(out, want):.2e}"
    assert rel_err(out, ref) < tol, f"vs jnp reference: {rel_err(out, ref):.2e}"
    if case.dtype == "f32":
        np.testing.assert_allclose(out, want, atol=2e-5, rtol=2e-5)
    return out


P16 = _mixed(16)
CASES = [
    # mixed prefill + decode, GQA 4 (direct q/out tiles), heuristic tiling
    Case(*P16),
    Case(*P16, dtype="bf16"),
    # decode-shaped batches take the decode tiling with split-K
    Case(*_decode(16), pad_tokens=-1),
    Case(*_decode(16), pad_tokens=-1, dtype="bf16", hq=16, hkv=2),
    # GQA ratios: MHA, MQA, 8, and a non-power-of-two group (gathered q tiles)
    Case(*P16, hq=4, hkv=4),
    Case(*P16, hq=8, hkv=1),
    Case(*P16, hq=16, hkv=2),
    Case(*P16, hq=6, hkv=2),
    Case(*_decode(16), pad_tokens=-1, hq=6, hkv=2),
    # head dims
    Case(*P16, d=128, hq=4, hkv=2),
    Case(*P16, d=32, hq=4, hkv=1),
    # sliding window / soft cap
    Case(*P16, window=7),
    Case(*P16, cap=5.0),
    Case(*P16, window=20, cap=3.0, dtype="bf16"),
    Case(*_decode(16), pad_tokens=-1, window=9, cap=4.0),
    # page sizes: several pages per step, and a step smaller than a page (slice of one page)
    Case(*_mixed(8), page=8),
    Case(*_mixed(32), page=32, config=GpuConfig(block_rows=16, block_kv=16)),
    Case(*_mixed(64), page=64, hq=4, hkv=4),
    # explicit tilings: odd split count, prefetch, head-fastest grid, tiny kv steps
    Case(*_decode(16), pad_tokens=-1, config=GpuConfig(block_rows=16, block_kv=16, num_splits=3)),
    Case(*P16, config=GpuConfig(block_rows=32, block_kv=32, num_splits=2, prefetch=True)),
    Case(*P16, window=11, config=GpuConfig(block_rows=16, block_kv=16, heads_fastest=True, prefetch=True)),
    # several kv heads per program (block-diagonal query tile), with split-K, prefetch, window and cap,
    # the one-page-slice path, and a non-power-of-two group (falls back to one head per program)
    Case(
        *_decode(16),
        pad_tokens=-1,
        hq=32,
        hkv=8,
        dtype="bf16",
        config=GpuConfig(16, 32, kv_heads=4, prefetch=True),
    ),
    Case(*_decode(16), pad_tokens=-1, hq=16, hkv=8, config=GpuConfig(16, 64, 3, prefetch=True, kv_heads=8)),
    Case(*P16, hq=16, hkv=4, window=7, cap=3.0, config=GpuConfig(32, 16, 2, kv_heads=2)),
    Case(*_mixed(32), page=32, hq=8, hkv=4, config=GpuConfig(16, 16, kv_heads=4, heads_fastest=True)),
    Case(*P16, hq=6, hkv=2, config=GpuConfig(16, 32, kv_heads=2)),
    # page-id lookahead (prefetch two blocks ahead in the page table), gathered pages and one-page slices
    Case(
        *_decode(16),
        pad_tokens=-1,
        dtype="bf16",
        hq=32,
        hkv=8,
        config=GpuConfig(16, 32, 3, prefetch=True, kv_heads=4, page_lookahead=True),
    ),
    Case(*_mixed(32), page=32, window=9, config=GpuConfig(16, 16, 2, prefetch=True, page_lookahead=True)),
    # planned splits (each work item's own split count from the kv lengths): decodes of very different
    # lengths, so items get 1 to 8 splits, with window / cap, two heads per program and a bf16 pool
    Case(
        (1,) * 6,
        (1, 200, 17, 90, 5, 64),
        pad_tokens=-1,
        config=GpuConfig(16, 16, 8, prefetch=True, page_lookahead=True, split_programs=24),
    ),
    Case(
        (1,) * 6,
        (3, 150, 40, 70, 1, 33),
        pad_tokens=-1,
        hq=16,
        hkv=4,
        dtype="bf16",
        window=37,
        cap=4.0,
        config=GpuConfig(16, 16, 4, prefetch=True, kv_heads=2, split_programs=16),
    ),
    # a small batch with multi-token chunks still takes the decode tiling (tokens <= sequence slots): a
    # work item holds up to 4 query tokens, and every token of it reads that item's planned splits
    Case(
        (1, 3, 1, 2),
        (50, 40, 9, 100),
        pad_tokens=-1,
        pad_seqs=4,
        config=GpuConfig(16, 16, 8, prefetch=True, page_lookahead=True, split_programs=20),
    ),
    Case(
        (1,) * 5,
        (130, 7, 64, 1, 99),
        pad_tokens=-1,
        d=128,
        hq=4,
        hkv=2,
        config=GpuConfig(16, 32, 16, prefetch=True, heads_fastest=True, split_programs=12),
    ),
    # more token rows than sequence slots (an engine running fewer requests than its smallest bucket holds)
    # with the decode tiling: a lone decode token, a lone 5-token chunk
    Case(
        (1,), (130,), pad_tokens=7, pad_seqs=0, config=GpuConfig(16, 16, 8, prefetch=True, split_programs=20)
    ),
    Case(
        (5,),
        (70,),
        pad_tokens=3,
        pad_seqs=0,
        config=GpuConfig(16, 16, 8, prefetch=True, page_lookahead=True, split_programs=20),
    ),
    # a sequence with no new tokens, a long prefill chunk spanning several query blocks, no padding at all
    Case((3, 0, 40), (3, 5, 50), pad_tokens=0, pad_seqs=0, config=GpuConfig(block_rows=32, block_kv=16)),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_oracle_and_reference(case):
    run_case(case, seed=zlib.crc32(str(case).encode()))


@pytest.mark.parametrize("decode", [True, False])
def test_head_major_pool_layout(decode):
    """kv_layout="hnd" (benchmarks only): head-major pools give the same result as the token-major ones."""
    rng = np.random.default_rng(7)
    q_lens, kv_lens = _decode(16) if decode else _mixed(16)
    n = len(q_lens)
    b = make_batch(
        rng,
        q_lens,
        kv_lens,
        num_q_heads=8,
        num_kv_heads=2,
        head_dim=64,
        page_size=16,
        max_num_seqs=n + 1,
        num_tokens=n + 1 if decode else sum(q_lens) + 3,
    )
    args = list(map(jnp.asarray, b.args()))
    args[1], args[2] = args[1].transpose(0, 2, 1, 3), args[2].transpose(0, 2, 1, 3)
    kw = dict(sm_scale=0.125, sliding_window=None if decode else 9)
    out = ragged_paged_attention_gpu(*args, interpret=True, validated_only=False, kv_layout="hnd", **kw)
    out = np.asarray(out, np.float64)
    assert np.all(out[b.num_real_tokens :] == 0)
    assert rel_err(out, oracle(b, **kw)) < 1e-5


def test_num_seqs_zero_gives_zeros():
    rng = np.random.default_rng(0)
    b = make_batch(
        rng, [2, 1], [5, 9], num_q_heads=4, num_kv_heads=2, head_dim=64, page_size=16, num_tokens=6
    )
    args = list(map(jnp.asarray, b.args()))
    args[6] = jnp.array([0], jnp.int32)
    out = ragged_paged_attention_gpu(*args, sm_scale=0.1, interpret=True)
    assert np.all(np.asarray(out) == 0)


def test_no_query_tokens():
    """A call with no query tokens returns an empty output (and empty metadata) on every backend."""
    q = jnp.zeros((0, 4, 64), jnp.float32)
    pages = jnp.zeros((8, 16, 1, 64), jnp.float32)
    batch = (jnp.zeros((2,), jnp.int32), jnp.zeros((2, 4), jnp.int32), jnp.zeros((3,), jnp.int32))
    num_seqs = jnp.zeros((1,), jnp.int32)
    for backend in ("pallas_gpu", "reference"):
        meta = attention_metadata(q, pages, *batch, num_seqs, backend=backend)
        out = ragged_paged_attention(
            q, pages, pages, *batch, num_seqs, sm_scale=0.125, backend=backend, interpret=True, metadata=meta
        )
        assert out.shape == (0, 4, 64)


def test_under_jit_and_public_entry_point():
    rng = np.random.default_rng(1)
    b = make_batch(
        rng, [1, 7], [4, 30], num_q_heads=8, num_kv_heads=2, head_dim=64, page_size=16, num_tokens=9
    )
    args = tuple(map(jnp.asarray, b.args()))
    f = jax.jit(lambda *a: ragged_paged_attention(*a, sm_scale=0.125, backend="pallas_gpu", interpret=True))
    out = np.asarray(f(*args), np.float64)
    np.testing.assert_allclose(out, oracle(b, sm_scale=0.125), atol=2e-5, rtol=2e-5)


def test_unsupported_shapes_fall_back_to_reference():
    rng = np.random.default_rng(2)
    b = make_batch(
        rng, [3, 1], [9, 4], num_q_heads=4, num_kv_heads=2, head_dim=48, page_size=16, poison=False
    )
    assert pallas_gpu.supports(b.q.shape, b.k_pages.shape, b.k_pages.dtype) is not None
    args = tuple(map(jnp.asarray, b.args()))
    out = ragged_paged_attention(*args, sm_scale=0.2, backend="pallas_gpu", interpret=True)
    np.testing.assert_allclose(np.asarray(out, np.float64), oracle(b, sm_scale=0.2), atol=2e-5, rtol=2e-5)
    # The fallback lives in the public function: no plan is made for it, and the kernel itself refuses.
    assert attention_metadata(*args[:2], *args[3:], backend="pallas_gpu") is None
    with pytest.raises(ValueError, match="head_dim 48"):
        ragged_paged_attention_gpu(*args, sm_scale=0.2, interpret=True)


def _poisoned(rng, q_lens, kv_lens, *, num_tokens, max_num_seqs, hq=32, hkv=8, d=64, dtype=jnp.bfloat16):
    return make_batch(
        rng,
        q_lens,
        kv_lens,
        num_q_heads=hq,
        num_kv_heads=hkv,
        head_dim=d,
        page_size=16,
        dtype=dtype,
        max_num_seqs=max_num_seqs,
        num_tokens=num_tokens,
    )


@pytest.mark.parametrize("decode", [True, False], ids=["decode", "mixed"])
def test_shared_metadata_gives_identical_results(decode):
    """One plan for several layers (different windows / caps / scales) == planning inside each call."""
    rng = np.random.default_rng(11 + decode)
    if decode:
        b = _poisoned(rng, [1] * 5, [1, 15, 16, 40, 7], num_tokens=6, max_num_seqs=6)
    else:
        b = _poisoned(rng, [1, 13, 1, 20], [1, 29, 17, 20], num_tokens=40, max_num_seqs=5)
    args = tuple(map(jnp.asarray, b.args()))
    q, k_pages = args[0], args[1]
    shapes = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k_pages.shape, k_pages.dtype))

    @jax.jit
    def layers(*a):
        plan = attention_metadata(*shapes, *a[3:], backend="pallas_gpu")
        assert isinstance(plan, AttentionMetadata) and plan.backend == "pallas_gpu"
        outs = []
        for layer_kw in (dict(sm_scale=0.125), dict(sm_scale=0.2, sliding_window=9, soft_cap=4.0)):
            for metadata in (plan, None):
                outs.append(
                    ragged_paged_attention(
                        *a, backend="pallas_gpu", interpret=True, metadata=metadata, **layer_kw
                    )
                )
        return outs

    shared, own, shared_w, own_w = (np.asarray(o.astype(jnp.float32)) for o in layers(*args))
    np.testing.assert_array_equal(shared, own)
    np.testing.assert_array_equal(shared_w, own_w)
    kw_w = dict(sm_scale=0.2, sliding_window=9, soft_cap=4.0)
    assert rel_err(shared, oracle(b, sm_scale=0.125)) < 2e-2
    assert rel_err(shared_w, oracle(b, **kw_w)) < 2e-2
    assert np.all(shared[b.num_real_tokens :] == 0) and np.all(np.isfinite(shared))


def test_metadata_must_match_the_call():
    rng = np.random.default_rng(12)
    b = _poisoned(rng, [1, 1], [5, 9], num_tokens=2, max_num_seqs=2, dtype=np.float32)
    args = list(map(jnp.asarray, b.args()))
    plan = attention_metadata(args[0], args[1], *args[3:], backend="pallas_gpu")
    assert attention_metadata(args[0], args[1], *args[3:], backend="reference") is None
    with pytest.raises(ValueError, match="metadata was made for attention backend"):
        ragged_paged_attention(*args, sm_scale=0.1, backend="reference", metadata=plan)
    longer = [args[0].repeat(2, axis=0), *args[1:]]
    with pytest.raises(ValueError, match="metadata was made for shapes"):
        ragged_paged_attention(*longer, sm_scale=0.1, backend="pallas_gpu", interpret=True, metadata=plan)


def test_default_config_tiles_are_triton_legal():
    for tokens, seqs in ((256, 256), (8192, 64), (7, 8)):
        for hq, hkv, d, item in (
            (32, 8, 64, 2),
            (32, 8, 128, 2),
            (8, 1, 256, 4),
            (12, 4, 128, 2),
            (64, 8, 64, 4),
        ):
            c = default_config(
                num_tokens=tokens,
                max_num_seqs=seqs,
                num_q_heads=hq,
                num_kv_heads=hkv,
                head_dim=d,
                page_size=16,
                pages_per_seq=64,
                itemsize=item,
                num_sms=132,
            )
            assert c.block_rows >= 16 and c.block_rows & (c.block_rows - 1) == 0
            assert c.block_kv >= 16 and c.block_kv & (c.block_kv - 1) == 0
            assert 1 <= c.num_splits <= 16
            if tokens > max(seqs, pallas_gpu.SMALL_BATCH_TOKENS):
                assert c.num_splits == 1


LLAMA_1B_DECODE = dict(num_q_heads=32, num_kv_heads=8, head_dim=64, page_size=16, num_sms=132)


def test_default_decode_tiling_by_bucket_size():
    """Llama-3.2-1B heads (head_dim 64): one kv head per program with 128-token blocks up to 8 tokens, two kv
    heads with 64-token blocks (256 contiguous bytes per token) from 16 (the H100 cold-L2 sweep's choice)."""
    shapes = dict(LLAMA_1B_DECODE, pages_per_seq=64)
    small = default_config(num_tokens=8, max_num_seqs=8, **shapes)
    assert (small.kv_heads, small.block_kv) == (1, 128)
    larger = default_config(num_tokens=16, max_num_seqs=16, **shapes)
    assert (larger.kv_heads, larger.block_kv) == (2, 64)
    # Split room for one sequence alone (up to 16, at most the blocks of a page-table row), planned per step.
    assert (small.num_splits, small.split_programs) == (8, 264)
    assert (larger.num_splits, larger.split_programs) == (16, 264)


def test_small_buckets_take_the_decode_tiling_with_few_sequence_slots():
    """An engine with max_running_requests below its smallest bucket (8 token rows, 1 sequence slot) decodes
    with the decode tiling (16-row tiles, planned splits), not the prefill one; larger calls with more
    tokens than slots stay on the prefill tiling."""
    shapes = dict(LLAMA_1B_DECODE, pages_per_seq=64)
    lone = default_config(num_tokens=8, max_num_seqs=1, **shapes)
    assert lone.block_rows == 16 and lone.num_splits > 1 and lone.split_programs > 0
    assert default_config(num_tokens=16, max_num_seqs=2, **shapes).num_splits > 1
    chunk = default_config(num_tokens=32, max_num_seqs=1, **shapes)
    assert chunk.block_rows == 64 and chunk.num_splits == 1


def _plan(kv_lens, num_tokens, config, hq=32, hkv=8, d=64, page=16, pages_per_seq=256):
    n = len(kv_lens)
    q = jax.ShapeDtypeStruct((num_tokens, hq, d), jnp.bfloat16)
    k_pages = jax.ShapeDtypeStruct((4096, page, hkv, d), jnp.bfloat16)
    cu = jnp.asarray(list(range(n + 1)) + [n] * (num_tokens - n), jnp.int32)
    kv = jnp.asarray(list(kv_lens) + [0] * (num_tokens - n), jnp.int32)
    pt = jnp.zeros((num_tokens, pages_per_seq), jnp.int32)
    plan = pallas_gpu.gpu_metadata(q, k_pages, kv, pt, cu, jnp.asarray([n], jnp.int32), config=config)
    meta = np.asarray(plan.work.meta)
    real = meta[:, pallas_gpu.common.META_NROWS] > 0
    blocks = meta[:, pallas_gpu.common.META_HI_BLK] - meta[:, pallas_gpu.common.META_LO_BLK]
    splits = meta[:, pallas_gpu.common.META_SPLITS]
    return splits[real], blocks[real]


def test_planned_splits_follow_the_real_kv_lengths():
    """The 8-token decode bucket of Llama-3.2-1B heads: a lone long sequence takes every split the grid
    has; a full bucket of equal sequences shares ~split_programs programs; in a mixed batch the long
    sequences get more splits than the short; a static tiling splits every item alike."""
    cfg = default_config(num_tokens=8, max_num_seqs=8, pages_per_seq=256, **LLAMA_1B_DECODE)
    groups = 8 // cfg.kv_heads
    assert cfg.num_splits == 16 and cfg.split_programs == 264
    splits, blocks = _plan([4096], 8, cfg)
    assert splits.tolist() == [16]
    splits, blocks = _plan([1024], 8, cfg)
    assert splits.tolist() == [8] and blocks.tolist() == [8]  # one 128-token block per split
    splits, blocks = _plan([4096] * 8, 8, cfg)
    assert len(set(splits.tolist())) == 1 and splits.sum() * groups <= cfg.split_programs
    assert splits.sum() * groups > cfg.split_programs // 2
    splits, blocks = _plan([4096, 300, 4096, 60], 8, cfg)
    assert splits[0] == splits[2] > splits[1] >= splits[3] >= 1
    assert splits.sum() * groups <= cfg.split_programs + len(splits) * groups
    assert np.all(splits <= np.maximum(blocks, 1))
    static = dataclasses.replace(cfg, split_programs=0)
    splits, _ = _plan([4096, 300, 60], 8, static)
    assert splits.tolist() == [16, 16, 16]


def test_backend_resolution():
    assert resolve_backend("auto", platform="cpu") == "reference"
    assert resolve_backend(None, platform="cpu") == "reference"
    assert resolve_backend("auto", platform="gpu") == "pallas_gpu"
    assert resolve_backend("pallas_gpu") == "pallas_gpu"


def _valid_args():
    rng = np.random.default_rng(3)
    b = make_batch(
        rng, [2, 1], [5, 9], num_q_heads=4, num_kv_heads=2, head_dim=64, page_size=16, poison=False
    )
    return list(map(jnp.asarray, b.args()))


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: a.__setitem__(0, a[0][0]), "q must be"),
        (lambda a: a.__setitem__(1, a[1][0]), "k_pages must be"),
        (lambda a: a.__setitem__(2, a[2][:, :8]), "differ"),
        (lambda a: a.__setitem__(0, a[0][:, :3]), "multiple of num_kv_heads"),
        (lambda a: a.__setitem__(0, a[0][..., :32]), "head_dim"),
        (lambda a: a.__setitem__(3, a[3].astype(jnp.float32)), "kv_lens must be int32"),
        (lambda a: a.__setitem__(4, a[4][0]), "page_indices must have 2 dims"),
        (lambda a: a.__setitem__(5, a[5][:-1]), "cu_q_lens"),
        (lambda a: a.__setitem__(6, jnp.array([2, 2], jnp.int32)), "num_seqs"),
    ],
)
def test_public_function_validates_inputs(mutate, match):
    args = _valid_args()
    mutate(args)
    with pytest.raises(ValueError, match=match):
        ragged_paged_attention(*args, sm_scale=0.1, backend="pallas_gpu", interpret=True)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(sliding_window=0), "sliding_window"),
        (dict(soft_cap=-1.0), "soft_cap"),
        (dict(backend="cuda"), "backend must be one of"),
    ],
)
def test_public_function_validates_options(kw, match):
    with pytest.raises(ValueError, match=match):
        ragged_paged_attention(*_valid_args(), sm_scale=0.1, interpret=True, **kw)


def test_bench_smoke_runs():
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "bench_kernels.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "8/8 PASS" in r.stdout


SLOW_CASES = [
    Case(*_mixed(p), d=d, page=p, dtype=dt, window=w, cap=c, hq=hq, hkv=hkv)
    for (d, p, dt, (w, c)), (hq, hkv) in zip(
        [
            (d, p, dt, wc)
            for d in (64, 128, 256)
            for p in (16, 32, 64)
            for dt in ("f32", "bf16")
            for wc in ((None, None), (17, 7.0))
        ],
        [(4, 4), (8, 2), (16, 2), (8, 1), (6, 2), (32, 8)] * 6,
        strict=False,
    )
]


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW_CASES, ids=str)
def test_full_grid(case):
    run_case(case, seed=zlib.crc32(str(case).encode()))


@pytest.mark.skipif(jax.__version_info__ < (0, 11), reason="jax >= 0.11 lowers Pallas to CUDA on CPU")
@pytest.mark.parametrize(
    "num_tokens,max_seqs,d",
    [(8, 8, 64), (16, 16, 64), (8, 8, 128), (40, 4, 64)],
    ids=["decode8-planned", "decode16-planned", "decode8-d128-heads-fastest", "mixed"],
)
def test_lowers_for_cuda(num_tokens, max_seqs, d):
    """The Pallas -> Triton IR lowering of the default tilings (decode buckets with planned splits, whose
    empty programs branch around the kv loops; a mixed batch) for an H100, on any machine. The Triton ->
    PTX compile happens in XLA on the GPU (benchmarks/bench_kernels.py --check)."""
    hq, hkv, page = 32, 8, 16
    q = jax.ShapeDtypeStruct((num_tokens, hq, d), jnp.bfloat16)
    pages = jax.ShapeDtypeStruct((512, page, hkv, d), jnp.bfloat16)
    ints = [jax.ShapeDtypeStruct(s, jnp.int32) for s in ((max_seqs,), (max_seqs, 256), (max_seqs + 1,), (1,))]
    cfg = pallas_gpu.config_for(q, pages, ints[1])
    if num_tokens <= max_seqs:
        assert cfg.split_programs > 0 and cfg.num_splits > 1 and cfg.mosaic is None
        assert cfg.heads_fastest == (d == 128)

    def f(q, k, v, kv_lens, pt, cu, ns):
        return ragged_paged_attention_gpu(q, k, v, kv_lens, pt, cu, ns, sm_scale=0.125, config=cfg)

    exp = export_triton_for_h100(jax.jit(f), q, pages, pages, *ints)
    assert [a.shape for a in exp.out_avals] == [(num_tokens, hq, d)]
    assert "jaxrt_rpa_" in exp.mlir_module()
    if num_tokens <= max_seqs:  # the split merge is a Pallas kernel too
        assert "jaxrt_rpa_merge_s" in exp.mlir_module()


@pytest.mark.parametrize(
    "shape",
    [(8, 5, 8, 16), (3, 4, 6, 16), (4, 2, 3, 32)],
    ids=["pallas", "xla-odd-splits", "pallas-odd-heads"],
)
def test_split_merge_reads_only_live_splits(shape):
    """merge_splits_direct (Pallas where S and D are powers of two, else XLA) against the flash-decoding
    merge of each token's live splits in float64 numpy (m is a base-2 max: weights 2^(m_s - max m)); the
    dead splits hold NaN and inf, as unwritten memory may, and padding tokens (0 splits) come out zero."""
    num_splits, num_tokens, hq, d = shape
    rng = np.random.default_rng(num_splits * 100 + hq)
    acc = rng.standard_normal((num_splits, num_tokens, hq, d)).astype(np.float32)
    m = rng.standard_normal((num_splits, num_tokens, hq)).astype(np.float32) * 4
    l = rng.uniform(0.5, 2.0, (num_splits, num_tokens, hq)).astype(np.float32)
    token_splits = rng.integers(1, num_splits + 1, num_tokens).astype(np.int32)
    token_splits[-1] = 0
    want = np.zeros((num_tokens, hq, d))
    for t, n in enumerate(token_splits):
        if n:
            w = np.exp2(m[:n, t].astype(np.float64) - m[:n, t].max(axis=0))  # [n, hq]
            want[t] = (w[..., None] * acc[:n, t]).sum(axis=0) / (w * l[:n, t]).sum(axis=0)[:, None]
        dead = np.arange(num_splits) >= n
        acc[dead, t], m[dead, t], l[dead, t] = np.nan, np.inf, np.nan
    out = pallas_gpu.merge_splits_direct(
        *map(jnp.asarray, (acc, m, l, token_splits)), jnp.float32, interpret=True
    )
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-6)
