"""Device-side batch description: the scheduler's decisions as flat, padded int32 arrays.

``ForwardBatch`` is what attention and the model read; ``SamplingBatch`` is what the sampler reads. Both are
pytrees of arrays only: shapes come from a bucket (``num_tokens``, ``num_seqs``), values change every step
without recompiling.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import numpy as np

from jaxrt.page_table import NULL_PAGE
from jaxrt.sampling_params import MAX_TOP_LOGPROBS
from jaxrt.scheduler import SchedulerOutput

MAX_STOP_IDS = 8  # stop ids suppressed on device while min_new_tokens is not reached


def _pytree_dataclass(cls):
    cls = dataclass(frozen=True)(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    return jax.tree_util.register_dataclass(cls, data_fields=names, meta_fields=[])


@_pytree_dataclass
class ForwardBatch:
    input_ids: jax.Array  # [num_tokens] int32
    positions: jax.Array  # [num_tokens] int32
    slot_mapping: jax.Array  # [num_tokens] int32, flat KV slot, -1 for padding
    cu_q_lens: jax.Array  # [num_seqs + 1] int32
    kv_lens: jax.Array  # [num_seqs] int32
    page_indices: jax.Array  # [num_seqs, pages_per_seq] int32
    num_seqs: jax.Array  # [1] int32
    logits_indices: jax.Array  # [num_seqs] int32, row of each sequence's last token
    # Overlap scheduling: token t's id is prev_tokens[prev_index[t]] (the previous step's output, still on
    # the device) when prev_index[t] >= 0, else input_ids[t].
    prev_index: jax.Array  # [num_tokens] int32


@_pytree_dataclass
class SamplingBatch:
    temperature: jax.Array  # [num_seqs] f32
    top_p: jax.Array  # [num_seqs] f32
    top_k: jax.Array  # [num_seqs] int32, vocab size when disabled
    min_p: jax.Array  # [num_seqs] f32
    repetition_penalty: jax.Array  # [num_seqs] f32
    frequency_penalty: jax.Array  # [num_seqs] f32
    presence_penalty: jax.Array  # [num_seqs] f32
    seeds: jax.Array  # [num_seqs] uint32
    sample_index: jax.Array  # [num_seqs] int32: which output token this is (keys the per-request rng)
    stop_ids: jax.Array  # [num_seqs, MAX_STOP_IDS] int32, -1 padding
    suppress_stop: jax.Array  # [num_seqs] bool: min_new_tokens not reached yet
    history: jax.Array  # [num_seqs, history_len] int32 token ids (prompt + output), -1 padding
    history_is_output: jax.Array  # [num_seqs, history_len] bool
    any_sampling: jax.Array  # [] bool: some row is not greedy
    any_penalty: jax.Array  # [] bool
    any_top_logprobs: jax.Array  # [] bool


@_pytree_dataclass
class StepOutput:
    tokens: jax.Array  # [num_seqs] int32
    logprobs: jax.Array  # [num_seqs] f32, log p(token) under the raw model distribution
    top_ids: jax.Array  # [num_seqs, MAX_TOP_LOGPROBS] int32
    top_logprobs: jax.Array  # [num_seqs, MAX_TOP_LOGPROBS] f32


def token_buckets(max_tokens: int, min_bucket: int = 8) -> list[int]:
    """Powers of two from ``min_bucket`` up to and including ``max_tokens``."""
    out, b = [], min_bucket
    while b < max_tokens:
        out.append(b)
        b *= 2
    out.append(max_tokens)
    return out


def pick_bucket(buckets: list[int], n: int) -> int:
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} tokens exceed the largest bucket {buckets[-1]}")


def history_buckets(context_length: int) -> list[int]:
    return [1, *token_buckets(context_length, 64)]


def build_batch(
    sched: SchedulerOutput,
    *,
    num_tokens: int,
    num_seqs: int,
    pages_per_seq: int,
    page_size: int,
    vocab_size: int,
    history_len: int,
    stop_ids: dict[str, list[int]],
) -> tuple[ForwardBatch, SamplingBatch]:
    """Lay out one scheduled step as padded numpy arrays (host side, then handed to the jitted step)."""
    n = len(sched.scheduled)
    assert n <= num_seqs and sched.num_tokens <= num_tokens
    input_ids = np.zeros(num_tokens, np.int32)
    prev_index = np.full(num_tokens, -1, np.int32)
    positions = np.zeros(num_tokens, np.int32)
    slot_mapping = np.full(num_tokens, -1, np.int32)
    cu_q_lens = np.zeros(num_seqs + 1, np.int32)
    kv_lens = np.zeros(num_seqs, np.int32)
    page_indices = np.full((num_seqs, pages_per_seq), NULL_PAGE, np.int32)
    logits_indices = np.zeros(num_seqs, np.int32)

    temperature = np.ones(num_seqs, np.float32)
    top_p = np.ones(num_seqs, np.float32)
    top_k = np.full(num_seqs, vocab_size, np.int32)
    min_p = np.zeros(num_seqs, np.float32)
    rep = np.ones(num_seqs, np.float32)
    freq = np.zeros(num_seqs, np.float32)
    pres = np.zeros(num_seqs, np.float32)
    seeds = np.zeros(num_seqs, np.uint32)
    sample_index = np.zeros(num_seqs, np.int32)
    stops = np.full((num_seqs, MAX_STOP_IDS), -1, np.int32)
    suppress = np.zeros(num_seqs, bool)
    history = np.full((num_seqs, history_len), -1, np.int32)
    history_is_output = np.zeros((num_seqs, history_len), bool)
    any_sampling = any_penalty = any_top = False

    t = 0
    for i, s in enumerate(sched.scheduled):
        req = s.request
        tokens = req.all_token_ids
        q = s.num_new_tokens
        pos = np.arange(s.start, s.start + q, dtype=np.int32)
        known = min(len(tokens), s.start + q)
        if known > s.start:
            input_ids[t : t + known - s.start] = tokens[s.start : known]
        for j, row in enumerate(req.pending_rows[: s.start + q - known]):
            # Sampled by the step still in flight: the device reads it from that step's output.
            prev_index[t + known - s.start + j] = row
        positions[t : t + q] = pos
        pages = np.asarray(req.page_ids, np.int32)
        slot_mapping[t : t + q] = pages[pos // page_size] * page_size + pos % page_size
        page_indices[i, : len(pages)] = pages
        kv_lens[i] = s.start + q
        t += q
        cu_q_lens[i + 1] = t
        logits_indices[i] = t - 1

        sp = req.sampling_params
        temperature[i] = sp.temperature
        top_p[i] = sp.top_p
        top_k[i] = vocab_size if sp.top_k == -1 else min(sp.top_k, vocab_size)
        min_p[i] = sp.min_p
        rep[i] = sp.repetition_penalty
        freq[i] = sp.frequency_penalty
        pres[i] = sp.presence_penalty
        seeds[i] = req.seed & 0xFFFFFFFF
        sample_index[i] = req.num_outputs
        if s.sample and req.num_outputs < sp.min_new_tokens:
            ids = stop_ids.get(req.request_id, [])[:MAX_STOP_IDS]
            stops[i, : len(ids)] = ids
            suppress[i] = True
        if s.sample and not sp.is_greedy:
            any_sampling = True
        if s.sample and sp.uses_penalties:
            any_penalty = True
            hist = tokens[-history_len:]
            history[i, : len(hist)] = hist
            n_out = min(len(req.output_token_ids), len(hist))
            if n_out:
                history_is_output[i, len(hist) - n_out : len(hist)] = True
        if s.sample and sp.top_logprobs_num > 0:
            any_top = True
    cu_q_lens[n + 1 :] = t

    fb = ForwardBatch(
        input_ids=input_ids,
        positions=positions,
        slot_mapping=slot_mapping,
        cu_q_lens=cu_q_lens,
        kv_lens=kv_lens,
        page_indices=page_indices,
        num_seqs=np.array([n], np.int32),
        logits_indices=logits_indices,
        prev_index=prev_index,
    )
    sb = SamplingBatch(
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        repetition_penalty=rep,
        frequency_penalty=freq,
        presence_penalty=pres,
        seeds=seeds,
        sample_index=sample_index,
        stop_ids=stops,
        suppress_stop=suppress,
        history=history,
        history_is_output=history_is_output,
        any_sampling=np.array(any_sampling),
        any_penalty=np.array(any_penalty),
        any_top_logprobs=np.array(any_top),
    )
    return fb, sb


__all__ = [
    "MAX_STOP_IDS",
    "MAX_TOP_LOGPROBS",
    "ForwardBatch",
    "SamplingBatch",
    "StepOutput",
    "build_batch",
    "history_buckets",
    "pick_bucket",
    "token_buckets",
]
