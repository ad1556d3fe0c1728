"""A request's life: what it asked for, what has been computed, what it holds."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from jaxrt.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class FinishReason:
    type: str  # "stop" | "length" | "abort"
    matched: int | str | None = None
    message: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type}
        if self.type == "stop":
            out["matched"] = self.matched
        if self.message is not None:
            out["message"] = self.message
        return out


@dataclass
class Request:
    """One sequence being generated. Host-side only (never traced).

    Invariant: ``len(page_ids) * page_size >= num_computed_tokens``; the KV of ``all_token_ids[:num_computed_tokens]``
    is in those pages. ``num_computed_tokens`` catches up with ``len(all_token_ids)`` one grant at a time.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    seed: int
    arrival_time: float = field(default_factory=time.perf_counter)
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    output_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the radix cache at first admission
    page_ids: list[int] = field(default_factory=list)
    locked_node: Any = None  # radix node locked while running (prefix pages can't be evicted)
    state_slot: int | None = None  # recurrent-state slot while running (models with state only)
    # Row of the device page table while running, and how many of ``page_ids`` that row holds already
    # (the runner uploads only the pages after those).
    page_row: int | None = None
    pages_on_device: int = 0
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    first_token_time: float | None = None
    finished_time: float | None = None
    admitted_once: bool = False
    # Rows of in-flight step outputs holding this request's sampled-but-unread tokens, oldest first
    # (overlap scheduling: step N+1 is dispatched before step N's tokens are read back).
    pending_rows: list[int] = field(default_factory=list)
    # Constrained decoding: the grammar's state (jaxrt.grammar.Matcher), fed each sampled token.
    grammar: Any = None
    # Prompt log-probabilities (``SamplingParams.logprob_start_len`` >= 0): prompt token p's log-probability
    # given the tokens before it, and its top alternatives, from ``input_logprob_start`` on, appended as the
    # rows before them are computed; the next position to fill is ``input_logprob_next``.
    input_logprobs: list[float] = field(default_factory=list)
    input_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)

    @cached_property
    def input_logprob_start(self) -> int | None:
        """The first prompt position whose log-probability the request wants (>= 1: the first token has none),
        or None."""
        sp = self.sampling_params
        if sp.logprob_start_len < 0 or not (sp.return_logprob or sp.top_logprobs_num):
            return None
        return max(sp.logprob_start_len, 1)

    @property
    def input_logprob_next(self) -> int | None:
        """The next prompt position whose log-probability is still to compute (its row is the one before it),
        or None when there is none."""
        start = self.input_logprob_start
        if start is None:
            return None
        nxt = start + len(self.input_logprobs)
        return nxt if nxt < len(self.prompt_token_ids) else None

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        """Known tokens plus sampled tokens not yet read back."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + len(self.pending_rows)

    @cached_property
    def sampling_row(self) -> tuple[float, float, int, float, int]:
        """(temperature, top_p, top_k, min_p, seed) as the batch lays them out; fixed for the request's life."""
        sp = self.sampling_params
        return (sp.temperature, sp.top_p, sp.top_k, sp.min_p, self.seed & 0xFFFFFFFF)

    @cached_property
    def needs_row_setup(self) -> bool:
        """Whether the batch needs per-step work beyond the plain row (stop suppression, penalties, ...)."""
        sp = self.sampling_params
        return (
            sp.min_new_tokens > 0
            or sp.uses_history
            or sp.top_logprobs_num > 0
            or not sp.is_greedy
            or self.grammar is not None
        )

    def token_slice(self, start: int, end: int) -> list[int]:
        """Known tokens ``[start, end)`` without building the whole prompt + output list."""
        n_prompt = len(self.prompt_token_ids)
        if end <= n_prompt:
            return self.prompt_token_ids[start:end]
        if start >= n_prompt:
            return self.output_token_ids[start - n_prompt : end - n_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n_prompt]

    @property
    def num_known_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_outputs(self) -> int:
        """Output tokens sampled so far, read back or not."""
        return len(self.output_token_ids) + len(self.pending_rows)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    @property
    def max_total_tokens(self) -> int:
        return len(self.prompt_token_ids) + self.sampling_params.max_new_tokens
