"""Loading: registry errors, weight-map errors, Orbax converted checkpoints (jaxrt convert and the automatic
cache), GGUF checkpoints."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from models_testing import (
    FAMILIES,
    TINY,
    assert_logits_close,
    engine_greedy,
    hf_all_logits,
    hf_greedy,
    load_native,
    make_checkpoint,
    native_chunk_logits,
    prompts_for,
)

from jaxrt.converters import checkpoint, loader
from jaxrt.converters.loader import build_native_model, load_hf_config, native_model_config
from jaxrt.converters.weights import WeightLoadError
from jaxrt.models import MODEL_REGISTRY, get_model_class


@pytest.fixture(scope="module")
def phi3_ckpt(tmp_path_factory):
    """Phi-3: its fused qkv_proj / gate_up_proj exercise the split rules."""
    config_cls, overrides = FAMILIES["phi3"]
    return make_checkpoint(tmp_path_factory.mktemp("phi3"), config_cls, seed=21, **overrides)


def _params(state) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in checkpoint.state_to_flat(state).items()}


def _load(path, dtype="float32", **kw):
    cfg = native_model_config(load_hf_config(str(path)))
    return build_native_model(cfg, str(path), dtype, "reference", **kw)[1]


def test_registry_lists_supported_architectures_on_unknown():
    assert {
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "GemmaForCausalLM",
        "Gemma2ForCausalLM",
        "Gemma3ForCausalLM",
        "Phi3ForCausalLM",
        "Olmo2ForCausalLM",
        "GraniteForCausalLM",
    } <= set(MODEL_REGISTRY)
    with pytest.raises(ValueError, match="FalconForCausalLM") as e:
        get_model_class("FalconForCausalLM")
    for arch in MODEL_REGISTRY:
        assert arch in str(e.value)


def test_native_on_unknown_architecture_is_a_clear_error(phi3_ckpt):
    cfg = native_model_config(load_hf_config(phi3_ckpt[0])).replace(architecture="MambaForCausalLM")
    with pytest.raises(ValueError, match="no native jaxrt port.*Qwen3ForCausalLM"):
        build_native_model(cfg, phi3_ckpt[0], "float32", "reference")


def test_weight_errors_name_the_tensors(tmp_path, phi3_ckpt):
    from safetensors.numpy import load_file, save_file

    src = Path(phi3_ckpt[0])
    tensors = load_file(str(src / "model.safetensors"))
    del tensors["model.norm.weight"]
    tensors["model.layers.0.mlp.extra.weight"] = np.zeros((2, 2), np.float32)
    tensors["model.layers.1.self_attn.qkv_proj.weight"] = tensors["model.layers.1.self_attn.qkv_proj.weight"][
        :-1
    ]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    shutil.copy(src / "config.json", tmp_path / "config.json")
    with pytest.raises(WeightLoadError) as e:
        _load(tmp_path, use_cache=False)
    msg = str(e.value)
    assert "model/norm/weight" in msg  # missing
    assert "model.layers.0.mlp.extra.weight" in msg  # unexpected
    assert "model.layers.1.self_attn.qkv_proj.weight" in msg  # does not split into q, k, v


def test_convert_checkpoint_roundtrip_and_engine(tmp_path, phi3_ckpt):
    """jaxrt convert: same params as streaming the safetensors; bf16 conversion restores (cast) into f32;
    the converted directory serves through the engine with transformers' greedy tokens."""
    from jaxrt.cli import main as cli_main

    src, hf = phi3_ckpt
    direct = _params(_load(src, use_cache=False))

    dst = tmp_path / "converted"
    assert cli_main(["convert", src, str(dst)]) == 0
    assert checkpoint.is_converted(dst) and (dst / "config.json").exists()
    meta = json.loads((dst / checkpoint.META_FILE).read_text())
    assert meta["architecture"] == "Phi3ForCausalLM" and meta["dtype"] == "float32"
    restored = _params(_load(dst))
    assert loader.last_load_info["source"] == "converted"
    assert restored.keys() == direct.keys()
    for k in direct:
        np.testing.assert_array_equal(restored[k], direct[k], err_msg=k)

    bf16 = checkpoint.convert_checkpoint(src, tmp_path / "bf16", dtype="bfloat16")
    back = _params(_load(bf16, "float32"))
    assert back["model.embed_tokens.embedding"].dtype == np.float32
    np.testing.assert_allclose(back["model.norm.weight"], direct["model.norm.weight"], rtol=1e-2)

    with pytest.raises(ValueError, match="not empty"):
        checkpoint.convert_checkpoint(src, dst)

    prompts = prompts_for(21)[:3]
    first, _, _ = engine_greedy(str(dst), prompts, chunked_prefill_size=8)  # one token bucket: one compile
    assert first == hf_greedy(hf, prompts, 32)


def test_automatic_cache(tmp_path, phi3_ckpt, monkeypatch):
    monkeypatch.setenv("JAXRT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("JAXRT_CONVERTED_CACHE", "auto")
    src = tmp_path / "ckpt"
    shutil.copytree(phi3_ckpt[0], src)

    _load(src)  # auto: safetensors are not worth caching by default
    assert loader.last_load_info["source"] == "safetensors"
    assert not (tmp_path / "cache" / "converted").exists()
    monkeypatch.setattr(checkpoint, "AUTO_CACHE_MIN_BYTES", 1 << 40)
    _load(src)  # below the size policy
    assert not (tmp_path / "cache" / "converted").exists()

    monkeypatch.setattr(checkpoint, "AUTO_CACHE_MIN_BYTES", 0)
    first = _params(_load(src))
    assert loader.last_load_info["source"] == "safetensors"
    entries = list((tmp_path / "cache" / "converted").iterdir())
    assert len(entries) == 1 and checkpoint.is_converted(entries[0])

    second = _params(_load(src))
    assert loader.last_load_info["source"] == "cache"
    for k in first:
        np.testing.assert_array_equal(second[k], first[k])

    monkeypatch.setattr(checkpoint, "AUTO_CACHE_MIN_BYTES", None)
    monkeypatch.setenv("JAXRT_CONVERTED_CACHE", "1")  # every checkpoint
    _load(src, "bfloat16")  # another dtype is another entry
    assert loader.last_load_info["source"] == "safetensors"
    assert len(list((tmp_path / "cache" / "converted").iterdir())) == 2

    # The checkpoint changes: its entries no longer match, are not used, and are dropped on the next write.
    st = src / "model.safetensors"
    os.utime(st, ns=(st.stat().st_atime_ns, st.stat().st_mtime_ns + 10**9))
    _load(src)
    assert loader.last_load_info["source"] == "safetensors"
    assert len(list((tmp_path / "cache" / "converted").iterdir())) == 1

    monkeypatch.setenv("JAXRT_CONVERTED_CACHE", "0")
    _load(src)
    assert loader.last_load_info["source"] == "safetensors"


# ------------------------------------------------------------------------------------------------- GGUF


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf q/k permutation (transformers undoes it when reading)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(hf_model, path: Path, quantize: bool = True) -> None:
    """A Llama GGUF file written the way llama.cpp's converter does; 2-D weights as Q8_0."""
    import gguf

    cfg = hf_model.config
    sd = {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)

    def add(name: str, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr, np.float32)
        if quantize and arr.ndim == 2:
            q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, arr)

    add("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        add(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        add(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads))
        add(f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads))
        add(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        add(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        add(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        add(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        add(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        add(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    add("output_norm.weight", sd["model.norm.weight"])
    add("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("gguf")
    _, hf = make_checkpoint(base / "hf", "LlamaConfig", seed=22)
    d = base / "gguf"
    d.mkdir()
    write_llama_gguf(hf, d / "tiny-llama.Q8_0.gguf")
    return str(d)


def test_gguf_loads_like_safetensors(gguf_dir, tmp_path, monkeypatch):
    """A directory with one .gguf file: config and weights (dequantized tensor by tensor) read natively, logits
    equal to transformers' own GGUF loading; jaxrt convert turns it into a servable directory."""
    import torch
    from transformers import AutoModelForCausalLM

    hf_config = load_hf_config(gguf_dir)
    assert hf_config.architectures == ["LlamaForCausalLM"]  # what the engine's impl="auto" looks at
    cfg = native_model_config(hf_config)
    assert cfg.vocab_size == TINY["vocab_size"] and cfg.num_kv_heads == TINY["num_key_value_heads"]
    name = next(Path(gguf_dir).glob("*.gguf")).name
    hf = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    prompts = prompts_for(22)
    native = load_native(gguf_dir)
    assert loader.last_load_info["source"] == "gguf"
    for (i, pos), ours in native_chunk_logits(native, prompts, 1).items():
        assert_logits_close(ours, hf_all_logits(hf, prompts[i])[pos], f"prompt {i}")

    # GGUF loads are cached by default (dequantizing is the slow part).
    monkeypatch.setenv("JAXRT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("JAXRT_CONVERTED_CACHE", "auto")
    _load(gguf_dir)
    assert loader.last_load_info["source"] == "gguf"
    cached = _params(_load(gguf_dir))
    assert loader.last_load_info["source"] == "cache"
    np.testing.assert_array_equal(
        cached["lm_head.kernel"], np.asarray(native.state["lm_head"]["kernel"][...])
    )

    dst = checkpoint.convert_checkpoint(gguf_dir, tmp_path / "from-gguf")
    assert json.loads((dst / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert native_model_config(load_hf_config(str(dst))).num_layers == cfg.num_layers
    jax.block_until_ready(jax.tree.leaves(_load(dst)))


@pytest.mark.slow
def test_default_model_gguf_matches_transformers_gguf(tmp_path):
    """The default model's real Q4_1 GGUF file, read natively, against transformers' GGUF loading."""
    import torch
    from transformers import AutoModelForCausalLM

    from jaxrt.default_model import gguf_path

    src = gguf_path()
    (tmp_path / src.name).symlink_to(src)
    hf = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=src.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    native = load_native(str(tmp_path))
    prompts = [[1, 504, 3458, 282, 4649, 314], [1, 9519, 2248, 253, 655, 28, 665, 436, 253, 1345]]
    for (i, pos), ours in native_chunk_logits(native, prompts, 1, num_tokens=32).items():
        ref = hf_all_logits(hf, prompts[i])[pos]
        assert_logits_close(ours, ref, f"prompt {i}")
        assert ours.argmax() == ref.argmax()
