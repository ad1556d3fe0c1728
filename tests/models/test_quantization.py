"""FP8 quantization (``quantization="fp8"``): the quantizer's error bound, the fp8 product against a float64
reference of the same math, and the quantized model against transformers running the same fp8 weights."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from jaxrt_testing import assert_no_leak, chunked_prefill_logits, hf_model

import jaxrt
from jaxrt.config import validate_quantization
from jaxrt.converters.checkpoint import state_to_flat
from jaxrt.converters.loader import build_native_model, load_hf_config, native_model_config
from jaxrt.models.quantization import (
    FP8_MAX,
    MIN_FP8_GEMM_ROWS,
    Fp8Linear,
    dequantize,
    fp8_linear,
    quantize_rows,
)
from jaxrt.step import nnx_forward

E4M3_MIN_SUBNORMAL = 2.0**-9  # float8_e4m3fn's spacing below its smallest normal (2^-6)


def test_quantize_rows_error_bound():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 96)).astype(np.float32) * np.array([1e-3, 0.1, 1, 30, 1e4, 0])[:, None]
    x[2, 5] = 0.0  # exact zeros stay zeros
    xq, scale = quantize_rows(jnp.asarray(x))
    assert xq.dtype == jnp.float8_e4m3fn and scale.shape == (6,)
    back = np.asarray(dequantize(xq, scale))
    assert np.all(np.isfinite(back)) and np.all(back[5] == 0)  # an all-zero row: zeros, not NaN
    assert back[2, 5] == 0.0
    s = np.asarray(scale)[:, None]
    # e4m3 has 3 mantissa bits: round to nearest is within 2^-4 of a normal value, within half the
    # subnormal spacing below 2^-6 (in units of the row's scale).
    bound = np.maximum(np.abs(x) * 2.0**-4, s * E4M3_MIN_SUBNORMAL / 2) * (1 + 1e-6)
    assert np.all(np.abs(back - x) <= bound)
    # each non-zero row's largest magnitude maps to e4m3's largest value
    top = np.abs(np.asarray(xq.astype(jnp.float32)))[:5].max(axis=1)
    np.testing.assert_array_equal(top, FP8_MAX)


@pytest.mark.parametrize("rows", [1, MIN_FP8_GEMM_ROWS + 1, 40])
@pytest.mark.parametrize("bias", [False, True])
def test_fp8_linear_matches_float64_reference(bias, rows, monkeypatch):
    """Above JAXRT_FP8_WEIGHT_ONLY_ROWS (16 here) rows both operands are fp8; up to it only the weight is."""
    monkeypatch.setenv("JAXRT_FP8_WEIGHT_ONLY_ROWS", "16")
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((rows, 64)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((48, 64)) * 0.05, jnp.float32)  # [out, in]
    b = jnp.asarray(rng.standard_normal(48), jnp.float32) if bias else None
    lin = Fp8Linear.from_weight(w, b)
    assert lin.weight[...].dtype == jnp.float8_e4m3fn and lin.weight_scale[...].shape == (48,)
    got = np.asarray(lin(x), np.float64)
    x_used = np.asarray(x, np.float64)
    if rows > 16:
        x_used = np.asarray(dequantize(*quantize_rows(x)), np.float64)
    want = x_used @ np.asarray(dequantize(lin.weight[...], lin.weight_scale[...]), np.float64).T
    if bias:
        want += np.asarray(b, np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # and the quantized product is close to the exact one: a few percent of its scale
    exact = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T + (np.asarray(b) if bias else 0)
    assert np.abs(got - exact).max() < 0.1 * np.abs(exact).max()
    # bf16 activations give bf16 outputs: the float64 reference of the bf16-rounded rows, within bf16 rounding
    x16 = x.astype(jnp.bfloat16)
    got16 = fp8_linear(x16, lin.weight[...], lin.weight_scale[...])
    assert got16.dtype == jnp.bfloat16
    x16_used = np.asarray(x16.astype(jnp.float32), np.float64)
    if rows > 16:
        x16_used = np.asarray(dequantize(*quantize_rows(x16)), np.float64)
    want16 = x16_used @ np.asarray(dequantize(lin.weight[...], lin.weight_scale[...]), np.float64).T
    np.testing.assert_allclose(
        np.asarray(got16, np.float64), want16, rtol=2**-7, atol=2**-7 * np.abs(want16).max()
    )


def test_validate_quantization_names_the_field():
    assert validate_quantization(None) is None and validate_quantization("fp8") == "fp8"
    with pytest.raises(ValueError, match="quantization"):
        validate_quantization("int4")


def _hf_with_fp8_weights(path: str):
    """transformers' model with each decoder projection replaced by its fp8 dequantization: what the
    quantized jaxrt model multiplies by (its activations are quantized on top)."""
    import torch

    model = hf_model(path)
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    with torch.no_grad():
        for name, mod in model.named_modules():
            if name.rsplit(".", 1)[-1] in names:
                wq, s = quantize_rows(jnp.asarray(mod.weight.numpy()))
                mod.weight.copy_(torch.from_numpy(np.array(dequantize(wq, s))))
    return model


def _native_logits(path: str, prompts_ids: list[list[int]], quantization: str | None) -> np.ndarray:
    cfg = native_model_config(load_hf_config(path))
    graphdef, state = build_native_model(cfg, path, "float32", "reference", quantization=quantization)
    return chunked_prefill_logits(nnx_forward(graphdef), state, cfg, prompts_ids, 4, 2, 256, 8)


def _all_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


TEXT = (
    "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is Rome. "
    "Water boils at one hundred degrees Celsius at sea level, and it freezes at zero degrees."
)


@pytest.mark.parametrize("weight_only_rows", ["0", "256"])
def test_fp8_default_model_matches_transformers_with_the_same_weights(
    default_model_dir, weight_only_rows, monkeypatch
):
    """SmolLM2-135M quantized: last-token logits of each prompt against transformers running the same fp8
    weights (the only difference left is the per-token activation quantization), and against the unquantized
    model (what quantizing costs). With JAXRT_FP8_WEIGHT_ONLY_ROWS=0 every product of the 8-row and larger
    buckets quantizes its activations; with 256 (the batch here is 256 rows) every product is weight-only."""
    from transformers import AutoTokenizer

    monkeypatch.setenv("JAXRT_FP8_WEIGHT_ONLY_ROWS", weight_only_rows)

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    words = TEXT.split()
    prompts = [tok.encode(" ".join(words[:n])) for n in (5, 12, 19, 30)]
    ours = _native_logits(default_model_dir, prompts, "fp8")
    same_weights = _hf_with_fp8_weights(default_model_dir)
    plain = hf_model(default_model_dir)
    for i, ids in enumerate(prompts):
        ref = _all_logits(same_weights, ids)[-1]
        full = _all_logits(plain, ids)[-1]
        # Measured on this model: the activations' quantization moves the logits by 3.5-8.7% of their
        # largest magnitude, as much as the weights' does (4.6-9.6%); cosine to the unquantized >= 0.992.
        err = np.abs(ours[i] - ref).max() / np.abs(ref).max()
        assert err < 0.15, (i, err)
        assert err < np.abs(ref - full).max() / np.abs(full).max() + 0.03
        assert ours[i] @ full / np.linalg.norm(ours[i]) / np.linalg.norm(full) > 0.99
        assert ours[i].argmax() == ref.argmax() == full.argmax()


def test_fp8_engine_greedy_and_prompt_logprobs(default_model_dir):
    """The whole engine quantized (scheduler, paged KV, chunked prefill): the prompt's next-token argmax
    agrees with transformers' unquantized model almost everywhere (near ties may flip: a code prompt's first
    token does), a clear prompt's greedy continuation starts as the unquantized engine's, bad requests are
    refused, and no page leaks."""
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    ids = tok.encode(TEXT)
    with torch.no_grad():
        ref_top = hf_model(default_model_dir)(torch.tensor([ids])).logits[0].argmax(-1).numpy()
    greedy = {"max_new_tokens": 8, "temperature": 0}
    with jaxrt.Engine(
        model_path=default_model_dir, quantization="fp8", chunked_prefill_size=32, max_running_requests=4
    ) as llm:
        assert llm.get_server_info()["quantization"] == "fp8"
        # programs of 8-32 rows are the weight-only ones (compiled with XLA's Triton GEMM fusions on GPUs)
        wo = llm.runner._weight_only_gemms
        assert wo(("forward", 8)) and wo(("decode_loop", 32, None)) and wo(("forward", 16, "logprobs"))
        assert not wo(("forward", 1)) and not wo(("forward", 64)) and not wo(("sample", 8, 0, None))
        out = llm.generate(
            input_ids=ids,
            sampling_params={"max_new_tokens": 1, "temperature": 0},
            return_logprob=True,
            top_logprobs_num=1,
            logprob_start_len=0,
        )
        top = [t[0][1] for t in out["meta_info"]["input_top_logprobs"][1:]]  # the prediction after each token
        agree = np.mean(np.asarray(top) == ref_top[: len(top)])
        assert agree >= 0.9, agree
        quantized = llm.generate(["The capital of France is"], greedy)
        with pytest.raises(ValueError, match="max_new_tokens"):
            llm.generate("x", {"max_new_tokens": -1})
        assert_no_leak(llm)
    with jaxrt.Engine(model_path=default_model_dir, chunked_prefill_size=32, max_running_requests=4) as llm:
        plain = llm.generate(["The capital of France is"], greedy)
        assert not llm.runner._weight_only_gemms(("forward", 8))
    for q, p in zip(quantized, plain, strict=True):
        assert q["output_ids"][:3] == p["output_ids"][:3], (q["text"], p["text"])


def test_fp8_argument_errors(tiny_llama_dir):
    with pytest.raises(ValueError, match="quantization"):
        jaxrt.Engine(model_path=tiny_llama_dir, quantization="int4")
    with pytest.raises(ValueError, match="quantization"):  # in this process, before any replica starts
        jaxrt.Engine(model_path=tiny_llama_dir, quantization="int4", dp_size=2)
    with pytest.raises(ValueError, match="quantization.*native"):
        jaxrt.Engine(model_path=tiny_llama_dir, impl="transformers", quantization="fp8")


def test_quantized_params_are_fp8(tiny_llama_dir):
    cfg = native_model_config(load_hf_config(tiny_llama_dir))
    _, state = build_native_model(cfg, tiny_llama_dir, "float32", "reference", quantization="fp8")
    dtypes = {name: a.dtype for name, a in state_to_flat(state).items()}
    proj = [k for k in dtypes if k.endswith("proj.weight")]
    assert len(proj) == 4 * cfg.num_layers
    assert all(dtypes[k] == jnp.float8_e4m3fn for k in proj)
    assert all(dtypes[k.replace(".weight", ".weight_scale")] == jnp.float32 for k in proj)
    assert all(v == jnp.float32 for k, v in dtypes.items() if "proj" not in k)


def test_fp8_on_the_gpu_kernel_path(tmp_path, monkeypatch):
    """On pallas_gpu (interpret mode here) a quantized model keeps the kernels that read no weights (attention,
    the add + norm kernel) and steps around those that read bf16 weights (the one-token norm + q/k/v kernel,
    the norm + gate/up kernel): greedy tokens equal the quantized model's on the reference path, including a
    lone stream's 1-token program."""
    from jaxrt_testing import make_tiny_llama, record_buckets

    from jaxrt.kernels import add_norm, decode_mlp, decode_qkv

    traced = []
    for module, name in (
        (decode_qkv, "norm_qkv_rope_write_gpu"),
        (decode_mlp, "norm_gate_up_gpu"),
        (add_norm, "add_rms_norm_gpu"),
    ):
        kernel = getattr(module, name)
        monkeypatch.setattr(
            module, name, lambda *a, _k=kernel, _n=name, **k: traced.append(_n) or _k(*a, **k)
        )
    monkeypatch.setenv("JAXRT_ATTENTION_INTERPRET", "1")
    monkeypatch.setenv("JAXRT_FUSED_GATE_UP", "1")
    path = make_tiny_llama(tmp_path / "m", None, vocab_size=512)
    kwargs = dict(
        quantization="fp8",
        skip_tokenizer_init=True,
        dtype="float32",
        chunked_prefill_size=16,
        max_running_requests=4,
        context_length=128,
        num_pages=64,
        single_token_bucket=True,
    )
    rng = np.random.default_rng(0)
    ids = [rng.integers(3, 500, n).tolist() for n in (5, 19, 11)]
    params = {"temperature": 0, "max_new_tokens": 10, "min_new_tokens": 10}
    outs = {}
    for backend in ("reference", "pallas_gpu"):
        with jaxrt.Engine(model_path=path, attention_backend=backend, **kwargs) as llm:
            picked = record_buckets(llm)
            batch = llm.generate(input_ids=ids, sampling_params=params)
            alone = llm.generate(input_ids=ids[1], sampling_params=params)
            outs[backend] = [o["output_ids"] for o in batch] + [alone["output_ids"]]
            assert picked.count(1) >= 9, picked  # the lone stream's decodes: the 1-token program
            assert_no_leak(llm)
    assert outs["pallas_gpu"] == outs["reference"]
    assert "add_rms_norm_gpu" in traced
    assert "norm_qkv_rope_write_gpu" not in traced and "norm_gate_up_gpu" not in traced


# ------------------------------------------------------------------------------------ fp8 checkpoints

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CT_CONFIG = {  # compressed-tensors' FP8_DYNAMIC scheme: float8 weights per channel, activations per token
    "quant_method": "compressed-tensors",
    "format": "float-quantized",
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True},
            "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True},
        }
    },
    "ignore": ["lm_head"],
}


def _write_fp8_checkpoint(src: str, dst, scheme: str) -> dict:
    """``src``'s tiny Llama saved as an fp8 checkpoint: each projection weight in float8_e4m3fn with
    ``weight_scale_inv`` per 32 x 32 block (transformers' "fp8", scheme "block") or ``weight_scale`` per
    output channel (compressed-tensors, "channel"). Returns the dequantized weights by name (numpy f32)."""
    import json
    import shutil
    from pathlib import Path

    import torch
    from safetensors.torch import load_file, save_file

    dst = Path(dst)
    dst.mkdir()
    state = load_file(str(Path(src) / "model.safetensors"))
    out, deq = {}, {}
    for name, t in state.items():
        if name.rsplit(".", 2)[-2] not in PROJ:
            out[name] = t
            continue
        w = t.float()
        if scheme == "block":
            o, i = w.shape
            blocks = w.reshape(o // 32, 32, i // 32, 32).abs().amax(dim=(1, 3))
            scale = blocks / 448.0
            full = scale.repeat_interleave(32, 0).repeat_interleave(32, 1)
            out[name.replace(".weight", ".weight_scale_inv")] = scale
        else:
            scale = w.abs().amax(dim=1, keepdim=True) / 448.0
            full = scale
            out[name.replace(".weight", ".weight_scale")] = scale
        q = (w / full).to(torch.float8_e4m3fn)
        out[name] = q
        deq[name] = (q.float() * full).numpy()
    save_file(out, str(dst / "model.safetensors"))
    cfg = json.loads((Path(src) / "config.json").read_text())
    if scheme == "block":
        cfg["quantization_config"] = {
            "quant_method": "fp8",
            "activation_scheme": "dynamic",
            "weight_block_size": [32, 32],
        }
    else:
        cfg["quantization_config"] = CT_CONFIG
    (dst / "config.json").write_text(json.dumps(cfg))
    for f in Path(src).iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            shutil.copy(f, dst / f.name)
    return deq


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory):
    from jaxrt_testing import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("src"), None, vocab_size=512)


@pytest.mark.parametrize("scheme", ["block", "channel"])
def test_fp8_checkpoint_matches_transformers_on_its_dequantized_weights(tiny_src, tmp_path, scheme):
    """A checkpoint stored in fp8 (transformers' block-scaled format, compressed-tensors' per-channel one)
    loads as the weights it stands for: logits equal transformers' on those weights; an Engine serves it in
    fp8 (as vLLM does) without being asked."""
    import torch

    deq = _write_fp8_checkpoint(tiny_src, tmp_path / "fp8", scheme)
    path = str(tmp_path / "fp8")
    cfg = native_model_config(load_hf_config(path))
    assert cfg.checkpoint_quantization == "fp8"
    assert cfg.checkpoint_block_size == ((32, 32) if scheme == "block" else None)
    ref = hf_model(tiny_src)
    with torch.no_grad():
        for name, w in deq.items():
            ref.get_parameter(name).copy_(torch.from_numpy(w))
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 500, n).tolist() for n in (4, 13, 30)]
    graphdef, state = build_native_model(cfg, path, "float32", "reference")
    ours = chunked_prefill_logits(nnx_forward(graphdef), state, cfg, prompts, 4, 2, 64, 8)
    for i, ids in enumerate(prompts):
        np.testing.assert_allclose(ours[i], _all_logits(ref, ids)[-1], atol=2e-4, rtol=1e-4)
    with jaxrt.Engine(model_path=path, skip_tokenizer_init=True, chunked_prefill_size=32) as llm:
        assert llm.get_server_info()["quantization"] == "fp8"
        out = llm.generate(input_ids=prompts[1], sampling_params={"max_new_tokens": 4, "temperature": 0})
        assert len(out["output_ids"]) == 4
        assert_no_leak(llm)


def test_fp8_checkpoint_errors(tiny_src, tmp_path):
    """A quantization method jaxrt does not read, and an fp8 weight without its scale, are errors naming
    them."""
    import json

    from safetensors.torch import load_file, save_file

    _write_fp8_checkpoint(tiny_src, tmp_path / "gptq", "channel")
    cfg_file = tmp_path / "gptq" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="quant_method 'gptq'"):
        jaxrt.Engine(model_path=str(tmp_path / "gptq"), skip_tokenizer_init=True)

    _write_fp8_checkpoint(tiny_src, tmp_path / "noscale", "channel")
    st = tmp_path / "noscale" / "model.safetensors"
    tensors = load_file(str(st))
    del tensors["model.layers.1.mlp.down_proj.weight_scale"]
    save_file(tensors, str(st))
    with pytest.raises(ValueError, match="model.layers.1.mlp.down_proj"):
        jaxrt.Engine(model_path=str(tmp_path / "noscale"), skip_tokenizer_init=True)
