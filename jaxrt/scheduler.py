"""Catch-up scheduler: each step grants tokens under a budget; prefill, chunked prefill and decode are one
mechanism. Pure Python: no jax here.

Every request has ``num_computed_tokens``; a step grants it ``min(remaining, budget)`` new tokens, so a long
prompt is prefilled in chunks while other requests decode in the same batch. Running requests go first (oldest
first), then waiting ones are admitted FCFS while the budget, ``max_running_requests`` and the KV pool allow.
When pages run out, the youngest running request is preempted: its computed pages go to the radix cache (or
are freed), and it is re-queued at the front to be recomputed later. Nothing is ever dropped.

Every running request owns a row of the per-request device tables (``Request.page_row``): taken on admission,
returned whenever the request stops running (finished, aborted, preempted). The row indexes the device page
table, and for models with recurrent state (``num_state_slots``) it is also the request's state slot. A
preempted request's state is dropped with its row; it is recomputed from token 0 like its pages.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from jaxrt.config import SchedulerConfig
from jaxrt.page_table import OutOfPagesError, PageAllocator
from jaxrt.radix_cache import RadixCache
from jaxrt.request import FinishReason, Request, RequestStatus

# A step that computes a prompt's log-probabilities makes logits for every token row ([tokens, vocab]), so it
# holds at most this many tokens (512 MiB of bf16 logits at a 128k vocabulary).
PROMPT_LOGPROB_TOKENS = 2048


@dataclass
class ScheduledRequest:
    request: Request
    start: int  # num_computed_tokens before this step: position of the first granted token
    num_new_tokens: int
    sample: bool  # the grant reaches the last known token, so the step samples the next one
    # Decode steps this row runs in this dispatch (continuous decode: each samples the next step's input
    # on the device). 1 for every ordinary step; see ``Scheduler.extend_decode``.
    num_steps: int = 1


def max_pages_for(max_total_tokens: int, context_length: int, page_size: int) -> int:
    """KV pages a request may come to hold: its prompt plus ``max_new_tokens``, capped by the context."""
    return cdiv(min(max_total_tokens, context_length), page_size)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    @property
    def num_steps(self) -> int:
        """Decode steps of this dispatch: more than 1 only for continuous decode."""
        return max((s.num_steps for s in self.scheduled), default=1)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        allocator: PageAllocator,
        radix_cache: RadixCache,
        page_size: int,
        num_state_slots: int = 0,
    ) -> None:
        if num_state_slots and num_state_slots < config.max_running_requests:
            raise ValueError(
                f"num_state_slots ({num_state_slots}) must cover max_running_requests "
                f"({config.max_running_requests})"
            )
        self.config = config
        self.num_state_slots = num_state_slots
        # Every running request owns a row (0..max_running_requests-1) of the per-request device tables: the page
        # table, and for models with recurrent state its state slot. pop() gives the lowest.
        self.free_page_rows: list[int] = list(range(config.max_running_requests))[::-1]
        self.allocator = allocator
        self.radix = radix_cache
        self.page_size = page_size
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order: oldest first
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

    # ------------------------------------------------------------------------------------------ intake

    def max_pages_for(self, req: Request) -> int:
        return max_pages_for(req.max_total_tokens, self.config.context_length, self.page_size)

    def add_request(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        if self.max_pages_for(req) > self.allocator.num_usable:
            raise ValueError(
                f"request needs up to {self.max_pages_for(req)} KV pages but the pool has "
                f"{self.allocator.num_usable}; lower max_new_tokens or grow the pool"
            )
        req.status = RequestStatus.WAITING
        self.waiting.append(req)
        self.requests[req.request_id] = req

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------------------------------ pages

    def _ensure_pages(self, req: Request, num_tokens: int) -> bool:
        """Give ``req`` pages for its first ``num_tokens`` tokens, evicting cache if needed."""
        missing = cdiv(num_tokens, self.page_size) - len(req.page_ids)
        if missing <= 0:
            return True
        if self.allocator.num_free < missing:
            self.radix.evict(missing - self.allocator.num_free)
        try:
            req.page_ids.extend(self.allocator.alloc(missing))
        except OutOfPagesError:
            return False
        return True

    def _release(self, req: Request, cache: bool) -> None:
        """Drop everything ``req`` holds; with ``cache`` its computed full pages go to the radix cache."""
        if cache and req.page_ids:
            self.radix.insert(req.all_token_ids[: req.num_computed_tokens], req.page_ids)
        if req.locked_node is not None:
            self.radix.unlock(req.locked_node)
            req.locked_node = None
        if req.page_ids:
            self.allocator.decref(req.page_ids)
        req.page_ids = []
        if req.page_row is not None:
            self.free_page_rows.append(req.page_row)
        req.page_row = req.state_slot = None
        req.pages_on_device = 0

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self._release(req, cache=True)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _admit(self, req: Request, budget: int) -> int:
        """Try to start ``req``: match its prefix, take pages for its first grant. Returns tokens granted."""
        req.page_row = self.free_page_rows.pop()  # running < max_running_requests: a row is free
        req.pages_on_device = 0
        req.state_slot = req.page_row if self.num_state_slots else None
        tokens = req.all_token_ids
        pages, node = self.radix.match_prefix(tokens)
        # At least one token must be computed to produce logits; prompt log-probabilities still to compute
        # need the rows before their positions.
        max_cached_pages = (req.num_tokens - 1) // self.page_size
        nxt = req.input_logprob_next
        if nxt is not None:
            max_cached_pages = min(max_cached_pages, (nxt - 1) // self.page_size)
        pages = pages[:max_cached_pages]
        self.allocator.incref(pages)
        self.radix.lock(node)
        req.locked_node = node
        req.page_ids = list(pages)
        req.num_computed_tokens = len(pages) * self.page_size
        grant = min(req.num_tokens - req.num_computed_tokens, budget)
        if not self._ensure_pages(req, req.num_computed_tokens + grant):
            self._release(req, cache=False)
            req.num_computed_tokens = 0
            return 0
        if not req.admitted_once:
            req.num_cached_tokens = req.num_computed_tokens
            req.admitted_once = True
        return grant

    # ------------------------------------------------------------------------------------------ step

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.chunked_prefill_size
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if self.done_sampling(req):
                i += 1  # its last token is sampled; it finishes when that token is read back
                continue
            grant = min(req.num_tokens - req.num_computed_tokens, budget)
            if req.input_logprob_next is not None:
                room = self._logprob_room(out)
                grant, budget = min(grant, room), min(budget, room)
                if grant == 0:
                    i += 1
                    continue
            while not self._ensure_pages(req, req.num_computed_tokens + grant):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            if req.status != RequestStatus.RUNNING:
                continue  # req preempted itself; `running` shrank so index i is now past the end
            out.scheduled.append(
                ScheduledRequest(
                    req, req.num_computed_tokens, grant, req.num_computed_tokens + grant == req.num_tokens
                )
            )
            budget -= grant
            i += 1

        j = 0
        while j < len(self.waiting) and budget > 0 and len(self.running) < self.config.max_running_requests:
            req = self.waiting[j]
            if self.done_sampling(req):
                j += 1  # preempted after its last sample: it finishes when that token is read back
                continue
            if req.input_logprob_next is not None:
                budget = min(budget, self._logprob_room(out))  # the rest of the step fits its rows of logits
                if budget == 0:
                    break  # the step holds enough rows of logits: it waits for the next one (FCFS)
            grant = self._admit(req, budget)
            if grant == 0:
                break  # pool is full of running work: wait for it to finish (FCFS, no overtaking)
            del self.waiting[j]
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append(
                ScheduledRequest(
                    req, req.num_computed_tokens, grant, req.num_computed_tokens + grant == req.num_tokens
                )
            )
            budget -= grant
        return out

    @staticmethod
    def _logprob_room(out: SchedulerOutput) -> int:
        """Tokens a step may still take once it holds a request whose prompt log-probabilities are still to
        compute: that step computes logits for every token row, so it holds at most ``PROMPT_LOGPROB_TOKENS``."""
        return max(PROMPT_LOGPROB_TOKENS - out.num_tokens, 0)

    def done_sampling(self, req: Request) -> bool:
        """No further token may be sampled: max_new_tokens or the context is reached."""
        num_tokens = req.num_tokens  # outputs = num_tokens - prompt (read back or pending)
        return (
            num_tokens - len(req.prompt_token_ids) >= req.sampling_params.max_new_tokens
            or num_tokens >= self.config.context_length
        )

    def extend_decode(self, out: SchedulerOutput, num_steps: int, allows) -> bool:
        """Turn an all-decode step into up to ``num_steps`` decode steps in one dispatch (SGLang's
        ``num_continuous_decode_steps``): each row runs until its own limit (max_new_tokens or the context)
        and takes pages for those tokens now. ``allows(request)`` vetoes rows whose sampling needs the host
        between tokens. Returns False (and changes nothing) when the step does not qualify: a prefill row,
        waiting requests that could be admitted (below ``max_running_requests``), a vetoed row, or too few
        free pages.
        """
        if num_steps <= 1 or not out.scheduled:
            return False
        if self.waiting and len(self.running) < self.config.max_running_requests:
            return False  # a waiting request may be admitted next step: don't keep it out for several
        rows = out.scheduled
        ctx, ps = self.config.context_length, self.page_size
        steps, missing = [], []  # per row: decode steps, and pages it lacks for them
        for s in rows:
            req = s.request
            if s.num_new_tokens != 1 or not s.sample or not allows(req):
                return False
            num_tokens = req.num_tokens
            room = min(
                req.sampling_params.max_new_tokens - (num_tokens - len(req.prompt_token_ids)),
                ctx - num_tokens,
            )
            n = max(1, min(num_steps, room))
            steps.append(n)
            missing.append(max(0, -(-(s.start + n) // ps) - len(req.page_ids)))
        if max(steps) <= 1:
            return False
        if sum(missing) > self.allocator.num_free:
            return False  # short of free pages: single steps evict or preempt as usual
        for s, n, m in zip(rows, steps, missing, strict=True):
            if m:
                ok = self._ensure_pages(s.request, s.start + n)
                assert ok, "free pages were counted above"
            s.num_steps = n
        return True

    def commit(self, out: SchedulerOutput) -> None:
        """Mark the granted tokens as computed (their KV is in the pool once the step has run).

        A prefill chunk's full pages enter the radix cache at once, not only when the request finishes:
        requests admitted behind it with the same prefix (a shared system prompt sent in a burst) reuse them
        from the next step on. Steps run in order on the device, so those pages are written before any later
        step reads them.
        """
        for s in out.scheduled:
            req = s.request
            req.num_computed_tokens = s.start + s.num_new_tokens + (s.num_steps - 1)
            if s.num_new_tokens > 1 and not self.radix.disabled:
                full = req.num_computed_tokens // self.page_size * self.page_size
                if full > s.start // self.page_size * self.page_size:
                    self.radix.insert(req.token_slice(0, full), req.page_ids)

    # ------------------------------------------------------------------------------------------ endings

    def finish(self, req: Request, reason: FinishReason) -> None:
        """End ``req`` (done or aborted), caching its pages for reuse and freeing the rest."""
        if req.is_finished:
            return
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
            self._release(req, cache=True)
        elif req in self.waiting:
            self.waiting.remove(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        self.requests.pop(req.request_id, None)

    def abort(self, request_id: str) -> Request | None:
        req = self.requests.get(request_id)
        if req is None:
            return None
        self.finish(req, FinishReason("abort", message="aborted by the client"))
        return req

    def flush_cache(self) -> bool:
        """Drop every cached prefix; refused (False) while requests are in flight, like SGLang."""
        if self.has_work:
            return False
        self.radix.reset()
        return True

    def check_invariants(self) -> None:
        self.allocator.check_invariants()
        self.radix.check_invariants()
        held = sum(len(r.page_ids) for r in self.running)
        assert all(not r.page_ids for r in self.waiting), "a waiting request holds pages"
        for r in self.running:
            assert len(r.page_ids) * self.page_size >= r.num_computed_tokens
        held_rows = [r.page_row for r in self.running]
        assert None not in held_rows, "a running request has no page-table row"
        assert all(r.page_row is None for r in self.waiting), "a waiting request holds a page-table row"
        assert sorted(held_rows + self.free_page_rows) == list(range(self.config.max_running_requests)), (
            "page-table rows leaked or double-freed"
        )
        if self.num_state_slots:
            assert all(r.state_slot == r.page_row for r in self.running), "a state slot is not its row"
            assert all(r.state_slot is None for r in self.waiting), "a waiting request holds a state slot"
        assert held <= sum(self.allocator.refcount(p) for p in range(1, self.allocator.num_pages))
