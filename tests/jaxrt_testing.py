"""Helpers for tests: tiny checkpoints, transformers references, page-leak checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

TINY_LLAMA = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    initializer_range=0.2,  # peaked logits: greedy argmax is not decided by float noise
    tie_word_embeddings=False,
)


# A small engine for the tiny random Llama on CPU (the engine-API modules' settings).
TINY_ENGINE = dict(
    dtype="float32",
    chunked_prefill_size=32,
    max_running_requests=8,
    context_length=256,
    num_pages=400,
    page_size=8,
)


def make_tiny_llama(out: Path, tokenizer_from: str | None, seed: int = 0, **overrides: Any) -> str:
    """Random-weight LlamaForCausalLM with the default model's tokenizer, saved as a transformers checkpoint.
    ``tokenizer_from=None``: no tokenizer (engines run it with ``skip_tokenizer_init=True``; the overrides
    give ``vocab_size``), so it builds where the default model is not cached."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_from) if tokenizer_from else None
    ids = {}
    if tok is not None:
        ids = dict(
            vocab_size=len(tok),
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        )
    cfg = LlamaConfig(**{**ids, **TINY_LLAMA, **overrides})
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    model.save_pretrained(out)
    if tok is not None:
        tok.save_pretrained(out)
    return str(out)


def hf_model(path: str):
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    return m.eval()


def hf_generate(model, ids: list[int], **kwargs) -> list[int]:
    """transformers' greedy ``generate`` of one prompt (no padding): its new tokens. ``kwargs`` go to generate
    (lengths, penalties, ``sequence_bias``, logits processors, ...)."""
    import torch

    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            do_sample=False,
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            pad_token_id=model.config.pad_token_id,
            **kwargs,
        )
    return out[0, len(ids) :].tolist()


def hf_greedy(model, prompts_ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """transformers' greedy generate, one prompt at a time (no padding effects), eos suppressed throughout."""
    import torch

    outs = []
    for ids in prompts_ids:
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens,
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                pad_token_id=model.config.pad_token_id,
            )
        outs.append(out[0, len(ids) :].tolist())
    return outs


def hf_last_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].float().numpy()


def assert_no_leak(engine) -> None:
    """Every page is free or held by the radix cache alone; nothing is running or queued."""
    import time

    deadline = time.time() + 10
    while time.time() < deadline and (engine.scheduler.running or engine.scheduler.waiting):
        time.sleep(0.05)
    assert not engine.scheduler.running and not engine.scheduler.waiting
    alloc = engine.allocator
    assert alloc.num_used == engine.radix.num_cached_pages, (alloc.num_used, engine.radix.num_cached_pages)
    engine.scheduler.check_invariants()
    for p in range(1, alloc.num_pages):
        assert alloc.refcount(p) in (0, 1)


def chunked_prefill_logits(
    forward,
    params,
    cfg,
    prompts_ids: list[list[int]],
    page_size: int,
    chunks: int,
    num_tokens: int,
    num_seqs: int,
) -> np.ndarray:
    """Last-token logits of each prompt through ``forward`` over a real paged KV pool.

    All prompts go in one ragged batch per step; each is prefilled in ``chunks`` steps, so later chunks attend
    to KV written by earlier ones. ``forward(params, kv_caches, batch) -> (logits, kv_caches)`` is the model
    as `jaxrt.step` takes it (native or fallback).
    """
    import jax
    import jax.numpy as jnp

    from jaxrt.batch import build_batch
    from jaxrt.page_table import PageAllocator
    from jaxrt.request import Request
    from jaxrt.sampling_params import SamplingParams
    from jaxrt.scheduler import ScheduledRequest, SchedulerOutput

    fwd = jax.jit(forward)
    num_pages = 64
    shape = (num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)
    kv = [(jnp.zeros(shape), jnp.zeros(shape)) for _ in range(cfg.num_layers)]
    # recurrent state (models with state_specs): slot i for prompt i, plus the scratch slot
    kv += [jnp.zeros((len(prompts_ids) + 1, *s.shape), s.dtype) for s in cfg.state_specs]
    alloc = PageAllocator(num_pages)
    reqs = []
    for i, ids in enumerate(prompts_ids):
        r = Request(str(i), ids, SamplingParams(), seed=0)
        r.page_ids = alloc.alloc(-(-len(ids) // page_size))
        r.state_slot = i
        reqs.append(r)
    logits = None
    for c in range(chunks):
        sched = SchedulerOutput()
        for r in reqs:
            n = len(r.prompt_token_ids)
            lo, hi = n * c // chunks, n * (c + 1) // chunks
            if hi > lo:
                sched.scheduled.append(ScheduledRequest(r, lo, hi - lo, hi == n))
        fb, *_ = build_batch(
            sched,
            num_tokens=num_tokens,
            num_seqs=num_seqs,
            pages_per_seq=16,
            page_size=page_size,
            vocab_size=cfg.vocab_size,
            history_len=1,
            stop_ids={},
        )
        logits, kv = fwd(params, kv, fb)
    # Every prompt's last chunk is in the last step, in prompt order.
    return np.asarray(logits)[: len(prompts_ids)]


def f64(a) -> np.ndarray:
    """A jax or numpy array as float64 numpy (bf16 through f32), for comparisons with a float64 oracle."""
    import jax.numpy as jnp

    return np.asarray(jnp.asarray(a).astype(jnp.float32), np.float64)


def mosaic_gpu_marks():
    """Skip marks of the few-token Mosaic GPU kernels' tests: (needs the Pallas GPU interpreter of jax >=
    0.11, needs jax >= 0.11's Mosaic GPU API (CUDA lowering runs on any machine), needs a Hopper GPU)."""
    import jax
    import pytest

    from jaxrt.kernels import mosaic_gpu
    from jaxrt.kernels.mosaic_mlp import plgpu

    return (
        pytest.mark.skipif(
            plgpu is None or not hasattr(plgpu, "InterpretGPUParams"),
            reason="needs jax >= 0.11's Pallas GPU interpreter",
        ),
        pytest.mark.skipif(
            plgpu is None or jax.__version_info__ < (0, 11), reason="needs jax >= 0.11 Mosaic GPU"
        ),
        pytest.mark.skipif(not mosaic_gpu.hopper_available(), reason="needs a Hopper GPU"),
    )


def record_buckets(llm) -> list[int]:
    """The token bucket of every step ``llm`` runs from now on, appended to the returned list as it goes (the
    runner's choice itself is unchanged)."""
    picked: list[int] = []
    pick = llm.runner.pick

    def recording(num_tokens: int, loop: bool = False) -> int:
        picked.append(pick(num_tokens, loop))
        return picked[-1]

    llm.runner.pick = recording
    return picked


def record_forward_keys(llm) -> list[tuple]:
    """The model program key of every single step ``llm`` stages from now on (``("forward", n)`` or
    ``("forward", n, "fresh")``), appended to the returned list (the runner's choice itself is unchanged)."""
    keys: list[tuple] = []
    choose = llm.runner._forward_key

    def recording(fb, n: int) -> tuple:
        keys.append(choose(fb, n))
        return keys[-1]

    llm.runner._forward_key = recording
    return keys


def export_triton_for_h100(jitted, *args):
    """``jax.export`` of ``jitted`` for CUDA on an abstract H100, on any machine (jax >= 0.11): the Pallas ->
    Triton IR lowering of the Pallas kernels inside (the Triton -> PTX compile happens in XLA on the GPU)."""
    import jax
    from jax import export
    from jax._src import mesh as mesh_lib

    h100 = mesh_lib.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
    mesh = jax.sharding.AbstractMesh(
        (1,), ("x",), axis_types=(jax.sharding.AxisType.Auto,), abstract_device=h100
    )
    with jax.sharding.use_abstract_mesh(mesh):
        return export.export(
            jitted,
            platforms=["cuda"],
            disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
        )(*args)
