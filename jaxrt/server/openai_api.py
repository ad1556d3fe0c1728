"""OpenAI-compatible routes: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` (JSON and SSE)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request

from jaxrt.sampling_params import MAX_TOP_LOGPROBS
from jaxrt.server.protocol import (
    SSE_DONE,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    EventStreamResponse,
    TokenText,
    chat_logprobs,
    check_context,
    check_max_tokens,
    check_unsupported,
    completion_logprobs,
    error_body,
    finish_reason,
    internal_failure,
    matched_stop,
    new_id,
    now,
    sampling_dict,
    set_reply_schema,
    sse,
    usage,
)
from jaxrt.server.state import ServerState
from jaxrt.server.tools import ToolPlan, ToolStream, template_messages, tool_call_objects
from jaxrt.server.tools import plan as tool_plan

logger = logging.getLogger("jaxrt.server")

router = APIRouter()


def _state(request: Request) -> ServerState:
    return request.app.state.server


def _model_card(state: ServerState) -> dict[str, Any]:
    e = state.engine
    return {
        "id": e.served_model_name,
        "object": "model",
        "created": state.created,
        "owned_by": "jaxrt",
        "root": e.model_path,
        "parent": None,
        "max_model_len": e.context_length,
    }


def check_model(engine, name: str | None) -> None:
    if name is None:
        return
    served = engine.served_model_name
    path = engine.model_path.rstrip("/")
    if name in (served, path, path.split("/")[-1]) or name.rstrip("/").split("/")[-1] == served:
        return
    raise APIError(
        404,
        f"The model '{name}' does not exist.",
        type="invalid_request_error",
        param="model",
        code="model_not_found",
    )


@router.get("/v1/models")
async def list_models(request: Request):
    state = _state(request)
    state.require_engine()
    return {"object": "list", "data": [_model_card(state)]}


@router.get("/v1/models/{model:path}")
async def get_model(model: str, request: Request):
    state = _state(request)
    check_model(state.require_engine(), model)
    return _model_card(state)


# ============================================================================================ shared


@dataclass
class _Job:
    """A validated OpenAI request, ready to run: one token list per prompt, n choices each."""

    kind: str  # "completion" | "chat"
    req: Any
    prompts: list[list[int]]
    prompt_texts: list[str]
    max_new: list[int]
    lp_args: dict[str, Any]
    top_k: int  # how many top logprobs to report
    tools: ToolPlan | None = None  # chat: how replies become tool calls (None: plain text)

    @property
    def n(self) -> int:
        return self.req.n

    def sampling(self, p: int) -> dict[str, Any]:
        return sampling_dict(self.req, self.max_new[p])


def _tokenizer(engine):
    if engine.tokenizer is None:
        raise APIError(400, "this server was started without a tokenizer; the OpenAI API needs one")
    return engine.tokenizer


def _extra_text(req, fr: dict[str, Any] | None) -> str:
    """With include_stop_str_in_output / no_stop_trim, a matched stop string goes back into the text."""
    m = matched_stop(fr)
    if (req.include_stop_str_in_output or req.no_stop_trim) and isinstance(m, str):
        return m
    return ""


async def _run(job: _Job, request: Request):
    state = _state(request)
    engine = state.engine
    req = job.req
    model = req.model or engine.served_model_name
    text_of = TokenText(engine.tokenizer)
    if not req.stream:
        results = await state.generate(
            request,
            num_seqs=len(job.prompts) * job.n,
            rid=req.rid,
            input_ids=job.prompts,
            sampling_params=[job.sampling(p) for p in range(len(job.prompts))],
            **job.lp_args,
        )
        return _response(job, results, model, text_of)

    items = []
    for p, ids in enumerate(job.prompts):
        for j in range(job.n):
            sp = job.sampling(p)
            sp["n"] = 1
            if req.seed is not None:
                sp["seed"] = req.seed + j
            items.append({"input_ids": ids, "sampling_params": sp, **job.lp_args})
    ss = await state.open_streams(request, items, rid=req.rid)
    return EventStreamResponse(_events(job, ss, model, text_of))


def _finish(job: _Job, fr: dict[str, Any] | None, called: bool) -> str | None:
    """OpenAI's finish_reason: "tool_calls" for a reply that made calls and stopped on its own (a named function
    keeps "stop", as OpenAI does)."""
    reason = finish_reason(fr)
    if called and reason == "stop" and job.tools is not None and job.tools.choice != "named":
        return "tool_calls"
    return reason


def _response(job: _Job, results: list[dict[str, Any]], model: str, text_of: TokenText) -> dict[str, Any]:
    req = job.req
    choices = []
    completion_tokens = cached = 0
    for k, r in enumerate(results):
        meta = r["meta_info"]
        fr = meta["finish_reason"]
        err = internal_failure(fr)
        if err is not None:
            raise err
        p = k // job.n
        completion_tokens += meta.get("completion_tokens", 0)
        if k % job.n == 0:
            cached += meta.get("cached_tokens", 0)
        text = r["text"] + _extra_text(req, fr)
        lps = meta.get("output_token_logprobs") or []
        tops = meta.get("output_top_logprobs") or []
        calls: list[dict[str, str]] = []
        if job.kind == "completion":
            prefix = job.prompt_texts[p] if req.echo else ""
            offset = len(prefix)
            if req.echo and job.lp_args:  # the prompt's entries first, from offset 0
                lps, tops, offset = _with_prompt(meta, lps), _with_prompt_top(meta, tops), 0
            logprobs = completion_logprobs(text_of, lps, tops, job.top_k, offset) if job.lp_args else None
            choice = {"index": k, "text": prefix + text, "logprobs": logprobs}
        else:
            logprobs = chat_logprobs(text_of, lps, tops, job.top_k) if job.lp_args else None
            content, calls = job.tools.parse(text) if job.tools else (text, [])
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if calls:
                message["tool_calls"] = tool_call_objects(calls)
            choice = {"index": k, "message": message, "logprobs": logprobs}
        choice["finish_reason"] = _finish(job, fr, bool(calls))
        choice["matched_stop"] = matched_stop(fr)
        choices.append(choice)
    prompt_tokens = sum(len(ids) for ids in job.prompts)
    return {
        "id": new_id("cmpl" if job.kind == "completion" else "chatcmpl"),
        "object": "text_completion" if job.kind == "completion" else "chat.completion",
        "created": now(),
        "model": model,
        "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens, cached),
    }


def _with_prompt(meta: dict[str, Any], lps: list) -> list:
    """``output_token_logprobs`` after the prompt's ``input_token_logprobs`` (echo with logprobs)."""
    return list(meta.get("input_token_logprobs") or []) + list(lps)


def _with_prompt_top(meta: dict[str, Any], tops: list) -> list:
    """``output_top_logprobs`` after the prompt's ``input_top_logprobs`` (None for its first token)."""
    n = len(meta.get("input_token_logprobs") or [])
    prompt = list(meta.get("input_top_logprobs") or [[] for _ in range(n)])
    return prompt + list(tops)


async def _events(job: _Job, ss, model: str, text_of: TokenText) -> AsyncIterator[str]:
    req = job.req
    chat = job.kind == "chat"
    base = {
        "id": new_id("chatcmpl" if chat else "cmpl"),
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": now(),
        "model": model,
    }
    opts = req.stream_options
    include_usage = bool(opts and opts.include_usage)
    continuous = bool(opts and opts.continuous_usage_stats)
    n_streams = len(job.prompts) * job.n
    sent_chars = [0] * n_streams
    sent_tokens = [0] * n_streams
    offsets = [0] * n_streams
    completion = [0] * n_streams
    cached = [0] * n_streams
    prompt_tokens = sum(len(ids) for ids in job.prompts)
    left = n_streams  # streams without their final chunk yet; the last one's event carries the end
    tool_streams = [ToolStream(job.tools) for _ in range(n_streams)] if chat and job.tools else None

    def running_usage() -> dict[str, Any]:
        return usage(prompt_tokens, sum(completion), sum(cached[:: job.n]))

    def ending() -> str:
        return (sse({**base, "choices": [], "usage": running_usage()}) if include_usage else "") + SSE_DONE

    def event(choice: dict[str, Any]) -> str:
        out = {**base, "choices": [choice]}
        if include_usage:
            out["usage"] = running_usage() if continuous else None
        return sse(out)

    try:
        if chat:
            for i in range(n_streams):
                yield event(
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                )
        elif req.echo and not job.lp_args:
            for i in range(n_streams):
                prefix = job.prompt_texts[i // job.n]
                offsets[i] = len(prefix)
                yield event({"index": i, "text": prefix, "logprobs": None, "finish_reason": None})
        echoing = [not chat and bool(req.echo and job.lp_args)] * n_streams  # prompt event still to send
        async for i, chunk in ss:
            if isinstance(chunk, BaseException):
                logger.error("stream failed: %s", chunk)
                yield sse(error_body(f"Internal server error: {chunk}", "internal_server_error", None, 500))
                yield SSE_DONE
                return
            meta = chunk["meta_info"]
            fr = meta["finish_reason"]
            err = internal_failure(fr)
            if err is not None:
                yield sse(err.body())
                yield SSE_DONE
                return
            if echoing[i]:  # echo with logprobs: the prompt, with its log-probabilities, once they exist
                echoing[i] = False
                prompt_lp = completion_logprobs(
                    text_of, _with_prompt(meta, []), _with_prompt_top(meta, []), job.top_k, 0
                )
                offsets[i] = sum(len(t) for t in prompt_lp["tokens"])
                prefix = job.prompt_texts[i // job.n]
                yield event({"index": i, "text": prefix, "logprobs": prompt_lp, "finish_reason": None})
            text = chunk["text"]
            delta = text[sent_chars[i] :]
            sent_chars[i] = max(sent_chars[i], len(text))
            if fr is not None:
                delta += _extra_text(req, fr)
            lps = (meta.get("output_token_logprobs") or [])[sent_tokens[i] :]
            tops = (meta.get("output_top_logprobs") or [])[sent_tokens[i] :]
            if job.lp_args:
                sent_tokens[i] += len(lps)
            completion[i] = meta.get("completion_tokens", 0)
            cached[i] = meta.get("cached_tokens", 0)
            calls: list[dict[str, Any]] = []  # this event's delta.tool_calls entries
            called = False
            if tool_streams is not None:
                delta, calls = tool_streams[i].feed(delta)
                if fr is not None:
                    tail, more, called = tool_streams[i].finish()
                    delta, calls = delta + tail, calls + more
            if not delta and fr is None and not lps and not calls:
                continue
            if chat:
                d: dict[str, Any] = {"content": delta} if delta else {}
                if calls:
                    d["tool_calls"] = calls
                choice: dict[str, Any] = {
                    "index": i,
                    "delta": d,
                    "logprobs": chat_logprobs(text_of, lps, tops, job.top_k) if job.lp_args else None,
                }
            else:
                logprobs = (
                    completion_logprobs(text_of, lps, tops, job.top_k, offsets[i]) if job.lp_args else None
                )
                offsets[i] += sum(len(t) for t in logprobs["tokens"]) if logprobs else len(delta)
                choice = {"index": i, "text": delta, "logprobs": logprobs}
            choice["finish_reason"] = _finish(job, fr, called)
            if fr is not None:
                choice["matched_stop"] = matched_stop(fr)
                left -= 1
            if left:
                yield event(choice)
            else:  # the last event, the usage and [DONE] in one piece (EventStreamResponse)
                yield event(choice) + ending()
        if left:
            yield ending()
    except Exception as e:  # a bug while formatting: report in-band, keep serving
        logger.exception("stream formatting failed")
        if left:  # (else the body has ended)
            yield sse(
                error_body(
                    f"Internal server error: {type(e).__name__}: {e}", "internal_server_error", None, 500
                )
            )
            yield SSE_DONE
    finally:
        ss.close()


# ============================================================================================ completions


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    state = _state(request)
    engine = state.require_engine()
    check_model(engine, body.model)
    check_unsupported(body)
    if body.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")
    if body.best_of not in (None, 1, body.n):
        raise APIError(400, "best_of other than n is not supported", param="best_of")
    check_max_tokens("max_tokens", body.max_tokens, body.min_tokens)
    if body.logprobs is not None and not 0 <= body.logprobs <= MAX_TOP_LOGPROBS:
        raise APIError(
            400, f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {body.logprobs}", param="logprobs"
        )
    tok = _tokenizer(engine)
    p = body.prompt
    if isinstance(p, str):
        raw: list = [p]
    elif p and isinstance(p[0], int):
        raw = [p]
    else:
        raw = list(p)
    if not raw:
        raise APIError(400, "prompt: empty batch", param="prompt")
    prompts, texts = [], []
    for x in raw:
        if isinstance(x, str):
            prompts.append(tok.encode(x) if x else [])
            texts.append(x)
        else:
            prompts.append(list(x))
            texts.append(tok.decode(list(x), skip_special_tokens=False) if body.echo else "")
    ctx = engine.context_length
    for ids in prompts:
        if not ids:
            raise APIError(400, "prompt: empty prompt (no tokens)", param="prompt")
        check_context(len(ids), body.max_tokens, ctx, "prompt")
    max_new = [body.max_tokens if body.max_tokens is not None else ctx - len(ids) for ids in prompts]
    lp_args = {} if body.logprobs is None else {"return_logprob": True, "top_logprobs_num": body.logprobs}
    if body.echo and lp_args:  # the prompt's tokens with their log-probabilities too (the first has none)
        lp_args["logprob_start_len"] = 0
    job = _Job("completion", body, prompts, texts, max_new, lp_args, body.logprobs or 0)
    return await _run(job, request)


# ============================================================================================ chat


def _chat_messages(body: ChatCompletionRequest) -> list[dict[str, Any]]:
    out = []
    for k, m in enumerate(body.messages):
        d = m.model_dump(exclude_none=True)
        if isinstance(m.content, list):
            parts = []
            for part in m.content:
                if part.get("type") != "text":
                    raise APIError(
                        400,
                        f"messages[{k}].content: content part type {part.get('type')!r} is not supported (text only)",
                        param=f"messages.{k}.content",
                    )
                parts.append(str(part.get("text", "")))
            d["content"] = "\n".join(parts)
        elif m.content is None:
            d["content"] = ""
        out.append(d)
    if not out:
        raise APIError(400, "messages must not be empty", param="messages")
    return out


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    state = _state(request)
    engine = state.require_engine()
    check_model(engine, body.model)
    check_unsupported(body)
    tools = tool_plan(body, state.tool_call_parser)
    if tools is not None and tools.keeps_special_tokens:
        body.skip_special_tokens = False  # the calls' marker is a special token
    schema = tools.schema() if tools else None
    if schema is not None:  # a named function or "required" constrain the reply
        set_reply_schema(body, schema, "tool_choice")
    name = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    check_max_tokens(name, max_tokens, body.min_tokens)
    top = body.top_logprobs
    if top is not None:
        if not body.logprobs:
            raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
        if not 0 <= top <= MAX_TOP_LOGPROBS:
            raise APIError(
                400, f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {top}", param="top_logprobs"
            )
    tok = _tokenizer(engine)
    messages = template_messages(_chat_messages(body))
    kwargs = dict(body.chat_template_kwargs or {})
    if body.tools:
        kwargs["tools"] = body.tools
    add_gen = body.add_generation_prompt
    if body.continue_final_message:
        kwargs["continue_final_message"] = True
        add_gen = False
    try:
        ids = tok.apply_chat_template(messages, add_generation_prompt=add_gen, **kwargs)
    except ValueError as e:
        raise APIError(400, f"chat template: {e}", param="messages") from None
    except Exception as e:
        import jinja2

        if isinstance(e, jinja2.TemplateError):
            raise APIError(400, f"chat template failed on these messages: {e}", param="messages") from None
        raise
    ctx = engine.context_length
    check_context(len(ids), max_tokens, ctx, "messages")
    max_new = [max_tokens if max_tokens is not None else ctx - len(ids)]
    lp_args = {"return_logprob": True, "top_logprobs_num": top or 0} if body.logprobs else {}
    job = _Job("chat", body, [ids], [""], max_new, lp_args, top or 0, tools)
    return await _run(job, request)
