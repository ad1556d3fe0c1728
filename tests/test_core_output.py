"""The respond stage (jaxrt.output) on its own: appending a dispatch's tokens at once must end every request
exactly where appending them one by one does (stop ids and EOS past min_new_tokens, max_new_tokens, the
context length), keep the same tokens and log-probabilities, and drop what was sampled past the end."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxrt.batch import MAX_TOP_LOGPROBS, DecodeLoopOutput, StepOutput
from jaxrt.output import OutputProcessor, Track
from jaxrt.request import FinishReason, Request, RequestStatus
from jaxrt.sampling_params import SamplingParams
from jaxrt.scheduler import ScheduledRequest, SchedulerOutput

VOCAB = 6  # few ids, so stop ids are hit often


def _run(case: dict, one_by_one: bool) -> tuple[list[dict], list[Request], dict]:
    """Feed the case's dispatches (each ``[num_steps, rows]`` tokens) through an OutputProcessor; a stop
    string (which never matches: there is no tokenizer) sends every row down the token-by-token path."""
    stats: dict = {"num_generated_tokens": 0, "num_prompt_tokens": 0, "num_cached_tokens": 0}
    proc = OutputProcessor(None, case["context_length"], stats)
    outputs: list[dict] = []
    reqs = []
    for i, row in enumerate(case["rows"]):
        sp = SamplingParams(
            max_new_tokens=row["max_new"],
            min_new_tokens=row["min_new"],
            stop_token_ids=row["stop_ids"],
            stop=["never"] if one_by_one else [],
            return_logprob=True,
        )
        req = Request(str(i), list(range(row["prompt_len"])), sp, seed=0)
        stop_ids = list(row["stop_ids"]) + list(row["eos"])
        proc.tracks[req.request_id] = Track(
            request=req,
            sink=outputs.append,
            stream=row["stream"],
            detok=None,
            stop_ids=stop_ids,
            eos_ids=set(row["eos"]),
            return_logprob=True,
            top_logprobs_num=0,
        )
        reqs.append(req)

    def finish(req: Request, reason: FinishReason) -> None:  # the scheduler's part of finishing
        req.finish_reason, req.status = reason, RequestStatus.FINISHED

    for tokens in case["dispatches"]:
        live = [r for r in reqs if not r.is_finished]
        if not live:
            break
        steps, rows = tokens.shape[0], len(live)
        sched = SchedulerOutput(
            [ScheduledRequest(r, r.num_known_tokens, 1, True, num_steps=steps) for r in live]
        )
        for i, r in enumerate(live):
            r.pending_rows.extend([i] * steps)
        logprobs = -(tokens[:, :rows] + 0.5).astype(np.float32)
        if steps > 1:  # a continuous-decode dispatch
            out = DecodeLoopOutput(
                tokens=tokens[-1, :rows], all_tokens=tokens[:, :rows], all_logprobs=logprobs
            )
        else:
            top = np.zeros((rows, MAX_TOP_LOGPROBS))
            out = StepOutput(tokens[0, :rows], logprobs[0], top.astype(np.int32), top.astype(np.float32))
        proc.process(sched, out, now=1.0, finish=finish)
    return outputs, reqs, stats


_row = st.fixed_dictionaries(
    {
        "prompt_len": st.integers(1, 6),
        "max_new": st.integers(1, 12),
        "min_new": st.integers(0, 6),
        "stop_ids": st.lists(st.integers(0, VOCAB - 1), max_size=2),
        "eos": st.lists(st.integers(0, VOCAB - 1), max_size=1),
        "stream": st.booleans(),
    }
)


@st.composite
def _cases(draw):
    rows = draw(st.lists(_row, min_size=1, max_size=4))
    steps = draw(st.integers(1, 4))
    n = draw(st.integers(1, 6))
    dispatches = [
        np.array(
            draw(st.lists(st.integers(0, VOCAB - 1), min_size=steps * 4, max_size=steps * 4)), np.int32
        ).reshape(steps, 4)
        for _ in range(n)
    ]
    return {"rows": rows, "dispatches": dispatches, "context_length": draw(st.integers(8, 20))}


@settings(max_examples=200, deadline=None)
@given(_cases())
def test_tokens_at_once_end_where_one_by_one_ends(case):
    at_once, reqs_a, stats_a = _run(case, one_by_one=False)
    each, reqs_b, stats_b = _run(case, one_by_one=True)
    for a, b in zip(reqs_a, reqs_b, strict=True):
        assert a.output_token_ids == b.output_token_ids
        assert a.output_logprobs == b.output_logprobs
        assert a.pending_rows == b.pending_rows == []
    finals_a = {
        o["meta_info"]["id"]: o["meta_info"]["finish_reason"]
        for o in at_once
        if o["meta_info"]["finish_reason"]
    }
    finals_b = {
        o["meta_info"]["id"]: o["meta_info"]["finish_reason"] for o in each if o["meta_info"]["finish_reason"]
    }
    assert finals_a == finals_b
    assert stats_a == stats_b
    # The rules themselves: no request outgrows max_new_tokens or the context; one that ended on a stop id
    # ended on its last token, past min_new_tokens.
    for req, row in zip(reqs_a, case["rows"], strict=True):
        n = len(req.output_token_ids)
        assert n <= row["max_new"] and req.num_known_tokens <= case["context_length"]
        reason = finals_a.get(req.request_id)
        if reason and reason["type"] == "stop":
            assert reason["matched"] == req.output_token_ids[-1] and n >= row["min_new"]
            assert reason["matched"] in set(row["stop_ids"]) | set(row["eos"])
        elif reason:
            assert n == row["max_new"] or req.num_known_tokens >= case["context_length"]
