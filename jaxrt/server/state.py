"""The server's hold on one engine: loading it in the background, admission control (503 when the queue is
full or the server is starting/draining), the registry of in-flight requests (for ``/abort_request``), and
the two ways a request runs — awaited to the end, or as merged streams — both aborted if the client goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.requests import Request

from jaxrt.server.metrics import Metrics
from jaxrt.server.protocol import APIError

logger = logging.getLogger("jaxrt.server")


class ClientDisconnected(Exception):
    """The client went away before the answer was ready; its request has been aborted."""


@dataclasses.dataclass
class Active:
    """One HTTP request's engine work: a non-streamed task, or a set of engine streams."""

    key: int
    rid: str | list[str] | None
    num_seqs: int
    task: asyncio.Task | None = None
    streams: list = dataclasses.field(default_factory=list)
    aborted: bool = False

    def matches(self, rid: str) -> bool:
        own = self.rid if isinstance(self.rid, list) else [self.rid]
        return rid in own or any(s.request_id == rid for s in self.streams)


class ServerState:
    def __init__(
        self,
        engine_factory: Callable[[], Any],
        *,
        api_key: str | None = None,
        max_queued_requests: int | None = None,
        owns_engine: bool = True,
        health_check_timeout: float = 20.0,
        incremental_streaming_output: bool = False,
        tool_call_parser: str | None = None,
        freeze_gc: bool = False,
        args: dict[str, Any] | None = None,
    ) -> None:
        self.engine_factory = engine_factory
        # Once the engine is loaded, leave the startup heap out of garbage collection (freeze_startup_heap).
        # Process-wide, so only for a process that serves nothing else (the server's own).
        self.freeze_gc = freeze_gc
        # /generate streams: each chunk carries only the text and output_ids new since the previous chunk
        # of its sequence (SGLang's --incremental-streaming-output) instead of everything so far.
        self.incremental_streaming_output = incremental_streaming_output
        # /v1/chat/completions: how replies with tool_choice "auto" are read for tool calls (jaxrt.server.tools).
        self.tool_call_parser = tool_call_parser
        self.api_key = api_key
        self.max_queued_requests = max_queued_requests
        self.owns_engine = owns_engine
        self.health_check_timeout = health_check_timeout
        self.args = args or {}
        self.engine: Any = None
        self.ready = False
        self.draining = False
        self.load_error: BaseException | None = None
        self.on_load_failure: Callable[[BaseException], None] | None = None
        self.created = int(time.time())
        self.metrics = Metrics(lambda: self.engine)
        self.active: dict[int, Active] = {}
        self.inflight_seqs = 0
        self._keys = itertools.count()
        self._loader: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------------------------- lifecycle

    def start_loading(self) -> None:
        """Load the engine on a thread (called from the running event loop, the server's lifespan)."""
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        if self._loader is None:
            self._loader = threading.Thread(target=self._load, name="jaxrt-engine-loader", daemon=True)
            self._loader.start()

    def _load(self) -> None:
        t0 = time.perf_counter()
        try:
            engine = self.engine_factory()
        except BaseException as e:  # noqa: BLE001 - reported through /health and the exit code
            logger.exception("loading the engine failed")
            self.load_error = e
            if self.on_load_failure is not None:
                self.on_load_failure(e)
            return
        self.engine = engine
        if hasattr(engine, "on_abort_broadcast") and self._loop is not None:
            # Another HTTP process of the same engine got an /abort_request: it may be for one of ours.
            engine.on_abort_broadcast = self._on_abort_broadcast
        if self.freeze_gc:
            freeze_startup_heap()
        self.ready = True
        logger.info("engine loaded in %.1f s; the server is ready", time.perf_counter() - t0)

    def wait_loaded(self, timeout: float) -> bool:
        if self._loader is not None:
            self._loader.join(timeout)
        return self.ready

    def shutdown_engine(self) -> None:
        self.draining = True
        if self._loader is not None:
            self._loader.join(timeout=600)
        if self.engine is not None and self.owns_engine:
            self.engine.shutdown()

    @property
    def engine_dead(self) -> bool:
        e = self.engine
        return e is not None and getattr(e, "_dead", None) is not None

    def unavailable(self) -> str | None:
        """Why generation is refused right now, or None."""
        if self.draining:
            return "The server is shutting down."
        if self.load_error is not None:
            return f"The model failed to load: {self.load_error}"
        if not self.ready:
            return "The server is starting up (loading and compiling the model)."
        if self.engine_dead:
            return "The engine has stopped after an internal error."
        return None

    def require_engine(self) -> Any:
        why = self.unavailable()
        if why is not None:
            raise APIError(503, why, headers={"Retry-After": "5"})
        return self.engine

    # ------------------------------------------------------------------------------------- admission

    def check_capacity(self, new_seqs: int) -> None:
        """503 if admitting ``new_seqs`` sequences would push the waiting queue past ``max_queued_requests``.

        Waiting = the engine's queue, or our in-flight sequences the engine does not run yet (whichever is
        larger: a request just submitted may not have reached the scheduler). Free running slots absorb new work.
        """
        limit = self.max_queued_requests
        if limit is None:
            return
        st = self.engine.load_stats()
        running = st["num_running_reqs"]
        queued = max(st["num_queue_reqs"], self.inflight_seqs - running)
        free = max(0, self.engine.config.scheduler.max_running_requests - running)
        if queued + new_seqs - free > limit:
            self.metrics.count_rejected()
            raise APIError(503, "The request queue is full.", headers={"Retry-After": "1"})

    def _register(self, num_seqs: int, rid) -> Active:
        a = Active(next(self._keys), rid, num_seqs)
        self.active[a.key] = a
        self.inflight_seqs += num_seqs
        return a

    def _unregister(self, a: Active) -> None:
        if self.active.pop(a.key, None) is not None:
            self.inflight_seqs -= a.num_seqs

    # ------------------------------------------------------------------------------------- abort

    async def abort(self, rid: str | None = None, abort_all: bool = False) -> int:
        """Abort by the client's ``rid`` or an engine request id (``meta_info.id``); returns the number of
        requests aborted. With several HTTP processes (``--api-server-count``) the others abort theirs too
        and the number counts every process's (as SGLang's, whose one tokenizer manager sees them all); a
        process that does not answer in time counts as none."""
        n = self._abort_local(rid, abort_all)
        engine = self.engine
        if engine is not None:
            if rid is not None:
                engine.abort(rid)  # an engine id we do not track (harmless if unknown)
            broadcast = getattr(engine, "broadcast_abort", None)
            if broadcast is not None:
                # The core replies within the engine's abort_broadcast_timeout; the margin covers a core
                # that cannot reply at all. Shielded: a caller that stops waiting leaves the Future alone.
                timeout = getattr(engine, "abort_broadcast_timeout", 5.0) + 5.0
                try:
                    n += await asyncio.wait_for(
                        asyncio.shield(asyncio.wrap_future(broadcast(rid, abort_all))), timeout
                    )
                except (TimeoutError, RuntimeError) as e:
                    logger.warning("abort: the other HTTP processes' count is missing (%r)", e)
        return n

    def _on_abort_broadcast(self, rid: str | None, abort_all: bool, reply: Callable[[int], None]) -> None:
        """Another HTTP process's abort (on the engine's reader thread): abort our matches on our event loop,
        then tell it how many."""

        def run() -> None:
            n = 0
            try:
                n = self._abort_local(rid, abort_all)
            finally:
                reply(n)

        loop = self._loop
        if loop is None:
            reply(0)
        else:
            loop.call_soon_threadsafe(run)

    def _abort_local(self, rid: str | None, abort_all: bool) -> int:
        hits = [a for a in self.active.values() if abort_all or (rid is not None and a.matches(rid))]
        for a in hits:
            self._abort_active(a)
        return len(hits)

    def _abort_active(self, a: Active) -> None:
        a.aborted = True
        for s in a.streams:
            if s.request_id is not None:
                self.engine.abort(s.request_id)
        if a.task is not None and not a.task.done():
            a.task.cancel()

    # ------------------------------------------------------------------------------------- running

    async def generate(self, request: Request, *, num_seqs: int, rid=None, **kwargs) -> list[dict[str, Any]]:
        """Run ``engine.async_generate(**kwargs)`` to the end; returns one result per sequence (prompt-major)."""
        engine = self.require_engine()
        coro = engine.async_generate(**kwargs)  # validates (ValueError) before anything is queued
        try:
            self.check_capacity(num_seqs)
        except APIError:
            coro.close()
            raise
        a = self._register(num_seqs, rid)
        a.task = asyncio.ensure_future(coro)
        try:
            out = await until_disconnect(request, a.task)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if a.aborted and task is not None and not task.cancelling():
                self.metrics.count_abort(num_seqs)
                return [_aborted_result(rid, i) for i in range(num_seqs)]
            raise
        except ClientDisconnected:
            self.metrics.count_abort(num_seqs)
            raise
        except RuntimeError as e:
            raise _engine_error(e) from e
        finally:
            self._unregister(a)
        results = out if isinstance(out, list) else [out]
        for r in results:
            self.metrics.observe_finish(r["meta_info"])
        return results

    async def open_streams(self, request: Request, items: list[dict[str, Any]], rid=None) -> StreamSet:
        """Start one engine stream per item (kwargs for ``async_generate(stream=True)``) and wait for each
        stream's first chunk, so that errors before the first token get a real status code."""
        engine = self.require_engine()
        streams = [engine.async_generate(stream=True, **kw) for kw in items]
        self.check_capacity(len(streams))
        a = self._register(len(streams), rid)
        a.streams = streams
        ss = StreamSet(self, a)
        try:
            await until_disconnect(request, ss.prime())
        except RuntimeError as e:
            ss.close()
            raise _engine_error(e) from e
        except BaseException:
            ss.close()
            raise
        if a.aborted:
            self._abort_active(a)
        return ss


class StreamSet:
    """Several engine streams merged into one async iterator of ``(index, chunk | Exception)``.

    Chunks of one stream are cumulative, so when the consumer falls behind only the newest chunk per stream
    is kept. Closing it aborts whatever has not finished and frees the request's slot in the registry.
    """

    def __init__(self, state: ServerState, active: Active) -> None:
        self.state = state
        self.active = active
        self.streams = active.streams
        self.first: list[Any] = []
        self._queue: asyncio.Queue = asyncio.Queue()
        self._pumps: list[asyncio.Task] = []
        self._live = 0
        self._finished: set[int] = set()
        self._closed = False

    async def prime(self) -> None:
        got = await asyncio.gather(*(s.__anext__() for s in self.streams), return_exceptions=True)
        for g in got:
            if isinstance(g, BaseException) and not isinstance(g, StopAsyncIteration):
                raise g
        self.first = list(got)

    async def _pump(self, i: int, stream) -> None:
        try:
            async for chunk in stream:
                self._queue.put_nowait((i, chunk))
        except Exception as e:  # noqa: BLE001 - handed to the consumer as an in-band error
            self._queue.put_nowait((i, e))
        finally:
            self._queue.put_nowait((i, None))

    def _is_final(self, chunk) -> bool:
        return isinstance(chunk, BaseException) or chunk["meta_info"]["finish_reason"] is not None

    async def __aiter__(self) -> AsyncIterator[tuple[int, Any]]:
        for i, chunk in enumerate(self.first):
            if isinstance(chunk, StopAsyncIteration):  # ended without a final chunk (aborted before start)
                continue
            yield i, chunk
            if self._is_final(chunk):
                self._note_final(i, chunk)
            else:
                self._live += 1
                self._pumps.append(asyncio.ensure_future(self._pump(i, self.streams[i])))
        while self._live:
            batch = [await self._queue.get()]
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            latest: dict[int, Any] = {}
            for i, chunk in batch:
                if chunk is None:
                    self._live -= 1
                elif i not in self._finished:
                    latest[i] = chunk
                    if self._is_final(chunk):
                        self._finished.add(i)
            for i, chunk in latest.items():
                yield i, chunk
                if self._is_final(chunk):
                    self._note_final(i, chunk)

    def _note_final(self, i: int, chunk) -> None:
        self._finished.add(i)
        if not isinstance(chunk, BaseException):
            self.state.metrics.observe_finish(chunk["meta_info"])

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        engine = self.state.engine
        n_open = 0
        for i, s in enumerate(self.streams):
            if i not in self._finished:
                n_open += 1
                if s.request_id is not None:
                    engine.abort(s.request_id)
                s.aclose_sync()
        for p in self._pumps:
            p.cancel()
        if n_open:
            self.state.metrics.count_abort(n_open)
        self.state._unregister(self.active)


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(request: Request, aw) -> Any:
    """Await ``aw``; if the client disconnects first, cancel it (which aborts its engine requests)."""
    task = asyncio.ensure_future(aw)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task.done() and not task.cancelled():
        return task.result()  # the answer (or its exception)
    if watcher.done() and not watcher.cancelled():  # the client went away first
        with contextlib.suppress(BaseException):
            await task  # let the cancellation run its abort
        raise ClientDisconnected("the client disconnected; request aborted")
    return task.result()  # cancelled by /abort_request: raises CancelledError


def _engine_error(e: RuntimeError) -> Exception:
    """The engine refusing work while it stops is a 503; anything else stays a real fault (500)."""
    if "shutting down" in str(e) or "shut down" in str(e):
        return APIError(503, "The server is shutting down.", headers={"Retry-After": "5"})
    return e


def freeze_startup_heap() -> None:
    """Move every object alive now into the collector's permanent generation (vLLM's server does the same).

    The startup heap (transformers' and the tokenizer's modules, FastAPI's routes: ~400k objects) never
    becomes garbage, yet each full collection walked all of it: 0.1-0.2 s of the HTTP process's core, every
    second burst of 256 requests (measured on the CPU; as much as admitting the burst). Frozen, a full
    collection walks only what serving allocated since.
    """
    gc.collect()
    gc.freeze()


def _aborted_result(rid, i: int) -> dict[str, Any]:
    rid_i = rid[i] if isinstance(rid, list) and i < len(rid) else rid
    return {
        "text": "",
        "output_ids": [],
        "meta_info": {
            "id": rid_i,
            "finish_reason": {"type": "abort", "message": "aborted by the client"},
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "cached_tokens": 0,
        },
    }
