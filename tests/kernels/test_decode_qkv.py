"""``norm_qkv_rope_write``: a lone decode token's RMSNorm, q/k/v projection, rope and KV write in one kernel
(``kernels/decode_qkv.py``) against the jnp composition (``rms_norm``, the product, ``rope_write_kv``), in
Pallas interpret mode on CPU, on the GPU itself where there is one, and its Triton lowering for CUDA
(jax.export) on any machine.

Every case draws fresh inputs and poisons the pools (NaN) first: the slot the reference writes must hold its
values, every other row must still be NaN.
"""

from __future__ import annotations

import types
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxrt_testing import export_triton_for_h100

from jaxrt.kernels import decode_qkv, norm_qkv_kernel_applies, norm_qkv_rope_write
from jaxrt.models.layers import PagedAttention

PAGES, PAGE = 6, 4
NUM_SLOTS = PAGES * PAGE
DT = {"f32": jnp.float32, "bf16": jnp.bfloat16}


def _inputs(seed, hidden, hq, hkv, d, dtype, slot, bias, rotary_dim=None):
    rng = np.random.default_rng(seed)
    width = (hq + 2 * hkv) * d
    dt = DT[dtype]
    x = jnp.asarray(rng.standard_normal((1, hidden)) * 3, dt)
    norm_weight = jnp.asarray(1 + 0.2 * rng.standard_normal(hidden), dt)
    w = jnp.asarray(rng.standard_normal((width, hidden)) * hidden**-0.5, dt)
    b = jnp.asarray(0.5 * rng.standard_normal(width), dt) if bias else None
    angles = rng.uniform(0, 100, (1, (rotary_dim or d) // 2)).astype(np.float32)
    pools = jnp.full((PAGES, PAGE, hkv, d), jnp.nan, dt)
    slots = jnp.asarray([slot], jnp.int32)
    return x, norm_weight, w, b, jnp.cos(angles), jnp.sin(angles), pools, pools, slots


def _assert_close(got, want, dtype):
    """f32: the sums run in another order. bf16: the projection's outputs (up to ~4 here) may round to the
    neighbouring bf16 value before rope mixes two of them: an ulp of that magnitude."""
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == "f32" else dict(rtol=2**-7, atol=2**-5)
    for name, a, b in zip(("q", "k_pages", "v_pages"), got, want, strict=True):
        a, b = np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32))
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=f"{name}: rows written differ")
        np.testing.assert_allclose(a, b, **tol, err_msg=name)


CASES = [  # (hidden, hq, hkv, d, dtype, bias, norm (offset, scale_f32), slot)
    (256, 8, 2, 64, "f32", False, (0.0, False), 5),  # GQA, Llama's norm
    (256, 8, 2, 64, "bf16", False, (0.0, False), 0),  # first slot of the pool
    (576, 9, 3, 64, "bf16", False, (0.0, False), NUM_SLOTS - 1),  # SmolLM2-135M's widths, last slot
    (192, 7, 1, 128, "f32", True, (0.0, False), 11),  # MQA, q/k/v biases (Qwen2), 7 q heads
    (128, 4, 2, 32, "bf16", True, (0.0, False), 12),
    (256, 4, 4, 64, "f32", False, (1.0, True), 3),  # a (1 + w) norm scaled in f32
    (256, 4, 2, 64, "bf16", False, (0.0, True), 17),  # scaled in f32 (OLMo-style order)
    (256, 8, 2, 64, "f32", False, (0.0, False), -1),  # a padding token: nothing written
    (256, 8, 2, 64, "bf16", False, (0.0, False), NUM_SLOTS),  # past the pool: dropped
]


def _call(args, hq, hkv, d, norm, backend, interpret=True):
    offset, scale_f32 = norm
    return norm_qkv_rope_write(
        *args,
        num_q_heads=hq,
        num_kv_heads=hkv,
        head_dim=d,
        eps=1e-5,
        norm_offset=offset,
        norm_scale_f32=scale_f32,
        backend=backend,
        interpret=interpret,
    )


@pytest.mark.parametrize("hidden,hq,hkv,d,dtype,bias,norm,slot", CASES, ids=lambda v: str(v))
def test_matches_composition_in_interpret_mode(hidden, hq, hkv, d, dtype, bias, norm, slot):
    seed = zlib.crc32(repr((hidden, hq, hkv, d, dtype, bias, norm, slot)).encode())
    args = _inputs(seed, hidden, hq, hkv, d, dtype, slot, bias)
    want = _call(args, hq, hkv, d, norm, "reference")
    got = _call(args, hq, hkv, d, norm, "pallas_gpu")
    _assert_close(got, want, dtype)
    if 0 <= slot < NUM_SLOTS:  # the token's k and v landed (and nothing else: the NaN check above)
        assert not np.isnan(np.asarray(got[1].astype(jnp.float32)).reshape(NUM_SLOTS, -1)[slot]).any()


def test_dispatch():
    """pallas_gpu runs the kernel for one token with full rotary and no q/k norms; more tokens, partial rotary,
    q/k norms and other backends run the composition (the same results)."""
    assert norm_qkv_kernel_applies(1, 256, 64, 64, None, "pallas_gpu")
    assert not norm_qkv_kernel_applies(2, 256, 64, 64, None, "pallas_gpu")
    assert not norm_qkv_kernel_applies(1, 256, 64, 32, None, "pallas_gpu")
    assert not norm_qkv_kernel_applies(1, 256, 64, 64, object(), "pallas_gpu")
    assert not norm_qkv_kernel_applies(1, 256, 40, 40, None, "pallas_gpu")  # half 20: not in rows of 4
    assert not norm_qkv_kernel_applies(1, 256, 64, 64, None, "reference")
    args = _inputs(3, 256, 4, 2, 64, "f32", 5, False)

    def kernel_in(args, backend):
        f = lambda *a: _call(a, 4, 2, 64, (0.0, False), backend)  # noqa: E731
        _assert_close(f(*args), _call(args, 4, 2, 64, (0.0, False), "reference"), "f32")
        return "jaxrt_norm_qkv_rope_write" in str(jax.make_jaxpr(f)(*args))

    assert kernel_in(args, "pallas_gpu")
    assert not kernel_in(args, "reference")
    two = _inputs(4, 256, 4, 2, 64, "f32", 5, False)
    two = (
        jnp.concatenate([two[0], two[0] * 2]),
        *two[1:4],
        jnp.concatenate([two[4]] * 2),
        jnp.concatenate([two[5]] * 2),
        *two[6:8],
        jnp.asarray([5, 9], jnp.int32),
    )
    assert not kernel_in(two, "pallas_gpu")


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(x=(256,)), "x must be"),
        (dict(norm_weight=(128,)), "norm_weight must be"),
        (dict(w=(8 * 64, 128)), "w_qkv must be"),
        (dict(bias=(100,)), "bias must be"),
        (dict(w_dtype=jnp.bfloat16), "share one dtype"),
        (dict(cos=(1, 40)), "cos must be"),
        (dict(slots=(2,)), "slot_mapping must be"),
    ],
)
def test_validates(change, match):
    x = jnp.zeros(change.get("x", (1, 256)), jnp.float32)
    nw = jnp.ones(change.get("norm_weight", (256,)), jnp.float32)
    w = jnp.zeros(change.get("w", (8 * 64, 256)), change.get("w_dtype", jnp.float32))
    b = jnp.zeros(change["bias"], jnp.float32) if "bias" in change else None
    cos = jnp.zeros(change.get("cos", (1, 32)), jnp.float32)
    pools = jnp.zeros((PAGES, PAGE, 2, 64), jnp.float32)
    slots = jnp.zeros(change.get("slots", (1,)), jnp.int32)
    with pytest.raises(ValueError, match=match):
        _call((x, nw, w, b, cos, cos, pools, pools, slots), 4, 2, 64, (0.0, False), "pallas_gpu")


def test_layer_takes_the_residual_stream_only_where_the_kernel_runs(monkeypatch):
    """A layer hands its attention the residual stream and its RMSNorm (one kernel) for a lone token on
    pallas_gpu; the normed rows otherwise, and always with ``JAXRT_FUSED_QKV=0``."""
    weight = types.SimpleNamespace(shape=(12 * 64, 256))
    layer = dict(
        qkv_proj=types.SimpleNamespace(weight=weight),
        head_dim=64,
        rotary_dim=64,
        qk_norm=None,
        attention_backend="pallas_gpu",
    )

    def takes(num_tokens=1, **change):
        ns = types.SimpleNamespace(**{**layer, **change})
        ns._kv_write_backend = lambda: PagedAttention._kv_write_backend(ns)
        return PagedAttention.takes_input_norm(ns, num_tokens)

    assert takes()
    assert not takes(8)
    assert not takes(rotary_dim=32)
    assert not takes(attention_backend="reference")
    monkeypatch.setenv("JAXRT_FUSED_KV_WRITE", "0")
    assert not takes()
    monkeypatch.delenv("JAXRT_FUSED_KV_WRITE")
    monkeypatch.setenv("JAXRT_FUSED_QKV", "0")
    assert not takes()


GPU_CASES = [  # (hidden, hq, hkv, d, bias): Llama-3.2-1B, Llama-3.1-8B, Qwen2.5-0.5B, SmolLM2-135M
    (2048, 32, 8, 64, False),
    (4096, 32, 8, 128, False),
    (896, 14, 2, 64, True),
    (576, 9, 3, 64, False),
]


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("hidden,hq,hkv,d,bias", GPU_CASES, ids=lambda v: str(v))
def test_matches_composition_on_gpu(hidden, hq, hkv, d, bias):
    """The compiled kernel on the GPU, bf16, model shapes, against the composition XLA runs."""
    for slot in (7, -1):
        args = _inputs(hidden + slot, hidden, hq, hkv, d, "bf16", slot, bias)
        args = (*args[:6], jnp.full((PAGES, PAGE, hkv, d), jnp.nan, jnp.bfloat16), *args[7:])  # two buffers
        want = _call(args, hq, hkv, d, (0.0, False), "reference", interpret=False)
        got = _call(args, hq, hkv, d, (0.0, False), "pallas_gpu", interpret=False)
        _assert_close(got, want, "bf16")


@pytest.mark.skipif(jax.__version_info__ < (0, 11), reason="jax >= 0.11 lowers Pallas to CUDA on CPU")
@pytest.mark.parametrize("hidden,hq,hkv,d,bias", GPU_CASES, ids=lambda v: str(v))
def test_lowers_for_cuda(hidden, hq, hkv, d, bias):
    """The Pallas -> Triton IR lowering for an H100 on any machine, the pools aliased to the outputs; the
    Triton -> PTX compile happens in XLA on the GPU."""
    width = (hq + 2 * hkv) * d
    bf16 = jnp.bfloat16
    x = jax.ShapeDtypeStruct((1, hidden), bf16)
    nw = jax.ShapeDtypeStruct((hidden,), bf16)
    w = jax.ShapeDtypeStruct((width, hidden), bf16)
    b = jax.ShapeDtypeStruct((width,), bf16) if bias else None
    cs = jax.ShapeDtypeStruct((1, d // 2), jnp.float32)
    pools = jax.ShapeDtypeStruct((512, 16, hkv, d), bf16)
    slots = jax.ShapeDtypeStruct((1,), jnp.int32)

    def f(x, nw, w, b, cos, sin, k, v, slots):
        return decode_qkv.norm_qkv_rope_write_gpu(
            x, nw, w, b, cos, sin, k, v, slots, num_q_heads=hq, num_kv_heads=hkv, head_dim=d, eps=1e-5
        )

    exp = export_triton_for_h100(jax.jit(f, donate_argnums=(6, 7)), x, nw, w, b, cs, cs, pools, pools, slots)
    assert [a.shape for a in exp.out_avals] == [(1, hq, d), pools.shape, pools.shape]
    assert "jaxrt_norm_qkv_rope_write" in exp.mlir_module()
