"""The gated MLP block (``kernels.gated_mlp``) and its Mosaic GPU kernel (``kernels.mosaic_mlp``).

- On CPU with jax >= 0.11 (CI's Python 3.12 step): the kernel runs in the Pallas GPU interpreter
  (deterministic mode: the interpreter has no TMA reductions) against a float64 oracle, and is lowered for
  CUDA (``jax.export``, the whole Pallas -> Mosaic GPU lowering) in every mode and tiling;
- anywhere: the public function's validation and backends, the shapes the kernel refuses, and the model's
  wiring (the layer hands the kernel its weights, activation and residual);
- on a Hopper GPU (mark ``gpu``): the kernel in both modes against the oracle.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxrt_testing import f64 as _f64
from jaxrt_testing import mosaic_gpu_marks

from jaxrt.kernels import _pallas_common as common
from jaxrt.kernels import gated_mlp, gated_mlp_reference, mosaic_gpu, mosaic_mlp
from jaxrt.kernels.mosaic_mlp import MlpConfig

needs_interpreter, needs_mgpu_api, on_hopper = mosaic_gpu_marks()


def _oracle(x, wgu, wd, act, residual):
    gu = _f64(x) @ _f64(wgu)
    inter = wd.shape[0]
    g, u = gu[:, :inter], gu[:, inter:]
    if act == "silu":
        a = g / (1 + np.exp(-g))
    else:
        a = 0.5 * g * (1 + np.tanh(0.7978845608028654 * (g + 0.044715 * g**3)))
    out = (a * u) @ _f64(wd)
    return out if residual is None else out + _f64(residual)


def _inputs(seed, tokens, hidden, inter, residual=True):
    k = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(k[0], (tokens, hidden), jnp.float32).astype(jnp.bfloat16)
    wgu = (jax.random.normal(k[1], (hidden, 2 * inter)) * hidden**-0.5).astype(jnp.bfloat16)
    wd = (jax.random.normal(k[2], (inter, hidden)) * inter**-0.5).astype(jnp.bfloat16)
    res = jax.random.normal(k[3], (tokens, hidden)).astype(jnp.bfloat16) if residual else None
    return x, wgu, wd, res


def _rel_err(got, want) -> float:
    return float(np.abs(_f64(got) - want).max() / np.abs(want).max())


INTERPRET_CASES = [
    # (tokens, hidden, intermediate, act, residual, num_sms, config)
    (8, 256, 128, "silu", True, 2, None),  # one item per program
    (1, 512, 256, "silu", False, 2, None),  # two items per program: the ring carries across items
    (5, 512, 256, "silu", True, 3, MlpConfig(stages=2, out_buffers=1)),  # padded rows, uneven items
    (16, 256, 192, "gelu_tanh", True, 2, MlpConfig(stages=3, out_buffers=2)),
    (8, 512, 256, "silu", True, 2, MlpConfig(stages=3, transposed_gate_up=True)),
    (5, 256, 192, "gelu_tanh", False, 2, MlpConfig(stages=4, transposed_gate_up=True)),
    # program 1 walks the output blocks from block 1 (rotated) or from block 0
    (8, 768, 128, "silu", True, 2, MlpConfig(stages=3)),
    (8, 768, 128, "silu", True, 2, MlpConfig(stages=3, rotate_down=False)),
    # two kernels: phase 1 writes h, the down projection's programs own output columns
    (8, 256, 256, "silu", True, 2, MlpConfig(stages=3, down_by_columns=True)),  # h of 4 items, 2 per program
    (5, 512, 512, "gelu_tanh", False, 3, MlpConfig(stages=2, out_buffers=1, down_by_columns=True)),
    (16, 256, 768, "silu", True, 2, MlpConfig(stages=4, transposed_gate_up=True, down_by_columns=True)),
    # (the interpreter runs overlap_down without its launch instructions: the same kernels otherwise)
    (8, 512, 256, "silu", True, 2, MlpConfig(stages=3, down_by_columns=True, overlap_down=True)),
]


@needs_interpreter
@pytest.mark.parametrize("tokens,hidden,inter,act,residual,num_sms,cfg", INTERPRET_CASES)
def test_interpreted_kernel_matches_oracle(tokens, hidden, inter, act, residual, num_sms, cfg):
    x, wgu, wd, res = _inputs(tokens + hidden, tokens, hidden, inter, residual)
    got = mosaic_mlp.gated_mlp_mgpu(
        x, wgu, wd, act=act, residual=res, deterministic=True, config=cfg, num_sms=num_sms, interpret=True
    )
    assert got.shape == (tokens, hidden) and got.dtype == jnp.bfloat16
    want = _oracle(x, wgu, wd, act, res)
    assert np.isfinite(_f64(got)).all()
    assert _rel_err(got, want) < 1e-2  # one bf16 rounding of the f32 sum (the XLA path rounds three times)


@needs_interpreter
def test_interleaved_gate_up_layout_gives_the_same_result():
    x, wgu, wd, _ = _inputs(7, 8, 512, 256, residual=False)
    split = mosaic_mlp.gated_mlp_mgpu(x, wgu, wd, deterministic=True, num_sms=2, interpret=True)
    il = wgu.reshape(512, 2, -1, mosaic_mlp.BLOCK_I).transpose(0, 2, 1, 3).reshape(512, -1)
    inter = mosaic_mlp.gated_mlp_mgpu(
        x, il, wd, deterministic=True, interleaved=True, num_sms=2, interpret=True
    )
    np.testing.assert_array_equal(np.asarray(split), np.asarray(inter))


LOWER_CASES = [
    # (name, tokens, hidden, intermediate, deterministic, residual, config)
    ("1b-8-reduce", 8, 2048, 8192, False, True, None),
    ("1b-16-reduce", 16, 2048, 8192, False, False, None),
    ("1b-1-det", 1, 2048, 8192, True, True, None),
    ("8b-8-reduce", 8, 4096, 14336, False, True, None),
    ("odd-3", 3, 1024, 2816, False, True, MlpConfig(stages=2, out_buffers=1)),
    ("copy-all", 8, 2048, 8192, False, True, MlpConfig(stages=4, out_buffers=2, copy_only="all")),
    ("copy-down-det", 8, 2048, 8192, True, True, MlpConfig(stages=4, out_buffers=2, copy_only="down")),
    ("1b-16-transposed", 16, 2048, 8192, False, True, MlpConfig(stages=3, transposed_gate_up=True)),
    ("pdl", 8, 2048, 8192, False, True, MlpConfig(stages=4, pdl=True)),
    ("pdl-det-no-rotation", 5, 2048, 8192, True, True, MlpConfig(stages=4, pdl=True, rotate_down=False)),
    ("columns-1b-8", 8, 2048, 8192, False, True, MlpConfig(stages=4, down_by_columns=True)),
    ("columns-8b-16", 16, 4096, 14336, False, True, MlpConfig(stages=2, out_buffers=1, down_by_columns=True)),
    ("columns-odd-3", 3, 1024, 2816, False, False, MlpConfig(stages=3, down_by_columns=True)),
    (
        "columns-overlap",
        8,
        2048,
        8192,
        False,
        True,
        MlpConfig(stages=4, down_by_columns=True, overlap_down=True),
    ),
    # one kernel: phase 1, a grid barrier on a GMEM semaphore, the down projection in K splits
    ("fused-1b-8", 8, 2048, 8192, False, True, MlpConfig(stages=4, fused_columns=True)),
    ("fused-8b-16", 16, 4096, 14336, False, True, MlpConfig(stages=2, out_buffers=1, fused_columns=True)),
    ("fused-odd-3", 3, 1024, 2816, False, False, MlpConfig(stages=3, fused_columns=True)),
]


@needs_mgpu_api
@pytest.mark.parametrize(
    "name,tokens,hidden,inter,det,residual,cfg", LOWER_CASES, ids=[c[0] for c in LOWER_CASES]
)
def test_lowers_for_cuda(name, tokens, hidden, inter, det, residual, cfg):
    from jax import export

    s = jax.ShapeDtypeStruct

    def f(x, wgu, wd, r):
        return mosaic_mlp.gated_mlp_mgpu(
            x, wgu, wd, residual=r if residual else None, deterministic=det, config=cfg, num_sms=132
        )

    args = (
        s((tokens, hidden), jnp.bfloat16),
        s((hidden, 2 * inter), jnp.bfloat16),
        s((inter, hidden), jnp.bfloat16),
        s((tokens, hidden), jnp.bfloat16),
    )
    exp = export.export(jax.jit(f), platforms=["cuda"])(*args)
    assert exp.out_avals[0].shape == (tokens, hidden)
    assert "mosaic_gpu" in exp.mlir_module()


def test_default_configs_fit_shared_memory():
    for hidden in (1024, 2048, 3072, 4096):
        for tokens in (1, 8, 16):
            cfg = mosaic_mlp.default_config(hidden, tokens)
            rows = common.token_rows(tokens)
            assert cfg is not None and mosaic_mlp.smem_bytes(cfg, hidden, rows) <= mosaic_mlp.SMEM_BUDGET
    assert mosaic_mlp.smem_bytes(MlpConfig(stages=6, out_buffers=2), 4096, 16) > mosaic_mlp.SMEM_BUDGET


@pytest.mark.parametrize(
    "tokens,hidden,inter,dtype,act,why",
    [
        (8, 2048, 8192, jnp.float32, "silu", "dtype"),
        (17, 2048, 8192, jnp.bfloat16, "silu", "tokens"),
        (8, 576, 1536, jnp.bfloat16, "silu", "hidden size 576"),  # SmolLM2-135M: XLA's path
        (8, 2048, 8200, jnp.bfloat16, "silu", "intermediate size"),
        (8, 2048, 8192, jnp.bfloat16, "relu", "activation"),
    ],
)
def test_kernel_refuses_what_it_cannot_run(tokens, hidden, inter, dtype, act, why):
    if mosaic_mlp.plgpu is None:
        pytest.skip("jax has no Mosaic GPU")
    assert why in mosaic_mlp.supports(tokens, hidden, inter, dtype, act)
    assert mosaic_mlp.supports(8, 2048, 8192, jnp.bfloat16, "silu") is None


def test_gated_mlp_passes_the_two_kernel_form_to_the_kernel(monkeypatch):
    seen = {}

    def fake(x, wgu, wd, *, act, residual, deterministic, config):
        seen.update(config=config, deterministic=deterministic)
        return x

    monkeypatch.setattr(mosaic_mlp, "gated_mlp_mgpu", fake)
    x, wgu, wd, res = _inputs(2, 8, 2048, 8192)
    gated_mlp(x, wgu, wd, residual=res, backend="mosaic", down_by_columns=True)
    assert seen["config"].down_by_columns and not seen["deterministic"]
    gated_mlp(x, wgu, wd, residual=res, backend="mosaic", deterministic=True)
    assert seen["config"] is None and seen["deterministic"]
    gated_mlp(x, wgu, wd, residual=res, backend="mosaic", down_by_columns=True, overlap_down=True)
    assert seen["config"].down_by_columns and seen["config"].overlap_down
    gated_mlp(x, wgu, wd, residual=res, backend="mosaic", down_by_columns=True, one_kernel=True)
    assert seen["config"].fused_columns and not seen["config"].down_by_columns
    with pytest.raises(ValueError, match="overlap_down"):
        gated_mlp(x, wgu, wd, residual=res, backend="mosaic", overlap_down=True)


def test_copy_only_mode_is_validated():
    with pytest.raises(ValueError, match="copy_only"):
        MlpConfig(copy_only="pages")
    with pytest.raises(ValueError, match="down_by_columns"):
        MlpConfig(copy_only="all", down_by_columns=True)
    with pytest.raises(ValueError, match="overlap_down"):
        MlpConfig(overlap_down=True)
    for other in (dict(down_by_columns=True), dict(copy_only="all"), dict(pdl=True)):
        with pytest.raises(ValueError, match="fused_columns"):
            MlpConfig(fused_columns=True, **other)


@needs_mgpu_api
def test_one_kernel_form_needs_a_gpu_and_the_columns_flag():
    """The one-kernel form's barrier is a GMEM semaphore, which the interpreter does not have; gated_mlp
    takes it only together with down_by_columns and not with overlap_down."""
    x, wgu, wd, res = _inputs(4, 4, 256, 256)
    with pytest.raises(ValueError, match="needs a GPU"):
        mosaic_mlp.gated_mlp_mgpu(
            x, wgu, wd, residual=res, deterministic=True, config=MlpConfig(fused_columns=True), interpret=True
        )
    with pytest.raises(ValueError, match="one_kernel"):
        gated_mlp(x, wgu, wd, residual=res, one_kernel=True)
    with pytest.raises(ValueError, match="two different forms"):
        gated_mlp(x, wgu, wd, residual=res, down_by_columns=True, overlap_down=True, one_kernel=True)


@needs_mgpu_api
def test_down_by_columns_refuses_an_intermediate_the_down_kernel_cannot_take():
    x, wgu, wd, res = _inputs(1, 4, 256, 192)  # 192 intermediate columns: 3 items, not a multiple of 256
    with pytest.raises(ValueError, match="down_by_columns.*K = 192"):
        mosaic_mlp.gated_mlp_mgpu(x, wgu, wd, residual=res, config=MlpConfig(down_by_columns=True))


def test_gated_mlp_reference_backend_is_the_models_xla_path():
    x, wgu, wd, res = _inputs(3, 5, 64, 96)
    got = gated_mlp(x, wgu, wd, act="silu", residual=res, backend="reference")
    gate, up = jnp.split(x @ wgu, 2, axis=-1)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(res + (jax.nn.silu(gate) * up) @ wd))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(gated_mlp_reference(x, wgu, wd, residual=res)))
    assert _rel_err(got, _oracle(x, wgu, wd, "silu", res)) < 3e-2
    # "auto" off a Hopper GPU is the reference
    if not mosaic_gpu.hopper_available():
        np.testing.assert_array_equal(np.asarray(gated_mlp(x, wgu, wd, residual=res)), np.asarray(got))


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(backend="triton"), "backend"),
        (dict(act="relu"), "act"),
        (dict(x=jnp.zeros((2, 3, 64), jnp.bfloat16)), "x"),
        (dict(w_gate_up=jnp.zeros((64, 191), jnp.bfloat16)), "w_gate_up"),
        (dict(w_down=jnp.zeros((96, 32), jnp.bfloat16)), "w_down"),
        (dict(residual=jnp.zeros((4, 64), jnp.bfloat16)), "residual"),
        (dict(w_down=jnp.zeros((96, 64), jnp.float32)), "dtype"),
    ],
)
def test_gated_mlp_rejects_bad_input_naming_the_field(kwargs, field):
    x, wgu, wd, res = _inputs(4, 5, 64, 96)
    args = dict(x=x, w_gate_up=wgu, w_down=wd, residual=res) | kwargs
    with pytest.raises(ValueError, match=field):
        gated_mlp(**args)


@pytest.mark.skipif(mosaic_gpu.hopper_available(), reason="checks the refusal off Hopper")
def test_mosaic_backend_off_its_shapes_is_a_clear_error():
    x, wgu, wd, res = _inputs(4, 5, 64, 96)
    with pytest.raises(ValueError, match="hidden size 64"):
        gated_mlp(x, wgu, wd, residual=res, backend="mosaic")


@needs_interpreter
def test_model_layer_hands_the_kernel_its_weights_and_residual(monkeypatch):
    """With the kernel switched on (JAXRT_FUSED_MLP=1, the hardware check forced), a Llama decoder layer's
    MLP goes through the kernel (interpreted here) and gives the XLA path's result within bf16 rounding."""
    from flax import nnx

    from jaxrt.config import ModelConfig
    from jaxrt.models import layers

    cfg = ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=64,
        hidden_size=256,
        intermediate_size=128,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
        head_dim=64,
        max_position_embeddings=128,
    )
    mlp = layers.GatedMLP(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    x, _, _, res = _inputs(9, 8, 256, 128)
    want = mlp(x, residual=res)  # XLA's path (the flag is off by default)
    calls = []

    def interpreted(x, wgu, wd, *, act, residual, backend, deterministic, down_by_columns, overlap_down):
        calls.append(
            (wgu.shape, wd.shape, act, residual is not None, backend, deterministic, down_by_columns)
        )
        assert overlap_down == (os.environ["JAXRT_FUSED_MLP"] == "columns-pdl")
        return mosaic_mlp.gated_mlp_mgpu(
            x, wgu, wd, act=act, residual=residual, deterministic=True, num_sms=2, interpret=True
        )

    monkeypatch.setenv("JAXRT_FUSED_MLP", "1")
    monkeypatch.setattr(layers, "mlp_kernel_applies", lambda *a, **k: True)
    monkeypatch.setattr(layers, "gated_mlp", interpreted)
    got = mlp(x, residual=res)
    assert calls == [((256, 256), (128, 256), "silu", True, "mosaic", False, False)]
    monkeypatch.setenv("JAXRT_FUSED_MLP", "deterministic")
    mlp(x, residual=res)
    assert calls[-1][-2:] == (True, False)
    for mode in ("columns", "columns-pdl"):
        monkeypatch.setenv("JAXRT_FUSED_MLP", mode)
        mlp(x, residual=res)
        assert calls[-1][-2:] == (False, True)
    for bad in ("yes", "columns-fused"):  # the one-kernel form is not offered to models (MlpConfig)
        monkeypatch.setenv("JAXRT_FUSED_MLP", bad)
        with pytest.raises(ValueError, match="JAXRT_FUSED_MLP"):
            mlp(x, residual=res)
    assert _rel_err(got, _f64(want)) < 2e-2


@on_hopper
@pytest.mark.parametrize("det", [False, True])
@pytest.mark.parametrize("tokens,hidden,inter", [(1, 2048, 8192), (8, 2048, 8192), (16, 4096, 14336)])
def test_matches_oracle_on_hopper(tokens, hidden, inter, det):
    x, wgu, wd, res = _inputs(tokens, tokens, hidden, inter)
    got = jax.jit(lambda *a: mosaic_mlp.gated_mlp_mgpu(*a[:3], residual=a[3], deterministic=det))(
        x, wgu, wd, res
    )
    assert _rel_err(got, _oracle(x, wgu, wd, "silu", res)) < 1e-2


@on_hopper
@pytest.mark.parametrize("form", ["columns", "fused"])
@pytest.mark.parametrize(
    "tokens,hidden,inter", [(1, 2048, 8192), (8, 2048, 8192), (16, 4096, 14336), (3, 1024, 2816)]
)
def test_column_forms_match_oracle_and_repeat_on_hopper(tokens, hidden, inter, form):
    """The two-kernel form (its down kernel in K splits) and the one-kernel form (a grid barrier between the
    phases): against the oracle, and bitwise the same on every run."""
    x, wgu, wd, res = _inputs(tokens, tokens, hidden, inter)
    base = mosaic_mlp.default_config(hidden, tokens)
    cfg = dataclasses.replace(
        base, **({"fused_columns": True} if form == "fused" else {"down_by_columns": True})
    )
    f = jax.jit(lambda *a: mosaic_mlp.gated_mlp_mgpu(*a[:3], residual=a[3], config=cfg))
    outs = [np.asarray(f(x, wgu, wd, res).astype(jnp.float32)) for _ in range(5)]
    assert _rel_err(outs[0], _oracle(x, wgu, wd, "silu", res)) < 1e-2
    assert all(np.array_equal(o, outs[0]) for o in outs[1:])
