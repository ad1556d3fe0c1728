"""Feature variants beyond each family's main test config: every rope scaling transformers supports for Llama,
and Phi-3's long LongRoPE factors. Logits parity (f32, paged KV); engine sweeps are ``slow``.

``dynamic`` and ``longrope`` depend on the sequence length as transformers computes it (the whole prompt in
one forward), so they are compared with the prefill in one chunk only: a chunk that ends before the
threshold legitimately uses the other frequencies, as transformers would if it were fed the same chunks.
"""

from __future__ import annotations

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

from jaxrt.converters.loader import load_hf_config, native_model_config

HEAD_HALF = 8  # head_dim 16 -> 8 rotary frequencies

ROPE_VARIANTS: dict[str, tuple[dict, tuple[int, ...]]] = {
    # name -> (Llama config overrides, chunk counts to compare)
    "default": (dict(rope_parameters=dict(rope_type="default", rope_theta=500.0)), (1, 3)),
    "linear": (dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0)), (1, 3)),
    "dynamic": (  # active: prompts longer than max_position_embeddings
        dict(
            max_position_embeddings=24,
            rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=3.0),
        ),
        (1,),
    ),
    "yarn": (
        dict(
            rope_parameters=dict(
                rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=32
            )
        ),
        (1, 3),
    ),
    "yarn-mscale": (
        dict(
            rope_parameters=dict(
                rope_type="yarn",
                rope_theta=10000.0,
                factor=8.0,
                original_max_position_embeddings=16,
                beta_fast=16.0,
                beta_slow=2.0,
                mscale=1.0,
                mscale_all_dim=0.5,
                truncate=False,
            )
        ),
        (1, 3),
    ),
    "longrope": (  # short factors for the prompts below 16 tokens, long ones above
        dict(
            rope_parameters=dict(
                rope_type="longrope",
                rope_theta=10000.0,
                original_max_position_embeddings=16,
                short_factor=[1.0 + 0.1 * i for i in range(HEAD_HALF)],
                long_factor=[1.0 + 0.7 * i for i in range(HEAD_HALF)],
            )
        ),
        (1,),
    ),
}


def _check_logits(path, hf, prompts, chunk_counts):
    native = load_native(path)
    ref = [hf_all_logits(hf, p) for p in prompts]
    for chunks in chunk_counts:
        for (i, pos), ours in native_chunk_logits(native, prompts, chunks).items():
            assert_logits_close(ours, ref[i][pos], f"prompt {i} position {pos}, {chunks} chunks")


@pytest.mark.parametrize("variant", list(ROPE_VARIANTS))
def test_llama_rope_scaling_logits(tmp_path, variant):
    overrides, chunk_counts = ROPE_VARIANTS[variant]
    path, hf = make_checkpoint(tmp_path, "LlamaConfig", seed=11, **overrides)
    cfg = native_model_config(load_hf_config(path))
    assert cfg.rope.rope_type == overrides["rope_parameters"]["rope_type"]
    _check_logits(path, hf, prompts_for(11), chunk_counts)


def test_phi3_long_factors_logits(tmp_path):
    """Prompts above original_max_position_embeddings use Phi-3's long factors (and the attention factor)."""
    config_cls, overrides = FAMILIES["phi3"]
    path, hf = make_checkpoint(
        tmp_path, config_cls, seed=12, **{**overrides, "original_max_position_embeddings": 16}
    )
    cfg = native_model_config(load_hf_config(path))
    assert cfg.rope.original_max_position_embeddings == 16 and cfg.rope.factor == 16.0
    _check_logits(path, hf, prompts_for(12), (1,))


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["default", "linear", "yarn", "yarn-mscale"])
def test_llama_rope_scaling_engine_greedy(tmp_path, variant):
    overrides, _ = ROPE_VARIANTS[variant]
    path, hf = make_checkpoint(tmp_path, "LlamaConfig", seed=13, **overrides)
    prompts = prompts_for(13)
    first, again, _ = engine_greedy(path, prompts)
    expected = hf_greedy(hf, prompts, 32)
    assert first == expected and again == expected


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_engine_greedy_page16_bf16_smoke(tmp_path, family):
    """bf16 compute through the engine with 16-token pages: runs, and mostly agrees with f32 transformers."""
    config_cls, overrides = FAMILIES[family]
    path, hf = make_checkpoint(tmp_path, config_cls, seed=14, **overrides)
    prompts = prompts_for(14)
    first, _, _ = engine_greedy(path, prompts, dtype="bfloat16", page_size=16, num_pages=64)
    expected = hf_greedy(hf, prompts, 32)
    agree = sum(
        a == b for f, e in zip(first, expected, strict=True) for a, b in zip(f[:4], e[:4], strict=True)
    )
    assert agree >= 8, (first, expected)
