"""Engine API: sampling semantics, seeds, streaming, async, logprobs, validation errors, abort."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from jaxrt_testing import TINY_ENGINE, assert_no_leak

import jaxrt

# The module engine's settings (tests that need a second engine like it reuse them).
LLM = TINY_ENGINE


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    engine = jaxrt.Engine(model_path=tiny_llama_dir, **LLM)
    yield engine
    engine.shutdown()


def test_single_prompt_returns_sglang_shaped_dict(llm):
    out = llm.generate("Hello there", {"temperature": 0, "max_new_tokens": 5})
    assert isinstance(out, dict)
    assert set(out) >= {"text", "output_ids", "meta_info"}
    meta = out["meta_info"]
    assert meta["completion_tokens"] == len(out["output_ids"]) <= 5
    assert meta["prompt_tokens"] == len(llm.tokenizer.encode("Hello there"))
    assert meta["finish_reason"]["type"] in ("length", "stop")
    assert meta["e2e_latency"] > 0 and isinstance(meta["id"], str)
    assert out["text"] == llm.tokenizer.decode(out["output_ids"])


def test_seed_gives_same_output_whatever_the_batch(llm):
    params = {"temperature": 1.0, "top_p": 0.9, "top_k": 50, "max_new_tokens": 16, "seed": 1234}
    alone = llm.generate("The weather today", params)["output_ids"]
    batch = llm.generate(
        ["Other prompt one", "The weather today", "Another different prompt"],
        [{"temperature": 0.7, "max_new_tokens": 9}, params, {"temperature": 1.3, "max_new_tokens": 20}],
    )
    assert batch[1]["output_ids"] == alone
    other_seed = llm.generate("The weather today", {**params, "seed": 99})["output_ids"]
    assert other_seed != alone


def test_sampling_respects_top_k_one_and_greedy(llm):
    greedy = llm.generate("Counting: one two", {"temperature": 0, "max_new_tokens": 8})["output_ids"]
    top1 = llm.generate("Counting: one two", {"temperature": 1.5, "top_k": 1, "max_new_tokens": 8})[
        "output_ids"
    ]
    assert top1 == greedy


def test_n_returns_n_samples(llm):
    outs = llm.generate("Pick a word:", {"temperature": 1.0, "max_new_tokens": 6, "n": 3, "seed": 5})
    assert isinstance(outs, list) and len(outs) == 3
    assert len({tuple(o["output_ids"]) for o in outs}) > 1


def test_min_new_tokens_and_stop_token_ids(llm):
    greedy = llm.generate("Stop test", {"temperature": 0, "max_new_tokens": 12})["output_ids"]
    stop_tok = greedy[3]
    first = greedy.index(stop_tok)
    out = llm.generate("Stop test", {"temperature": 0, "max_new_tokens": 12, "stop_token_ids": [stop_tok]})
    assert out["output_ids"] == greedy[: first + 1]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_tok}
    held = llm.generate(
        "Stop test",
        {"temperature": 0, "max_new_tokens": 12, "stop_token_ids": [stop_tok], "min_new_tokens": 12},
    )
    assert len(held["output_ids"]) == 12 and stop_tok not in held["output_ids"]


def test_stop_string_truncates_text(llm):
    full = llm.generate("Stop string test", {"temperature": 0, "max_new_tokens": 16})
    text = full["text"]
    assert len(text) > 6
    stop = text[3:6]
    out = llm.generate("Stop string test", {"temperature": 0, "max_new_tokens": 16, "stop": stop})
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert out["text"] == text[: text.find(stop)]


def _sampling_batch(rows: int, **fields):
    """A host SamplingBatch of ``rows`` rows: zeros, no stop ids, a one-token history, then ``fields``."""
    from jaxrt.batch import MAX_STOP_IDS, SamplingBatch

    z = np.zeros(rows, np.float32)
    base = dict(
        temperature=z,
        top_p=z,
        top_k=z.astype(np.int32),
        min_p=z,
        repetition_penalty=z,
        frequency_penalty=z,
        presence_penalty=z,
        seeds=z.astype(np.uint32),
        sample_index=z.astype(np.int32),
        stop_ids=np.full((rows, MAX_STOP_IDS), -1, np.int32),
        suppress_stop=z.astype(bool),
        history=np.zeros((rows, 1), np.int32),
        history_is_output=np.zeros((rows, 1), bool),
        history_bias=np.zeros((rows, 1), np.float32),
        allowed=np.full((rows, 1), -1, np.int32),
    )
    return SamplingBatch(**{**base, **fields})


def test_penalties_match_transformers_and_openai_rules():
    import torch
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    from jaxrt.sampler import apply_penalties

    rng = np.random.default_rng(0)
    vocab, rows, hist = 50, 3, 10
    logits = rng.normal(size=(rows, vocab)).astype(np.float32) * 3
    history = rng.integers(0, vocab, size=(rows, hist)).astype(np.int32)
    history[2, 6:] = -1  # padding
    is_out = np.zeros((rows, hist), bool)
    is_out[:, 5:] = True
    rep = np.array([1.0, 1.7, 0.8], np.float32)
    freq = np.array([0.5, 0.0, -0.3], np.float32)
    pres = np.array([0.2, 1.0, 0.0], np.float32)
    sb = _sampling_batch(
        rows,
        repetition_penalty=rep,
        frequency_penalty=freq,
        presence_penalty=pres,
        history=history,
        history_is_output=is_out,
        history_bias=np.zeros((rows, hist), np.float32),
    )
    ours = np.asarray(apply_penalties(logits, sb))
    for r in range(rows):
        valid = history[r][history[r] >= 0]
        expected = RepetitionPenaltyLogitsProcessor(float(rep[r]))(
            torch.tensor(valid[None].astype(np.int64)), torch.tensor(logits[r : r + 1])
        )[0].numpy()
        outs = history[r][(history[r] >= 0) & is_out[r]]
        counts = np.bincount(outs, minlength=vocab).astype(np.float32)
        expected = expected - freq[r] * counts - pres[r] * (counts > 0)
        np.testing.assert_allclose(ours[r], expected, rtol=1e-6, atol=1e-6)


def test_logit_bias_entries_add_first_and_are_not_tokens():
    """History entries with a bias add it to their token's logit before the penalties (so the repetition
    penalty scales the biased logit), and are not tokens of the sequence: a token that is only biased is
    neither "seen" (repetition) nor counted (frequency / presence)."""
    from jaxrt.sampler import apply_penalties

    rng = np.random.default_rng(4)
    vocab, rows = 30, 2
    logits = rng.normal(size=(rows, vocab)).astype(np.float32) * 3
    history = np.array([[4, 9, 9, 17, 4, -1], [2, 2, 11, 5, -1, -1]], np.int32)
    is_out = np.array([[0, 1, 1, 0, 0, 0], [0, 1, 0, 0, 0, 0]], bool)
    bias = np.array([[0, 0, 0, -100, 2.5, 0], [0, 0, 7, 0, 0, 0]], np.float32)  # 17 and 4 / 11 biased
    rep = np.array([1.5, 1.0], np.float32)
    freq = np.array([0.5, 0.25], np.float32)
    sb = _sampling_batch(
        rows,
        repetition_penalty=rep,
        frequency_penalty=freq,
        presence_penalty=np.zeros(rows, np.float32),
        history=history,
        history_is_output=is_out,
        history_bias=bias,
    )
    ours = np.asarray(apply_penalties(logits, sb))
    want = logits.copy()
    for r in range(rows):
        for t, b in zip(history[r], bias[r], strict=True):
            if b:
                want[r, t] += b
        tokens = [t for t, b in zip(history[r], bias[r], strict=True) if t >= 0 and not b]
        for t in set(tokens):
            want[r, t] = want[r, t] / rep[r] if want[r, t] > 0 else want[r, t] * rep[r]
        outs = history[r][(history[r] >= 0) & is_out[r] & (bias[r] == 0)]
        want[r] -= freq[r] * np.bincount(outs, minlength=vocab)
    np.testing.assert_allclose(ours, want, rtol=1e-6, atol=1e-5)
    assert ours[0, 17] < -90  # biased only: banned, not penalised as seen


def test_suppress_stops_masks_only_rows_under_min_new_tokens():
    from jaxrt.batch import MAX_STOP_IDS
    from jaxrt.sampler import suppress_stops

    rng = np.random.default_rng(1)
    vocab, rows = 40, 4
    logits = rng.normal(size=(rows, vocab)).astype(np.float32)
    stop_ids = np.full((rows, MAX_STOP_IDS), -1, np.int32)
    stop_ids[0, :3] = [5, 0, 39]
    stop_ids[1, :1] = [7]  # row 1 is past min_new_tokens: nothing masked
    stop_ids[2, :] = np.arange(MAX_STOP_IDS) + 10  # every slot used
    suppress = np.array([True, False, True, True])  # row 3 has no stop ids
    sb = _sampling_batch(rows, stop_ids=stop_ids, suppress_stop=suppress)
    expected = logits.copy()
    for r in range(rows):
        if suppress[r]:
            expected[r, stop_ids[r][stop_ids[r] >= 0]] = -np.inf
    np.testing.assert_array_equal(np.asarray(suppress_stops(logits, sb)), expected)


def test_row_stats_matches_logsumexp_and_argmax():
    import jax
    import jax.numpy as jnp

    from jaxrt.sampler import row_stats

    rng = np.random.default_rng(2)
    rows, vocab = 7, 1000
    raw = (rng.normal(size=(rows, vocab)) * 4).astype(np.float32)
    masked = raw.copy()
    masked[1, raw[1].argmax()] = -np.inf  # row 1's best id is suppressed: the second best wins
    masked[2, [3, 700]] = masked[2].max() + 1  # a tie: the lower index wins
    masked[3, :] = -np.inf  # nothing left: argmax 0, as jnp.argmax
    raw[4, ::3] = -np.inf  # -inf logits (masked-out vocabulary) add nothing to the normaliser
    masked[4] = raw[4]
    raw[5] = raw[5] * 0 + 7.0  # a flat row
    masked[5] = raw[5]
    lse, arg, mx = (np.asarray(x) for x in jax.jit(row_stats)(raw, masked))
    np.testing.assert_allclose(lse, np.asarray(jax.nn.logsumexp(raw, axis=-1)), rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(arg, np.asarray(jnp.argmax(masked, axis=-1)))
    np.testing.assert_array_equal(mx, masked.max(axis=-1))
    assert arg[2] == 3 and arg[3] == 0 and arg[5] == 0


def test_sampler_greedy_kernel_gives_the_same_step_output():
    """The greedy Pallas kernel (interpret mode here) in the sampler: same tokens, same log-probabilities."""
    import jax
    import jax.numpy as jnp

    from jaxrt import sampler
    from jaxrt.batch import MAX_STOP_IDS, SampleMode

    rng = np.random.default_rng(3)
    rows, vocab = 5, 700
    logits = jnp.asarray(rng.normal(size=(rows, vocab)) * 3, jnp.bfloat16)
    stop_ids = np.full((rows, MAX_STOP_IDS), -1, np.int32)
    stop_ids[0, 0] = int(jnp.argmax(logits[0]))
    suppress = np.array([True, False, False, True, False])
    sb = _sampling_batch(rows, stop_ids=stop_ids, suppress_stop=suppress)
    outs = []
    for mode in (None, "interpret"):
        sampler.set_greedy_kernel(mode)
        try:
            outs.append(jax.jit(sampler.sample, static_argnums=2)(logits, sb, SampleMode()))
        finally:
            sampler.set_greedy_kernel(None)
    np.testing.assert_array_equal(np.asarray(outs[0].tokens), np.asarray(outs[1].tokens))
    np.testing.assert_allclose(
        np.asarray(outs[0].logprobs), np.asarray(outs[1].logprobs), rtol=1e-5, atol=1e-5
    )
    assert int(outs[1].tokens[0]) != stop_ids[0, 0]
    with pytest.raises(ValueError, match="greedy kernel mode"):
        sampler.set_greedy_kernel("cuda")


def test_repetition_penalty_greedy_matches_transformers(llm, tiny_llama_dir):
    from jaxrt_testing import hf_generate, hf_model

    ids = llm.tokenizer.encode("repeat repeat repeat")
    out = llm.generate(
        input_ids=ids,
        sampling_params={
            "temperature": 0,
            "max_new_tokens": 16,
            "min_new_tokens": 16,
            "repetition_penalty": 1.3,
        },
    )
    exp = hf_generate(
        hf_model(tiny_llama_dir), ids, max_new_tokens=16, min_new_tokens=16, repetition_penalty=1.3
    )
    assert out["output_ids"] == exp


def test_logit_bias_greedy_matches_transformers(llm, tiny_llama_dir):
    """Greedy tokens with a logit bias (the unbiased run's first two tokens banned, pushes up and down) equal
    transformers' ``sequence_bias`` on one-token sequences, with and without a repetition penalty beside
    it, and with a single banned token; a request without a bias in the same step is unchanged."""
    from jaxrt_testing import hf_generate, hf_model

    ids = llm.tokenizer.encode("bias the next tokens")
    plain = {"temperature": 0, "max_new_tokens": 12, "min_new_tokens": 12}
    base = llm.generate(input_ids=ids, sampling_params=plain)["output_ids"]
    # A prompt token pushed up too: with a repetition penalty, the order of the two matters for it.
    bias = {str(base[0]): -100.0, str(base[1]): -100.0, "7": 3.0, "11": -2.5, str(ids[1]): 6.0}
    ref = hf_model(tiny_llama_dir)
    cases = [({}, bias), ({"repetition_penalty": 1.3}, bias), ({}, {str(base[0]): -100.0})]
    for extra, bias in cases:
        params = {**plain, **extra, "logit_bias": bias}
        outs = llm.generate(input_ids=[ids, ids], sampling_params=[params, plain])
        exp = hf_generate(
            ref,
            ids,
            max_new_tokens=12,
            min_new_tokens=12,
            sequence_bias={(int(t),): b for t, b in bias.items()},
            **extra,
        )
        assert outs[0]["output_ids"] == exp
        assert base[0] not in outs[0]["output_ids"] and outs[0]["output_ids"] != base
        assert outs[1]["output_ids"] == base
    assert_no_leak(llm)


def test_logit_bias_is_validated(llm):
    vocab = llm.config.model.vocab_size
    for bad, match in (
        ({"5": 101}, r"logit_bias values must be numbers in \[-100, 100\]"),
        ({"x": 1}, "logit_bias must map non-negative integer token ids"),
        ({str(vocab): 1}, f"logit_bias token ids must be < vocab size {vocab}"),
        ({str(i): 1 for i in range(301)}, "logit_bias may have at most 300 entries, got 301"),
    ):
        with pytest.raises(ValueError, match=match):
            llm.generate(input_ids=[1, 2], sampling_params={"max_new_tokens": 1, "logit_bias": bad})
    out = llm.generate(input_ids=[1, 2], sampling_params={"temperature": 0, "max_new_tokens": 2})
    assert len(out["output_ids"]) == 2
    assert_no_leak(llm)


def test_logprobs_match_a_log_softmax(llm):
    out = llm.generate(
        "Logprobs please", {"temperature": 0, "max_new_tokens": 4}, return_logprob=True, top_logprobs_num=3
    )
    lps = out["meta_info"]["output_token_logprobs"]
    tops = out["meta_info"]["output_top_logprobs"]
    assert [t for _, t, _ in lps] == out["output_ids"]
    for (lp, tok, _), top in zip(lps, tops, strict=True):
        assert lp <= 0
        assert len(top) == 3 and top[0][1] == tok  # greedy token is the most likely one
        assert np.isclose(top[0][0], lp, atol=1e-5)
        assert top[0][0] >= top[1][0] >= top[2][0]


def test_stream_chunks_accumulate_to_the_final_text(llm):
    params = {"temperature": 0, "max_new_tokens": 12}
    final = llm.generate("Streaming test", params)
    chunks = list(llm.generate("Streaming test", params, stream=True))
    assert chunks[-1]["meta_info"]["finish_reason"] is not None
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["text"] == final["text"]
    assert chunks[-1]["output_ids"] == final["output_ids"]
    texts = [c["text"] for c in chunks]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:], strict=False))


def test_stream_interval_spaces_the_chunks(llm, tiny_llama_dir):
    """stream_interval (SGLang's --stream-interval): the first token goes at once, then a chunk every N
    tokens, and the final chunk always; the final output is the same."""
    params = {"temperature": 0, "max_new_tokens": 10, "ignore_eos": True}
    final = llm.generate("Streaming test", params)
    assert llm.output.stream_interval == 1 and llm.config.scheduler.num_continuous_decode_steps == 1
    llm.output.stream_interval = 3
    try:
        chunks = list(llm.generate("Streaming test", params, stream=True))
    finally:
        llm.output.stream_interval = 1
    assert [c["meta_info"]["completion_tokens"] for c in chunks] == [1, 4, 7, 10]
    assert chunks[-1]["text"] == final["text"] and chunks[-1]["output_ids"] == final["output_ids"]
    with pytest.raises(ValueError, match="stream_interval"):
        jaxrt.Engine(model_path=tiny_llama_dir, **LLM, stream_interval=0)


def test_async_generate_and_async_stream(llm):
    params = {"temperature": 0, "max_new_tokens": 8}
    expected = llm.generate(["Async one", "Async two"], params)

    async def main():
        res = await llm.async_generate(["Async one", "Async two"], params)
        chunks = [c async for c in llm.async_generate("Async one", params, stream=True)]
        stream = await llm.async_generate("Async two", params, stream=True)
        chunks2 = [c async for c in stream]
        return res, chunks, chunks2

    res, chunks, chunks2 = asyncio.run(main())
    assert [r["output_ids"] for r in res] == [e["output_ids"] for e in expected]
    assert chunks[-1]["text"] == expected[0]["text"]
    assert chunks2[-1]["text"] == expected[1]["text"]


def test_abort_mid_stream_frees_pages(llm):
    gen = llm.generate("Abort me", {"temperature": 0, "max_new_tokens": 200, "ignore_eos": True}, stream=True)
    first = next(gen)
    assert first["meta_info"]["finish_reason"] is None
    gen.close()  # the consumer walks away: the request is aborted
    assert_no_leak(llm)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"prompt": "x", "sampling_params": {"max_new_tokens": -1}}, "max_new_tokens"),
        ({"prompt": "x", "sampling_params": {"temperature": -0.5}}, "temperature"),
        ({"prompt": "x", "sampling_params": {"top_p": 0.0}}, "top_p"),
        ({"prompt": "x", "sampling_params": {"top_p": 1.5}}, "top_p"),
        ({"prompt": "x", "sampling_params": {"top_k": 0}}, "top_k"),
        ({"prompt": "x", "sampling_params": {"top_k": -2}}, "top_k"),
        ({"prompt": "x", "sampling_params": {"bogus_key": 1}}, "bogus_key"),
        ({"prompt": ""}, "prompt"),
        ({"input_ids": [1, 2, 10**9]}, "input_ids"),
        ({"input_ids": [-1]}, "input_ids"),
        ({"input_ids": [5] * 300}, "prompt"),
        ({"prompt": "x", "sampling_params": [{}, {}]}, "sampling_params"),
    ],
)
def test_bad_input_is_a_value_error_naming_the_field_and_engine_keeps_serving(llm, kwargs, field):
    with pytest.raises(ValueError, match=field):
        llm.generate(**kwargs)
    out = llm.generate("still alive?", {"temperature": 0, "max_new_tokens": 2})
    assert out["meta_info"]["completion_tokens"] == 2
    assert_no_leak(llm)


def test_flush_cache_and_model_info(llm):
    llm.generate("fill the cache with something long enough", {"temperature": 0, "max_new_tokens": 4})
    assert llm.radix.num_cached_pages > 0
    assert llm.flush_cache() is True
    assert llm.radix.num_cached_pages == 0
    info = llm.get_model_info()
    assert info["architecture"] == "LlamaForCausalLM" and info["impl"] == "native"
    assert_no_leak(llm)


def test_unknown_model_path_is_a_clear_error():
    with pytest.raises(ValueError, match="not a local directory"):
        jaxrt.Engine(model_path="some-org/not-downloaded-model")


def test_skip_tokenizer_init_ids_in_ids_out(tiny_llama_dir, llm):
    """Ids in, ids out; after shutdown the engine's device memory is freed."""
    ids = llm.tokenizer.encode("token ids only")
    expected = llm.generate(input_ids=ids, sampling_params={"temperature": 0, "max_new_tokens": 6})[
        "output_ids"
    ]
    with jaxrt.Engine(
        model_path=tiny_llama_dir, **{**LLM, "num_pages": 100}, skip_tokenizer_init=True
    ) as raw:
        out = raw.generate(input_ids=ids, sampling_params={"temperature": 0, "max_new_tokens": 6})
        assert out["output_ids"] == expected and out["text"] == ""
        with pytest.raises(ValueError, match="prompt"):
            raw.generate("text is not accepted")
        pool = jax.tree.leaves(raw.runner.kv_caches)
    # Shut down (the object lives on): its KV pool is freed on the device, and it serves nothing more.
    assert pool and all(a.is_deleted() for a in pool)
    assert raw.runner.state is None
    with pytest.raises(RuntimeError, match="shutting down"):
        raw.generate(input_ids=ids, sampling_params={"max_new_tokens": 1})
    raw.shutdown()  # a second shutdown is harmless


def test_no_recompiles_after_warmup(llm):
    """Every step after start-up hits a compiled bucket (a silent recompile costs seconds on a GPU)."""
    before = llm.runner.num_compiles
    llm.generate(["one", "two words", "three words here"], {"temperature": 0, "max_new_tokens": 12})
    llm.generate("streamed", {"temperature": 0.5, "max_new_tokens": 5, "seed": 1})
    assert llm.runner.num_compiles == before


@pytest.mark.parametrize("workers", ["1", "2"])
def test_fresh_engine_serves_without_compiling(tiny_llama_dir, monkeypatch, workers):
    """From the first request on, greedy and sampled decoding (with overlap: step N+1 fed by step N's
    outputs) hit programs compiled at start-up; with 2 workers the buckets are compiled side by side."""
    monkeypatch.setenv("JAXRT_COMPILE_WORKERS", workers)
    with jaxrt.Engine(
        model_path=tiny_llama_dir, max_running_requests=4, chunked_prefill_size=64, context_length=128
    ) as fresh:
        runner = fresh.runner
        assert set(runner.startup_keys()) <= set(runner._programs)
        compiled = runner.num_compiles
        fresh.generate(["one", "two words here"], {"temperature": 0, "max_new_tokens": 6})
        fresh.generate("sampled", {"temperature": 0.7, "max_new_tokens": 4, "seed": 3})
        assert runner.num_compiles == compiled


def test_background_compile_serves_from_the_first_programs(tiny_llama_dir, monkeypatch):
    """background_compile: the engine is ready once the programs that fit any batch are compiled. While the
    rest are held back, steps run padded to those (single decode steps, no decode loop yet) without compiling
    anything on the way and give the tokens of a fully precompiled engine; once released, every start-up
    program is there and a continuous-decode run matches too."""
    from jaxrt.model_runner import ModelRunner

    gate = threading.Event()
    compile_one = ModelRunner._compile_one

    def held(self, key, lowered):
        gate.wait(timeout=120)
        compile_one(self, key, lowered)

    monkeypatch.setattr(ModelRunner, "_compile_one", held)
    kwargs = dict(
        model_path=tiny_llama_dir,
        dtype="float32",
        max_running_requests=4,
        chunked_prefill_size=64,
        context_length=128,
        num_continuous_decode_steps=3,
    )
    prompts = ["one", "two words here", "and a third, longer prompt than both"]
    greedy = {"temperature": 0, "max_new_tokens": 7}
    sampled = {"temperature": 0.8, "max_new_tokens": 5, "seed": 11}
    with jaxrt.Engine(**kwargs, background_compile=False) as full:
        want = [o["output_ids"] for o in full.generate(prompts, greedy)]
        want_sampled = full.generate("sampled", sampled)["output_ids"]
    try:
        with jaxrt.Engine(**kwargs, background_compile=True) as llm:
            runner = llm.runner
            first = set(runner.first_keys())
            assert runner.compiling and set(runner._programs) == first
            assert len(first) < len(runner.startup_keys())
            assert [o["output_ids"] for o in llm.generate(prompts, greedy)] == want
            assert llm.generate("sampled", sampled)["output_ids"] == want_sampled
            assert set(runner._programs) == first  # padded to the ready buckets: nothing compiled on use
            assert llm.get_server_info()["compiling"]
            gate.set()
            assert llm.wait_compiled(timeout=300)
            assert set(runner.startup_keys()) <= set(runner._programs)
            assert "background_s" in llm.startup_breakdown and not llm.get_server_info()["compiling"]
            compiled = runner.num_compiles
            assert [o["output_ids"] for o in llm.generate(prompts, greedy)] == want
            assert llm.generate("sampled", sampled)["output_ids"] == want_sampled
            assert runner.num_compiles == compiled
            assert_no_leak(llm)
    finally:
        gate.set()


def test_page_table_updates_in_several_writes(tiny_llama_dir, monkeypatch, llm):
    """A step whose requests gained more pages than one page-table update holds writes them in several
    (here 5 entries per update, so every prefill step needs many): the same tokens as the module's engine."""
    import jaxrt.model_runner as mr

    prompts = ["a prompt long enough to need several pages of eight", "short", "and one more of a few words"]
    params = {"temperature": 0, "max_new_tokens": 9}
    want = [o["output_ids"] for o in llm.generate(prompts, params)]
    monkeypatch.setattr(mr, "_DELTA", 5)
    with jaxrt.Engine(model_path=tiny_llama_dir, **LLM) as small:
        assert [o["output_ids"] for o in small.generate(prompts, params)] == want


def test_cached_prefix_gains_more_pages_than_the_step_writes_itself(llm):
    """A request admitted on a long cached prefix gains more page-table entries in one step than that step's
    program carries (``delta_capacity``): the rest go through the separate update first. Same tokens as
    without the cache hit."""
    runner = llm.runner
    prompt = list(range(5, 205))  # 25 pages of 8
    params = {"temperature": 0, "max_new_tokens": 6}
    llm.flush_cache()
    cold = llm.generate(input_ids=prompt, sampling_params=params)
    warm = llm.generate(input_ids=prompt, sampling_params=params)
    assert warm["meta_info"]["cached_tokens"] >= 192
    assert warm["meta_info"]["cached_tokens"] // 8 > runner.delta_capacity(("forward", 8))
    assert warm["output_ids"] == cold["output_ids"]
    assert_no_leak(llm)


def test_packed_layout_round_trips_every_leaf_dtype():
    """One int32 buffer carries int32, float32 (bit-exact, NaN and -0.0 included), uint32 and bool leaves of
    any tree; the jitted unpack gives back the host tree."""
    import jax

    from jaxrt.batch import PackedLayout

    rng = np.random.default_rng(0)
    tree = (
        {"a": rng.integers(-(2**31), 2**31 - 1, (3, 4), dtype=np.int32), "none": None},
        np.array([1.5, np.nan, -0.0, np.inf, 1e-42], np.float32),
        [rng.integers(0, 2**32 - 1, 5, dtype=np.uint32), rng.random(7) < 0.5],
    )
    layout = PackedLayout.of(tree)
    buf = layout.pack(tree)
    assert buf.dtype == np.int32 and buf.shape == (layout.size,) == (12 + 5 + 5 + 7,)
    back = jax.jit(layout.unpack)(buf)
    for want, got in zip(jax.tree.leaves(tree), jax.tree.leaves(back), strict=True):
        got = np.asarray(got)
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))
    with pytest.raises(ValueError, match="float64"):
        PackedLayout.of([np.zeros(2)])
    with pytest.raises(ValueError, match="does not match"):
        layout.pack((tree[0], np.zeros(5, np.int32), tree[2]))
    with pytest.raises(ValueError, match="structure"):
        layout.pack(tree[:2])


def test_bad_checkpoint_fails_engine_with_the_tensor_named(tiny_llama_dir, tmp_path):
    """A checkpoint missing a tensor fails Engine(...) with the loader's error naming it."""
    import shutil

    from safetensors.numpy import load_file, save_file

    from jaxrt.converters.weights import WeightLoadError

    for f in Path(tiny_llama_dir).iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, tmp_path / f.name)
    tensors = load_file(str(Path(tiny_llama_dir) / "model.safetensors"))
    del tensors["model.norm.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightLoadError, match="model/norm/weight"):
        jaxrt.Engine(model_path=str(tmp_path), max_running_requests=4, context_length=128)


def test_a_batch_with_a_request_the_pool_cannot_hold_runs_nothing(tiny_llama_dir):
    """Every request of a batch is validated before any is handed to the loop: one that can never fit the KV
    pool fails the call, the others do not run, and the engine keeps serving."""
    with jaxrt.Engine(
        model_path=tiny_llama_dir, max_running_requests=4, context_length=256, num_pages=10, page_size=8
    ) as small:
        good = {"input_ids": [5, 6, 7], "max_new_tokens": 4}
        with pytest.raises(ValueError, match="max_new_tokens.*KV pages"):
            small.generate(
                input_ids=[[5, 6, 7], [5] * 50],
                sampling_params=[{"max_new_tokens": 4}, {"max_new_tokens": 40}],
            )
        time.sleep(0.2)  # had the good request been posted, the loop would have taken it by now
        assert small.stats["num_prompt_tokens"] == 0 and not small.scheduler.has_work
        out = small.generate(input_ids=good["input_ids"], sampling_params={"max_new_tokens": 4})
        assert out["meta_info"]["completion_tokens"] == 4
        assert_no_leak(small)
