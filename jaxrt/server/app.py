"""The FastAPI app: SGLang's native endpoints, the OpenAI routes (openai_api.py), auth, errors and lifespan.

``create_app(state)`` builds an app around a :class:`ServerState`; the engine loads in a background thread
when the app starts, and ``/health`` answers 503 until it is loaded and compiled.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

import jaxrt
from jaxrt.server.metrics import CONTENT_TYPE
from jaxrt.server.protocol import (
    SSE_DONE,
    APIError,
    EventStreamResponse,
    bad_request,
    error_body,
    internal_failure,
    sse,
)
from jaxrt.server.state import ClientDisconnected, ServerState

logger = logging.getLogger("jaxrt.server")

OPEN_PATHS = {"/health", "/health_generate", "/metrics", "/ping", "/version"}


class APIKeyMiddleware:
    """``Authorization: Bearer <key>`` on every route except health, metrics, ping and version (pure ASGI)."""

    def __init__(self, app, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        got = dict(scope["headers"]).get(b"authorization", b"")
        if not hmac.compare_digest(got, self.expected):
            body = error_body("Invalid API key", "authentication_error", None, "invalid_api_key")
            return await JSONResponse(body, status_code=401)(scope, receive, send)
        return await self.app(scope, receive, send)


class CatchAllMiddleware:
    """A bug in a handler answers 500 in OpenAI's shape (and is logged); the server and engine keep going.

    (Starlette's handler for ``Exception`` re-raises after answering, which resets the connection.)
    """

    def __init__(self, app, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as e:
            logger.exception("internal error on %s", scope.get("path"))
            if not started:
                err = APIError(500, f"Internal server error: {type(e).__name__}: {e}")
                await error_response(self.state, err)(scope, receive, send)


def error_response(state: ServerState, e: APIError) -> JSONResponse:
    state.metrics.count_error(e.status)
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def create_app(state: ServerState) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state.start_loading()
        try:
            yield
        finally:
            await asyncio.to_thread(state.shutdown_engine)

    app = FastAPI(title="jaxrt", version=jaxrt.__version__, lifespan=lifespan)
    app.state.server = state
    app.add_middleware(CatchAllMiddleware, state=state)
    if state.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=state.api_key)

    # ------------------------------------------------------------------------------------- errors

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(state, e)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return error_response(state, APIError(400, f"Malformed JSON body: {first.get('msg', '')}"))
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        msg = "; ".join(
            f"{'.'.join(str(x) for x in err.get('loc', ()) if x != 'body') or 'body'}: {err.get('msg')}"
            for err in errors[:5]
        )
        return error_response(state, APIError(400, msg or "invalid request", param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        return error_response(state, APIError(e.status_code, str(e.detail), headers=e.headers))

    @app.exception_handler(ValueError)
    async def _value(request: Request, e: ValueError):
        return error_response(state, bad_request(e, openai=request.url.path.startswith("/v1/")))

    @app.exception_handler(ClientDisconnected)
    async def _gone(request: Request, e: ClientDisconnected):
        return Response(status_code=499)

    # ------------------------------------------------------------------------------------- health

    @app.get("/health")
    async def health():
        why = state.unavailable()
        if why is not None:
            return JSONResponse(error_body(why, "service_unavailable_error", None, 503), status_code=503)
        return Response(status_code=200)

    @app.get("/health_generate")
    async def health_generate():
        engine = state.require_engine()
        before = engine.load_stats().get("num_generated_tokens", 0)
        ids = [next(iter(engine.eos_ids), 0)] if not engine.tokenizer else engine.tokenizer.encode("ping")[:1]
        task = asyncio.ensure_future(
            engine.async_generate(
                input_ids=ids or [0], sampling_params={"max_new_tokens": 1, "temperature": 0}
            )
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + state.health_check_timeout
        try:
            while not task.done() and loop.time() < deadline:
                await asyncio.wait({task}, timeout=0.1)
                if engine.load_stats().get("num_generated_tokens", 0) > before:
                    return Response(status_code=200)  # the engine is producing tokens
            if task.done() and not task.cancelled() and task.exception() is None:
                return Response(status_code=200)
        finally:
            if not task.done():
                task.cancel()
        raise APIError(503, "health check generation did not finish in time")

    @app.get("/ping")
    async def ping():
        return Response(status_code=200)

    @app.get("/version")
    async def version():
        return {"version": jaxrt.__version__}

    # ------------------------------------------------------------------------------------- info

    @app.get("/get_model_info")
    @app.get("/model_info")
    async def get_model_info():
        engine = state.require_engine()
        info = engine.get_model_info()
        arch = info.get("architecture")
        return {
            **info,
            "architectures": [arch] if arch else [],
            "model_type": getattr(engine.config.model, "model_type", None),
            "weight_version": "default",
            "preferred_sampling_params": None,
            "has_image_understanding": False,
            "has_audio_understanding": False,
        }

    @app.get("/get_server_info")
    @app.get("/server_info")
    async def get_server_info():
        engine = state.require_engine()
        # Off the event loop: with the engine in its own process this is a round trip to it.
        info = await asyncio.to_thread(engine.get_server_info)
        stats = engine.load_stats()
        return {
            **info,
            **stats,
            **state.args,
            "max_total_num_tokens": info["num_pages"] * info["page_size"],
            "max_req_input_len": engine.context_length - 1,
            "server_pid": os.getpid(),  # which HTTP process answered (--api-server-count)
            "max_queued_requests": state.max_queued_requests,
            "num_inflight_seqs": state.inflight_seqs,
            "internal_states": [stats],
            "version": jaxrt.__version__,
        }

    @app.get("/get_load")
    async def get_load():
        return state.require_engine().load_stats()

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    # ------------------------------------------------------------------------------------- control

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache():
        engine = state.require_engine()
        ok = await asyncio.to_thread(engine.flush_cache)
        if not ok:
            return PlainTextResponse(
                "Cache not flushed: there are running or waiting requests. Retry when the server is idle.",
                status_code=400,
            )
        return PlainTextResponse(
            "Cache flushed.\nPlease check backend logs for more details. "
            "(When there are running or waiting requests, the operation will not be performed.)"
        )

    @app.post("/abort_request")
    async def abort_request(request: Request):
        body = await _json_body(request)
        state.require_engine()
        rid = body.get("rid")
        if rid is not None and not isinstance(rid, str):
            raise APIError(400, "rid must be a string", param="rid")
        abort_all = bool(body.get("abort_all", False))
        if rid is None and not abort_all:
            raise APIError(400, 'pass {"rid": ...} or {"abort_all": true}', param="rid")
        n = await state.abort(rid, abort_all)
        return {"success": True, "num_aborted": n}

    # ------------------------------------------------------------------------------------- generate

    @app.api_route("/generate", methods=["POST", "PUT"])
    async def generate(request: Request):
        body = await _json_body(request)
        return await _native_generate(state, request, body)

    from jaxrt.server.openai_api import router as openai_router

    app.include_router(openai_router)
    return app


async def _json_body(request: Request) -> dict[str, Any]:
    ctype = request.headers.get("content-type", "")
    raw = await request.body()
    if ctype and "json" not in ctype:
        raise APIError(400, f"Content-Type must be application/json, got {ctype!r}")
    try:
        body = json.loads(raw or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"Malformed JSON body: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, "the JSON body must be an object")
    return body


_NATIVE_KEYS = {
    "text",
    "input_ids",
    "sampling_params",
    "stream",
    "rid",
    "return_logprob",
    "top_logprobs_num",
    "logprob_start_len",
    "return_text_in_logprobs",
}


async def _native_generate(state: ServerState, request: Request, body: dict[str, Any]):
    from jaxrt.sampling_params import SamplingParams

    engine = state.require_engine()
    ignored = sorted(set(body) - _NATIVE_KEYS)
    if ignored:
        logger.info("/generate: ignoring unsupported field(s) %s", ", ".join(ignored))
    text, ids = body.get("text"), body.get("input_ids")
    if (text is None) == (ids is None):
        raise APIError(400, "pass exactly one of text or input_ids", param="text")
    prompts = text if text is not None else ids
    single = isinstance(prompts, str) or (
        isinstance(prompts, list) and (not prompts or isinstance(prompts[0], int))
    )
    batch = [prompts] if single else list(prompts) if isinstance(prompts, list) else None
    if not batch:
        raise APIError(400, "text/input_ids must be a string, a list of ids, or a non-empty batch of them")
    sp = body.get("sampling_params")
    sps = sp if isinstance(sp, list) else [sp] * len(batch)
    if len(sps) != len(batch):
        raise APIError(
            400, f"sampling_params: got {len(sps)} for a batch of {len(batch)}", param="sampling_params"
        )
    parsed = [SamplingParams.from_dict(s) for s in sps]  # ValueError -> 400
    num_seqs = sum(p.n for p in parsed)
    rid = body.get("rid")
    if rid is not None and not (
        isinstance(rid, str) or isinstance(rid, list) and all(isinstance(r, str) for r in rid)
    ):
        raise APIError(400, "rid must be a string or a list of strings", param="rid")
    return_logprob = body.get("return_logprob")
    top_n = body.get("top_logprobs_num")
    with_text = bool(body.get("return_text_in_logprobs", False))
    key = "prompt" if text is not None else "input_ids"
    gen = {
        "return_logprob": return_logprob,
        "top_logprobs_num": top_n,
        "logprob_start_len": body.get("logprob_start_len"),
    }

    def finish(out: dict[str, Any], i: int) -> dict[str, Any]:
        if rid is not None:
            out["meta_info"]["id"] = (
                rid if isinstance(rid, str) else rid[i] if i < len(rid) else out["meta_info"]["id"]
            )
        if with_text and engine.tokenizer is not None:
            meta = out["meta_info"]
            for k in ("output_token_logprobs", "input_token_logprobs"):
                if k in meta:
                    meta[k] = [(lp, t, engine.tokenizer.decode([t], False)) for lp, t, *_ in meta[k]]
            for k in ("output_top_logprobs", "input_top_logprobs"):
                if k in meta:
                    meta[k] = [
                        None
                        if row is None
                        else [(lp, t, engine.tokenizer.decode([t], False)) for lp, t, *_ in row]
                        for row in meta[k]
                    ]
        return out

    if not body.get("stream", False):
        arg = batch[0] if single else batch
        results = await state.generate(
            request, num_seqs=num_seqs, rid=rid, **{key: arg}, sampling_params=sp, **gen
        )
        for r in results:
            err = internal_failure(r["meta_info"]["finish_reason"])
            if err is not None:
                raise err
        results = [finish(r, i) for i, r in enumerate(results)]
        return results[0] if single and num_seqs == 1 else results

    items = []
    for prompt, p, raw in zip(batch, parsed, sps, strict=True):
        for j in range(p.n):
            one = dict(raw or {})
            one["n"] = 1
            if p.seed is not None:
                one["seed"] = p.seed + j
            items.append({key: prompt, "sampling_params": one, **gen})
    ss = await state.open_streams(request, items, rid=rid)
    multi = len(items) > 1
    # Incremental chunks: (text length, ids) already sent per sequence. The engine's chunks stay cumulative;
    # only what goes on the wire is cut, so a long stream costs O(its length) bytes, not O(length^2).
    sent = [(0, 0)] * len(items) if state.incremental_streaming_output else None

    async def events():
        left = len(items)  # streams without their final chunk yet; the last one's event carries [DONE]
        try:
            async for i, chunk in ss:
                if isinstance(chunk, BaseException):
                    yield sse(
                        error_body(f"Internal server error: {chunk}", "internal_server_error", None, 500)
                    )
                    break
                err = internal_failure(chunk["meta_info"]["finish_reason"])
                if err is not None:
                    yield sse(err.body())
                    break
                out = dict(chunk, meta_info=dict(chunk["meta_info"]))
                if sent is not None:  # cut by length, as the OpenAI streams cut their deltas
                    n_text, n_ids = sent[i]
                    text, ids, meta = out["text"], out["output_ids"], out["meta_info"]
                    out["text"], out["output_ids"] = text[n_text:], ids[n_ids:]
                    for k in ("output_token_logprobs", "output_top_logprobs"):  # one entry per output id
                        if k in meta:
                            meta[k] = meta[k][n_ids:]
                    sent[i] = (max(n_text, len(text)), max(n_ids, len(ids)))
                out = finish(out, i)
                if multi:
                    out["index"] = i
                if out["meta_info"]["finish_reason"] is not None:
                    left -= 1
                yield sse(out) if left else sse(out) + SSE_DONE
            if left:
                yield SSE_DONE
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

    return EventStreamResponse(events())
