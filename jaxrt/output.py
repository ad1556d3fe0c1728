"""The respond stage: a step's sampled tokens -> each request's outputs.

For every sampled row of a step the engine read back: append its tokens to the request, check the finish
conditions (stop ids and EOS past ``min_new_tokens``, stop strings, ``max_new_tokens``, the context length),
decode text incrementally where a stream or a stop string needs it, and hand the SGLang-shaped output dict
to the request's sink. Host-only (no jax); runs on the engine's loop thread.

A request submitted with ``deltas`` (the engine running in its own process, `jaxrt.engine_process`) gets
:class:`OutputDelta` records instead: the ids, log-probabilities and finish state new since its previous
output, no text. The other process detokenizes and builds the same dicts with :func:`output_dict`, so the
engine's interpreter does no per-chunk text work.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from jaxrt.request import FinishReason, Request
from jaxrt.scheduler import SchedulerOutput
from jaxrt.tokenizer import IncrementalDetokenizer, Tokenizer

if TYPE_CHECKING:  # jaxrt.batch imports jax, which the engine process's frontend never loads
    from jaxrt.batch import DecodeLoopOutput, StepOutput

Sink = Callable[[Any], None]  # takes an output dict, an OutputDelta, or the exception that ended the request


class OutputDelta(NamedTuple):
    """What is new in one request's output since its previous one: the engine's side of a process boundary.

    ``final`` marks its last; ``stop_text`` is the whole text cut at a matched stop string (final only);
    ``error`` is the exception that ended the request instead (nothing else is set then). A named tuple:
    a pass's records cross the pipe together as plain tuples (``tuple(d)``, read back by position: the field
    order is the wire format), which pickle ~8x faster than dataclass instances."""

    request_id: str
    new_ids: Sequence[int] = ()
    new_logprobs: list[float] | None = None
    new_top_logprobs: list[list[tuple[int, float]]] | None = None
    final: bool = False
    finish_reason: dict[str, Any] | None = None
    stop_text: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    error: BaseException | None = None
    # The prompt's log-probabilities (``input_token_logprobs``), whole, in the request's first delta.
    input_logprobs: list[float] | None = None
    input_top_logprobs: list[list[tuple[int, float]]] | None = None
    # Seconds from the request's arrival in the engine to its first output token, in the final delta: the
    # frontend measures a stream's itself, but a request that is not streamed sends nothing before its end.
    ttft: float | None = None


# Field positions of an OutputDelta that crossed the pipe as a plain tuple.
DELTA_FINAL = OutputDelta._fields.index("final")
DELTA_ERROR = OutputDelta._fields.index("error")


def delta_ends(d: tuple) -> bool:
    """Whether a delta (an OutputDelta, or its plain tuple) is its request's last: final, or failed."""
    return bool(d[DELTA_FINAL]) or d[DELTA_ERROR] is not None


@dataclass
class Track:
    """Per-request host state the engine keeps beside the scheduler's Request: where its outputs go and
    how to tell that it has finished."""

    request: Request
    sink: Sink
    stream: bool
    detok: IncrementalDetokenizer | None
    stop_ids: list[int]  # stop_token_ids, then the EOS ids unless ignore_eos
    eos_ids: set[int]
    return_logprob: bool
    top_logprobs_num: int
    stop_text: str | None = None  # text cut at a matched stop string
    emitted: int = 0  # output tokens when the last stream chunk went out
    deltas: bool = False  # the sink takes OutputDelta records (see the module's docstring)
    sent: int = 0  # deltas: output tokens already handed to the sink
    # stop_ids as a set: a sampled token in it finishes the request once min_new_tokens is reached
    stop_set: frozenset[int] = field(init=False)

    def __post_init__(self) -> None:
        self.stop_set = frozenset(self.stop_ids)


class OutputProcessor:
    """The live requests' tracks, and what happens to each step's sampled tokens."""

    def __init__(
        self,
        tokenizer: Tokenizer | None,
        context_length: int,
        stats: dict[str, Any],
        stream_interval: int = 1,
    ) -> None:
        """``stats``: the engine's counters; this adds generated, prompt and cached token counts to them.
        ``stream_interval``: a stream's chunk goes out once this many tokens have come since the last one
        (SGLang's ``--stream-interval``; the first token goes at once, the final chunk always)."""
        self.tokenizer = tokenizer
        self.stream_interval = stream_interval
        self.context_length = context_length
        self.stats = stats
        self.tracks: dict[str, Track] = {}

    def process(
        self,
        sched: SchedulerOutput,
        out: StepOutput | DecodeLoopOutput,
        now: float,
        finish: Callable[[Request, FinishReason], None],
    ) -> None:
        """Take a step's host outputs (``out``, its rows in ``sched.scheduled`` order): append each sampled
        row's tokens, and stream them or finish the request (``finish`` hands it back to the scheduler)."""
        multi = sched.num_steps > 1  # a continuous-decode dispatch returned a DecodeLoopOutput
        if not multi and out.prompt is not None:
            self._prompt_logprobs(sched, out.prompt)
        # Row i's tokens (and log-probabilities) as Python lists, converted once for the whole batch.
        tokens = out.all_tokens.T.tolist() if multi else out.tokens[:, None].tolist()
        logprobs = None
        for i, s in enumerate(sched.scheduled):
            if not s.sample:
                continue
            req = s.request
            n = s.num_steps
            assert req.pending_rows[:n] == [i] * n, "pending tokens must be read back in order"
            del req.pending_rows[:n]
            track = self.tracks.get(req.request_id)
            if track is None or req.is_finished:
                continue  # finished or aborted while this step was in flight: its tokens are dropped
            if track.return_logprob and logprobs is None:
                logprobs = out.all_logprobs.T.tolist() if multi else out.logprobs[:, None].tolist()
            top = None
            if track.top_logprobs_num:  # single steps only (continuous decode excludes these requests)
                k = track.top_logprobs_num
                top = [
                    [
                        (int(t), float(lp))
                        for t, lp in zip(out.top_ids[i][:k], out.top_logprobs[i][:k], strict=True)
                    ]
                ]
            reason = self._accept(
                req, track, tokens[i][:n], logprobs[i] if track.return_logprob else None, top, now
            )
            if reason is not None:
                finish(req, reason)
                self.emit(track, final=True)
            elif track.stream:
                n_out = len(req.output_token_ids)
                if track.emitted == 0 or n_out - track.emitted >= self.stream_interval:
                    track.emitted = n_out
                    self.emit(track, final=False)

    def _prompt_logprobs(self, sched: SchedulerOutput, prompt: Any) -> None:
        """Append the prompt log-probabilities a step computed (``StepOutput.prompt``, per token row) to the
        requests that want them, in position order: row ``p``'s entry is prompt token ``p + 1``'s."""
        row0 = 0
        for s in sched.scheduled:
            req, first = s.request, row0
            row0 += s.num_new_tokens
            nxt = req.input_logprob_next
            track = self.tracks.get(req.request_id)
            if nxt is None or track is None or req.is_finished or nxt <= s.start:
                continue  # (nxt <= start: rows before this chunk are missing; the prefix cap prevents it)
            end = min(s.start + s.num_new_tokens + 1, len(req.prompt_token_ids))
            rows = [first + q - 1 - s.start for q in range(nxt, end)]
            req.input_logprobs.extend(prompt.logprobs[rows].tolist())
            k = track.top_logprobs_num
            if k:
                ids, lps = prompt.top_ids[rows, :k].tolist(), prompt.top_logprobs[rows, :k].tolist()
                req.input_top_logprobs.extend(
                    [list(zip(i, lp, strict=True)) for i, lp in zip(ids, lps, strict=True)]
                )

    def _accept(
        self,
        req: Request,
        track: Track,
        tokens: list[int],
        logprobs: list[float] | None,
        top: list[list[tuple[int, float]]] | None,
        now: float,
    ) -> FinishReason | None:
        """Append a row's sampled tokens (one step's, or a continuous decode's) to ``req`` in order, up to the
        first that finishes it; returns why it finished, if it did. A token finishes the request when it is a
        stop id or EOS past ``min_new_tokens``, completes a stop string past ``min_new_tokens``, leaves the
        request's grammar nothing more to take (constrained decoding), or reaches ``max_new_tokens`` or the
        context length. Tokens sampled past the end are dropped. The text is decoded
        token by token only for stop strings; a stream's is decoded once per chunk that goes out (``emit``)."""
        sp = req.sampling_params
        outs = req.output_token_ids
        n0 = len(outs)
        # Tokens that fit before max_new_tokens or the context length ends the request.
        room = min(sp.max_new_tokens - n0, self.context_length - req.num_known_tokens)
        by_token = bool(sp.stop) and track.detok is not None  # stop strings: match after each token
        take, reason = len(tokens), None
        for j, token in enumerate(tokens):
            past_min = n0 + j + 1 >= sp.min_new_tokens
            if by_token:
                outs.append(token)
                delta = track.detok.step(outs)
            grammar = req.grammar.consume(token) if req.grammar is not None else None
            if past_min and token in track.stop_set:
                reason = FinishReason("stop", matched=token)
            elif grammar == "done":  # the grammar can take no further token (its EOS, or its end)
                reason = FinishReason("stop", matched=token if token in track.stop_set else None)
            elif grammar is not None:
                reason = FinishReason("abort", message=f"constrained decoding: {grammar}")
            elif by_token and past_min and delta:
                reason = self._stop_string(track, sp.stop, delta)
            if reason is None and j + 1 >= room:
                reason = FinishReason("length")
            if reason is not None:
                take = j + 1
                break
        if not by_token:  # a stream's text is decoded when its next chunk goes out (emit)
            outs.extend(tokens[:take])
        self.stats["num_generated_tokens"] += take
        if req.first_token_time is None:
            req.first_token_time = now
            self.stats["num_prompt_tokens"] += req.num_prompt_tokens
            self.stats["num_cached_tokens"] += req.num_cached_tokens
        if logprobs is not None:
            req.output_logprobs.extend(logprobs[:take])
        if top is not None:
            req.output_top_logprobs.extend(top[:take])
        return reason

    @staticmethod
    def _stop_string(track: Track, stops: list[str], delta: str) -> FinishReason | None:
        """The earliest stop string in the text's new tail (``delta`` plus what a stop string may straddle);
        the text is cut before it."""
        text = track.detok.text
        start = max(0, len(text) - len(delta) - max(len(s) for s in stops))
        hits = [(pos, s) for pos, s in ((text.find(s, start), s) for s in stops) if pos >= 0]
        if not hits:
            return None
        pos, s = min(hits)
        track.stop_text = text[:pos]
        return FinishReason("stop", matched=s)

    def emit(self, track: Track, final: bool) -> None:
        """Hand ``track``'s request its output so far (streaming) or its final output, SGLang-shaped."""
        req = track.request
        sp = req.sampling_params
        if final:
            self.tracks.pop(req.request_id, None)
            req.finished_time = time.perf_counter()
        reason = req.finish_reason.to_dict() if final and req.finish_reason else None
        if track.deltas:
            self._emit_delta(track, final, reason)
            return
        if final:
            if track.stop_text is not None:
                text = track.stop_text
            elif self.tokenizer is None:
                text = ""
            else:
                text = self.tokenizer.decode(req.output_token_ids, sp.skip_special_tokens)
        else:
            if track.detok is not None:
                track.detok.step(req.output_token_ids)  # catches up on every token since the last chunk
            text = hold_back(track.detok.text, sp.stop) if track.detok is not None else ""
        ttft = None if req.first_token_time is None else req.first_token_time - req.arrival_time
        track.sink(
            output_dict(
                req.request_id,
                text,
                req.output_token_ids,
                reason,
                prompt_tokens=req.num_prompt_tokens,
                cached_tokens=req.num_cached_tokens,
                e2e_latency=time.perf_counter() - req.arrival_time,
                ttft=ttft,
                logprobs=req.output_logprobs if track.return_logprob else None,
                top_logprobs=req.output_top_logprobs if track.top_logprobs_num else None,
                input_logprobs=_input_logprobs(req),
            )
        )

    @staticmethod
    def _emit_delta(track: Track, final: bool, reason: dict[str, Any] | None) -> None:
        req = track.request
        n = track.sent
        track.sent = len(req.output_token_ids)
        first = n == 0 and req.input_logprob_start is not None  # the prompt's log-probabilities go once
        track.sink(
            OutputDelta(
                req.request_id,
                req.output_token_ids[n:],
                req.output_logprobs[n:] if track.return_logprob else None,
                req.output_top_logprobs[n:] if track.top_logprobs_num else None,
                final,
                reason,
                track.stop_text if final else None,
                req.num_prompt_tokens,
                req.num_cached_tokens,
                None,
                *((req.input_logprobs, req.input_top_logprobs) if first else (None, None)),
                req.first_token_time - req.arrival_time
                if final and req.first_token_time is not None
                else None,
            )
        )


def _input_logprobs(req: Request) -> tuple | None:
    """(logprob_start_len, prompt ids, log-probabilities, top lists or None) for ``output_dict``, when the
    request asked for its prompt's log-probabilities."""
    if req.input_logprob_start is None:
        return None
    top = req.input_top_logprobs if req.sampling_params.top_logprobs_num else None
    return req.sampling_params.logprob_start_len, req.prompt_token_ids, req.input_logprobs, top


def hold_back(text: str, stops: list[str]) -> str:
    """A stream's text without the tail that may still become one of ``stops`` (it goes out once it cannot)."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return text[: len(text) - hold] if hold else text


def output_dict(
    request_id: str,
    text: str,
    output_ids: list[int],
    finish_reason: dict[str, Any] | None,
    *,
    prompt_tokens: int,
    cached_tokens: int,
    e2e_latency: float,
    ttft: float | None,
    logprobs: list[float] | None,
    top_logprobs: list[list[tuple[int, float]]] | None,
    input_logprobs: tuple | None = None,
) -> dict[str, Any]:
    """One SGLang-shaped output: ``text``, ``output_ids`` and ``meta_info`` (copies; the caller keeps its lists).
    ``logprobs`` / ``top_logprobs``: per output token, when the request asked for them. ``input_logprobs``:
    ``(logprob_start_len, prompt ids, log-probabilities from position max(logprob_start_len, 1), top lists or
    None)``, given as ``input_token_logprobs`` / ``input_top_logprobs`` from ``logprob_start_len`` (the first
    prompt token's log-probability is None)."""
    meta: dict[str, Any] = {
        "id": request_id,
        "finish_reason": finish_reason,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": len(output_ids),
        "cached_tokens": cached_tokens,
        "e2e_latency": e2e_latency,
    }
    if ttft is not None:
        meta["ttft"] = ttft
    if logprobs is not None:
        meta["output_token_logprobs"] = [(lp, t, None) for lp, t in zip(logprobs, output_ids, strict=False)]
        if top_logprobs is not None:
            meta["output_top_logprobs"] = [[(lp, t, None) for t, lp in row] for row in top_logprobs]
    if input_logprobs is not None:
        start, ids, lps, top = input_logprobs
        lead = 1 if start == 0 and ids else 0  # the first prompt token: no log-probability
        first = start + lead
        meta["input_token_logprobs"] = [(None, ids[0], None)] * lead + [
            (lp, t, None) for lp, t in zip(lps, ids[first:], strict=False)
        ]
        if top is not None:
            meta["input_top_logprobs"] = [None] * lead + [[(lp, t, None) for t, lp in row] for row in top]
    return {"text": text, "output_ids": list(output_ids), "meta_info": meta}
