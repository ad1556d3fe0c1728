"""Parity with transformers: logits of the native model and greedy tokens through the whole engine."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jaxrt_testing import (
    assert_no_leak,
    chunked_prefill_logits,
    hf_greedy,
    hf_last_logits,
    hf_model,
    make_tiny_llama,
    mosaic_gpu_marks,
    record_buckets,
    record_forward_keys,
)

import jaxrt
from jaxrt.converters.loader import build_native_model, load_hf_config, native_model_config
from jaxrt.step import nnx_forward

PROMPTS = [
    "The capital of France is",
    "Once upon a time, there was a little",
    "def fibonacci(n):\n    ",
    "1, 2, 3, 4, 5,",
    "A very long prompt that keeps going " * 6,
]


def native_logits(
    path: str, prompts_ids: list[list[int]], page_size: int = 16, chunks: int = 1
) -> np.ndarray:
    """Last-token logits of each prompt through the native model, paged KV, prefill in ``chunks`` steps."""
    cfg = native_model_config(load_hf_config(path))
    graphdef, state = build_native_model(cfg, path, "float32", "reference")
    return chunked_prefill_logits(nnx_forward(graphdef), state, cfg, prompts_ids, page_size, chunks, 256, 8)


@pytest.mark.parametrize("chunks", [1, 3])
def test_tiny_llama_logits_match_transformers(tiny_llama_dir, chunks):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ids = [tok.encode(p) for p in PROMPTS[:4]]
    ours = native_logits(tiny_llama_dir, ids, chunks=chunks)
    ref = hf_model(tiny_llama_dir)
    for i, p in enumerate(ids):
        np.testing.assert_allclose(ours[i], hf_last_logits(ref, p), atol=2e-4, rtol=1e-4)


def test_default_model_logits_match_transformers(default_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    ids = [tok.encode(p) for p in PROMPTS[:2]]
    ours = native_logits(default_model_dir, ids, page_size=4)
    ref = hf_model(default_model_dir)
    for i, p in enumerate(ids):
        expected = hf_last_logits(ref, p)
        np.testing.assert_allclose(ours[i], expected, atol=2e-3, rtol=1e-3)
        assert ours[i].argmax() == expected.argmax()


@pytest.fixture(scope="module")
def hf_tiny(tiny_llama_dir):
    return hf_model(tiny_llama_dir)


ENGINE_VARIANTS = {
    "page16": dict(page_size=16),
    "page1-chunk8": dict(page_size=1, chunked_prefill_size=8, max_running_requests=8),
    "no-radix": dict(page_size=16, disable_radix_cache=True),
    "no-overlap": dict(page_size=16, disable_overlap_schedule=True),
}


@pytest.mark.parametrize("variant", list(ENGINE_VARIANTS))
def test_engine_greedy_matches_transformers_generate(tiny_llama_dir, hf_tiny, variant):
    kwargs = dict(
        dtype="float32", chunked_prefill_size=32, max_running_requests=8, context_length=256, num_pages=600
    )
    kwargs.update(ENGINE_VARIANTS[variant])
    with jaxrt.Engine(model_path=tiny_llama_dir, **kwargs) as llm:
        ids = [llm.tokenizer.encode(p) for p in PROMPTS]
        params = {"temperature": 0, "max_new_tokens": 32, "min_new_tokens": 32}
        outs = llm.generate(input_ids=ids, sampling_params=params)
        expected = hf_greedy(hf_tiny, ids, 32)
        for out, exp in zip(outs, expected, strict=True):
            assert out["output_ids"] == exp
            assert out["meta_info"]["finish_reason"]["type"] == "length"
        # Same prompts again: radix reuse must not change anything.
        again = llm.generate(input_ids=ids, sampling_params=params)
        assert [o["output_ids"] for o in again] == expected
        cached = [o["meta_info"]["cached_tokens"] for o in again]
        if kwargs.get("disable_radix_cache"):
            assert cached == [0] * len(ids)
        else:
            assert sum(cached) > 0
        assert_no_leak(llm)


def test_single_token_bucket_matches_transformers(tiny_llama_dir, hf_tiny):
    """The 1-token program (on by default on GPUs): a lone stream's decode steps run in it, greedy tokens
    match transformers, and a batch that outgrows it moves to the 8-token program."""
    kwargs = dict(dtype="float32", chunked_prefill_size=32, max_running_requests=8, context_length=256)
    with jaxrt.Engine(model_path=tiny_llama_dir, num_pages=600, single_token_bucket=True, **kwargs) as llm:
        assert llm.runner.token_buckets[:2] == [1, 8]
        picked = record_buckets(llm)
        ids = [llm.tokenizer.encode(p) for p in PROMPTS]
        params = {"temperature": 0, "max_new_tokens": 12, "min_new_tokens": 12}
        expected = hf_greedy(hf_tiny, ids, 12)
        alone = llm.generate(input_ids=ids[0], sampling_params=params)
        assert alone["output_ids"] == expected[0]
        assert picked.count(1) >= 10, picked  # the decode steps after the prompt's
        picked.clear()
        outs = llm.generate(input_ids=ids, sampling_params=params)
        assert [o["output_ids"] for o in outs] == expected
        assert max(picked) >= 8, picked
        assert_no_leak(llm)


def test_preemption_small_pool_same_output(tiny_llama_dir, hf_tiny):
    ids_list = None
    results = {}
    for num_pages in (600, 24):
        with jaxrt.Engine(
            model_path=tiny_llama_dir,
            dtype="float32",
            page_size=4,
            chunked_prefill_size=32,
            max_running_requests=8,
            context_length=128,
            num_pages=num_pages,
        ) as llm:
            ids_list = [llm.tokenizer.encode(p) for p in PROMPTS]
            outs = llm.generate(
                input_ids=ids_list,
                sampling_params={"temperature": 0, "max_new_tokens": 40, "min_new_tokens": 40},
            )
            results[num_pages] = [o["output_ids"] for o in outs]
            if num_pages == 24:
                assert llm.scheduler.num_preemptions > 0
            assert_no_leak(llm)
    assert results[24] == results[600]
    assert results[600] == hf_greedy(hf_tiny, ids_list, 40)


def test_engine_through_pallas_gpu_kernel_interpret(tmp_path, default_model_dir, monkeypatch):
    """The whole engine on the GPU kernel (Pallas interpret mode on CPU), with the attention plan shared
    across layers: greedy tokens identical to transformers. head_dim 64 and a GQA group of 4 are shapes the
    kernel takes itself (others would be handed to the reference, which this test must not measure)."""
    import jax

    from jaxrt.kernels import attention_metadata

    path = make_tiny_llama(
        tmp_path / "hd64", default_model_dir, num_attention_heads=4, num_key_value_heads=1, head_dim=64
    )
    q = jax.ShapeDtypeStruct((16, 4, 64), np.float32)
    k = jax.ShapeDtypeStruct((8, 16, 1, 64), np.float32)
    z = np.zeros(4, np.int32)
    plan = attention_metadata(
        q, k, z, np.zeros((4, 2), np.int32), np.zeros(5, np.int32), z[:1], backend="pallas_gpu"
    )
    assert plan is not None, "these shapes must run on the kernel, not the reference"

    from jaxrt.kernels import add_norm, decode_mlp, decode_qkv

    traced = []  # the norm-fused kernels' traces (each layer of the programs that run them)
    kernels = (
        (decode_qkv, "norm_qkv_rope_write_gpu"),
        (decode_mlp, "norm_gate_up_gpu"),
        (add_norm, "add_rms_norm_gpu"),
    )
    for module, name in kernels:
        kernel = getattr(module, name)
        monkeypatch.setattr(
            module, name, lambda *a, _k=kernel, _n=name, **k: traced.append((_n, a[0].shape)) or _k(*a, **k)
        )
    monkeypatch.setenv("JAXRT_ATTENTION_INTERPRET", "1")
    monkeypatch.setenv("JAXRT_FUSED_GATE_UP", "1")  # opt-in: the gate/up kernel runs here too
    kwargs = dict(
        dtype="float32",
        chunked_prefill_size=16,
        max_running_requests=4,
        context_length=128,
        num_pages=64,
        single_token_bucket=True,  # as on GPUs: a lone stream's steps take the one-token kernels
    )
    with jaxrt.Engine(model_path=path, attention_backend="pallas_gpu", **kwargs) as llm:
        picked = record_buckets(llm)
        ids = [llm.tokenizer.encode(p) for p in PROMPTS[:3]]
        params = {"temperature": 0, "max_new_tokens": 12, "min_new_tokens": 12}
        outs = llm.generate(input_ids=ids, sampling_params=params)
        expected = hf_greedy(hf_model(path), ids, 12)
        assert [o["output_ids"] for o in outs] == expected
        # A lone stream: its decode steps run the 1-token program, whose layers norm, project, rope and
        # write k / v in one kernel (kernels.norm_qkv_rope_write), and (opted in) norm and gate their MLP
        # input in another (kernels.norm_gate_up).
        picked.clear()
        alone = llm.generate(input_ids=ids[1], sampling_params=params)
        assert alone["output_ids"] == expected[1]
        assert picked.count(1) >= 10, picked
        hidden = hf_model(path).config.hidden_size
        one_token = {(n, (1, hidden)) for n in ("norm_qkv_rope_write_gpu", "norm_gate_up_gpu")}
        assert one_token <= set(traced), traced
        # The 8- and 16-token programs (the three requests' decodes, prefill chunks) add and norm in one kernel.
        assert {("add_rms_norm_gpu", (8, hidden)), ("add_rms_norm_gpu", (16, hidden))} <= set(traced), traced
        assert {n for n, _ in traced} == {n for _, n in kernels}, traced
        assert_no_leak(llm)


@pytest.mark.parametrize("impl", ["native", "transformers"])
def test_fresh_prompt_program_matches_the_paged_kernel(tmp_path, monkeypatch, impl):
    """A step of fresh prompts runs its own program, whose attention is cuDNN's over the gathered K/V rows
    (XLA's attention with a segment mask in the interpreter, here), and a step of prompts behind cached
    prefixes (a long prompt's second chunk; a prompt that hits the radix cache) the prefixed program (own rows
    and prefix rows attended apart and merged), with decodes before them taken by the paged kernel. Each
    request's first two tokens and their top-20 log-probabilities match the paged kernel's (a second engine with ``JAXRT_CUDNN_PREFILL=0``) in bf16; native and through the
    fallback."""
    from jaxrt.kernels import cudnn_prefill

    monkeypatch.setattr(cudnn_prefill, "MIN_TOKENS", 32)  # small buckets stand in for long prompts
    monkeypatch.setattr(cudnn_prefill, "MIN_WORK", 0)
    monkeypatch.setattr(cudnn_prefill, "MIN_PREFIX_CAPACITY", 128)
    monkeypatch.setattr(cudnn_prefill, "MAX_SEQS", 2)
    monkeypatch.setenv("JAXRT_ATTENTION_INTERPRET", "1")
    path = make_tiny_llama(
        tmp_path / "m", None, vocab_size=512, num_attention_heads=4, num_key_value_heads=1, head_dim=64
    )
    rng = np.random.default_rng(0)
    sizes = (40, 20, 100, 30, 30, 25, 10, 11, 12, 95)
    first, second, long, more, a, b, *short, later = (rng.integers(3, 500, n).tolist() for n in sizes)
    # Fresh prefills (buckets 64 and 32); a 100-token prompt in chunks of 64 (fresh) and 36 (behind its first
    # chunk); the first prompt and 30 more tokens (38 new behind its 32 cached); two prompts in one step; three
    # short prompts with a long one's first chunk (four prompts: the paged kernel), then their decodes beside
    # the long one's second chunk: three decodes and a chunk, more sequences than cuDNN's slots (cut to 2
    # here), so the decodes must go to the paged kernel on their own (split_attention).
    prompts = [[first], [second], [long], [first + more], [a, b], [*short, later]]
    kwargs = dict(
        dtype="bfloat16",
        chunked_prefill_size=64,
        max_running_requests=4,
        context_length=128,
        num_pages=64,
        skip_tokenizer_init=True,
        attention_backend="pallas_gpu",
        impl=impl,
    )
    params = {"temperature": 0, "max_new_tokens": 4, "min_new_tokens": 4}
    results = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("JAXRT_CUDNN_PREFILL", flag)
        with jaxrt.Engine(model_path=path, **kwargs) as llm:
            assert llm.runner.fresh_buckets == ([32, 64] if flag == "1" else [])
            keys = record_forward_keys(llm)
            outs = []
            for p in prompts:
                got = llm.generate(
                    input_ids=p, sampling_params=params, return_logprob=True, top_logprobs_num=20
                )
                outs += got
            results[flag] = [(o["output_ids"], o["meta_info"]["output_top_logprobs"][:2]) for o in outs]
            assert_no_leak(llm)
            assert outs[3]["meta_info"]["cached_tokens"] > 0
            if flag == "1":
                assert llm.runner.bucket_capacities == {64: [128]}
                started = llm.runner.startup_keys()
                assert ("forward", 64, "prefixed", 128, "decodes") in started
                assert ("forward", 64, "fresh", "decodes") in started
                assert ("forward", 32, "fresh", "decodes") not in started  # no room beside 32 prompt tokens
                cudnn = [k for k in keys if len(k) > 2]
                assert cudnn == [
                    ("forward", 64, "fresh"),
                    ("forward", 32, "fresh"),
                    ("forward", 64, "fresh"),
                    ("forward", 64, "prefixed", 128),
                    ("forward", 64, "prefixed", 128),
                    ("forward", 64, "fresh"),
                    ("forward", 64, "prefixed", 128, "decodes"),
                ], keys
    for (ids, tops), (ids0, tops0) in zip(results["1"], results["0"], strict=True):
        assert ids[:2] == ids0[:2]
        for top, top0 in zip(tops, tops0, strict=True):
            lp, lp0 = ({tok: v for v, tok, _ in t} for t in (top, top0))
            both = lp.keys() & lp0.keys()
            assert len(both) >= 15
            assert max(abs(lp[k] - lp0[k]) for k in both) < 0.1  # bf16: 0.03 here; 0.56 with a 1.5x scale


@pytest.mark.parametrize(
    "change,has",
    [
        ({}, True),
        (dict(attn_logit_softcap=50.0), False),  # Gemma 2: every layer soft-capped
        (dict(sliding_window=64), False),  # a window on every layer
        (dict(sliding_window=64, layer_types=("sliding_attention", "full_attention")), True),  # Gemma 3
        (dict(sliding_window=64, layer_types=("sliding_attention",) * 2), False),
    ],
)
def test_cudnn_programs_only_for_models_with_a_layer_in_scope(change, has):
    """The fresh-prompt and prefixed programs are made only when some attention layer can take cuDNN's path;
    otherwise they would trace the same as the normal programs and only cost start-up compiles."""
    from jaxrt.config import ModelConfig
    from jaxrt.model_runner import has_cudnn_layers

    cfg = ModelConfig("llama", 64, 32, 64, 2, 4, 2, 16, 256, **change)
    assert has_cudnn_layers(cfg) == has


@pytest.mark.gpu
@mosaic_gpu_marks()[2]
def test_small_decode_programs_on_split_mosaic_tilings_match_triton(tmp_path, monkeypatch):
    """bf16 on a Hopper GPU: 12 requests decoding together run the engine's 16-token program, which takes the
    Mosaic kernel with 2 kv splits (Llama-3.2-1B heads); with ``JAXRT_MOSAIC_DECODE=0`` the same steps run
    the Triton kernel. Greedy tokens and their logprobs agree up to any divergence (bf16 adds in another
    order, so a near tie may flip a token). No tokenizer: it runs where the default model is not cached."""
    import jax.numpy as jnp

    from jaxrt.kernels import _pallas_common, pallas_gpu

    heads = dict(num_attention_heads=32, num_key_value_heads=8, head_dim=64)
    path = make_tiny_llama(
        tmp_path / "m",
        None,
        vocab_size=1000,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=4,
        max_position_embeddings=1024,
        **heads,
    )
    cfg = pallas_gpu.mosaic_decode_config(
        num_tokens=16,
        num_q_heads=32,
        num_kv_heads=8,
        head_dim=64,
        page_size=16,
        kv_dtype=jnp.bfloat16,
        num_sms=_pallas_common.num_sms(),
    )
    assert cfg is not None and cfg.num_splits > 1, "the 16-token program must take a split Mosaic tiling"
    rng = np.random.default_rng(0)
    prompts = [rng.integers(5, 995, int(n)).tolist() for n in rng.integers(200, 900, 12)]
    params = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}
    kw = dict(
        dtype="bfloat16",
        max_running_requests=16,
        context_length=1024,
        page_size=16,
        skip_tokenizer_init=True,
        background_compile=False,  # every program from the first step: the 16-token one runs the decodes
    )
    runs = {}
    try:
        for name, flag, backend in (
            ("mosaic", "1", "auto"),
            ("triton", "0", "auto"),
            ("xla", "1", "reference"),
        ):
            monkeypatch.setenv("JAXRT_MOSAIC_DECODE", flag)
            with jaxrt.Engine(model_path=path, attention_backend=backend, **kw) as llm:
                picked = record_buckets(llm)
                runs[name] = _greedy_logprobs(llm, prompts, params)
                assert 16 in picked, picked  # (a decode loop dispatches several steps at once)
                assert_no_leak(llm)
    finally:
        pallas_gpu.set_mosaic_decode(True)
    _assert_as_close_as_the_kernel_to_xla(runs["mosaic"], runs["triton"], runs["xla"])


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU")
def test_lone_stream_one_token_kernels_match_separate_kernels(tmp_path, monkeypatch):
    """bf16 on a GPU: a lone stream's decode steps (the 1-token program) with the norm, q/k/v product, rope
    and KV write in one kernel, and the second norm, gate/up product and activation in another, agree with
    the same steps on separate kernels (``JAXRT_FUSED_QKV=0``, ``JAXRT_FUSED_GATE_UP=0``). Llama-3.2-1B's
    attention shapes on a tokenizer-free model."""
    path = make_tiny_llama(
        tmp_path / "m",
        None,
        vocab_size=1000,
        hidden_size=2048,
        intermediate_size=1024,
        num_hidden_layers=2,
        max_position_embeddings=1024,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
    )
    rng = np.random.default_rng(1)
    prompts = [rng.integers(5, 995, int(n)).tolist() for n in (300, 700)]
    params = {"temperature": 0, "max_new_tokens": 48, "ignore_eos": True}
    kw = dict(dtype="bfloat16", max_running_requests=4, context_length=1024, skip_tokenizer_init=True)
    kw.update(single_token_bucket=True, background_compile=False)  # the 1-token program from the first step
    runs = {}
    for name, flag, backend in (("fused", "1", "auto"), ("separate", "0", "auto"), ("xla", "0", "reference")):
        monkeypatch.setenv("JAXRT_FUSED_QKV", flag)
        monkeypatch.setenv("JAXRT_FUSED_GATE_UP", flag)
        with jaxrt.Engine(model_path=path, attention_backend=backend, **kw) as llm:
            picked = record_buckets(llm)
            runs[name] = [_greedy_logprobs(llm, [p], params)[0] for p in prompts]
            assert picked.count(1) >= 10, picked  # (a decode loop dispatches several steps at once)
            assert_no_leak(llm)
    _assert_as_close_as_the_kernel_to_xla(runs["fused"], runs["separate"], runs["xla"])


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU")
def test_fresh_prompt_cudnn_program_matches_the_paged_kernel_on_gpu(tmp_path, monkeypatch):
    """bf16 on a GPU: steps of fresh prompts in buckets of >= 2048 tokens (one prompt, or two packed) run the
    fresh-prompt program (cuDNN's attention); their greedy tokens and log-probabilities agree with the paged
    kernel's (``JAXRT_CUDNN_PREFILL=0``) about as closely as the paged kernel's agree with XLA's attention."""
    path = make_tiny_llama(
        tmp_path / "m",
        None,
        vocab_size=1000,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=2,
        max_position_embeddings=4096,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
    )
    rng = np.random.default_rng(2)
    # Two prompts alone (buckets 2048 and 4096), then two together (packed segments, bucket 4096).
    prompts = [[rng.integers(5, 995, n).tolist()] for n in (2048, 2100)]
    prompts.append([rng.integers(5, 995, n).tolist() for n in (2000, 1500)])
    params = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}
    kw = dict(dtype="bfloat16", max_running_requests=4, context_length=4096, skip_tokenizer_init=True)
    kw.update(background_compile=False)  # the fresh-prompt programs from the first step
    runs = {}
    for name, flag, backend in (("cudnn", "1", "auto"), ("paged", "0", "auto"), ("xla", "0", "reference")):
        monkeypatch.setenv("JAXRT_CUDNN_PREFILL", flag)
        with jaxrt.Engine(model_path=path, attention_backend=backend, **kw) as llm:
            keys = record_forward_keys(llm)
            runs[name] = [out for p in prompts for out in _greedy_logprobs(llm, p, params)]
            fresh = [k for k in keys if len(k) == 3]
            want = [("forward", 2048, "fresh"), ("forward", 4096, "fresh"), ("forward", 4096, "fresh")]
            assert fresh == (want if flag == "1" else []), keys
            assert_no_leak(llm)
    _assert_as_close_as_the_kernel_to_xla(runs["cudnn"], runs["paged"], runs["xla"])


def _greedy_logprobs(llm, prompts, params) -> list[tuple[list[int], list[float]]]:
    outs = llm.generate(input_ids=prompts, sampling_params=params, return_logprob=True)
    return [(o["output_ids"], [lp for lp, _, _ in o["meta_info"]["output_token_logprobs"]]) for o in outs]


def _agreement(a, b) -> tuple[int, list[float]]:
    """Greedy runs ``a`` and ``b`` (per request: tokens, logprobs): how many tokens agree before each
    request's first divergence, and the |logprob difference| of those tokens."""
    agreed, diffs = 0, []
    for (ids_a, lp_a), (ids_b, lp_b) in zip(a, b, strict=True):
        n = next((i for i, (x, y) in enumerate(zip(ids_a, ids_b, strict=True)) if x != y), len(ids_a))
        agreed += n
        diffs += [abs(x - y) for x, y in zip(lp_a[:n], lp_b[:n], strict=True)]
    return agreed, diffs


def _assert_as_close_as_the_kernel_to_xla(new, kernel, xla) -> None:
    """bf16 greedy decoding of a random model flips near ties and lets early rounding differences grow
    along a sequence, so a fixed tolerance says little. The yardstick is the established kernel's own
    distance from XLA's attention on the same steps: ``new`` must be at least about as close to ``kernel``
    (tokens agreeing before a divergence, median |logprob difference|)."""
    agreed, diffs = _agreement(new, kernel)
    ref_agreed, ref_diffs = _agreement(kernel, xla)
    assert agreed >= 0.5 * ref_agreed, (agreed, ref_agreed)
    assert diffs and ref_diffs
    assert np.median(diffs) <= 2 * np.median(ref_diffs) + 1e-3, (np.median(diffs), np.median(ref_diffs))


def _continuous_run(path: str, steps: int, prompts, params, **kw):
    with jaxrt.Engine(
        model_path=path,
        dtype="float32",
        max_running_requests=4,
        chunked_prefill_size=64,
        context_length=160,
        num_pages=200,
        num_continuous_decode_steps=steps,
        **kw,
    ) as llm:
        outs = llm.generate(input_ids=prompts, sampling_params=params)
        again = llm.generate(input_ids=prompts, sampling_params=params)  # radix reuse on top
        num_steps = llm.load_stats()["num_steps"]
        assert_no_leak(llm)
    return [o["output_ids"] for o in outs], [o["output_ids"] for o in again], outs, num_steps


@pytest.mark.parametrize("overlap", [True, False])
def test_continuous_decode_matches_single_steps(tiny_llama_dir, overlap):
    """Several decode steps per dispatch give exactly the tokens of one step per dispatch: greedy, seeded
    sampling, rows of different lengths ending inside a dispatch, a stop id hit mid-dispatch, a request
    capped by the context, logprobs; in far fewer dispatches."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    prompts = [tok.encode(p) for p in PROMPTS[:4]]
    base = {"ignore_eos": True, "return_logprob": True}
    params = [
        {"temperature": 0, "max_new_tokens": 9},
        {"temperature": 0.8, "top_p": 0.9, "seed": 5, "max_new_tokens": 14},
        {"temperature": 0, "max_new_tokens": 30},
        {"temperature": 0, "max_new_tokens": 200},  # capped by context_length
    ]
    params = [{**base, **p} for p in params]
    kw = {} if overlap else {"disable_overlap_schedule": True}
    single, single_again, single_outs, single_steps = _continuous_run(
        tiny_llama_dir, 1, prompts, params, **kw
    )
    multi, multi_again, multi_outs, multi_steps = _continuous_run(tiny_llama_dir, 4, prompts, params, **kw)
    assert multi == single and multi_again == single_again == single
    assert multi_steps < 0.6 * single_steps
    for a, b in zip(single_outs, multi_outs, strict=True):
        assert a["meta_info"]["finish_reason"] == b["meta_info"]["finish_reason"]
        np.testing.assert_allclose(
            [lp for lp, _, _ in b["meta_info"]["output_token_logprobs"]],
            [lp for lp, _, _ in a["meta_info"]["output_token_logprobs"]],
            rtol=1e-5,
            atol=1e-5,
        )
    # A stop id that first appears mid-dispatch ends the request there; later tokens are dropped.
    stop = single[2][6]
    first = single[2].index(stop)
    stopped = [{**params[2], "stop_token_ids": [stop]}]
    out_single = _continuous_run(tiny_llama_dir, 1, prompts[2:3], stopped, **kw)[0]
    out_multi = _continuous_run(tiny_llama_dir, 4, prompts[2:3], stopped, **kw)[0]
    assert out_multi == out_single == [single[2][: first + 1]]


def test_tokens_accepted_at_once_match_token_by_token(tiny_llama_dir):
    """The engine appends a row's tokens at once when no stop string needs matching token by token; a stop
    string that never matches makes it append and decode them one by one. Both give the same tokens, finish
    reasons and log-probabilities: a stop id hit mid-dispatch, min_new_tokens holding it back, max_new_tokens and the
    context length ending rows inside a continuous decode."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    prompts = [tok.encode(p) for p in PROMPTS[:4]]
    runs = _continuous_run(tiny_llama_dir, 4, prompts[1:2], [{"temperature": 0, "max_new_tokens": 12}])
    greedy = runs[0][0]
    stop = greedy[6]
    params = [
        {"temperature": 0, "max_new_tokens": 9, "ignore_eos": True},
        {"temperature": 0, "max_new_tokens": 12, "stop_token_ids": [stop]},
        {"temperature": 0, "max_new_tokens": 12, "stop_token_ids": [stop], "min_new_tokens": 8},
        {"temperature": 0, "max_new_tokens": 200, "ignore_eos": True},  # capped by context_length
    ]
    params = [{**p, "return_logprob": True} for p in params]
    never = [{**p, "stop": ["\x00never"]} for p in params]
    at_once, _, outs_at_once, _ = _continuous_run(tiny_llama_dir, 4, prompts, params)
    each, _, outs_each, _ = _continuous_run(tiny_llama_dir, 4, prompts, never)
    assert at_once == each
    assert at_once[1] == greedy[: greedy.index(stop) + 1]
    for a, b in zip(outs_at_once, outs_each, strict=True):
        assert a["meta_info"]["finish_reason"] == b["meta_info"]["finish_reason"]
        assert a["meta_info"]["output_token_logprobs"] == b["meta_info"]["output_token_logprobs"]


@pytest.mark.parametrize("impl", ["native", "transformers"])
def test_prompt_logprobs_match_transformers(tiny_llama_dir, impl):
    """``logprob_start_len`` (SGLang's): the prompt's own tokens get log-probabilities, each from the logits
    of the row before it, equal to transformers' log-softmax over the prompt; top alternatives too. In chunks
    (a 40-token prompt in a 16-token budget), beside a request without them, and for a prompt the radix cache
    holds (its wanted positions are computed again, not read from the cache); a start past 0 returns only
    from there. f32."""
    import torch

    from jaxrt.scheduler import PROMPT_LOGPROB_TOKENS

    assert PROMPT_LOGPROB_TOKENS >= 16
    rng = np.random.default_rng(3)
    ref = hf_model(tiny_llama_dir)
    vocab = ref.config.vocab_size
    prompt, other = (rng.integers(3, vocab, n).tolist() for n in (40, 23))
    with torch.no_grad():
        logp = torch.log_softmax(ref(torch.tensor([prompt])).logits[0].double(), -1).numpy()
    want = [logp[p - 1, prompt[p]] for p in range(1, len(prompt))]
    top_want = [np.argsort(-logp[p - 1])[:3].tolist() for p in range(1, len(prompt))]
    kwargs = dict(dtype="float32", chunked_prefill_size=16, max_running_requests=4, page_size=4, impl=impl)
    with jaxrt.Engine(model_path=tiny_llama_dir, **kwargs) as llm:
        params = {"temperature": 0, "max_new_tokens": 2}
        for attempt in range(2):  # the second time the prompt's pages are in the radix cache
            a, b = llm.generate(
                input_ids=[prompt, other],
                sampling_params=params,
                return_logprob=True,
                top_logprobs_num=3,
                logprob_start_len=0,
            )
            got = a["meta_info"]["input_token_logprobs"]
            assert [t for _, t, _ in got] == prompt
            assert got[0][0] is None and a["meta_info"]["input_top_logprobs"][0] is None
            np.testing.assert_allclose([lp for lp, _, _ in got[1:]], want, atol=2e-4)
            tops = a["meta_info"]["input_top_logprobs"][1:]
            assert [[t for _, t, _ in row] for row in tops] == top_want
            assert len(b["meta_info"]["input_token_logprobs"]) == len(other)
            if attempt:
                assert a["meta_info"]["cached_tokens"] == 0  # cached pages, not read for wanted positions
        late = llm.generate(
            input_ids=prompt, sampling_params=params, return_logprob=True, logprob_start_len=30
        )
        got = late["meta_info"]["input_token_logprobs"]
        assert [t for _, t, _ in got] == prompt[30:]
        np.testing.assert_allclose([lp for lp, _, _ in got], want[29:], atol=2e-4)
        assert 0 < late["meta_info"]["cached_tokens"] <= 29  # the positions before 29 came from the cache
        plain = llm.generate(input_ids=prompt, sampling_params=params, return_logprob=True)
        assert "input_token_logprobs" not in plain["meta_info"]
        assert_no_leak(llm)
