"""Every native family against transformers on a tiny random checkpoint with its features switched on.

(1) logits parity (f32) through paged KV, prefill in one chunk and in three chunks;
(2) greedy tokens through the whole engine (batched prompts, chunked prefill, paged KV, radix cache) identical
to transformers' ``generate`` for 32 tokens, and identical again when the prompts come back from the cache.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
from models_testing import (
    FAMILIES,
    assert_logits_close,
    engine_greedy,
    hf_all_logits,
    hf_greedy,
    load_native,
    make_checkpoint,
    native_chunk_logits,
    prompts_for,
)

from jaxrt.converters.loader import has_native, load_hf_config, native_model_config

WINDOWED = ("mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    name = request.param
    config_cls, overrides = FAMILIES[name]
    seed = sorted(FAMILIES).index(name)
    path, hf = make_checkpoint(tmp_path_factory.mktemp(name), config_cls, seed=seed, **overrides)
    prompts = prompts_for(seed)
    return {
        "name": name,
        "path": path,
        "hf": hf,
        "prompts": prompts,
        "ref": [hf_all_logits(hf, p) for p in prompts],
        "native": load_native(path),
    }


def test_config_and_registry(family):
    cfg = native_model_config(load_hf_config(family["path"]))
    assert has_native(cfg.architecture)
    name = family["name"]
    if name in ("mistral", "phi3"):
        assert cfg.sliding_window and not cfg.layer_types  # every layer
    if name in ("qwen2", "qwen3", "gemma2", "gemma3"):
        assert cfg.sliding_window == 8 and "sliding_attention" in cfg.layer_types
        assert "full_attention" in cfg.layer_types
    if name == "gemma2":
        assert cfg.attn_logit_softcap == 3.0 and cfg.final_logit_softcap == 12.0
    if name == "gemma3":
        assert cfg.attn_logit_softcap is None and cfg.local_rope.theta == 10000.0
        assert cfg.rope.rope_type == "linear" and cfg.rope.theta == 100000.0
    if name == "phi3":
        assert cfg.rope.rope_type == "longrope" and cfg.rope.original_max_position_embeddings == 128
        assert cfg.rope.partial_rotary_factor == 0.5
    if name == "llama":
        assert cfg.rope.rope_type == "llama3"


@pytest.mark.parametrize("chunks", [1, 3])
def test_logits_match_transformers(family, chunks):
    got = native_chunk_logits(family["native"], family["prompts"], chunks)
    assert len(got) == sum(min(chunks, len(p)) for p in family["prompts"])
    for (i, pos), ours in got.items():
        assert_logits_close(ours, family["ref"][i][pos], f"{family['name']} prompt {i} position {pos}")


# q/k RMSNorm before rope (per head, (1 + w) per head, all heads), and partial rotary (phi3's test config)
FUSED_VARIANTS = ("gemma3", "olmo2", "qwen3", "phi3")


@pytest.mark.parametrize("name", FUSED_VARIANTS)
def test_families_through_the_gpu_kernels(name, tmp_path):
    """The q/k norms and partial rotary run inside the fused norm + rope + KV-write kernel on pallas_gpu
    (with the attention kernel, both in Pallas interpret mode): logits of a one-chunk prefill still match
    transformers'."""
    config_cls, overrides = FAMILIES[name]
    seed = sorted(FAMILIES).index(name)
    path, hf = make_checkpoint(tmp_path, config_cls, seed=seed, **overrides)
    prompts = prompts_for(seed, (11, 26))
    model = load_native(path, attention_backend="pallas_gpu", interpret=True)
    got = native_chunk_logits(model, prompts, 1, num_tokens=64)
    for i, p in enumerate(prompts):
        assert_logits_close(got[(i, len(p) - 1)], hf_all_logits(hf, p)[len(p) - 1], f"{name} prompt {i}")


# Pre-norm, full-rotary families with no q/k norms: a lone decode token's layers take the one-token kernels
# (q/k/v biases in llama, qwen2 and granite; Gemma's (1 + w) norms and GeGLU; granite's residual multiplier)
ONE_TOKEN_FAMILIES = ("llama", "mistral", "qwen2", "gemma", "granite")


@pytest.mark.parametrize("name", ONE_TOKEN_FAMILIES)
def test_one_token_steps_through_the_gpu_kernels(name, tmp_path, monkeypatch):
    """Steps of one token on pallas_gpu (the kernels in Pallas interpret mode) run the norm + q/k/v + rope +
    KV-write kernel in every layer and, opted in, the norm + gate/up + activation kernel where the MLP has no
    biases and adds its residual unscaled; otherwise the residual add + norm kernel where the residual is
    unscaled: the logits at every position of a prompt fed one token per step match transformers'."""
    from jaxrt.kernels import add_norm, decode_mlp, decode_qkv

    traced = []
    kernels = (
        (decode_qkv, "norm_qkv_rope_write_gpu"),
        (decode_mlp, "norm_gate_up_gpu"),
        (add_norm, "add_rms_norm_gpu"),
    )
    for module, fn in kernels:
        kernel = getattr(module, fn)
        monkeypatch.setattr(module, fn, lambda *a, _k=kernel, _n=fn, **k: traced.append(_n) or _k(*a, **k))
    monkeypatch.setenv("JAXRT_FUSED_GATE_UP", "1")
    config_cls, overrides = FAMILIES[name]
    seed = sorted(FAMILIES).index(name)
    path, hf = make_checkpoint(tmp_path, config_cls, seed=seed, **overrides)
    (prompt,) = prompts_for(seed, (9,))
    model = load_native(path, attention_backend="pallas_gpu", interpret=True)
    got = native_chunk_logits(model, [prompt], len(prompt), num_tokens=1)
    ref = hf_all_logits(hf, prompt)
    for pos in range(len(prompt)):
        assert_logits_close(got[(0, pos)], ref[pos], f"{name} position {pos}")
    # llama's test config has MLP biases (no gate/up kernel); granite scales its residual (neither kernel)
    second = {"mistral": "norm_gate_up_gpu", "qwen2": "norm_gate_up_gpu", "gemma": "norm_gate_up_gpu"}
    second["llama"] = "add_rms_norm_gpu"
    assert set(traced) == {"norm_qkv_rope_write_gpu"} | ({second[name]} if name in second else set())


def test_engine_greedy_matches_transformers_generate(family):
    prompts = family["prompts"]
    expected = hf_greedy(family["hf"], prompts, 32)
    # Sanity: the reference is not degenerate (a constant stream would hide many bugs).
    assert len({t for seq in expected for t in seq}) > 8
    first, again, cached = engine_greedy(family["path"], prompts)
    for i, (ours, ref) in enumerate(zip(first, expected, strict=True)):
        assert ours == ref, f"{family['name']} prompt {i} (len {len(prompts[i])}) diverges at " + str(
            next(j for j, (a, b) in enumerate(zip(ours, ref, strict=True)) if a != b)
        )
    assert again == expected
    assert sum(cached) > 0


def test_sliding_window_is_active(family):
    """The window is shorter than the long prompt and changes transformers' logits, so the parity tests above
    really cover it."""
    import torch
    from transformers import AutoModelForCausalLM

    if family["name"] not in WINDOWED:
        pytest.skip("no sliding window in this family")
    hf = family["hf"]
    cfg = copy.deepcopy(hf.config)
    cfg.sliding_window = 4096  # longer than anything here: full attention
    full = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32).eval()
    full.load_state_dict(hf.state_dict())
    ids = family["prompts"][-1]
    assert len(ids) > hf.config.sliding_window
    windowed = family["ref"][-1][-1]
    assert not np.allclose(hf_all_logits(full, ids)[-1], windowed, atol=1e-3)
