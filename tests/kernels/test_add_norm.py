"""``add_rms_norm``: the residual add and the RMSNorm after it in one kernel (``kernels/add_norm.py``) against
XLA's ops (``x + h``, ``rms_norm``), in Pallas interpret mode on CPU, on the GPU itself where there is one,
and its Triton lowering for CUDA (jax.export) on any machine."""

from __future__ import annotations

import types
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jaxrt_testing import export_triton_for_h100

from jaxrt.kernels import add_norm, add_rms_norm, add_rms_norm_kernel_applies
from jaxrt.models.layers import DecoderLayer, RMSNorm

DT = {"f32": jnp.float32, "bf16": jnp.bfloat16}


def _inputs(seed, tokens, hidden, dtype):
    rng = np.random.default_rng(seed)
    dt = DT[dtype]
    x = jnp.asarray(rng.standard_normal((tokens, hidden)) * 3, dt)
    h = jnp.asarray(rng.standard_normal((tokens, hidden)), dt)
    w = jnp.asarray(1 + 0.2 * rng.standard_normal(hidden), dt)
    return x, h, w


def _assert_close(got, want, dtype):
    """The sum rounds the same in both; the norm's statistic adds in another order, so in bf16 the normed row
    may round to the neighbouring value before the weight scales it: up to two ulps of the output."""
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]), err_msg="x + h")
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == "f32" else dict(rtol=2**-6, atol=2**-6)
    a, b = (np.asarray(v.astype(jnp.float32)) for v in (got[1], want[1]))
    np.testing.assert_allclose(a, b, **tol, err_msg="normed")


CASES = [  # (tokens, hidden, dtype, (offset, scale_f32))
    (1, 256, "f32", (0.0, False)),
    (1, 576, "bf16", (0.0, False)),  # SmolLM2-135M's width: pieces of 512 and 64
    (8, 192, "bf16", (1.0, True)),  # Gemma's (1 + w), scaled in f32
    (3, 256, "f32", (0.0, True)),  # OLMo-style order
    (16, 896, "bf16", (0.0, False)),  # Qwen2.5-0.5B's width
    (256, 64, "bf16", (0.0, False)),  # the most tokens the kernel takes
]


@pytest.mark.parametrize("tokens,hidden,dtype,norm", CASES, ids=lambda v: str(v))
def test_matches_xla_ops_in_interpret_mode(tokens, hidden, dtype, norm):
    args = _inputs(zlib.crc32(repr((tokens, hidden, dtype, norm)).encode()), tokens, hidden, dtype)
    kw = dict(offset=norm[0], scale_f32=norm[1])
    want = add_rms_norm(*args, 1e-5, **kw, backend="reference")
    got = add_rms_norm(*args, 1e-5, **kw, backend="pallas_gpu", interpret=True)
    _assert_close(got, want, dtype)


def test_dispatch():
    """pallas_gpu runs the kernel for 1 to 256 tokens; longer calls and other backends run XLA's ops."""
    assert add_rms_norm_kernel_applies(1, 256, "pallas_gpu")
    assert add_rms_norm_kernel_applies(256, 256, "pallas_gpu")
    assert not add_rms_norm_kernel_applies(257, 256, "pallas_gpu")
    assert not add_rms_norm_kernel_applies(8, 200, "pallas_gpu")
    assert not add_rms_norm_kernel_applies(8, 256, "reference")

    def kernel_in(args, backend):
        f = lambda *a: add_rms_norm(*a, 1e-5, backend=backend, interpret=True)  # noqa: E731
        return "jaxrt_add_rms_norm" in str(jax.make_jaxpr(f)(*args))

    assert kernel_in(_inputs(1, 8, 256, "f32"), "pallas_gpu")
    assert not kernel_in(_inputs(1, 8, 256, "f32"), "reference")
    assert not kernel_in(_inputs(1, 300, 256, "f32"), "pallas_gpu")


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(x=(256,)), "x must be"),
        (dict(h=(2, 128)), "h must have"),
        (dict(w=(128,)), "weight must be"),
        (dict(h_dtype=jnp.bfloat16), "share one dtype"),
    ],
)
def test_validates(change, match):
    x = jnp.zeros(change.get("x", (2, 256)), jnp.float32)
    h = jnp.zeros(change.get("h", x.shape), change.get("h_dtype", jnp.float32))
    w = jnp.ones(change.get("w", (256,)), jnp.float32)
    with pytest.raises(ValueError, match=match):
        add_rms_norm(x, h, w, 1e-5, backend="pallas_gpu", interpret=True)


def test_layer_adds_and_norms_in_the_kernel_only_where_it_runs(monkeypatch):
    """A pre-norm layer's add after attention and its MLP's norm take the kernel on pallas_gpu for decode-sized
    steps with an unscaled residual and no norm-fused gate/up kernel; XLA's ops otherwise, and always with
    ``JAXRT_FUSED_ADD_NORM=0``. Traced with a stand-in attention and MLP that record what they receive."""
    hidden, seen = 256, []

    class Attn:
        attention_backend, interpret = "pallas_gpu", True

        def takes_input_norm(self, t):
            return False

        def __call__(self, x, batch, kv, metadata=None, input_norm=None):
            return x * 0.5, kv

    class Mlp:
        def takes_input_norm(self, t, backend):
            return False

        def __call__(self, x, residual=None, **kw):
            seen.append(x)
            return residual + x

    norm = RMSNorm(hidden, 1e-5, dtype=jnp.float32, rngs=nnx.Rngs(0))
    norm.weight[...] = jnp.linspace(0.5, 1.5, hidden)
    layer = types.SimpleNamespace(
        placement="pre",
        self_attn=Attn(),
        mlp=Mlp(),
        input_layernorm=lambda x: x,
        post_attention_layernorm=norm,
        residual_multiplier=1.0,
    )
    layer._residual = lambda x, h: DecoderLayer._residual(layer, x, h)

    def run(tokens):
        x = jnp.asarray(np.random.default_rng(tokens).standard_normal((tokens, hidden)), jnp.float32)
        f = lambda x: DecoderLayer.__call__(layer, x, None, None)[0]  # noqa: E731
        jaxpr = str(jax.make_jaxpr(f)(x))
        want = (x + x * 0.5) + norm(x + x * 0.5)
        np.testing.assert_allclose(np.asarray(f(x)), np.asarray(want), rtol=1e-5, atol=1e-5)
        return "jaxrt_add_rms_norm" in jaxpr

    assert run(8)
    assert not run(300)
    monkeypatch.setenv("JAXRT_FUSED_ADD_NORM", "0")
    assert not run(8)


GPU_CASES = [2048, 4096, 896, 576]  # hidden of Llama-3.2-1B, Llama-3.1-8B, Qwen2.5-0.5B, SmolLM2-135M


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("hidden", GPU_CASES)
def test_matches_xla_ops_on_gpu(hidden):
    """The compiled kernel on the GPU, bf16, decode batch sizes, against XLA's ops."""
    for tokens in (1, 8, 64, 256):
        args = _inputs(hidden + tokens, tokens, hidden, "bf16")
        want = add_rms_norm(*args, 1e-5, backend="reference")
        got = add_rms_norm(*args, 1e-5, backend="pallas_gpu")
        _assert_close(got, want, "bf16")


@pytest.mark.skipif(jax.__version_info__ < (0, 11), reason="jax >= 0.11 lowers Pallas to CUDA on CPU")
@pytest.mark.parametrize("hidden", GPU_CASES)
@pytest.mark.parametrize("tokens", [1, 64])
def test_lowers_for_cuda(hidden, tokens):
    """The Pallas -> Triton IR lowering for an H100 on any machine; the Triton -> PTX compile happens in XLA
    on the GPU."""
    bf16 = jnp.bfloat16
    x = jax.ShapeDtypeStruct((tokens, hidden), bf16)
    w = jax.ShapeDtypeStruct((hidden,), bf16)

    def f(x, h, w):
        return add_norm.add_rms_norm_gpu(x, h, w, eps=1e-5)

    exp = export_triton_for_h100(jax.jit(f), x, x, w)
    assert [a.shape for a in exp.out_avals] == [(tokens, hidden), (tokens, hidden)]
    assert "jaxrt_add_rms_norm" in exp.mlir_module()
