"""``rope_write_kv``: the fused rope + KV write kernel (``kernels/kv_write.py``) against the jnp composition
(split, ``apply_rope``, ``write_kv_reference``), in Pallas interpret mode on CPU, and its Triton lowering for
CUDA (jax.export) on any machine.

Every case draws fresh inputs and poisons the pools (NaN) first: the rows the reference writes must hold its
values, every other row must still be NaN (no stray or missing write).
"""

from __future__ import annotations

import types
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxrt_testing import export_triton_for_h100

from jaxrt.kernels import QKNorm, rope_write_kv, rope_write_kv_reference
from jaxrt.kernels.kv_write import rope_write_kv_gpu
from jaxrt.models.layers import PagedAttention

PAGES, PAGE = 6, 4
NUM_SLOTS = PAGES * PAGE


def _inputs(rng, hq, hkv, d, dtype, slots, rotary_dim=None):
    t = len(slots)
    qkv = jnp.asarray(rng.standard_normal((t, (hq + 2 * hkv) * d)) * 2, dtype)
    angles = rng.uniform(0, 100, (t, (rotary_dim or d) // 2)).astype(np.float32)
    pools = jnp.full((PAGES, PAGE, hkv, d), jnp.nan, dtype)
    return qkv, jnp.cos(angles), jnp.sin(angles), pools, pools, jnp.asarray(slots, jnp.int32)


def _f32(x):
    return np.asarray(jnp.asarray(x).astype(jnp.float32))


def _assert_same(got, want, dtype, normed=False):
    """Within an ulp of the dtype. ``normed``: the kernel sums the squares in another order than the
    reference, and XLA may keep the reference's bf16 intermediates in f32 (``xla_allow_excess_precision``),
    so a normed element can round to the neighbouring bf16 value before rope mixes it with another: an ulp
    of the inputs' magnitude (up to ~4 here) in bf16. The f32 cases check the arithmetic closely."""
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == "f32" else dict(rtol=2**-7, atol=1e-5)  # 1 bf16 ulp
    if normed:
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == "f32" else dict(rtol=2**-7, atol=2**-5)
    q, k_pages, v_pages = map(_f32, got)
    wq, wk, wv = map(_f32, want)
    for name, a, b in (("q", q, wq), ("k_pages", k_pages, wk), ("v_pages", v_pages, wv)):
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=f"{name}: rows written differ")
        np.testing.assert_allclose(a, b, **tol, err_msg=name)  # NaN == NaN here


# Slots: padding rows (-1) between real ones, both ends of pages (0, 3 | 4, 11 | 12, 23), one past the pool
# (dropped, as the reference's scatter drops it).
SLOTS = [4, -1, 3, 12, 11, -1, 0, 23, NUM_SLOTS, 17]
CASES = [  # (hq, hkv, d, dtype, rotary_dim or None for all of head_dim)
    (8, 2, 64, "bf16", None),  # GQA
    (8, 2, 128, "f32", None),
    (4, 1, 128, "bf16", None),  # MQA
    (14, 2, 64, "f32", None),  # Qwen2-0.5B's 14 q heads: tiles of 8, 4 and 2
    (6, 3, 32, "bf16", None),  # odd kv head count
    (6, 2, 128, "bf16", 96),  # Phi-4-mini's partial rotary: halves of 48 (32 + 16 columns), 32 passed through
    (4, 2, 80, "f32", 32),  # Phi-2-like: head_dim 80 (64 + 16), 32 rotary dims
    (4, 4, 96, "f32", 24),  # halves of 12 (8 + 4 columns), head_dim 96 (64 + 32)
]
DT = {"f32": jnp.float32, "bf16": jnp.bfloat16}


@pytest.mark.parametrize("hq,hkv,d,dtype,rotary", CASES, ids=lambda v: str(v))
def test_matches_reference_in_interpret_mode(hq, hkv, d, dtype, rotary):
    rng = np.random.default_rng(zlib.crc32(f"{hq}-{hkv}-{d}-{dtype}-{rotary}".encode()))
    args = _inputs(rng, hq, hkv, d, DT[dtype], SLOTS, rotary)
    heads = dict(num_q_heads=hq, num_kv_heads=hkv, head_dim=d)
    want = rope_write_kv_reference(*args, **heads)
    got = rope_write_kv(*args, **heads, backend="pallas_gpu", interpret=True)
    _assert_same(got, want, dtype)
    written = np.flatnonzero(~np.isnan(_f32(got[1]).reshape(NUM_SLOTS, -1)).any(axis=1))
    assert sorted(written) == sorted(s for s in SLOTS if 0 <= s < NUM_SLOTS)


NORMS = {  # the q/k norms of the families that have them
    "qwen3": QKNorm("head", 1e-6),  # cast to the dtype, then scaled
    "gemma3": QKNorm("head", 1e-6, offset=1.0, scale_f32=True),  # (1 + w), in f32
    "olmo2": QKNorm("full", 1e-6, scale_f32=True),  # over all heads of the token
}


def _norm_weights(rng, norm, hq, hkv, d, dtype):
    rows = (hq, hkv) if norm.mode == "full" else (1, 1)
    return tuple(jnp.asarray(1 + 0.3 * rng.standard_normal(r * d), dtype) for r in rows)


@pytest.mark.parametrize("family", sorted(NORMS))
@pytest.mark.parametrize(
    "hq,hkv,d,dtype,rotary",
    [(8, 2, 64, "bf16", None), (14, 2, 32, "f32", None), (6, 3, 128, "bf16", None), (4, 2, 80, "f32", 48)],
)
def test_qk_norm_matches_reference_in_interpret_mode(family, hq, hkv, d, dtype, rotary):
    """q/k RMSNorm before rope (Qwen3, Gemma 3, OLMo 2 arithmetic), in the kernel: same as the jnp
    composition within an ulp of the dtype (the kernel sums the squares in another order); with partial
    rotary the pass-through columns are normed too."""
    rng = np.random.default_rng(zlib.crc32(f"{family}-{hq}-{hkv}-{d}-{dtype}-{rotary}".encode()))
    args = _inputs(rng, hq, hkv, d, DT[dtype], SLOTS, rotary)
    norm = NORMS[family]
    kw = dict(
        num_q_heads=hq,
        num_kv_heads=hkv,
        head_dim=d,
        qk_norm=norm,
        qk_norm_weights=_norm_weights(rng, norm, hq, hkv, d, DT[dtype]),
    )
    want = rope_write_kv_reference(*args, **kw)
    got = rope_write_kv(*args, **kw, backend="pallas_gpu", interpret=True)
    _assert_same(got, want, dtype, normed=True)
    # The norm is there: without it the result differs (the weights are far from one).
    plain = rope_write_kv_reference(*args, num_q_heads=hq, num_kv_heads=hkv, head_dim=d)
    assert not np.allclose(_f32(got[0]), _f32(plain[0]), rtol=0.05)


def test_dispatch():
    """pallas_gpu runs the kernel where it can (partial rotary and head_dims that are not powers of two
    included); a head_dim that is not a multiple of 8 runs the jnp composition (same results), and so do
    other backends, always."""
    rng = np.random.default_rng(7)
    slots = [5, -1, 8]

    def kernels_in(d, rotary_dim, backend):
        args = _inputs(rng, 4, 2, d, jnp.float32, slots, rotary_dim)
        heads = dict(num_q_heads=4, num_kv_heads=2, head_dim=d)
        f = lambda *a: rope_write_kv(*a, **heads, backend=backend, interpret=True)  # noqa: E731
        _assert_same(f(*args), rope_write_kv_reference(*args, **heads), "f32")
        return "jaxrt_rope_write_kv" in str(jax.make_jaxpr(f)(*args))

    assert kernels_in(64, None, "pallas_gpu")
    assert kernels_in(64, 32, "pallas_gpu")  # partial rotary
    assert kernels_in(96, None, "pallas_gpu")
    assert not kernels_in(36, None, "pallas_gpu")
    assert not kernels_in(64, None, "reference")


def test_no_tokens():
    """An empty batch returns an empty q and the pools as they were, on every backend."""
    pools = jnp.arange(PAGES * PAGE * 2 * 16, dtype=jnp.float32).reshape(PAGES, PAGE, 2, 16)
    empty = jnp.zeros((0, 8), jnp.float32)
    for backend in ("pallas_gpu", "reference"):
        q, k_pages, v_pages = rope_write_kv(
            jnp.zeros((0, 8 * 16), jnp.float32),
            empty,
            empty,
            pools,
            pools,
            jnp.zeros((0,), jnp.int32),
            num_q_heads=4,
            num_kv_heads=2,
            head_dim=16,
            backend=backend,
            interpret=True,
        )
        assert q.shape == (0, 4, 16)
        np.testing.assert_array_equal(np.asarray(k_pages), np.asarray(pools))
        np.testing.assert_array_equal(np.asarray(v_pages), np.asarray(pools))


def test_no_rotary_dims_writes_k_and_v_unchanged():
    """A model whose rope covers no dims (cos, sin [T, 0]) still writes its K/V: q and k pass through as is."""
    rng = np.random.default_rng(11)
    slots = [2, -1, 9]
    qkv = jnp.asarray(rng.standard_normal((3, 8 * 32)), jnp.float32)
    empty = jnp.zeros((3, 0), jnp.float32)
    pools = jnp.full((PAGES, PAGE, 2, 32), jnp.nan, jnp.float32)
    heads = dict(num_q_heads=4, num_kv_heads=2, head_dim=32)
    q, k_pages, v_pages = rope_write_kv(
        qkv,
        empty,
        empty,
        pools,
        pools,
        jnp.asarray(slots, jnp.int32),
        **heads,
        backend="pallas_gpu",
        interpret=True,
    )
    x = np.asarray(qkv).reshape(3, 8, 32)
    np.testing.assert_array_equal(np.asarray(q), x[:, :4])
    flat_k, flat_v = (
        np.asarray(k_pages).reshape(NUM_SLOTS, 2, 32),
        np.asarray(v_pages).reshape(NUM_SLOTS, 2, 32),
    )
    for row, slot in enumerate(slots):
        if slot >= 0:
            np.testing.assert_array_equal(flat_k[slot], x[row, 4:6])
            np.testing.assert_array_equal(flat_v[slot], x[row, 6:8])
    assert np.isnan(flat_k).any(axis=(1, 2)).sum() == NUM_SLOTS - 2


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(qkv=(3, 100)), "qkv must be"),
        (dict(cos=(3, 40)), "cos must be"),
        (dict(cos_dtype=jnp.bfloat16), "cos must be float32"),
        (dict(k_pages=(PAGES, PAGE, 3, 64)), "k_pages must be"),
        (dict(v_pages=(PAGES, PAGE, 2, 32)), "k_pages .* and v_pages"),
        (dict(slots=(4,)), "slot_mapping must be"),
        (dict(norm=QKNorm("head", 1e-6)), "given together"),
        (dict(norm=QKNorm("head", 1e-6), weights=(64, 32)), "k weight must be"),
        (dict(norm=QKNorm("full", 1e-6), weights=(64, 128)), "q weight must be"),
        (dict(norm="head", weights=(64, 32)), "must be a kernels.reference.QKNorm"),
    ],
)
def test_validates(change, match):
    d = 64
    qkv = jnp.zeros(change.get("qkv", (3, 8 * d)), jnp.float32)
    cos = jnp.zeros(change.get("cos", (3, d // 2)), change.get("cos_dtype", jnp.float32))
    k = jnp.zeros(change.get("k_pages", (PAGES, PAGE, 2, d)), jnp.float32)
    v = jnp.zeros(change.get("v_pages", (PAGES, PAGE, 2, d)), jnp.float32)
    slots = jnp.zeros(change.get("slots", (3,)), jnp.int32)
    norm = {}
    if "norm" in change:
        norm["qk_norm"] = change["norm"]
    if "weights" in change:
        norm["qk_norm_weights"] = tuple(jnp.ones(n, jnp.float32) for n in change["weights"])
    with pytest.raises(ValueError, match=match):
        rope_write_kv(qkv, cos, cos, k, v, slots, num_q_heads=4, num_kv_heads=2, head_dim=d, **norm)


def test_layer_routes_rope_and_kv_write(monkeypatch):
    """Every model ropes and writes (and norms q / k where it does) through ``rope_write_kv`` on its attention
    backend (the kernel on pallas_gpu, where ``supports`` allows); XLA's ops with ``JAXRT_FUSED_KV_WRITE=0``."""
    layer = dict(attention_backend="pallas_gpu")

    def backend(**change):
        return PagedAttention._kv_write_backend(types.SimpleNamespace(**{**layer, **change}))

    assert backend() == "pallas_gpu"
    assert backend(attention_backend="reference") == "reference"
    monkeypatch.setenv("JAXRT_FUSED_KV_WRITE", "0")
    assert backend() == "reference"


@pytest.mark.skipif(jax.__version_info__ < (0, 11), reason="jax >= 0.11 lowers Pallas to CUDA on CPU")
@pytest.mark.parametrize(
    "num_tokens,hq,hkv,d,norm,rotary",
    [
        (1, 32, 8, 64, None, 64),
        (256, 32, 8, 64, None, 64),
        (8, 14, 2, 64, None, 64),
        (8, 16, 8, 128, "qwen3", 128),  # Qwen3-0.6B
        (256, 8, 4, 256, "gemma3", 256),  # Gemma 3 1B's head_dim 256 (one kv head on the real model)
        (8, 16, 16, 128, "olmo2", 128),  # OLMo 2 1B
        (8, 24, 8, 128, None, 96),  # Phi-4-mini: 96 of 128 dims rotary
        (64, 32, 32, 80, None, 32),  # Phi-2's head_dim 80 with 32 rotary dims
    ],
)
def test_lowers_for_cuda(num_tokens, hq, hkv, d, norm, rotary):
    """The Pallas -> Triton IR lowering for an H100 on any machine (Llama 3.2 1B at decode batch 1 / 256,
    Qwen2 0.5B's 14 q heads, the q/k-norm families, partial rotary), the pools aliased to the outputs; the
    Triton -> PTX compile happens in XLA on the GPU."""
    qkv = jax.ShapeDtypeStruct((num_tokens, (hq + 2 * hkv) * d), jnp.bfloat16)
    cs = jax.ShapeDtypeStruct((num_tokens, rotary // 2), jnp.float32)
    pools = jax.ShapeDtypeStruct((512, 16, hkv, d), jnp.bfloat16)
    slots = jax.ShapeDtypeStruct((num_tokens,), jnp.int32)

    qk_norm = None if norm is None else NORMS[norm]
    rows = (hq, hkv) if norm == "olmo2" else (1, 1)
    weights = tuple(jax.ShapeDtypeStruct((r * d,), jnp.bfloat16) for r in rows)

    def f(qkv, cos, sin, k, v, slots, weights):
        return rope_write_kv_gpu(
            qkv,
            cos,
            sin,
            k,
            v,
            slots,
            num_q_heads=hq,
            num_kv_heads=hkv,
            head_dim=d,
            qk_norm=qk_norm,
            qk_norm_weights=None if norm is None else weights,
        )

    exp = export_triton_for_h100(jax.jit(f, donate_argnums=(3, 4)), qkv, cs, cs, pools, pools, slots, weights)
    assert [a.shape for a in exp.out_avals] == [(num_tokens, hq, d), pools.shape, pools.shape]
    assert "jaxrt_rope_write_kv" in exp.mlir_module()
