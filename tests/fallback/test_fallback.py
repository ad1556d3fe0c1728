"""The transformers fallback end to end: greedy parity with transformers through jaxrt.Engine, logits parity of
the traced forward on a ragged paged batch, remote code, and clear errors for models it cannot run."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from fallback_sweep import NEW_TOKENS, hf_greedy_ids, prompts
from fallback_testing import make_checkpoint, make_remote_code_checkpoint
from jaxrt_testing import assert_no_leak, chunked_prefill_logits

import jaxrt
from jaxrt.converters.fallback import FallbackError, build_fallback
from jaxrt.converters.loader import load_hf_config

ENGINE = dict(
    impl="transformers",
    dtype="float32",
    chunked_prefill_size=32,
    max_running_requests=8,
    num_pages=256,
    context_length=256,
)
GREEDY = {"temperature": 0, "max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS}


def engine_greedy(path: str, ids: list[list[int]], **kwargs) -> tuple[list[list[int]], jaxrt.Engine]:
    llm = jaxrt.Engine(model_path=path, **{**ENGINE, "skip_warmup": True, **kwargs})
    outs = llm.generate(input_ids=ids, sampling_params=GREEDY)
    return [o["output_ids"] for o in outs], llm


# ============================================================================== logits of the traced forward


def _forward_logits(path: str, prompt_ids: list[list[int]], chunks: int, page_size: int = 4) -> np.ndarray:
    """Last-token logits of each prompt: all prompts in one ragged batch per step, prefill in ``chunks`` steps."""
    cfg, forward, params = build_fallback(path, load_hf_config(path), "float32", "reference")
    return chunked_prefill_logits(forward, params, cfg, prompt_ids, page_size, chunks, 64, 4)


@pytest.mark.parametrize("chunks", [1, 3])
def test_forward_logits_match_transformers(llama_dir, chunks):
    """Several sequences in one flattened ragged batch, prefilled in one or three chunks through the KV pool."""
    import torch
    from transformers import AutoModelForCausalLM

    ids = prompts(320)
    ours = _forward_logits(llama_dir, ids, chunks)
    ref = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32, attn_implementation="eager")
    for i, p in enumerate(ids):
        with torch.no_grad():
            expected = ref(torch.tensor([p])).logits[0, -1].numpy()
        np.testing.assert_allclose(ours[i], expected, atol=1e-4, rtol=1e-4)


# ============================================================================== engine parity


def test_llama_engine_greedy_text_radix_and_preemption(llama_dir, caplog):
    """Llama through the fallback: text in/out, chunked prefill, radix reuse, preemption, no page leak."""
    ids = prompts(320)
    expected = hf_greedy_ids(llama_dir, ids)
    with caplog.at_level(logging.INFO, logger="jaxrt"):
        got, llm = engine_greedy(llama_dir, ids)
    with llm:
        assert got == expected
        assert llm.get_model_info()["impl"] == "transformers"
        again = llm.generate(input_ids=ids, sampling_params=GREEDY)
        assert [o["output_ids"] for o in again] == expected
        assert sum(o["meta_info"]["cached_tokens"] for o in again) > 0
        prompt = "The capital of France is"
        out = llm.generate(prompt, GREEDY)
        assert out["output_ids"] == hf_greedy_ids(llama_dir, [llm.tokenizer.encode(prompt)])[0]
        assert out["text"] == llm.tokenizer.decode(out["output_ids"])
        assert_no_leak(llm)
    # A pool too small for all requests at once: preempted requests recompute and still match.
    got, llm = engine_greedy(llama_dir, ids, page_size=4, num_pages=20, context_length=64)
    with llm:
        assert got == expected
        assert llm.scheduler.num_preemptions > 0
        assert_no_leak(llm)


def test_continuous_decode_and_parallel_compile(llama_dir, monkeypatch):
    """The GPU defaults on the fallback: buckets compiled by worker threads (tracing stays on the engine's
    thread: the traced torch model keeps thread-local state) and several decode steps per dispatch."""
    monkeypatch.setenv("JAXRT_COMPILE_WORKERS", "2")
    ids = prompts(320)
    params = {"temperature": 0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True}
    got = {}
    for steps in (1, 4):
        with jaxrt.Engine(model_path=llama_dir, **ENGINE, num_continuous_decode_steps=steps) as llm:
            compiled = llm.runner.num_compiles
            got[steps] = [o["output_ids"] for o in llm.generate(input_ids=ids, sampling_params=params)]
            assert llm.runner.num_compiles == compiled  # everything ran on start-up programs
            assert_no_leak(llm)
    assert got[4] == got[1]


def test_background_compile_traces_the_fallback_off_the_engine_thread(llama_dir, monkeypatch):
    """background_compile (the GPU default) lowers most programs on a background thread: the traced torch
    model gives the same tokens from the first programs and from all of them (torchax's thread-local
    properties hold their defaults in every thread; the fallback sets none of them)."""
    monkeypatch.setenv("JAXRT_COMPILE_WORKERS", "2")
    ids = prompts(320)
    params = {"temperature": 0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True}
    kwargs = dict(model_path=llama_dir, **ENGINE, num_continuous_decode_steps=4)
    with jaxrt.Engine(**kwargs, background_compile=False) as llm:
        want = [o["output_ids"] for o in llm.generate(input_ids=ids, sampling_params=params)]
    with jaxrt.Engine(**kwargs, background_compile=True) as llm:
        first = [o["output_ids"] for o in llm.generate(input_ids=ids, sampling_params=params)]
        assert llm.wait_compiled(timeout=600)
        assert set(llm.runner.startup_keys()) <= set(llm.runner._programs)
        compiled = llm.runner.num_compiles
        after = [o["output_ids"] for o in llm.generate(input_ids=ids, sampling_params=params)]
        assert llm.runner.num_compiles == compiled
        assert_no_leak(llm)
    assert first == want and after == want


@pytest.mark.parametrize("model_type, impl", [("qwen2", "transformers"), ("gpt2", "auto")])
def test_engine_greedy_matches_transformers(tmp_path, model_type, impl, caplog):
    """Qwen2 (biases, GQA) and GPT-2 (learned positions, Conv1D, tied embeddings) through the fallback.

    impl="auto" routes an architecture without a native port to the fallback and logs the choice."""
    from jaxrt.converters.loader import has_native

    path = make_checkpoint(tmp_path / model_type, model_type)
    arch = load_hf_config(path).architectures[0]
    ids = prompts(320)
    expected = hf_greedy_ids(path, ids)
    with caplog.at_level(logging.INFO, logger="jaxrt"):
        got, llm = engine_greedy(path, ids, impl=impl, skip_tokenizer_init=True)
    with llm:
        assert got == expected
        chosen = llm.get_model_info()["impl"]
        assert_no_leak(llm)
    if impl == "auto":
        assert chosen == ("native" if has_native(arch) else "transformers")
        assert any(f"impl=auto chose {chosen} for {arch}" in r.getMessage() for r in caplog.records)
    else:
        assert chosen == "transformers"


# ============================================================================== remote code and clear errors


def test_remote_code_model_through_engine(remote_code_dir):
    ids = prompts(320)
    expected = hf_greedy_ids(remote_code_dir, ids, trust_remote_code=True)
    got, llm = engine_greedy(remote_code_dir, ids, trust_remote_code=True)
    with llm:
        assert got == expected
        assert llm.get_model_info()["architecture"] == "TinyDecForCausalLM"
        text = llm.generate("Once upon a time", {"temperature": 0, "max_new_tokens": 4})["text"]
        assert isinstance(text, str)


def test_model_not_using_the_interface_is_refused_clearly(tmp_path):
    path = make_remote_code_checkpoint(tmp_path / "manual", attention_mode="manual")
    with pytest.raises(FallbackError) as e:
        jaxrt.Engine(model_path=path, trust_remote_code=True, **ENGINE)
    assert "never called the attention interface" in str(e.value)


@pytest.mark.parametrize("mode", ["drop_kwargs", "layer_drops_kwargs"])
def test_layers_that_drop_kwargs_still_reach_the_paged_cache(tmp_path, mode):
    """The step context reaches the attention call through the module when layers do not forward **kwargs."""
    path = make_remote_code_checkpoint(tmp_path / mode, attention_mode=mode)
    ids = prompts(320)
    expected = hf_greedy_ids(path, ids, trust_remote_code=True)
    got, llm = engine_greedy(path, ids, trust_remote_code=True)
    with llm:
        assert got == expected


# ============================================================================== variants the sweep does not build


@pytest.mark.parametrize(
    "model_type, overrides",
    [
        # Falcon-40B style: grouped kv heads broadcast over their query group, cached once per kv head
        ("falcon", dict(new_decoder_architecture=True, num_kv_heads=2, num_attention_heads=4)),
        ("gpt_neo", dict(attention_types=[[["local", "global"], 1]], window_size=5)),
        # Gemma-3n's KV-shared layers attend with an earlier layer's K/V: written again into their own pages
        ("gemma3n_text", dict(num_hidden_layers=4, num_kv_shared_layers=2)),
    ],
)
def test_variants_beyond_the_sweep_match_transformers(tmp_path, model_type, overrides):
    """Configurations of adapted / newly covered architectures that the sweep's one tiny config does not reach."""
    path = make_checkpoint(tmp_path / model_type, model_type, **overrides)
    ids = prompts(320)
    expected = hf_greedy_ids(path, ids)
    got, llm = engine_greedy(path, ids, skip_tokenizer_init=True)
    with llm:
        assert got == expected
        if overrides.get("new_decoder_architecture"):
            assert llm.config.model.num_kv_heads == 2


def test_alibi_falcon_is_refused(tmp_path):
    path = make_checkpoint(tmp_path / "falcon", "falcon", alibi=True)
    with pytest.raises(FallbackError, match="ALiBi"):
        jaxrt.Engine(model_path=path, skip_tokenizer_init=True, **ENGINE)


def test_sliding_window_only_in_the_mask_is_refused(tmp_path):
    """Moshi declares config.sliding_window but its layers never pass it to the attention call (transformers applies
    it through the mask): serving it with unwindowed attention would give different tokens past the window."""
    path = make_checkpoint(tmp_path / "moshi", "moshi")
    with pytest.raises(FallbackError, match="sliding_window=12"):
        jaxrt.Engine(model_path=path, skip_tokenizer_init=True, **ENGINE)
