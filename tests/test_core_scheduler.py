"""Scheduler simulations without a device: the "model" samples a deterministic function of the tokens."""

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxrt.config import SchedulerConfig
from jaxrt.page_table import PageAllocator
from jaxrt.radix_cache import RadixCache
from jaxrt.request import FinishReason, Request
from jaxrt.sampling_params import SamplingParams
from jaxrt.scheduler import Scheduler


def fake_next_token(tokens: list[int]) -> int:
    return (sum(tokens) * 31 + len(tokens)) % 97


def make(num_pages=64, page_size=4, max_running=4, chunk=16, context=256, radix=True):
    alloc = PageAllocator(num_pages)
    radix_cache = RadixCache(alloc, page_size, disabled=not radix)
    cfg = SchedulerConfig(
        max_running_requests=max_running, chunked_prefill_size=chunk, context_length=context
    )
    return Scheduler(cfg, alloc, radix_cache, page_size)


def sample_and_finish(s: Scheduler, out) -> None:
    """The "model" samples each sampling row's tokens of a committed step; rows at max_new_tokens finish."""
    for sr in out.scheduled:
        if sr.sample:
            r = sr.request
            for _ in range(sr.num_steps):
                r.output_token_ids.append(fake_next_token(r.all_token_ids))
                assert len(r.output_token_ids) <= r.sampling_params.max_new_tokens
            if len(r.output_token_ids) >= r.sampling_params.max_new_tokens:
                s.finish(r, FinishReason("length"))


def run_to_completion(
    s: Scheduler, reqs: list[Request], max_steps=10_000, decode_steps=1
) -> dict[str, list[int]]:
    for r in reqs:
        s.add_request(r)
    steps = 0
    while s.has_work:
        steps += 1
        assert steps < max_steps, "scheduler made no progress"
        out = s.schedule()
        s.extend_decode(out, decode_steps, lambda r: True)
        assert out.scheduled, "nothing scheduled while work remains (deadlock)"
        assert out.num_tokens <= s.config.chunked_prefill_size
        assert len(s.running) <= s.config.max_running_requests
        for sr in out.scheduled:
            r = sr.request
            # KV for every granted position must have a page.
            assert len(r.page_ids) * s.page_size >= sr.start + sr.num_new_tokens + sr.num_steps - 1
            assert sr.num_steps == 1 or sr.num_new_tokens == 1
        s.commit(out)
        sample_and_finish(s, out)
        s.check_invariants()
    return {r.request_id: r.output_token_ids for r in reqs}


def req(rid, prompt, max_new=8):
    return Request(rid, list(prompt), SamplingParams(max_new_tokens=max_new), seed=0)


def test_chunked_prefill_and_decode_mix():
    s = make(chunk=8, max_running=4)
    outs = run_to_completion(s, [req("a", range(1, 30)), req("b", [5, 6, 7])])
    assert all(len(v) == 8 for v in outs.values())
    assert s.allocator.num_used == s.radix.num_cached_pages


def test_preemption_gives_same_outputs_as_big_pool():
    prompts = [[random.Random(i).randrange(1, 50) for _ in range(20 + 3 * i)] for i in range(6)]
    big = run_to_completion(make(num_pages=256), [req(str(i), p, 24) for i, p in enumerate(prompts)])
    small = make(num_pages=16)  # 15 usable pages of 4 tokens: far less than 6 running requests need
    tight = run_to_completion(small, [req(str(i), p, 24) for i, p in enumerate(prompts)])
    assert tight == big
    assert small.num_preemptions > 0


def test_radix_reuse_reports_cached_tokens():
    s = make()
    shared = list(range(1, 17))
    run_to_completion(s, [req("a", shared + [20, 21])])
    b = req("b", shared + [30, 31, 32])
    run_to_completion(s, [b])
    assert b.num_cached_tokens == 16


def test_fully_cached_prompt_still_computes_one_token():
    s = make(page_size=4)
    p = list(range(1, 9))
    run_to_completion(s, [req("a", p)])
    b = req("b", p)
    outs = run_to_completion(s, [b])
    assert b.num_cached_tokens == 4  # the last page is recomputed to get logits
    assert len(outs["b"]) == 8


def test_abort_frees_everything():
    s = make()
    a = req("a", range(1, 40), 100)
    s.add_request(a)
    s.commit(s.schedule())
    assert a.page_ids
    s.abort("a")
    assert a.finish_reason.type == "abort" and not s.has_work
    assert s.allocator.num_used == s.radix.num_cached_pages
    s.check_invariants()


def test_request_larger_than_pool_is_rejected():
    s = make(num_pages=4, page_size=4)
    with pytest.raises(ValueError, match="KV pages"):
        s.add_request(req("a", range(1, 10), max_new=20))


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 40), st.integers(1, 12)), min_size=1, max_size=8),
    st.integers(1, 8),
    st.sampled_from([1, 2, 4, 8]),
    st.booleans(),
)
def test_random_workloads_finish_without_leaks(shapes, max_running, page_size, radix):
    rng = random.Random(len(shapes))
    reqs = [req(str(i), [rng.randrange(1, 9) for _ in range(p)], n) for i, (p, n) in enumerate(shapes)]
    need = max(-(-(p + n) // page_size) for p, n in shapes)
    s = make(
        num_pages=need + 2,
        page_size=page_size,
        max_running=max_running,
        chunk=max(8, max_running),
        radix=radix,
    )
    outs = run_to_completion(s, reqs)
    ref = run_to_completion(
        make(num_pages=512, page_size=page_size, radix=False),
        [req(r.request_id, r.prompt_token_ids, r.sampling_params.max_new_tokens) for r in reqs],
    )
    assert outs == ref
    s.radix.reset()
    assert s.allocator.num_free == s.allocator.num_usable


@settings(max_examples=25, deadline=None)
@given(
    shapes=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 20)), min_size=1, max_size=8),
    decode_steps=st.integers(2, 6),
    num_pages=st.integers(30, 80),
)
def test_continuous_decode_same_outputs_and_no_leaks(shapes, decode_steps, num_pages):
    """Several decode steps per dispatch: same tokens as single steps, never past max_new_tokens, pages
    for every computed position, nothing leaked, under preemption pressure too."""

    def reqs():
        return [req(f"r{i}", range(7 + i, 7 + i + p), max_new=m) for i, (p, m) in enumerate(shapes)]

    single = run_to_completion(make(num_pages=num_pages), reqs())
    s = make(num_pages=num_pages)
    multi = run_to_completion(s, reqs(), decode_steps=decode_steps)
    assert multi == single
    assert s.allocator.num_used == s.radix.num_cached_pages


def test_continuous_decode_needs_all_rows_decoding():
    s = make(max_running=2)
    a, b = req("a", range(10, 14), max_new=9), req("b", range(20, 28), max_new=9)
    s.add_request(a)
    out = s.schedule()  # a's prefill
    assert not s.extend_decode(out, 4, lambda r: True)
    s.commit(out)
    a.output_token_ids.append(1)
    s.add_request(b)
    out = s.schedule()  # a decodes, b prefills: not all decoding
    assert not s.extend_decode(out, 4, lambda r: True)
    s.commit(out)
    a.output_token_ids.append(1)
    b.output_token_ids.append(1)
    out = s.schedule()
    assert not s.extend_decode(out, 4, lambda r: r is not b)  # a row vetoed (e.g. penalties)
    assert s.extend_decode(out, 4, lambda r: True)
    assert [x.num_steps for x in out.scheduled] == [4, 4] and out.num_steps == 4


def test_prefill_chunks_are_shared_before_the_request_finishes():
    """A request admitted while another is still prefilling the same prompt reuses its computed pages."""
    s = make(num_pages=64, page_size=4, max_running=4, chunk=32)
    prompt = list(range(100, 140))
    a = req("a", prompt, max_new=4)
    s.add_request(a)
    s.commit(s.schedule())  # a: 32 of 40 prompt tokens
    b = req("b", prompt + [7, 8], max_new=4)
    s.add_request(b)
    out = s.schedule()  # a finishes its prompt; b is admitted behind it
    assert [x.request.request_id for x in out.scheduled] == ["a", "b"]
    assert b.num_cached_tokens == 32 and b.page_ids[:8] == a.page_ids[:8]
    s.commit(out)
    s.check_invariants()
    for r in (a, b):
        s.finish(r, FinishReason("abort"))
    s.check_invariants()
    assert s.allocator.num_used == s.radix.num_cached_pages  # only the cache holds pages now


def test_continuous_decode_with_a_queue_behind_a_full_batch():
    """Waiting requests block continuous decode only while they could be admitted."""
    s = make(max_running=1)
    a, b = req("a", range(10, 14), max_new=9), req("b", range(20, 24), max_new=9)
    s.add_request(a)
    s.commit(s.schedule())
    a.output_token_ids.append(1)
    s.add_request(b)  # cannot be admitted: the batch is full
    out = s.schedule()
    assert [x.request.request_id for x in out.scheduled] == ["a"] and s.waiting
    assert s.extend_decode(out, 4, lambda r: True) and out.num_steps == 4


@settings(max_examples=25, deadline=None)
@given(
    shapes=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 20)), min_size=1, max_size=8),
    decode_steps=st.sampled_from([1, 3]),
    num_pages=st.integers(20, 80),
    max_running=st.integers(1, 4),
)
def test_state_slots_follow_their_requests(shapes, decode_steps, num_pages, max_running):
    """Recurrent-state slots: a simulated device state per slot, advanced by each scheduled row, must always
    hold exactly the tokens its request computed so far (or the row starts from position 0), under chunked
    prefill, preemption and continuous decode; every slot is free at the end."""
    page_size = 4
    num_pages = max(num_pages, max(-(-(p + m) // page_size) for p, m in shapes) + 2)
    alloc = PageAllocator(num_pages)
    cfg = SchedulerConfig(max_running_requests=max_running, chunked_prefill_size=16, context_length=256)
    s = Scheduler(
        cfg, alloc, RadixCache(alloc, page_size, disabled=True), page_size, num_state_slots=max_running
    )
    device: dict[int, tuple[str, int]] = {}  # slot -> (request id, tokens folded into its state)
    reqs = [req(f"r{i}", range(7 + i, 7 + i + p), max_new=m) for i, (p, m) in enumerate(shapes)]
    for r in reqs:
        s.add_request(r)
    while s.has_work:
        out = s.schedule()
        s.extend_decode(out, decode_steps, lambda r: True)
        for sr in out.scheduled:
            slot = sr.request.state_slot
            assert slot is not None and 0 <= slot < max_running
            if sr.start > 0:
                assert device.get(slot) == (sr.request.request_id, sr.start), "state slot lost its request"
            device[slot] = (sr.request.request_id, sr.start + sr.num_new_tokens + sr.num_steps - 1)
        s.commit(out)
        sample_and_finish(s, out)
        s.check_invariants()
    assert sorted(s.free_page_rows) == list(range(max_running))
    assert all(r.state_slot is None for r in reqs)


def test_state_slots_must_cover_running_requests():
    alloc = PageAllocator(16)
    cfg = SchedulerConfig(max_running_requests=4, chunked_prefill_size=16, context_length=64)
    with pytest.raises(ValueError, match="num_state_slots"):
        Scheduler(cfg, alloc, RadixCache(alloc, 4, disabled=True), 4, num_state_slots=2)


@settings(max_examples=25, deadline=None)
@given(
    shapes=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 20)), min_size=1, max_size=8),
    decode_steps=st.sampled_from([1, 3]),
    num_pages=st.integers(20, 80),
    max_running=st.integers(1, 4),
    shared=st.booleans(),
)
def test_device_page_table_rows_follow_their_requests(shapes, decode_steps, num_pages, max_running, shared):
    """The device page table (simulated in numpy): applying each step's page_table_delta before it, every
    scheduled request's row holds exactly its pages, and the batch laid out against the table (page rows) has
    the same KV slots and, once rows are read, the same page indices as one laid out with the host table;
    under chunked prefill, radix reuse, preemption and continuous decode. Rows are all free at the end."""
    from jaxrt.batch import build_batch, page_table_delta
    from jaxrt.page_table import NULL_PAGE

    page_size, pages_per_seq = 4, 32
    num_pages = max(num_pages, max(-(-(p + m) // page_size) for p, m in shapes) + 2)
    s = make(num_pages=num_pages, page_size=page_size, max_running=max_running, radix=True)
    table = np.full((max_running + 1, pages_per_seq), NULL_PAGE, np.int32)  # last row: padding
    prefix = list(range(50, 62)) if shared else []
    reqs = [
        req(f"r{i}", prefix + list(range(7 + i, 7 + i + p)), max_new=m) for i, (p, m) in enumerate(shapes)
    ]
    for r in reqs:
        s.add_request(r)
    while s.has_work:
        out = s.schedule()
        s.extend_decode(out, decode_steps, lambda r: True)
        rows, cols, pages = page_table_delta(out)
        assert (rows < max_running).all()
        table[rows, cols] = pages
        for sr in out.scheduled:
            r = sr.request
            assert table[r.page_row, : len(r.page_ids)].tolist() == r.page_ids
        n = 16
        kw = dict(num_tokens=n, num_seqs=n, page_size=page_size, vocab_size=100, history_len=1, stop_ids={})
        dev, *_ = build_batch(out, pages_per_seq=None, pad_row=max_running, **kw)
        host, *_ = build_batch(out, pages_per_seq=pages_per_seq, **kw)
        np.testing.assert_array_equal(dev.slot_mapping, host.slot_mapping)
        read = table[dev.page_rows]
        for i, sr in enumerate(out.scheduled):
            used = -(-(sr.start + sr.num_new_tokens + sr.num_steps - 1) // page_size)
            np.testing.assert_array_equal(read[i, :used], host.page_indices[i, :used])
        assert (read[len(out.scheduled) :] == NULL_PAGE).all()  # padding sequences read the padding row
        s.commit(out)
        sample_and_finish(s, out)
        s.check_invariants()
    assert sorted(s.free_page_rows) == list(range(max_running))
    assert all(r.page_row is None and r.pages_on_device == 0 for r in reqs)


@pytest.mark.parametrize("single", [False, True])
@pytest.mark.parametrize("max_tokens", [1, 4, 8, 9, 2048])
def test_token_buckets(max_tokens, single):
    """Powers of two from 8 up to the step's token budget (always included), after a 1-token bucket when
    asked for one; strictly increasing, so every batch size has exactly one smallest fitting bucket."""
    from jaxrt.batch import pick_bucket, token_buckets

    buckets = token_buckets(max_tokens, single=single)
    assert buckets == sorted(set(buckets)) and buckets[-1] == max_tokens
    assert all(b & (b - 1) == 0 for b in buckets[:-1]) and all(b == 1 or b >= 8 for b in buckets[:-1])
    assert (buckets[0] == 1) == (single or max_tokens == 1)
    for n in range(1, max_tokens + 1, max(1, max_tokens // 64)):
        b = pick_bucket(buckets, n)
        assert b >= n and all(c < n for c in buckets if c < b)


def test_steps_computing_prompt_logprobs_hold_a_bounded_number_of_tokens(monkeypatch):
    """A step with a request whose prompt log-probabilities are still to compute makes logits for every row,
    so it holds at most PROMPT_LOGPROB_TOKENS tokens (6 here, against a 16-token budget); the request's cached
    prefix stops before the rows its positions need; other steps keep the whole budget."""
    from jaxrt import scheduler as sched_mod

    monkeypatch.setattr(sched_mod, "PROMPT_LOGPROB_TOKENS", 6)
    s = make(chunk=16)
    warm = Request("warm", list(range(1, 21)), SamplingParams(max_new_tokens=1), seed=0)
    run_to_completion(s, [warm])  # its 20 prompt tokens' full pages go to the radix cache
    wants = SamplingParams(max_new_tokens=2, return_logprob=True, logprob_start_len=9)
    req = Request("lp", list(range(1, 21)), wants, seed=0)
    plain = Request("plain", list(range(50, 70)), SamplingParams(max_new_tokens=2), seed=0)
    s.add_request(plain)
    s.add_request(req)
    sizes, computed = [], []
    while s.has_work:
        out = s.schedule()
        sizes.append(out.num_tokens)
        for sr in out.scheduled:
            r = sr.request
            if r is req and req.input_logprob_next is not None:
                computed.append((sr.start, sr.num_new_tokens))
                n = min(sr.start + sr.num_new_tokens + 1, len(r.prompt_token_ids)) - r.input_logprob_next
                r.input_logprobs.extend([0.0] * max(n, 0))  # what the engine reads back for its rows
        s.commit(out)
        sample_and_finish(s, out)
    assert sizes[0] == 16  # the plain prompt alone fills the budget; the other waits (FCFS)
    assert computed[0][0] == 8  # cached pages stop at the row before position 9 (page size 4)
    assert all(n <= 6 for n in sizes[1 : 1 + len(computed)])
    assert req.input_logprob_next is None and len(req.input_logprobs) == 20 - 9
