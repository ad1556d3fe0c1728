"""The respond stage (jaxrt.output) on its own, against the finish rules written out token by token: a request
ends at the first sampled token that is a stop id or EOS past min_new_tokens, or that reaches max_new_tokens or
the context length; tokens sampled past it (later steps of a continuous-decode dispatch) are dropped."""

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


def _run(case: dict) -> tuple[list[dict], list[Request], dict]:
    """Feed the case's dispatches (each ``[num_steps, rows]`` tokens; column i goes to the i-th request still
    running) through an OutputProcessor."""
    stats: dict = {"num_generated_tokens": 0, "num_prompt_tokens": 0, "num_cached_tokens": 0}
    proc = OutputProcessor(None, case["context_length"], stats)
    outputs: list[dict] = []
    reqs = []
    for i, row in enumerate(case["rows"]):
        sp = SamplingParams(
            max_new_tokens=row["max_new"],
            min_new_tokens=row["min_new"],
            stop_token_ids=row["stop_ids"],
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


def _expected(case: dict) -> list[tuple[list[int], dict]]:
    """Each request's tokens and finish reason under the rules, one token at a time (the reference)."""
    rows = case["rows"]
    outs: list[list[int]] = [[] for _ in rows]
    reasons: list[dict | None] = [None] * len(rows)
    for tokens in case["dispatches"]:
        live = [i for i in range(len(rows)) if reasons[i] is None]
        for col, i in enumerate(live):
            row = rows[i]
            for token in tokens[:, col].tolist():
                outs[i].append(token)
                n = len(outs[i])
                if n >= row["min_new"] and token in set(row["stop_ids"]) | set(row["eos"]):
                    reasons[i] = {"type": "stop", "matched": token}
                elif n >= row["max_new"] or row["prompt_len"] + n >= case["context_length"]:
                    reasons[i] = {"type": "length"}
                if reasons[i] is not None:
                    break
    return list(zip(outs, reasons, strict=True))


@settings(max_examples=200, deadline=None)
@given(_cases())
def test_each_request_ends_where_the_rules_say(case):
    outputs, reqs, stats = _run(case)
    finals = {
        o["meta_info"]["id"]: o["meta_info"]["finish_reason"]
        for o in outputs
        if o["meta_info"]["finish_reason"]
    }
    for req, (want_ids, want_reason) in zip(reqs, _expected(case), strict=True):
        assert req.output_token_ids == want_ids
        assert req.output_logprobs == [-(t + 0.5) for t in want_ids]
        assert req.pending_rows == []
        assert finals.get(req.request_id) == want_reason
    assert stats["num_generated_tokens"] == sum(len(r.output_token_ids) for r in reqs)
