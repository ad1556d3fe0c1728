"""Helpers for tests/models: tiny random checkpoints of every native family and two parity harnesses.

- ``native_chunk_logits``: the jaxrt model through real ``ForwardBatch``es over a paged KV pool (pages
  scattered, prefill in one or several chunks, all prompts in one ragged batch); logits of each chunk's last
  token.
- ``engine_greedy``: ``jaxrt.Engine`` (scheduler, paged KV, radix cache, chunked prefill) greedy tokens.

The transformers side runs in f32 with ``attn_implementation="eager"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

VOCAB = 384
BOS, EOS, PAD = 1, 2, 0

TINY = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    initializer_range=0.2,  # peaked logits: greedy argmax is not decided by float noise
    bos_token_id=BOS,
    eos_token_id=EOS,
    pad_token_id=PAD,
)

WINDOW = 8  # shorter than all but the shortest prompt
PROMPT_LENS = (3, 11, 26, 41)

# family -> (transformers config class, overrides). Each family's distinguishing features are switched on:
# sliding windows shorter than the prompts, soft caps in their non-linear range, rope scaling.
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": (
        "LlamaConfig",
        dict(
            attention_bias=True,
            mlp_bias=True,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=10000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=32,
            ),
        ),
    ),
    "mistral": ("MistralConfig", dict(sliding_window=WINDOW, head_dim=16)),
    "qwen2": (
        "Qwen2Config",
        dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1, tie_word_embeddings=False),
    ),
    "qwen3": (
        "Qwen3Config",
        dict(
            head_dim=16,
            attention_bias=True,
            use_sliding_window=True,
            sliding_window=WINDOW,
            max_window_layers=1,
            tie_word_embeddings=True,
        ),
    ),
    "gemma": ("GemmaConfig", dict(head_dim=16, hidden_act="gelu_pytorch_tanh", num_key_value_heads=1)),
    "gemma2": (
        "Gemma2Config",
        dict(
            head_dim=16,
            num_hidden_layers=4,
            query_pre_attn_scalar=24,
            sliding_window=WINDOW,
            attn_logit_softcapping=3.0,
            final_logit_softcapping=12.0,
            tie_word_embeddings=False,  # tied, these tiny random models just repeat one token
        ),
    ),
    "gemma3": (
        "Gemma3TextConfig",
        dict(
            head_dim=16,
            num_hidden_layers=4,
            query_pre_attn_scalar=24,
            sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            final_logit_softcapping=12.0,
            tie_word_embeddings=False,
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 100000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
        ),
    ),
    "phi3": (
        "Phi3Config",
        dict(
            sliding_window=2 * WINDOW,
            # Above prompt + generation: the short factors throughout (see test_models_features for the long
            # ones; transformers re-encodes a sequence that crosses it, jaxrt does not).
            original_max_position_embeddings=128,
            rope_parameters=dict(
                rope_type="longrope",
                rope_theta=10000.0,
                partial_rotary_factor=0.5,
                short_factor=[1.0, 1.3, 1.9, 2.5],
                long_factor=[1.2, 2.0, 4.0, 9.0],
            ),
        ),
    ),
    "olmo2": ("Olmo2Config", dict(attention_bias=False)),
    "granite": (
        "GraniteConfig",
        dict(
            embedding_multiplier=6.0,
            residual_multiplier=0.4,
            attention_multiplier=0.09,
            logits_scaling=2.5,
            attention_bias=True,
        ),
    ),
}


def make_checkpoint(out: Path, config_cls: str, seed: int = 0, **overrides: Any):
    """Random f32 checkpoint from a transformers config class; norms and biases randomised too (their
    defaults, ones and zeros, would hide a wrong mapping). Returns (path, the transformers model)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    cfg = getattr(transformers, config_cls)(**{**TINY, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
    model.eval()
    model.save_pretrained(out)
    return str(out), model


def prompts_for(seed: int, lens: tuple[int, ...] = PROMPT_LENS) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, VOCAB, size=n).tolist() for n in lens]


def hf_all_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def hf_greedy(model, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """transformers' greedy generate, one prompt at a time, eos suppressed (min_new_tokens)."""
    import torch

    outs = []
    for ids in prompts:
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens,
                pad_token_id=PAD,
            )
        outs.append(out[0, len(ids) :].tolist())
    return outs


def assert_logits_close(ours: np.ndarray, ref: np.ndarray, what: str = "") -> None:
    scale = max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=2e-4 * scale, err_msg=what)


@dataclass
class NativeModel:
    """A loaded jaxrt model with one jitted forward (fixed shapes, so one compile serves every call)."""

    cfg: Any
    state: Any
    forward: Any


def load_native(
    path: str, dtype: str = "float32", attention_backend: str = "reference", interpret: bool = False
) -> NativeModel:
    from jaxrt.converters.loader import build_native_model, load_hf_config, native_model_config
    from jaxrt.step import nnx_forward

    cfg = native_model_config(load_hf_config(path))
    graphdef, state = build_native_model(
        cfg, path, dtype, attention_backend, interpret=interpret, use_cache=False
    )
    return NativeModel(cfg, state, jax.jit(nnx_forward(graphdef)))


def native_chunk_logits(
    model: NativeModel,
    prompts: list[list[int]],
    chunks: int,
    page_size: int = 4,
    num_tokens: int = 128,
    seed: int = 0,
) -> dict[tuple[int, int], np.ndarray]:
    """{(prompt index, position): logits} at the last token of every prefill chunk of every prompt.

    All prompts share each step's ragged batch; chunk ``c`` of a prompt of length n covers
    ``[n*c//chunks, n*(c+1)//chunks)``. Pages are handed out in a shuffled order.
    """
    from jaxrt.batch import ForwardBatch
    from jaxrt.page_table import NULL_PAGE

    cfg = model.cfg
    n_seqs = len(prompts)
    pages_per_seq = -(-max(len(p) for p in prompts) // page_size)
    num_pages = 1 + n_seqs * pages_per_seq
    order = np.random.default_rng(seed).permutation(np.arange(1, num_pages))
    seq_pages = [order[i * pages_per_seq : (i + 1) * pages_per_seq] for i in range(n_seqs)]
    shape = (num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)
    kv = [(jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32)) for _ in range(cfg.num_layers)]
    out: dict[tuple[int, int], np.ndarray] = {}
    for c in range(chunks):
        rows = []
        for i, ids in enumerate(prompts):
            lo, hi = len(ids) * c // chunks, len(ids) * (c + 1) // chunks
            if hi > lo:
                rows.append((i, lo, hi))
        input_ids = np.zeros(num_tokens, np.int32)
        positions = np.zeros(num_tokens, np.int32)
        slots = np.full(num_tokens, -1, np.int32)
        cu = np.zeros(n_seqs + 1, np.int32)
        kv_lens = np.zeros(n_seqs, np.int32)
        page_indices = np.full((n_seqs, pages_per_seq), NULL_PAGE, np.int32)
        logits_indices = np.zeros(n_seqs, np.int32)
        t = 0
        for r, (i, lo, hi) in enumerate(rows):
            pos = np.arange(lo, hi, dtype=np.int32)
            input_ids[t : t + hi - lo] = prompts[i][lo:hi]
            positions[t : t + hi - lo] = pos
            slots[t : t + hi - lo] = seq_pages[i][pos // page_size] * page_size + pos % page_size
            page_indices[r] = seq_pages[i]
            kv_lens[r] = hi
            t += hi - lo
            cu[r + 1] = t
            logits_indices[r] = t - 1
        cu[len(rows) + 1 :] = t
        assert t <= num_tokens
        batch = ForwardBatch(
            input_ids=input_ids,
            positions=positions,
            slot_mapping=slots,
            cu_q_lens=cu,
            kv_lens=kv_lens,
            page_indices=page_indices,
            num_seqs=np.array([len(rows)], np.int32),
            logits_indices=logits_indices,
            prev_index=np.full(num_tokens, -1, np.int32),
            state_slots=np.full(n_seqs, -1, np.int32),
        )
        logits, kv = model.forward(model.state, kv, batch)
        logits = np.asarray(logits)
        for r, (i, _, hi) in enumerate(rows):
            out[(i, hi - 1)] = logits[r]
    return out


ENGINE_KWARGS = dict(
    dtype="float32",
    page_size=4,
    chunked_prefill_size=16,  # token buckets 8 and 16: two compiles per engine
    max_running_requests=8,
    num_pages=160,
    context_length=128,
    skip_tokenizer_init=True,
)


def engine_greedy(path: str, prompts: list[list[int]], max_new_tokens: int = 32, **overrides: Any):
    """Greedy tokens from jaxrt.Engine for all prompts batched, twice (the second run hits the radix cache).

    Returns (first outputs, second outputs, cached prompt tokens of the second run).
    """
    import jaxrt

    params = {"temperature": 0, "max_new_tokens": max_new_tokens, "min_new_tokens": max_new_tokens}
    with jaxrt.Engine(model_path=path, **{**ENGINE_KWARGS, **overrides}) as llm:
        first = llm.generate(input_ids=prompts, sampling_params=params)
        again = llm.generate(input_ids=prompts, sampling_params=params)
    return (
        [o["output_ids"] for o in first],
        [o["output_ids"] for o in again],
        [o["meta_info"]["cached_tokens"] for o in again],
    )
