"""Device-side batch description: the scheduler's decisions as flat, padded int32 arrays.

``ForwardBatch`` is what attention and the model read; ``SamplingBatch`` is what the sampler reads. Both are
pytrees of arrays only: shapes come from a bucket (``num_tokens``, ``num_seqs``), values change every step
without recompiling.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxrt.page_table import NULL_PAGE
from jaxrt.sampling_params import MAX_TOP_LOGPROBS
from jaxrt.scheduler import SchedulerOutput

MAX_STOP_IDS = 8  # stop ids suppressed on device while min_new_tokens is not reached


def _pytree_dataclass(cls=None, *, meta: tuple[str, ...] = ()):
    """A frozen dataclass registered as a pytree: its fields are leaves, except ``meta`` (static: part of
    the tree's structure, so a jitted function traces each value apart)."""
    if cls is None:
        return lambda c: _pytree_dataclass(c, meta=meta)
    cls = dataclass(frozen=True)(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name not in meta]
    return jax.tree_util.register_dataclass(cls, data_fields=names, meta_fields=list(meta))


@_pytree_dataclass(meta=("fresh", "prefix_capacity", "decodes"))
class ForwardBatch:
    input_ids: jax.Array  # [num_tokens] int32
    positions: jax.Array  # [num_tokens] int32
    slot_mapping: jax.Array  # [num_tokens] int32, flat KV slot, -1 for padding
    cu_q_lens: jax.Array  # [num_seqs + 1] int32
    kv_lens: jax.Array  # [num_seqs] int32
    # [num_seqs, pages_per_seq] int32. The engine's steps fill it on the device from the runner's page table
    # (``page_rows``); a batch laid out with ``pages_per_seq`` carries it from the host instead.
    page_indices: jax.Array | None
    num_seqs: jax.Array  # [1] int32
    logits_indices: jax.Array  # [num_seqs] int32, row of each sequence's last token
    # Overlap scheduling: token t's id is prev_tokens[prev_index[t]] (the previous step's output, still on
    # the device) when prev_index[t] >= 0, else input_ids[t].
    prev_index: jax.Array  # [num_tokens] int32
    # Recurrent-state slot of each sequence (models with state); -1 for padding sequences and models without
    # state: recurrent layers map -1 to the scratch slot (the last). A sequence whose first token here is at
    # position 0 starts from a zero state, whatever its slot holds.
    state_slots: jax.Array  # [num_seqs] int32
    # Row of the device page table of each sequence (the padding row for padding sequences), or None when
    # ``page_indices`` comes from the host.
    page_rows: jax.Array | None = None
    # Static: set (to "cudnn", or "xla" in the interpreter) in the programs the runner runs only for a batch of
    # fresh prompts (``kernels.cudnn_prefill.batch_is_fresh``), whose attention then skips the pages.
    fresh: str | None = None
    # Static, with ``fresh``: > 0 in the programs for prompts behind a cached prefix (at most ``MAX_SEQS``
    # sequences whose prefixes fit a packed buffer of this many rows, ``kernels.cudnn_prefill.choose``).
    prefix_capacity: int = 0
    # Static, with ``fresh``: the batch begins with one-token sequences (decodes beside the prompts), which the
    # paged kernel attends apart (``kernels.cudnn_prefill.split_attention``).
    decodes: bool = False
    # [num_tokens] int32, or None: in steps that compute prompt log-probabilities, the prompt token each row
    # predicts (the next position's) where its log-probability is wanted, else -1 (``prompt_logprobs``).
    targets: jax.Array | None = None


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
    # Nonzero: the entry is not a token of the sequence but its logit bias for that id (``logit_bias``).
    history_bias: jax.Array  # [num_seqs, history_len] f32
    # Constrained decoding: the tokens each row may sample, a bitmask of int32 words (bit t % 32 of word
    # t // 32 is token t; all ones for unconstrained rows). [num_seqs, ceil(vocab / 32)] in programs with
    # SampleMode.constrained, else [num_seqs, 1] and unused.
    allowed: jax.Array


class SampleMode(NamedTuple):
    """Which sampler variant a step needs: static (compiled per variant), so the step has no device-side
    branch. A branch on a device value makes XLA read the predicate back to the host mid-program, which
    blocks the dispatching thread until the forward pass is done and defeats overlap scheduling.
    Penalties and logit biases are implied by the history bucket (``history_len > 1``)."""

    sampling: bool = False  # some row is not greedy (temperature / top-k / top-p / min-p / seed)
    top_logprobs: bool = False  # some row asked for top log-probabilities
    constrained: bool = False  # some row samples under a grammar (SamplingBatch.allowed)


@_pytree_dataclass
class StepOutput:
    tokens: jax.Array  # [num_seqs] int32
    logprobs: jax.Array  # [num_seqs] f32, log p(token) under the raw model distribution
    top_ids: jax.Array  # [num_seqs, MAX_TOP_LOGPROBS] int32
    top_logprobs: jax.Array  # [num_seqs, MAX_TOP_LOGPROBS] f32
    # Steps with ``ForwardBatch.targets``: per token row, log p(target) and the row's top tokens.
    prompt: PromptLogprobs | None = None


@_pytree_dataclass
class PromptLogprobs:
    logprobs: jax.Array  # [num_tokens] f32: log p(targets[t]) at row t (0 where targets[t] < 0)
    top_ids: jax.Array  # [num_tokens, MAX_TOP_LOGPROBS] int32
    top_logprobs: jax.Array  # [num_tokens, MAX_TOP_LOGPROBS] f32


def prompt_logprobs(logits: jax.Array, targets: jax.Array) -> PromptLogprobs:
    """Each row's log-probability of its target and its ``MAX_TOP_LOGPROBS`` most likely tokens (f32), from
    the logits of every token row ``[num_tokens, vocab]``."""
    import jax.numpy as jnp

    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, jnp.maximum(targets, 0)[:, None], axis=-1)[:, 0]
    top_lp, top_ids = jax.lax.top_k(logp, MAX_TOP_LOGPROBS)
    return PromptLogprobs(jnp.where(targets >= 0, picked, 0.0), top_ids.astype(jnp.int32), top_lp)


@_pytree_dataclass
class DecodeLoopOutput:
    """Outputs of a continuous-decode dispatch: ``num_steps`` tokens per row."""

    tokens: jax.Array  # [max_num_seqs] int32: each row's last sampled token (the next step's input)
    all_tokens: jax.Array  # [num_steps, max_num_seqs] int32
    all_logprobs: jax.Array  # [num_steps, max_num_seqs] f32


@dataclass(frozen=True)
class PackedLayout:
    """How a pytree of host arrays crosses to the device as ONE int32 buffer.

    A dispatch's batch is two dozen small arrays; each host-to-device copy costs tens of microseconds of host
    time (measured ~45 us per array on an H100 host, against ~90 us for one 32 KiB buffer), which added up to
    about 2 ms per dispatch. The runner packs the tree on the host (:meth:`pack`) and the jitted program slices it
    back (:meth:`unpack`) at static offsets. Leaves are int32, float32, uint32 (bit-cast) or bool (as 0/1).
    Static (hashable): a program is compiled per layout.
    """

    treedef: Any
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[np.dtype, ...]

    @classmethod
    def of(cls, tree: Any) -> PackedLayout:
        leaves, treedef = jax.tree.flatten(tree)
        dtypes = tuple(np.dtype(x.dtype) for x in leaves)  # host arrays (numpy)
        for d in dtypes:
            if d not in _PACKABLE:
                raise ValueError(f"cannot pack a {d} array (packable: {sorted(str(t) for t in _PACKABLE)})")
        return cls(treedef, tuple(tuple(x.shape) for x in leaves), dtypes)

    @functools.cached_property
    def _spans(self) -> tuple[tuple[int, int, tuple[int, ...], np.dtype], ...]:
        """(offset, length, shape, dtype) of each leaf in the buffer."""
        spans, o = [], 0
        for shape, dtype in zip(self.shapes, self.dtypes, strict=True):
            n = math.prod(shape)
            spans.append((o, n, shape, dtype))
            o += n
        return tuple(spans)

    @functools.cached_property
    def size(self) -> int:
        return sum(n for _, n, _, _ in self._spans)

    def pack(self, tree: Any) -> np.ndarray:
        """``[size]`` int32: the leaves of ``tree`` (host arrays laid out like this layout's) end to end."""
        leaves, treedef = jax.tree.flatten(tree)
        if treedef != self.treedef:
            raise ValueError(f"tree structure {treedef} does not match the layout's {self.treedef}")
        out = np.empty(self.size, np.int32)
        for x, (o, n, shape, dtype) in zip(leaves, self._spans, strict=True):
            if x.shape != shape or x.dtype != dtype:
                raise ValueError(f"leaf {x.shape} {x.dtype} does not match the layout's {shape} {dtype}")
            # bool -> 0/1; float32 and uint32 keep their bits (a view); int32 as is.
            out[o : o + n] = x.reshape(-1) if dtype == _BOOL else x.reshape(-1).view(np.int32)
        return out

    def unpack(self, buf: jax.Array) -> Any:
        """The tree back from a packed ``[size]`` int32 buffer (inside a jitted program: static slices)."""
        leaves = []
        for o, n, shape, dtype in self._spans:
            x = buf[o : o + n].reshape(shape)
            if dtype == _BOOL:
                x = x != 0
            elif dtype != np.int32:
                x = jax.lax.bitcast_convert_type(x, dtype)
            leaves.append(x)
        return jax.tree.unflatten(self.treedef, leaves)


_BOOL = np.dtype(np.bool_)
_PACKABLE = (np.dtype(np.int32), np.dtype(np.float32), np.dtype(np.uint32), np.dtype(np.bool_))


def token_buckets(max_tokens: int, min_bucket: int = 8, single: bool = False) -> list[int]:
    """Powers of two from ``min_bucket`` up to and including ``max_tokens``, after a bucket of 1 if
    ``single``."""
    out, b = [1] if single and min_bucket > 1 and max_tokens > 1 else [], min_bucket
    while b < max_tokens:
        out.append(b)
        b *= 2
    out.append(max_tokens)
    return out


def page_table_delta(sched: SchedulerOutput) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, cols, page ids) of the scheduled requests' pages that their rows of the device page table do
    not hold yet (pages are only ever appended while a request runs; a released request's row starts over).
    Marks them as held: call once per dispatched step, before it."""
    rows: list[int] = []
    cols: list[int] = []
    vals: list[int] = []
    for s in sched.scheduled:
        req = s.request
        have, n = req.pages_on_device, len(req.page_ids)
        if n > have:
            rows.extend([req.page_row] * (n - have))
            cols.extend(range(have, n))
            vals.extend(req.page_ids[have:])
            req.pages_on_device = n
    return np.array(rows, np.int32), np.array(cols, np.int32), np.array(vals, np.int32)


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
    pages_per_seq: int | None,
    page_size: int,
    vocab_size: int,
    history_len: int,
    stop_ids: dict[str, list[int]],
    pad_row: int = 0,
    constrained: bool = False,
) -> tuple[ForwardBatch, SamplingBatch, SampleMode]:
    """Lay out one scheduled step as padded numpy arrays (host side, then handed to the jitted step).

    ``pages_per_seq=None`` (the engine): each sequence names its row of the device page table
    (``Request.page_row``; padding sequences ``pad_row``) and the step reads its pages from there (see
    :func:`page_table_delta`); otherwise the whole ``[num_seqs, pages_per_seq]`` table is laid out here.
    """
    n = len(sched.scheduled)
    assert n <= num_seqs and sched.num_tokens <= num_tokens
    input_ids = np.zeros(num_tokens, np.int32)
    prev_index = np.full(num_tokens, -1, np.int32)
    positions = np.zeros(num_tokens, np.int32)
    slot_mapping = np.full(num_tokens, -1, np.int32)
    cu_q_lens = np.zeros(num_seqs + 1, np.int32)
    kv_lens = np.zeros(num_seqs, np.int32)
    host_table = pages_per_seq is not None
    page_indices = np.full((num_seqs, pages_per_seq), NULL_PAGE, np.int32) if host_table else None
    page_rows = None if host_table else np.full(num_seqs, pad_row, np.int32)
    logits_indices = np.zeros(num_seqs, np.int32)
    state_slots = np.full(num_seqs, -1, np.int32)

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
    history_bias = np.zeros((num_seqs, history_len), np.float32)
    allowed = np.full((num_seqs, -(-vocab_size // 32) if constrained else 1), -1, np.int32)
    any_sampling = any_top = False

    if n:
        # One pass over the requests gathers every per-sequence and per-token value into lists (a decode
        # row, the common case, is a few scalar reads); numpy fills the arrays from them afterwards.
        ps = page_size
        q_list: list[int] = []
        start_list: list[int] = []
        row_list: list[int] = []
        state_list: list[int] = []
        tok_ids: list[int] = []
        tok_prev: list[int] = []  # prev_index per token
        tok_slots: list[int] = []
        sampling_rows: list[tuple] = []
        num_outputs: list[int] = []
        setup: list[int] = []  # rows that need more than the plain sampling row
        for i, s in enumerate(sched.scheduled):
            req = s.request
            st, q = s.start, s.num_new_tokens
            end = st + q
            q_list.append(q)
            start_list.append(st)
            if host_table:
                page_indices[i, : len(req.page_ids)] = req.page_ids
            elif req.page_row is None:
                raise ValueError(f"request {req.request_id} has no page-table row (not admitted)")
            else:
                row_list.append(req.page_row)
            state_list.append(-1 if req.state_slot is None else req.state_slot)
            prompt, output, pending, pages = (
                req.prompt_token_ids,
                req.output_token_ids,
                req.pending_rows,
                req.page_ids,
            )
            n_prompt = len(prompt)
            known = n_prompt + len(output)
            # Each token's KV slot, from the pages its request holds for this step's positions; its input id
            # is known to the host, or was sampled by the step still in flight: then the device reads it from
            # that step's output (after continuous decode, earlier pending tokens are already computed: only
            # positions from ``start`` on are inputs, and the last pending row holds the latest token).
            if q == 1:
                tok_slots.append(pages[st // ps] * ps + st % ps)
                if st < known:
                    tok_ids.append(prompt[st] if st < n_prompt else output[st - n_prompt])
                    tok_prev.append(-1)
                else:
                    tok_ids.append(0)
                    tok_prev.append(pending[st - known])
            else:
                p = np.arange(st, end)
                first = st // ps
                span = np.asarray(pages[first : (end - 1) // ps + 1], np.int32)
                tok_slots.extend((span[p // ps - first] * ps + p % ps).tolist())
                k = min(known, end)
                if k > st:
                    tok_ids.extend(req.token_slice(st, k))
                    tok_prev.extend([-1] * (k - st))
                if end > k:
                    f = max(st, k)
                    tok_ids.extend([0] * (end - f))
                    tok_prev.extend(pending[f - known : end - known])
            sampling_rows.append(req.sampling_row)
            num_outputs.append(len(output) + len(pending))
            if s.sample and req.needs_row_setup:
                setup.append(i)

        q_lens = np.array(q_list, np.int32)
        starts = np.array(start_list, np.int32)
        total = len(tok_ids)
        cu_q_lens[1 : n + 1] = np.cumsum(q_lens)
        cu_q_lens[n + 1 :] = total
        kv_lens[:n] = starts + q_lens
        logits_indices[:n] = cu_q_lens[1 : n + 1] - 1
        positions[:total] = np.arange(total, dtype=np.int32) - np.repeat(cu_q_lens[:n] - starts, q_lens)
        slot_mapping[:total] = tok_slots
        input_ids[:total] = tok_ids
        prev_index[:total] = tok_prev
        if not host_table:
            page_rows[:n] = row_list
        state_slots[:n] = state_list

        rows = np.array(sampling_rows, np.float64)
        temperature[:n] = rows[:, 0]
        top_p[:n] = rows[:, 1]
        top_k[:n] = np.where(rows[:, 2] == -1, vocab_size, np.minimum(rows[:, 2], vocab_size))
        min_p[:n] = rows[:, 3]
        seeds[:n] = rows[:, 4].astype(np.uint32)
        sample_index[:n] = num_outputs
        for i in setup:
            req = sched.scheduled[i].request
            sp = req.sampling_params
            if req.num_outputs < sp.min_new_tokens:
                stop = stop_ids.get(req.request_id, [])[:MAX_STOP_IDS]
                stops[i, : len(stop)] = stop
                suppress[i] = True
            if not sp.is_greedy:
                any_sampling = True
            if sp.top_logprobs_num > 0:
                any_top = True
            bias = sp.bias_items
            if sp.uses_penalties:
                rep[i], freq[i], pres[i] = sp.repetition_penalty, sp.frequency_penalty, sp.presence_penalty
                room = history_len - len(bias)  # the most recent tokens, beside the bias entries
                hist = req.all_token_ids[-room:] if room > 0 else []
                history[i, : len(hist)] = hist
                n_out = min(len(req.output_token_ids), len(hist))
                if n_out:
                    history_is_output[i, len(hist) - n_out : len(hist)] = True
            if bias:
                history[i, history_len - len(bias) :] = [t for t, _ in bias]
                history_bias[i, history_len - len(bias) :] = [b for _, b in bias]
            if req.grammar is not None:
                assert constrained, "a batch with a grammar's row needs constrained=True"
                req.grammar.fill(allowed, i)

    targets = None
    wanting = [(i, s) for i, s in enumerate(sched.scheduled) if s.request.input_logprob_next is not None]
    if wanting:
        targets = np.full(num_tokens, -1, np.int32)
        for i, s in wanting:
            req, nxt = s.request, s.request.input_logprob_next
            prompt = req.prompt_token_ids
            q = np.arange(max(s.start + 1, nxt), min(s.start + s.num_new_tokens + 1, len(prompt)))
            targets[cu_q_lens[i] + q - 1 - s.start] = np.asarray(prompt, np.int32)[q] if q.size else []
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
        state_slots=state_slots,
        page_rows=page_rows,
        targets=targets,
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
        history_bias=history_bias,
        allowed=allowed,
    )
    return fb, sb, SampleMode(sampling=any_sampling, top_logprobs=any_top, constrained=constrained)


__all__ = [
    "MAX_STOP_IDS",
    "MAX_TOP_LOGPROBS",
    "DecodeLoopOutput",
    "ForwardBatch",
    "PackedLayout",
    "SampleMode",
    "SamplingBatch",
    "StepOutput",
    "build_batch",
    "history_buckets",
    "page_table_delta",
    "pick_bucket",
    "token_buckets",
]
