"""``norm_gate_up``: a lone decode token's RMSNorm, gate/up product and activation in one kernel
(``kernels/decode_mlp.py``) against the jnp composition (``rms_norm``, the product, ``act(gate) * up``), in
Pallas interpret mode on CPU, on the GPU itself where there is one, and its Triton lowering for CUDA
(jax.export) on any machine."""

from __future__ import annotations

import types
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxrt_testing import export_triton_for_h100

from jaxrt.kernels import decode_mlp, norm_gate_up, norm_gate_up_applies
from jaxrt.models.layers import GatedMLP

DT = {"f32": jnp.float32, "bf16": jnp.bfloat16}


def _inputs(seed, hidden, inter, dtype):
    rng = np.random.default_rng(seed)
    dt = DT[dtype]
    x = jnp.asarray(rng.standard_normal((1, hidden)) * 3, dt)
    norm_weight = jnp.asarray(1 + 0.2 * rng.standard_normal(hidden), dt)
    w = jnp.asarray(rng.standard_normal((hidden, 2 * inter)) * hidden**-0.5, dt)
    return x, norm_weight, w


def _call(args, act, norm, backend, interpret=True, **tiling):
    offset, scale_f32 = norm
    kw = dict(eps=1e-5, norm_offset=offset, norm_scale_f32=scale_f32, act=act)
    if tiling:  # the kernel itself, with a tiling other than the default
        return decode_mlp.norm_gate_up_gpu(*args, **kw, interpret=interpret, **tiling)
    return norm_gate_up(*args, **kw, backend=backend, interpret=interpret)


def _assert_close(got, want, dtype):
    """f32: the sums run in another order. bf16: gate and up (up to ~4 here) may round to the neighbouring
    bf16 value before the activation mixes them: an ulp of that magnitude, relative."""
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == "f32" else dict(rtol=2**-6, atol=2**-5)
    np.testing.assert_allclose(
        np.asarray(got.astype(jnp.float32)), np.asarray(want.astype(jnp.float32)), **tol
    )


CASES = [  # (hidden, intermediate, dtype, act, norm (offset, scale_f32))
    (256, 128, "f32", "silu", (0.0, False)),
    (256, 192, "bf16", "silu", (0.0, False)),
    (576, 128, "bf16", "silu", (0.0, False)),  # SmolLM2-135M's hidden: no power of two
    (192, 64, "f32", "gelu_tanh", (1.0, True)),  # Gemma's (1 + w) norm scaled in f32, GeGLU
    (128, 256, "bf16", "gelu_tanh", (0.0, True)),
]


@pytest.mark.parametrize("hidden,inter,dtype,act,norm", CASES, ids=lambda v: str(v))
def test_matches_composition_in_interpret_mode(hidden, inter, dtype, act, norm):
    args = _inputs(zlib.crc32(repr((hidden, inter, dtype, act, norm)).encode()), hidden, inter, dtype)
    want = _call(args, act, norm, "reference")
    _assert_close(_call(args, act, norm, "pallas_gpu"), want, dtype)
    # another tiling: narrower column blocks, shorter row steps
    _assert_close(_call(args, act, norm, None, block_n=32, block_k_rows=32, num_stages=2), want, dtype)


def test_dispatch():
    """pallas_gpu runs the kernel for one token; more tokens, other backends and intermediate sizes that are
    not a multiple of its column block run the composition (the same results)."""
    assert norm_gate_up_applies(1, 256, 128, "silu", "pallas_gpu")
    assert not norm_gate_up_applies(2, 256, 128, "silu", "pallas_gpu")
    assert not norm_gate_up_applies(1, 256, 100, "silu", "pallas_gpu")
    assert not norm_gate_up_applies(1, 256, 128, "relu", "pallas_gpu")
    assert not norm_gate_up_applies(1, 256, 128, "silu", "reference")
    args = _inputs(3, 256, 128, "f32")

    def kernel_in(args, backend):
        f = lambda *a: _call(a, "silu", (0.0, False), backend)  # noqa: E731
        _assert_close(f(*args), _call(args, "silu", (0.0, False), "reference"), "f32")
        return "jaxrt_norm_gate_up" in str(jax.make_jaxpr(f)(*args))

    assert kernel_in(args, "pallas_gpu")
    assert not kernel_in(args, "reference")
    assert not kernel_in((jnp.concatenate([args[0]] * 2), *args[1:]), "pallas_gpu")


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(x=(256,)), "x must be"),
        (dict(norm_weight=(128,)), "norm_weight must be"),
        (dict(w=(128, 256)), "w_gate_up must be"),
        (dict(w=(256, 255)), "w_gate_up must be"),
        (dict(w_dtype=jnp.bfloat16), "share one dtype"),
        (dict(act="relu"), "act must be"),
    ],
)
def test_validates(change, match):
    x = jnp.zeros(change.get("x", (1, 256)), jnp.float32)
    nw = jnp.ones(change.get("norm_weight", (256,)), jnp.float32)
    w = jnp.zeros(change.get("w", (256, 256)), change.get("w_dtype", jnp.float32))
    with pytest.raises(ValueError, match=match):
        norm_gate_up(x, nw, w, eps=1e-5, act=change.get("act", "silu"), backend="pallas_gpu", interpret=True)


def test_mlp_takes_the_residual_stream_only_where_the_kernel_runs(monkeypatch):
    """Opted in (``JAXRT_FUSED_GATE_UP=1``), the MLP takes the residual stream and its RMSNorm (one kernel)
    for a lone token on pallas_gpu with a kernel activation and no biases; the normed rows otherwise, by
    default, and when ``JAXRT_FUSED_MLP`` picks a Mosaic MLP."""
    mlp = dict(gate_up_proj=types.SimpleNamespace(kernel=jnp.zeros((256, 256))), act="silu", bias=False)

    def takes(num_tokens=1, backend="pallas_gpu", **change):
        return GatedMLP.takes_input_norm(types.SimpleNamespace(**{**mlp, **change}), num_tokens, backend)

    assert not takes()  # off by default
    monkeypatch.setenv("JAXRT_FUSED_GATE_UP", "1")
    assert takes()
    assert takes(act="gelu_pytorch_tanh")
    assert not takes(8)
    assert not takes(backend="reference")
    assert not takes(act="relu")
    assert not takes(bias=True)
    monkeypatch.setenv("JAXRT_FUSED_MLP", "1")
    assert not takes()
    monkeypatch.delenv("JAXRT_FUSED_MLP")
    monkeypatch.setenv("JAXRT_FUSED_GATE_UP", "0")
    assert not takes()


GPU_CASES = [(2048, 8192), (4096, 14336), (896, 4864), (576, 1536)]  # Llama 1B / 8B, Qwen2.5-0.5B, SmolLM2


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("hidden,inter", GPU_CASES, ids=lambda v: str(v))
def test_matches_composition_on_gpu(hidden, inter):
    """The compiled kernel on the GPU, bf16, model shapes, against the composition XLA runs."""
    args = _inputs(hidden, hidden, inter, "bf16")
    want = _call(args, "silu", (0.0, False), "reference", interpret=False)
    _assert_close(_call(args, "silu", (0.0, False), "pallas_gpu", interpret=False), want, "bf16")


@pytest.mark.skipif(jax.__version_info__ < (0, 11), reason="jax >= 0.11 lowers Pallas to CUDA on CPU")
@pytest.mark.parametrize("hidden,inter", GPU_CASES, ids=lambda v: str(v))
def test_lowers_for_cuda(hidden, inter):
    """The Pallas -> Triton IR lowering for an H100 on any machine; the Triton -> PTX compile happens in XLA on
    the GPU."""
    bf16 = jnp.bfloat16
    x = jax.ShapeDtypeStruct((1, hidden), bf16)
    nw = jax.ShapeDtypeStruct((hidden,), bf16)
    w = jax.ShapeDtypeStruct((hidden, 2 * inter), bf16)
    exp = export_triton_for_h100(
        jax.jit(lambda x, nw, w: decode_mlp.norm_gate_up_gpu(x, nw, w, eps=1e-5)), x, nw, w
    )
    assert [a.shape for a in exp.out_avals] == [(1, inter)]
    assert "jaxrt_norm_gate_up" in exp.mlir_module()
