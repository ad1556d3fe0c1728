"""The respond stage: a step's sampled tokens -> each request's outputs.

For every sampled row of a step the engine read back: append its tokens to the request, check the finish
conditions (stop ids and EOS past ``min_new_tokens``, stop strings, ``max_new_tokens``, the context length),
decode text incrementally where a stream or a stop string needs it, and hand the SGLang-shaped output dict
to the request's sink. Host-only (no jax); runs on the engine's loop thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from jaxrt.batch import DecodeLoopOutput, StepOutput
from jaxrt.request import FinishReason, Request
from jaxrt.scheduler import SchedulerOutput
from jaxrt.tokenizer import IncrementalDetokenizer, Tokenizer

Sink = Callable[[dict[str, Any]], None]


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
    # stop_ids as a set: a sampled token in it finishes the request once min_new_tokens is reached
    stop_set: frozenset[int] = field(init=False)

    def __post_init__(self) -> None:
        self.stop_set = frozenset(self.stop_ids)


class OutputProcessor:
    """The live requests' tracks, and what happens to each step's sampled tokens."""

    def __init__(self, tokenizer: Tokenizer | None, context_length: int, stats: dict[str, Any]) -> None:
        """``stats``: the engine's counters; this adds generated, prompt and cached token counts to them."""
        self.tokenizer = tokenizer
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
            if not req.sampling_params.stop and not track.top_logprobs_num:
                if track.return_logprob and logprobs is None:
                    logprobs = out.all_logprobs.T.tolist() if multi else out.logprobs[:, None].tolist()
                reason = self._accept_run(
                    req, track, tokens[i][:n], logprobs[i] if track.return_logprob else None, now
                )
            else:
                reason = self._accept_each(req, track, out, i, n, multi, now)
            if reason is not None:
                finish(req, reason)
                self.emit(track, final=True)
            elif track.stream:
                self.emit(track, final=False)

    def _accept_run(
        self, req: Request, track: Track, tokens: list[int], logprobs: list[float] | None, now: float
    ) -> FinishReason | None:
        """Append a row's sampled tokens (one step's, or a continuous decode's) to ``req`` at once; returns
        why it finished, if it did. For requests without stop strings or top log-probabilities (the common
        case): the same outcome as accepting them one by one (:meth:`_accept_each`), with the finish
        checks in integer arithmetic and the text decoded once, only where a stream needs it."""
        sp = req.sampling_params
        outs = req.output_token_ids
        n0 = len(outs)
        # Tokens that fit before max_new_tokens or the context length ends the request.
        room = min(sp.max_new_tokens - n0, self.context_length - req.num_known_tokens)
        take, reason = len(tokens), None
        for j, token in enumerate(tokens):
            if token in track.stop_set and n0 + j + 1 >= sp.min_new_tokens:
                take, reason = j + 1, FinishReason("stop", matched=token)
                break
            if j + 1 >= room:
                take, reason = j + 1, FinishReason("length")
                break
        outs.extend(tokens[:take])
        self.stats["num_generated_tokens"] += take
        if req.first_token_time is None:
            req.first_token_time = now
            self.stats["num_prompt_tokens"] += req.num_prompt_tokens
            self.stats["num_cached_tokens"] += req.num_cached_tokens
        if logprobs is not None:
            req.output_logprobs.extend(logprobs[:take])
        if track.stream and track.detok is not None:
            track.detok.step(outs)
        return reason

    def _accept_each(
        self, req: Request, track: Track, out, i: int, n: int, multi: bool, now: float
    ) -> FinishReason | None:
        """Append row ``i``'s ``n`` sampled tokens one by one (stop strings are matched token by token;
        top log-probabilities come per token); returns why the request finished, if it did."""
        reason = None
        for j in range(n):
            if multi:
                token, logprob, top = int(out.all_tokens[j, i]), out.all_logprobs[j, i], None
            else:
                token, logprob = int(out.tokens[i]), out.logprobs[i]
                top = (out.top_ids[i], out.top_logprobs[i])
            reason = self._accept(req, track, token, logprob, top, now)
            if reason is not None:
                break  # tokens a continuous decode sampled past the end are dropped
        return reason

    def _accept(
        self, req: Request, track: Track, token: int, logprob, top, now: float
    ) -> FinishReason | None:
        """Append one sampled token to ``req``; returns why it finished, if it did."""
        req.output_token_ids.append(token)
        self.stats["num_generated_tokens"] += 1
        if req.first_token_time is None:
            req.first_token_time = now
            self.stats["num_prompt_tokens"] += req.num_prompt_tokens
            self.stats["num_cached_tokens"] += req.num_cached_tokens
        if track.return_logprob:
            req.output_logprobs.append(float(logprob))
            if track.top_logprobs_num:
                k = track.top_logprobs_num
                ids, lps = top
                req.output_top_logprobs.append(
                    [(int(t), float(lp)) for t, lp in zip(ids[:k], lps[:k], strict=True)]
                )
        return self._check_finish(req, track, token)

    def _check_finish(self, req: Request, track: Track, token: int) -> FinishReason | None:
        sp = req.sampling_params
        n_out = len(req.output_token_ids)
        delta = track.detok.step(req.output_token_ids) if track.detok is not None else ""
        past_min = n_out >= sp.min_new_tokens
        if past_min and token in track.eos_ids:
            return FinishReason("stop", matched=token)
        if past_min and token in sp.stop_token_ids:
            return FinishReason("stop", matched=token)
        if sp.stop and delta and past_min:
            text = track.detok.text
            start = max(0, len(text) - len(delta) - max(len(s) for s in sp.stop))
            hits = [(text.find(s, start), s) for s in sp.stop]
            hits = [(pos, s) for pos, s in hits if pos >= 0]
            if hits:
                pos, s = min(hits)
                track.stop_text = text[:pos]
                return FinishReason("stop", matched=s)
        if n_out >= sp.max_new_tokens or req.num_known_tokens >= self.context_length:
            return FinishReason("length")
        return None

    def emit(self, track: Track, final: bool) -> None:
        """Hand ``track``'s request its output so far (streaming) or its final output, SGLang-shaped."""
        req = track.request
        sp = req.sampling_params
        if final:
            if track.stop_text is not None:
                text = track.stop_text
            elif self.tokenizer is None:
                text = ""
            else:
                text = self.tokenizer.decode(req.output_token_ids, sp.skip_special_tokens)
            self.tracks.pop(req.request_id, None)
            req.finished_time = time.perf_counter()
        else:
            text = track.detok.text if track.detok is not None else ""
            if sp.stop:  # hold back a tail that may still become a stop string
                hold = 0
                for s in sp.stop:
                    for k in range(min(len(s) - 1, len(text)), 0, -1):
                        if text.endswith(s[:k]):
                            hold = max(hold, k)
                            break
                text = text[: len(text) - hold] if hold else text
        reason = req.finish_reason.to_dict() if final and req.finish_reason else None
        meta: dict[str, Any] = {
            "id": req.request_id,
            "finish_reason": reason,
            "prompt_tokens": req.num_prompt_tokens,
            "completion_tokens": len(req.output_token_ids),
            "cached_tokens": req.num_cached_tokens,
            "e2e_latency": time.perf_counter() - req.arrival_time,
        }
        if req.first_token_time is not None:
            meta["ttft"] = req.first_token_time - req.arrival_time
        if track.return_logprob:
            meta["output_token_logprobs"] = [
                (lp, t, None) for lp, t in zip(req.output_logprobs, req.output_token_ids, strict=False)
            ]
            if track.top_logprobs_num:
                meta["output_top_logprobs"] = [
                    [(lp, t, None) for t, lp in row] for row in req.output_top_logprobs
                ]
        track.sink({"text": text, "output_ids": list(req.output_token_ids), "meta_info": meta})
