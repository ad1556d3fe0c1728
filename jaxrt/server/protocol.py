"""Wire shapes: OpenAI request bodies (pydantic, unknown fields allowed), the error shape, and the small
translations between OpenAI and SGLang vocabularies (sampling keys, finish reasons, logprobs)."""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict
from starlette.responses import StreamingResponse

from jaxrt.sampling_params import CONSTRAINTS

# --------------------------------------------------------------------------------------------- errors


class APIError(Exception):
    """Raised anywhere in a handler; rendered as ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str | None = None,
        param: str | None = None,
        code: str | int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _ERROR_TYPES.get(status, "invalid_request_error")
        self.param = param
        self.code = code if code is not None else status
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    500: "internal_server_error",
    503: "service_unavailable_error",
}


def error_body(message: str, type: str, param: str | None = None, code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def sse(obj: Any) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(obj, separators=(',', ':'), ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"
_SSE_DONE_BYTES = SSE_DONE.encode()


class EventStreamResponse(StreamingResponse):
    """A ``text/event-stream`` of ``sse`` events whose last body piece ends with ``SSE_DONE``: that piece also
    ends the HTTP body. The streams yield their last event and ``[DONE]`` as one piece, so a stream's end
    costs one send through the middleware and one socket write instead of three (event, ``[DONE]``, the
    chunked-encoding terminator); at 256 short streams at once these sends were a fifth of the HTTP
    process's time. Bytes on the wire are unchanged."""

    media_type = "text/event-stream"

    def __init__(self, content, headers: dict[str, str] | None = None) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", **(headers or {})})

    async def stream_response(self, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        ended = False
        async for chunk in self.body_iterator:
            if not isinstance(chunk, bytes | memoryview):
                chunk = chunk.encode(self.charset)
            ended = chunk.endswith(_SSE_DONE_BYTES)
            await send({"type": "http.response.body", "body": chunk, "more_body": not ended})
        if not ended:
            await send({"type": "http.response.body", "body": b"", "more_body": False})


# Engine ValueErrors name their field ("sampling_params.top_p must be ...", "prompt: ..."); OpenAI names differ.
_OPENAI_PARAM = {
    "max_new_tokens": "max_tokens",
    "min_new_tokens": "min_tokens",
    "top_logprobs_num": "logprobs",
    "input_ids": "prompt",
}


def param_of(message: str, openai: bool) -> str | None:
    m = re.match(r"\s*(?:sampling_params\.)?([a-z_]+)\b", message)
    if not m:
        return None
    name = m.group(1)
    known = {"prompt", "input_ids", "max_new_tokens", "sampling_params", "text"}
    if not message.startswith("sampling_params.") and name not in known:
        return None
    return _OPENAI_PARAM.get(name, name) if openai else name


def bad_request(e: ValueError, openai: bool = True) -> APIError:
    msg = str(e)
    code: str | int = 400
    if "too long for context_length" in msg:
        code = "context_length_exceeded"
        msg = f"{msg} (the prompt is longer than the model's maximum context length)"
    return APIError(400, msg, param=param_of(str(e), openai), code=code)


# --------------------------------------------------------------------------------------------- requests


class OpenAIBase(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(OpenAIBase):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _SamplingRequest(OpenAIBase):
    """Fields common to completions and chat, plus the vLLM/SGLang extras clients send in ``extra_body``."""

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    response_format: dict[str, Any] | None = None
    # extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    no_stop_trim: bool = False  # SGLang's name for include_stop_str_in_output
    rid: str | None = None
    regex: str | None = None
    json_schema: str | dict[str, Any] | None = None
    ebnf: str | None = None
    # vLLM's names for the same constraints
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_grammar: str | None = None


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class ChatMessage(OpenAIBase):
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False


def check_unsupported(req: _SamplingRequest) -> None:
    """Reject what we cannot honour instead of silently ignoring it."""
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
    _normalise_constraints(req)
    if req.n < 1:
        raise APIError(400, f"n must be at least 1, got {req.n}", param="n")


def _normalise_constraints(req: _SamplingRequest) -> None:
    """Move vLLM's ``guided_*`` fields and OpenAI's ``response_format`` onto SGLang's ``regex`` / ``json_schema``
    / ``ebnf`` (once per request), with a 400 for a constraint set twice."""
    for vllm, ours in (("guided_json", "json_schema"), ("guided_regex", "regex"), ("guided_grammar", "ebnf")):
        value = getattr(req, vllm)
        if value is not None:
            if getattr(req, ours) is not None:
                raise APIError(400, f"{vllm} and {ours} are the same constraint: set one", param=vllm)
            setattr(req, ours, value)
            setattr(req, vllm, None)
    schema = _response_format_schema(req)
    if schema is not None:
        set_reply_schema(req, schema, "response_format")
        req.response_format = None


def set_reply_schema(req: _SamplingRequest, schema: str, field: str) -> None:
    """Constrain the reply to ``schema``, which request field ``field`` implies (``response_format``, a tool
    choice): a 400 naming that field when the request sets another constraint."""
    if any(getattr(req, k) is not None for k in CONSTRAINTS):
        raise APIError(400, f"{field} cannot be combined with regex, json_schema or ebnf", param=field)
    req.json_schema = schema


def _response_format_schema(req: _SamplingRequest) -> str | None:
    """The JSON schema that OpenAI's ``response_format`` asks for: None for "text" (or none), any JSON object
    for "json_object", ``json_schema.schema`` for "json_schema"; 400 for anything else."""
    rf = req.response_format
    kind = (rf or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return json.dumps({"type": "object"})
    if kind == "json_schema":
        spec = rf.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise APIError(
                400,
                "response_format.json_schema.schema must be a JSON schema object",
                param="response_format",
            )
        return json.dumps(schema)
    raise APIError(
        400,
        f"response_format type {kind!r} is not supported (text, json_object, json_schema)",
        param="response_format",
    )


def sampling_dict(req: _SamplingRequest, max_new_tokens: int | None) -> dict[str, Any]:
    """OpenAI fields -> SGLang sampling_params keys (only the ones the client set; the constraints as
    ``check_unsupported`` left them)."""
    d: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "min_new_tokens": req.min_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "min_p": req.min_p,
        "repetition_penalty": req.repetition_penalty,
        "frequency_penalty": req.frequency_penalty,
        "presence_penalty": req.presence_penalty,
        "stop": req.stop,
        "stop_token_ids": req.stop_token_ids,
        "ignore_eos": req.ignore_eos,
        "skip_special_tokens": req.skip_special_tokens,
        "n": req.n,
        "seed": req.seed,
        "logit_bias": req.logit_bias,
        "regex": req.regex,
        "json_schema": req.json_schema,
        "ebnf": req.ebnf,
    }
    return {k: v for k, v in d.items() if v is not None}


def check_max_tokens(name: str, value: int | None, min_tokens: int) -> None:
    if value is None:
        return
    if value < 1:
        raise APIError(400, f"{name} must be at least 1, got {value}", param=name)
    if min_tokens > value:
        raise APIError(400, f"min_tokens ({min_tokens}) must be <= {name} ({value})", param="min_tokens")


def check_context(n_prompt: int, max_tokens: int | None, context_length: int, param: str) -> None:
    if n_prompt >= context_length:
        raise APIError(
            400,
            f"This model's maximum context length is {context_length} tokens. However, your prompt has "
            f"{n_prompt} tokens (the prompt is longer than the model's context length).",
            param=param,
            code="context_length_exceeded",
        )
    if max_tokens is not None and n_prompt + max_tokens > context_length:
        raise APIError(
            400,
            f"Requested token count exceeds the model's maximum context length of {context_length} tokens. "
            f"You requested a total of {n_prompt + max_tokens} tokens: {n_prompt} tokens from the input and "
            f"{max_tokens} tokens for the completion. Please reduce the prompt or max_tokens.",
            param="max_tokens",
            code="context_length_exceeded",
        )


# --------------------------------------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def finish_reason(fr: dict[str, Any] | None) -> str | None:
    """SGLang finish_reason object -> OpenAI string. Aborts surface as "abort"."""
    if fr is None:
        return None
    return {"stop": "stop", "length": "length"}.get(fr.get("type"), "abort")


def matched_stop(fr: dict[str, Any] | None) -> str | int | None:
    return fr.get("matched") if fr else None


def internal_failure(fr: dict[str, Any] | None) -> APIError | None:
    """An abort that is the server's fault (a failed step) or a shutdown, as an error to report."""
    if not fr or fr.get("type") != "abort":
        return None
    msg = fr.get("message") or ""
    if msg.startswith("internal error"):
        return APIError(500, f"Internal server error: {msg}")
    if "shutting down" in msg:
        return APIError(503, "The server is shutting down.", headers={"Retry-After": "5"})
    return None


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


class TokenText:
    """id -> the token's text, cached (for logprobs)."""

    def __init__(self, tokenizer) -> None:
        self._tok = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        s = self._cache.get(token_id)
        if s is None:
            s = self._tok.decode([int(token_id)], skip_special_tokens=False)
            self._cache[token_id] = s
        return s


def completion_logprobs(text_of: TokenText, lps: list, tops: list, k: int, offset0: int) -> dict[str, Any]:
    """OpenAI completions ``logprobs`` for the given slice of ``output_token_logprobs`` / ``output_top_logprobs``
    (with echo, the prompt's ``input_token_logprobs`` before them: a None log-probability gives a None top entry)."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    pos = offset0
    for i, (lp, tid, *_rest) in enumerate(lps):
        s = text_of(tid)
        tokens.append(s)
        token_logprobs.append(lp)
        if lp is None:  # a prompt's first token (echo): no log-probability, no alternatives
            top.append(None)
        else:
            d: dict[str, float] = {}
            for lp2, tid2, *_r in (tops[i] if i < len(tops) and tops[i] else [])[:k]:
                d.setdefault(text_of(tid2), lp2)
            d.setdefault(s, lp)
            top.append(d)
        offsets.append(pos)
        pos += len(s)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(text_of: TokenText, lps: list, tops: list, k: int) -> dict[str, Any]:
    """OpenAI chat ``logprobs`` ({"content": [...]}) for the given slice."""

    def entry(lp: float, tid: int) -> dict[str, Any]:
        s = text_of(tid)
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

    content = []
    for i, (lp, tid, *_rest) in enumerate(lps):
        e = entry(lp, tid)
        row = tops[i] if i < len(tops) else []
        e["top_logprobs"] = [entry(lp2, tid2) for lp2, tid2, *_r in row[:k]]
        content.append(e)
    return {"content": content}
