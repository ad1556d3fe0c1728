"""The engine loop in a process of its own, for the server.

In one process the engine loop shares the interpreter with everything else the server does per chunk
(detokenizing, building and JSON-encoding chunks, the ASGI send chain), so at a few hundred live streams the
device waits on the HTTP side. As in vLLM's and SGLang's servers, :class:`EngineProcess` runs the
:class:`jaxrt.engine.Engine` (scheduler, model runner, device) in a child process and keeps the rest here:

- here (the frontend): validation and tokenization (the same ``_prepare`` as the engine's), request ids and
  seeds, detokenization, the SGLang-shaped output dicts, and the Engine's public API on top of them;
- there (the core): the Engine itself, fed prepared requests; each pass of its loop sends what it produced as
  one message of `jaxrt.output.OutputDelta` records (new ids, log-probabilities, finish state, no text),
  with the load counters.

The two talk over a socket pair wrapped as a ``multiprocessing`` connection (pickled tuples). The child is a
fresh interpreter (it starts its own JAX) that imports only jaxrt: not the parent's ``__main__``, so scripts
need no ``if __name__ == "__main__"`` guard. One engine process can serve several connections
(``start_core``; the server's ``--api-server-count``): each request's outputs go back on the connection that
sent it. Frontend -> core: ``(engine_kwargs, log_level, control)`` first (on the first connection), then
``("add", [(specs, stream), ...])`` (the requests of one event-loop pass, a group per
``_submit_many``), ``("abort", rid)``, ``("abort_broadcast", token, client_rid, abort_all, timeout)``
(passed on to the other connections), ``("aborted", key, count)`` (the answer to a passed-on broadcast),
``("call", token, method, args)``, ``("shutdown",)``. Core -> frontend: ``("ready", info)`` or
``("failed", message)`` once, then ``("out", deltas, stats)`` (the deltas as plain tuples),
``("reply", token, ok, value)`` (to a call, or to an abort broadcast: how many requests the other
connections aborted), ``("abort_broadcast", key, client_rid, abort_all)`` (another connection's, to be
answered with ``aborted``), ``("dead", message)``, and ``("bye",)`` last. The core answers a broadcast once
every connection it passed it to has answered or left, or after ``timeout`` seconds with the counts so far,
so that ``/abort_request`` reports the requests aborted in every HTTP process. The engine stops once every
connection has said shutdown or closed; a connection that leaves earlier has its requests aborted.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from jaxrt.engine import EngineAPI
from jaxrt.output import DELTA_ERROR, OutputDelta, Sink, delta_ends, hold_back, output_dict
from jaxrt.sampling_params import SamplingParams
from jaxrt.tokenizer import IncrementalDetokenizer, Tokenizer

logger = logging.getLogger("jaxrt")


@dataclass
class _Seq:
    """The frontend's side of one request: where its outputs go, and its output so far."""

    request_id: str
    sp: SamplingParams
    stream: bool
    sink: Sink
    loop: asyncio.AbstractEventLoop | None  # the sink runs on this loop's thread; None: on the reader thread
    detok: IncrementalDetokenizer | None
    return_logprob: bool
    top_logprobs: bool
    arrival: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    # Kept only for prompt log-probabilities (output_dict's input_logprobs).
    prompt_ids: list[int] | None = None
    input_logprobs: list[float] = field(default_factory=list)
    input_top: list[list[tuple[int, float]]] | None = None


# Guards the shared tokenizer dicts of data-parallel handles (their replicas set up on threads).
_TOKENIZERS_LOCK = threading.Lock()


class EngineProcess(EngineAPI):
    """An :class:`jaxrt.engine.Engine` running in a child process, behind the same API.

    Takes the Engine's keyword arguments. ``generate`` / ``async_generate`` / streaming, ``abort``,
    ``flush_cache``, ``load_stats``, ``get_model_info``, ``get_server_info``, ``wait_compiled`` and
    ``shutdown`` behave as the Engine's; ``load_stats`` is the core's latest report (sent with every output,
    and whenever the queue or page counts change). Construction returns once the child's engine is ready;
    a failure there raises RuntimeError with the child's error.
    """

    def __init__(
        self,
        model_path: str | None = None,
        *,
        visible_devices: str | None = None,
        tokenizers: dict[tuple, Tokenizer] | None = None,
        **engine_kwargs: Any,
    ) -> None:
        """``visible_devices``: the GPUs the engine process may see (``CUDA_VISIBLE_DEVICES`` in its
        environment; None: those this process sees). `jaxrt.data_parallel` gives each replica one.
        ``tokenizers``: a dict that handles on replicas of one model share: the first to need a tokenizer
        builds it there, the others use that one (a data-parallel frontend loads it once, not per replica)."""
        t0 = time.perf_counter()
        self._proc, (self._conn,) = start_core(1, visible_devices)
        level = logging.getLogger("jaxrt").getEffectiveLevel()
        msg = _handshake(self._conn, self._proc, ({"model_path": model_path, **engine_kwargs}, level, False))
        if msg[0] != "ready":
            self._conn.close()
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
            raise RuntimeError(f"the engine process failed to start: {msg[1]}")
        self._setup(msg[1], engine_kwargs, 0, t0, tokenizers)

    @classmethod
    def attach(
        cls, fd: int, index: int, tokenizers: dict[tuple, Tokenizer] | None = None, **engine_kwargs: Any
    ) -> EngineProcess:
        """A handle on an engine process that another process started (``start_core``), over the
        connection ``fd``: what each HTTP process of ``--api-server-count`` holds. ``engine_kwargs`` are those
        the engine was started with (the tokenizer's are read from them); ``index`` tells handles apart
        (each draws its requests' seeds from its own stream)."""
        t0 = time.perf_counter()
        self = cls.__new__(cls)
        self._proc = None
        self._conn = Connection(fd)
        try:
            msg = self._conn.recv()
        except (EOFError, OSError):
            msg = ("failed", "the engine process exited")
        if msg[0] != "ready":
            self._conn.close()
            raise RuntimeError(f"the engine process failed to start: {msg[1]}")
        self._setup(msg[1], engine_kwargs, index, t0, tokenizers)
        return self

    def _setup(
        self,
        info: dict[str, Any],
        engine_kwargs: dict[str, Any],
        index: int,
        t0: float,
        tokenizers: dict[tuple, Tokenizer] | None,
    ) -> None:
        self.config = info["config"]
        self.model_path = info["model_path"]
        self.served_model_name = info["served_model_name"]
        self.eos_ids = set(info["eos_ids"])
        self._usable_pages = info["num_usable_pages"]
        self._stats: dict[str, Any] = info["stats"]
        self._startup_breakdown = info["startup_breakdown"]
        self._core_pid = info["pid"]
        self.device = info["device"]  # (platform, device kind) the engine runs on
        # The other handles on this engine (other HTTP processes): with none, an abort broadcast has no one
        # to reach and costs no round trip.
        self._num_peers = info.get("num_frontends", 1) - 1
        self.tokenizer = None
        if not engine_kwargs.get("skip_tokenizer_init"):
            key = (
                self.model_path,
                engine_kwargs.get("trust_remote_code", False),
                engine_kwargs.get("chat_template"),
            )
            if tokenizers is None:
                self.tokenizer = Tokenizer(*key)
            else:
                with _TOKENIZERS_LOCK:  # the replicas' handles set up on threads at once
                    if key not in tokenizers:
                        tokenizers[key] = Tokenizer(*key)
                    self.tokenizer = tokenizers[key]
        seed = engine_kwargs.get("random_seed", 0)
        self._rng = np.random.default_rng(seed if index == 0 else [seed, index])
        # Called (on the reader thread) with (rid, abort_all, reply) when another process's handle asks every
        # process to abort a client's request id, or everything (the server's /abort_request); it must call
        # reply(number aborted) once, from any thread, without blocking the reader on the answer.
        self.on_abort_broadcast: Callable[[str | None, bool, Callable[[int], None]], None] | None = None
        self._seqs: dict[str, _Seq] = {}
        self._send_lock = threading.Lock()
        self._pending_adds: list[tuple[list[dict[str, Any]], bool]] = []  # (specs, stream) not sent yet
        self._flush_scheduled = False
        self._calls: dict[int, Future] = {}
        self._tokens = itertools.count()
        self._dead: BaseException | None = None
        self._stopping = False
        self._reader = threading.Thread(target=self._read, name="jaxrt-engine-reader", daemon=True)
        self._reader.start()
        self.startup_seconds = time.perf_counter() - t0

    # ===================================================================================== public API

    @property
    def startup_breakdown(self) -> dict[str, float]:
        return dict(self._startup_breakdown)

    def abort(self, request_id: str) -> None:
        """Abort a request: it finishes with ``finish_reason.type == "abort"`` and frees all it holds."""
        self._send(("abort", request_id), quiet=True)

    # How long the core waits for the other handles' answers to an abort broadcast before it replies with
    # the counts it has: a handle whose event loop is stuck must not hold up /abort_request for long.
    abort_broadcast_timeout = 5.0

    def broadcast_abort(self, rid: str | None, abort_all: bool = False) -> Future:
        """Ask the other handles on this engine (other HTTP processes) to abort their requests with the
        client id ``rid``, or all of theirs: their ``on_abort_broadcast`` runs. Returns a Future of how many
        requests they aborted in all; the core answers once each has answered or left, or after
        ``abort_broadcast_timeout`` seconds with the answers so far. It fails with RuntimeError if the core
        has gone. Sent after the queued requests, as every message: it never overtakes their adds."""
        fut: Future = Future()
        if self._num_peers <= 0:
            fut.set_result(0)
            return fut
        token = next(self._tokens)
        try:
            self._check_alive()
            self._calls[token] = fut
            self._send(("abort_broadcast", token, rid, abort_all, self.abort_broadcast_timeout))
        except RuntimeError as err:
            self._calls.pop(token, None)
            _settle(fut, False, err)
        return fut

    def flush_cache(self) -> bool:
        """Drop all cached prefixes. Returns False (and does nothing) while requests are running."""
        return bool(self._call("flush_cache"))

    def get_server_info(self) -> dict[str, Any]:
        return {**self._call("get_server_info"), "engine_process_pid": self._core_pid}

    def load_stats(self) -> dict[str, Any]:
        return dict(self._stats)

    def wait_compiled(self, timeout: float | None = None) -> bool:
        return bool(self._call("wait_compiled", timeout, timeout=None if timeout is None else timeout + 60))

    def shutdown(self) -> None:
        """Stop the engine: requests still in flight finish with an abort; the child process exits."""
        if not self._stopping:
            self._stopping = True
            self._send(("shutdown",), quiet=True)
        self._reader.join(timeout=90)
        if self._proc is not None:
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                logger.warning("the engine process did not exit; killing it")
                self._proc.kill()
                self._proc.wait(timeout=10)
        self._conn.close()

    # ===================================================================================== intake

    @property
    def _num_usable_pages(self) -> int:
        return self._usable_pages

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise RuntimeError("the engine loop died") from self._dead
        if self._stopping or not self._reader.is_alive():
            raise RuntimeError("the engine is shut down")

    def _submit_many(
        self,
        items: list[tuple[dict[str, Any], Sink]],
        stream: bool,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> list[str]:
        if self._dead is not None:
            raise RuntimeError("the engine loop died") from self._dead
        if self._stopping:
            raise RuntimeError("the engine is shutting down")
        specs, rids = [], []
        for spec, sink in items:
            sp: SamplingParams = spec["sp"]
            rid = uuid.uuid4().hex
            self._seqs[rid] = _Seq(
                rid,
                sp,
                stream,
                sink,
                loop,
                IncrementalDetokenizer(self.tokenizer, sp.skip_special_tokens)
                if stream and self.tokenizer is not None
                else None,
                return_logprob=sp.return_logprob or sp.top_logprobs_num > 0,
                top_logprobs=sp.top_logprobs_num > 0,
                prompt_ids=list(spec["ids"]) if sp.logprob_start_len >= 0 else None,
            )
            specs.append({**spec, "rid": rid, "deltas": True})
            rids.append(rid)
        if loop is not None:
            # Requests admitted in one pass of the event loop go to the core in one message (SGLang's and
            # vLLM's frontends batch the same way): at 256 arrivals at once, one pickle and one write per
            # pass instead of per request, and one wake-up of the core's receiver instead of 256.
            with self._send_lock:
                self._pending_adds.append((specs, stream))
                schedule = not self._flush_scheduled
                self._flush_scheduled = True
            if schedule:
                loop.call_soon(self._flush_adds)
            return rids
        try:
            self._send(("add", [(specs, stream)]))
        except BaseException:
            for rid in rids:
                self._seqs.pop(rid, None)
            raise
        return rids

    def _flush_adds(self) -> None:
        """Send the requests queued by this loop pass; if the core has gone, their sinks get the error."""
        try:
            self._send(None)
        except RuntimeError as err:
            with self._send_lock:
                groups, self._pending_adds = self._pending_adds, []
            self._route([OutputDelta(spec["rid"], error=err) for specs, _ in groups for spec in specs])

    # ===================================================================================== the pipe

    def _send(self, msg: tuple | None, quiet: bool = False) -> None:
        """Send ``msg`` (None: nothing more), after the queued requests: an abort never overtakes its add."""
        try:
            with self._send_lock:
                if self._pending_adds:
                    self._conn.send(("add", self._pending_adds))
                    self._pending_adds = []
                self._flush_scheduled = False
                if msg is not None:
                    self._conn.send(msg)
        except (OSError, ValueError) as e:  # the core has exited (closed pipe)
            if not quiet:
                raise RuntimeError("the engine is shut down") from e

    def _call(self, method: str, *args: Any, timeout: float | None = 120.0) -> Any:
        """Run ``Engine.<method>(*args)`` in the core and return its result."""
        self._check_alive()
        token = next(self._tokens)
        fut: Future = Future()
        self._calls[token] = fut
        self._send(("call", token, method, args))
        return fut.result(timeout)

    def _read(self) -> None:
        """The reader thread: every message from the core, until it says goodbye or its pipe closes."""
        try:
            while True:
                msg = self._conn.recv()
                kind = msg[0]
                if kind == "out":
                    self._stats = msg[2]
                    self._route(msg[1])
                elif kind == "reply":
                    fut = self._calls.pop(msg[1], None)
                    if fut is not None:
                        _settle(fut, msg[2], msg[3])
                elif kind == "abort_broadcast":
                    self._heard_abort(*msg[1:])
                elif kind == "dead":
                    self._dead = RuntimeError(msg[1])
                elif kind == "bye":
                    return
        except (EOFError, OSError):
            if not self._stopping:
                code = self._proc.wait() if self._proc is not None else "unknown"
                logger.error("the engine process exited (code %s)", code)
                self._dead = RuntimeError(f"the engine process exited (code {code})")
        finally:
            err = RuntimeError("the engine is shut down")
            for fut in list(self._calls.values()):
                _settle(fut, False, err)
            self._route([OutputDelta(rid, error=err) for rid in list(self._seqs)])

    def _heard_abort(self, key: int, rid: str | None, abort_all: bool) -> None:
        """Another handle's abort broadcast: abort our matches (``on_abort_broadcast``) and tell the core
        how many, which it adds up for the asker. A failure here still answers (0); a callback that never
        replies costs the asker the core's timeout, no more."""

        def reply(n: int) -> None:
            self._send(("aborted", key, int(n)), quiet=True)

        callback = self.on_abort_broadcast
        if callback is None:
            reply(0)
            return
        try:
            callback(rid, abort_all, reply)
        except Exception:  # noqa: BLE001 - the asker still gets an answer
            logger.exception("an abort broadcast failed here")
            reply(0)

    def _route(self, deltas: list[tuple]) -> None:
        """Hand each delta (an OutputDelta's fields as a plain tuple, as they cross the pipe: read by position,
        not rebuilt) to its request: one call per event loop for the async ones, directly here for the rest
        (their sinks are thread-safe queues)."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        here = []
        for d in deltas:
            rid = d[0]
            seq = self._seqs.get(rid)
            if seq is None:
                continue
            if delta_ends(d):
                del self._seqs[rid]
            if seq.loop is None:
                here.append((seq, d))
            else:
                by_loop.setdefault(seq.loop, []).append((seq, d))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(self._deliver, batch)
            except RuntimeError:  # that loop has closed: nobody is waiting there any more
                pass
        if here:
            self._deliver(here)

    def _deliver(self, batch: list[tuple[_Seq, tuple]]) -> None:
        now = time.perf_counter()
        for seq, d in batch:
            err = d[DELTA_ERROR]
            seq.sink(err if err is not None else self._absorb(seq, d, now))

    def _absorb(self, seq: _Seq, d: tuple, now: float) -> dict[str, Any]:
        """Add a delta to its request's output and return the output dict the Engine would have sent."""
        (
            _,
            new_ids,
            new_logprobs,
            new_top,
            final,
            reason,
            stop_text,
            prompt_tokens,
            cached_tokens,
            _,
            lps,
            tops,
            core_ttft,
        ) = d
        if lps is not None:
            seq.input_logprobs, seq.input_top = lps, tops
        seq.ids.extend(new_ids)
        if new_logprobs is not None:
            seq.logprobs.extend(new_logprobs)
        if new_top is not None:
            seq.top.extend(new_top)
        if seq.first_token_time is None and seq.ids:
            # Only a stream's first chunk tells when its first token came; a request that is not streamed
            # hears of its tokens at its end, and takes the engine's count.
            seq.first_token_time = now if core_ttft is None else seq.arrival + core_ttft
        tok = self.tokenizer
        if final:
            if stop_text is not None:
                text = stop_text
            else:
                text = tok.decode(seq.ids, seq.sp.skip_special_tokens) if tok is not None else ""
        elif seq.detok is not None:
            seq.detok.step(seq.ids)
            text = hold_back(seq.detok.text, seq.sp.stop)
        else:
            text = ""
        return output_dict(
            seq.request_id,
            text,
            seq.ids,
            reason,
            prompt_tokens=prompt_tokens,
            cached_tokens=cached_tokens,
            e2e_latency=now - seq.arrival,
            ttft=None if seq.first_token_time is None else seq.first_token_time - seq.arrival,
            logprobs=seq.logprobs if seq.return_logprob else None,
            top_logprobs=seq.top if seq.top_logprobs else None,
            input_logprobs=None
            if seq.prompt_ids is None or not seq.return_logprob
            else (seq.sp.logprob_start_len, seq.prompt_ids, seq.input_logprobs, seq.input_top),
        )


def _settle(fut: Future, ok: bool, value: Any) -> None:
    """Resolve ``fut`` unless it is already done (a caller that stopped waiting may have cancelled it)."""
    try:
        (fut.set_result if ok else fut.set_exception)(value)
    except InvalidStateError:
        pass


# ======================================================================================= the child


def start_core(
    num_links: int, visible_devices: str | None = None
) -> tuple[subprocess.Popen, list[Connection]]:
    """Start an engine process with ``num_links`` connections to it (seeing the GPUs ``visible_devices`` as its
    ``CUDA_VISIBLE_DEVICES``; None: those this process sees); returns it and our ends. The first
    connection must send ``(engine_kwargs, log_level, control)`` (``_handshake``); ``control``: that
    connection only starts and stops the engine (it gets no outputs or load reports) and the others serve
    requests. Every connection then gets ``("ready", info)`` or ``("failed", message)``."""
    pairs = [socket.socketpair() for _ in range(num_links)]
    fds = [theirs.fileno() for _, theirs in pairs]
    env = None if visible_devices is None else {**os.environ, "CUDA_VISIBLE_DEVICES": visible_devices}
    proc = spawn_python("jaxrt.engine_process", "_core_main", [str(fd) for fd in fds], fds, env)
    conns = []
    for ours, theirs in pairs:
        theirs.close()
        conns.append(Connection(ours.detach()))
    return proc, conns


def spawn_python(
    module: str, func: str, args: list[str], pass_fds: list[int], env: dict[str, str] | None = None
) -> subprocess.Popen:
    """A fresh interpreter that runs ``module.func(*args)``, resolving imports as this process does
    (multiprocessing's spawn passes ``sys.path`` the same way) and importing nothing of our ``__main__``."""
    path = [p or os.getcwd() for p in sys.path]
    code = f"import sys, json; sys.path[:] = json.loads(sys.argv[1]); from {module} import {func}; {func}(*sys.argv[2:])"
    return subprocess.Popen(
        [sys.executable, "-c", code, json.dumps(path), *args],
        pass_fds=pass_fds,
        stdin=subprocess.DEVNULL,
        env=env,
    )


def _handshake(conn: Connection, proc: subprocess.Popen, init: tuple) -> tuple:
    """Send the engine process its arguments; return its first answer (``ready`` or ``failed``)."""
    try:
        conn.send(init)
        while not conn.poll(0.5):
            if proc.poll() is not None:
                break
        else:
            return conn.recv()
    except (EOFError, OSError):
        pass
    return ("failed", f"the process exited with code {proc.wait()}")


def _core_main(*fds: str) -> None:
    """The child process: build the Engine, then serve every connection's messages; stop once each has said
    shutdown or closed."""
    import signal

    # Ctrl-C reaches the whole process group, and `timeout` or systemd send SIGTERM to every process of theirs:
    # the frontends decide when the engine stops (they drain first). The engine also stops when their ends
    # of the sockets close, so it cannot outlive them.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    conns = [Connection(int(fd)) for fd in fds]
    try:
        engine_kwargs, log_level, control = conns[0].recv()
    except (EOFError, OSError):
        return
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from jaxrt.engine import Engine

    try:
        engine = Engine(**engine_kwargs)
    except BaseException as e:  # noqa: BLE001 - reported to the frontends, which raise it
        logger.exception("the engine failed to start")
        for conn in conns:
            try:
                conn.send(("failed", f"{type(e).__name__}: {e}"))
                conn.close()
            except OSError:
                pass
        return
    _Core(engine, conns, control).run()


class _Link:
    """One frontend's connection to the core, and the outputs waiting to go to it."""

    def __init__(self, index: int, conn: Connection, serves: bool) -> None:
        self.index = index
        self.conn = conn
        self.serves = serves  # False: the control connection (no outputs, no load reports)
        self.lock = threading.Lock()
        self.outbox: list[OutputDelta] = []
        self.open = True  # until it says shutdown or closes
        self.listening = True  # until its receiver stops reading it: it answers no abort broadcast after
        self.owned: set[str] = set()  # its requests' ids, until their last output is sent

    def send(self, msg: tuple) -> None:
        try:
            with self.lock:
                self.conn.send(msg)
        except (OSError, ValueError):  # it has gone away: its requests are aborted by its receiver
            self.open = False


class _Core:
    """The child's side: requests in (one receiver thread per connection), each loop pass's outputs out
    (the engine's loop thread), each request's outputs to the connection that sent it."""

    def __init__(self, engine, conns: list[Connection], control: bool) -> None:
        self.engine = engine
        self.links = [_Link(i, c, serves=not (control and i == 0)) for i, c in enumerate(conns)]
        self.counts: tuple = ()
        self.dead_sent = False
        engine.on_loop_end = self.flush
        self.abort_lock = threading.Lock()  # the receivers of every connection share the waits below
        self.abort_waits: dict[int, _AbortWait] = {}  # by key: the broadcasts still waiting for answers
        self.abort_keys = itertools.count()

    def sink(self, link: _Link, rid: str):
        outbox = link.outbox

        def put(item) -> None:  # on the engine's loop thread
            outbox.append(item if isinstance(item, OutputDelta) else OutputDelta(rid, error=item))

        return put

    def flush(self) -> None:
        """One message per loop pass and connection: its outputs, with the load counters (also sent alone
        when they moved)."""
        st = self.engine.load_stats()
        counts = (
            st["num_running_reqs"],
            st["num_queue_reqs"],
            st["num_used_pages"],
            st["num_cached_pages"],
            st["num_generated_tokens"],
        )
        moved, self.counts = counts != self.counts, counts
        for link in self.links:
            if not link.serves or not (link.outbox or moved):
                continue
            out, link.outbox[:] = [tuple(d) for d in link.outbox], []
            link.owned.difference_update(d[0] for d in out if delta_ends(d))
            if link.open:
                link.send(("out", out, st))
        if self.engine._dead is not None and not self.dead_sent:
            self.dead_sent = True
            for link in self.links:
                if link.open:
                    link.send(("dead", f"engine loop died: {self.engine._dead}"))

    def run(self) -> None:
        e = self.engine
        info = {
            "config": e.config,
            "model_path": e.model_path,
            "served_model_name": e.served_model_name,
            "eos_ids": sorted(e.eos_ids),
            "num_usable_pages": e.allocator.num_usable,
            "stats": e.load_stats(),
            "startup_breakdown": e.startup_breakdown,
            "pid": os.getpid(),
            "device": e.device,
            "num_frontends": sum(link.serves for link in self.links),
        }
        for link in self.links:
            link.send(("ready", info))
        receivers = [
            threading.Thread(
                target=self.receive, args=(link,), name=f"jaxrt-core-link{link.index}", daemon=True
            )
            for link in self.links
        ]
        for t in receivers:
            t.start()
        for t in receivers:
            t.join()
        e.shutdown()  # in-flight requests finish with an abort; the loop's last pass sends them
        for link in self.links:
            if link.open:
                link.send(("bye",))
            link.conn.close()

    def receive(self, link: _Link) -> None:
        """One connection's messages, until it says shutdown or closes; then its requests are aborted and,
        if it is still there, it gets ``("bye",)``."""
        e = self.engine
        while True:
            try:
                msg = link.conn.recv()
            except (EOFError, OSError):  # that frontend is gone
                link.open = False
                break
            kind = msg[0]
            if kind == "add":
                for specs, stream in msg[1]:  # one group per _submit_many call of the frontend
                    rids = [spec["rid"] for spec in specs]
                    link.owned.update(rids)  # before the loop can finish (and discard) them
                    try:
                        e._submit_many([(spec, self.sink(link, spec["rid"])) for spec in specs], stream)
                    except Exception as err:  # noqa: BLE001 - the whole group fails, as in the Engine
                        link.owned.difference_update(rids)
                        out = [tuple(OutputDelta(s["rid"], error=err)) for s in specs]
                        link.send(("out", out, e.load_stats()))
            elif kind == "abort":
                e.abort(msg[1])
            elif kind == "abort_broadcast":
                self.broadcast_abort(link, *msg[1:])
            elif kind == "aborted":
                self.count_aborted(link, msg[1], msg[2])
            elif kind == "call":
                # On a thread of its own: flush_cache and wait_compiled wait for the loop.
                threading.Thread(target=self.call, args=(link, *msg[1:]), daemon=True).start()
            elif kind == "shutdown":
                break
        self.stop_listening(link)
        if any(other.open for other in self.links if other is not link):
            # The engine keeps serving the others: end this one's requests, then say goodbye.
            for rid in list(link.owned):
                e.abort(rid)
            deadline = time.monotonic() + 30
            while link.owned and link.open and time.monotonic() < deadline:
                time.sleep(0.01)  # the aborts' final outputs go out with the loop's next pass
            if link.open:
                link.send(("bye",))
            link.open = False
        # else the last one: run() stops the engine (whatever is in flight ends with an abort) and says bye

    def call(self, link: _Link, token: int, method: str, args: tuple) -> None:
        try:
            result, ok = getattr(self.engine, method)(*args), True
        except Exception as err:  # noqa: BLE001 - raised in the frontend
            result, ok = err, False
        link.send(("reply", token, ok, result))

    # ----------------------------------------------------------------------------- abort broadcasts

    def broadcast_abort(
        self, asker: _Link, token: int, rid: str | None, abort_all: bool, timeout: float
    ) -> None:
        """Pass an abort on to every other connection that serves, and reply to ``asker`` with the sum of
        their counts once each has answered or left, or after ``timeout`` seconds with what has come."""
        key = next(self.abort_keys)
        with self.abort_lock:
            targets = [o for o in self.links if o is not asker and o.serves and o.open and o.listening]
            wait = _AbortWait(asker, token, {o.index for o in targets})
            if targets:
                wait.timer = threading.Timer(timeout, self.end_abort_wait, args=(key,))
                wait.timer.daemon = True
                wait.timer.start()
                self.abort_waits[key] = wait
        if not targets:
            self.answer_abort(wait)
            return
        for o in targets:
            o.send(("abort_broadcast", key, rid, abort_all))
            if not o.open:  # it went away: it will not answer
                self.count_aborted(o, key, 0)

    def count_aborted(self, link: _Link, key: int, n: int) -> None:
        """One connection's answer to broadcast ``key``; the last one awaited sends the reply."""
        with self.abort_lock:
            wait = self.abort_waits.get(key)
            if wait is None or link.index not in wait.waiting:  # late (timed out) or a second answer
                return
            wait.waiting.discard(link.index)
            wait.total += n
            if wait.waiting:
                return
            del self.abort_waits[key]
        self.answer_abort(wait)

    def end_abort_wait(self, key: int) -> None:
        """A broadcast's time is up (on its timer's thread): reply with the counts so far."""
        with self.abort_lock:
            wait = self.abort_waits.pop(key, None)
        if wait is not None:
            logger.warning("abort broadcast: %d connection(s) did not answer in time", len(wait.waiting))
            self.answer_abort(wait)

    def answer_abort(self, wait: _AbortWait) -> None:
        if wait.timer is not None:
            wait.timer.cancel()
        if wait.asker.open:
            wait.asker.send(("reply", wait.token, True, wait.total))

    def stop_listening(self, link: _Link) -> None:
        """``link``'s receiver has stopped: it answers no broadcast any more (count it as 0), and the
        broadcasts it asked for get their reply now, with the counts so far (if it still reads)."""
        done = []
        with self.abort_lock:
            link.listening = False
            for key, wait in list(self.abort_waits.items()):
                if wait.asker is link:
                    done.append(self.abort_waits.pop(key))
                elif link.index in wait.waiting:
                    wait.waiting.discard(link.index)
                    if not wait.waiting:
                        done.append(self.abort_waits.pop(key))
        for wait in done:
            self.answer_abort(wait)


@dataclass
class _AbortWait:
    """An abort broadcast in the core, waiting for the other connections' counts."""

    asker: _Link
    token: int  # the asker's, for its reply
    waiting: set[int]  # the indices of the connections yet to answer
    total: int = 0
    timer: threading.Timer | None = None
