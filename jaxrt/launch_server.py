"""HTTP server entry point: ``python -m jaxrt.launch_server --model-path PATH`` (also ``jaxrt serve``).

The socket comes up first; the engine loads and compiles in a background thread (``/health`` is 503 until
then), in a child process of its own unless ``--disable-frontend-multiprocessing`` (`jaxrt.engine_process`). SIGTERM/SIGINT stop new work (503), let running requests finish within ``--shutdown-timeout``
seconds, shut the engine down and exit 0.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
from typing import Any

from jaxrt.cli import add_engine_args, engine_kwargs
from jaxrt.server.tools import TOOL_CALL_PARSERS

logger = logging.getLogger("jaxrt.server")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jaxrt.launch_server",
        description="Serve a causal LM over HTTP (SGLang + OpenAI APIs).",
    )
    add_engine_args(p)
    p.add_argument(
        "--served-model-name", default=None, help="model id in /v1/models (default: the path's name)"
    )
    p.add_argument("--chat-template", default=None, help="a Jinja chat template file, or the template itself")
    p.add_argument(
        "--api-key", default=os.environ.get("JAXRT_API_KEY"), help="require 'Authorization: Bearer KEY'"
    )
    p.add_argument(
        "--max-queued-requests", type=int, default=None, help="answer 503 when more would wait in the queue"
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds running requests get to finish on SIGTERM",
    )
    p.add_argument("--skip-server-warmup", action="store_true", help="do not precompile before serving")
    p.add_argument(
        "--disable-frontend-multiprocessing",
        action="store_true",
        help="run the engine loop in the server's own process (default: a process of its own, so that the "
        "HTTP side's per-chunk work does not share one interpreter with scheduling)",
    )
    p.add_argument(
        "--api-server-count",
        type=int,
        default=1,
        help="HTTP processes sharing the port, each tokenizing, detokenizing and streaming for its own "
        "connections, all served by one engine process (vLLM's flag; default 1)",
    )
    p.add_argument(
        "--dp-size",
        "--data-parallel-size",
        dest="dp_size",
        type=int,
        default=1,
        help="data parallelism: this many engine replicas, each in a process of its own on one GPU (the first "
        "N of CUDA_VISIBLE_DEVICES), requests spread over them (SGLang's flag; default 1)",
    )
    p.add_argument(
        "--load-balance-method",
        default="round_robin",
        choices=["round_robin", "shortest_queue", "cache_aware"],
        help="how --dp-size spreads requests: replicas in turn, the one with the fewest in flight, or the one "
        "last sent most of the prompt's prefix (so it finds it cached; else the fewest in flight)",
    )
    p.add_argument(
        "--incremental-streaming-output",
        action="store_true",
        help="/generate streams: each chunk carries only the new text and output_ids (default: all so far)",
    )
    p.add_argument(
        "--tool-call-parser",
        default=None,
        choices=TOOL_CALL_PARSERS,
        help="read tool calls out of chat replies with tool_choice 'auto' (OpenAI's default with tools): hermes "
        "(<tool_call> blocks: Qwen2.5/3, Hermes), llama3_json (Llama 3.1+), pythonic ([f(a=1)]: Llama 3.2/4) or "
        "mistral ([TOOL_CALLS]: Mistral, whose replies then keep special tokens); without it 'auto' is a 400",
    )
    p.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help="vLLM's flag, taken for compatibility: 'auto' tool choice is on whenever --tool-call-parser is set "
        "(it needs one)",
    )
    return p


def read_chat_template(value: str | None) -> str | None:
    """``--chat-template``: a file path, or the template text itself."""
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    if "{{" in value or "{%" in value:
        return value
    raise ValueError(f"--chat-template: {value!r} is neither a file nor a Jinja template")


def server_engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The Engine's keyword arguments from the server's flags."""
    return {
        **engine_kwargs(args),
        "served_model_name": args.served_model_name,
        "chat_template": read_chat_template(args.chat_template),
        "skip_warmup": args.skip_server_warmup,
    }


def build_state(args: argparse.Namespace, factory=None):
    """The server's state; ``factory`` makes its engine (default: an engine process, or the engine itself
    with ``--disable-frontend-multiprocessing``)."""
    from jaxrt.server.state import ServerState

    kwargs = server_engine_kwargs(args)

    def default_factory():
        if args.dp_size > 1:
            from jaxrt.data_parallel import DataParallelEngine

            return DataParallelEngine(
                **kwargs, dp_size=args.dp_size, load_balance_method=args.load_balance_method
            )
        if args.disable_frontend_multiprocessing:
            from jaxrt.engine import Engine

            return Engine(**kwargs)
        from jaxrt.engine_process import EngineProcess

        return EngineProcess(**kwargs)

    shown = {k: v for k, v in vars(args).items() if k != "api_key"}
    return ServerState(
        factory or default_factory,
        api_key=args.api_key,
        max_queued_requests=args.max_queued_requests,
        incremental_streaming_output=args.incremental_streaming_output,
        tool_call_parser=args.tool_call_parser,
        freeze_gc=True,
        args={"server_args": shown},
    )


def make_server(app, host: str, port: int, log_level: str, shutdown_timeout: float, state):
    import uvicorn

    class _Server(uvicorn.Server):
        """uvicorn, plus: a signal marks the server draining (503s) and does not re-raise after shutdown."""

        def handle_exit(self, sig, frame) -> None:
            state.draining = True
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            sigs = (signal.SIGINT, signal.SIGTERM)
            original = {s: signal.signal(s, self.handle_exit) for s in sigs}
            try:
                yield
            finally:
                for s, h in original.items():
                    signal.signal(s, h)

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level.lower(),
        timeout_graceful_shutdown=shutdown_timeout,
        timeout_keep_alive=5,
        lifespan="on",
    )
    return _Server(config)


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def spawn(
    args: list[str],
    *,
    entry: tuple[str, ...] = ("-m", "jaxrt.launch_server"),
    host: str = "127.0.0.1",
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    timeout: float = 120.0,
):
    """Start a server subprocess on a port it binds itself (``--port 0``, so no other process can take it
    between choosing and binding) and return ``(proc, base_url)`` once it printed its address.

    ``args`` are the server's other flags. Its stdout and stderr are read on a thread into
    ``proc.output_lines`` (so the pipe never fills); ``RuntimeError`` with their tail if no address came.
    """
    import subprocess

    cmd = [sys.executable, *entry, "--host", host, "--port", "0", *args]
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []
    url: list[str] = []
    got = threading.Event()

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if not url and "listening on http://" in line:
                url.append(line.strip().split("listening on ")[1])
                got.set()
        got.set()

    threading.Thread(target=reader, daemon=True).start()
    if not got.wait(timeout) or not url:
        proc.kill()
        raise RuntimeError("server subprocess did not start:\n" + "".join(lines[-40:]))
    proc.output_lines = lines  # type: ignore[attr-defined]
    return proc, url[0]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.api_server_count < 1:
        print("error: --api-server-count must be >= 1", file=sys.stderr)
        return 2
    if args.dp_size != 1:
        if args.disable_frontend_multiprocessing:
            print("error: --dp-size > 1 runs each replica in a process of its own", file=sys.stderr)
            return 2
        from jaxrt.data_parallel import replica_devices, validate_dp_args

        try:
            validate_dp_args(args.dp_size, args.load_balance_method)
            replica_devices(args.dp_size)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        print("error: --enable-auto-tool-choice needs --tool-call-parser", file=sys.stderr)
        return 2
    if args.api_server_count > 1:
        if args.disable_frontend_multiprocessing:
            print("error: --api-server-count > 1 needs the engine in its own process", file=sys.stderr)
            return 2
        try:
            kwargs = server_engine_kwargs(args)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return _serve_multi(args, argv, kwargs)
    try:
        state = build_state(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from jaxrt.server.app import create_app

    app = create_app(state)
    server = make_server(app, args.host, args.port, args.log_level, args.shutdown_timeout, state)

    def on_load_failure(e: BaseException) -> None:
        server.should_exit = True

    state.on_load_failure = on_load_failure
    try:
        sock = bind_socket(args.host, args.port)
    except OSError as e:
        print(f"error: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    print(f"jaxrt server listening on http://{args.host}:{sock.getsockname()[1]}", flush=True)
    server.run(sockets=[sock])
    return 1 if state.load_error is not None else 0


def _serve_multi(args: argparse.Namespace, argv: list[str], kwargs: dict[str, Any]) -> int:
    """``--api-server-count N``: this process binds the port, starts one engine process (one per replica with
    ``--dp-size``, each on its own GPU) and N HTTP processes that accept on the shared socket (each an
    `EngineProcess` handle on the engine, or a `DataParallelEngine` over the replicas), and supervises them.
    SIGTERM / SIGINT: the HTTP processes drain (``--shutdown-timeout``), then the engines stop. If any of
    them dies, or an engine fails to start, everything stops and the exit code is 1."""
    import shutil
    import subprocess
    import tempfile
    import time

    from jaxrt.engine_process import spawn_python, start_core

    try:
        sock = bind_socket(args.host, args.port)
    except OSError as e:
        print(f"error: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    # The HTTP processes' Prometheus counters and histograms, summed at every scrape (metrics.py).
    own_metrics_dir = not os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if own_metrics_dir:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="jaxrt-metrics-")
    # One engine process, or one per data-parallel replica (each on its own GPU); every HTTP process gets a
    # connection to each.
    from jaxrt.data_parallel import replica_devices

    cores, controls, core_links = [], [], []
    for device in replica_devices(args.dp_size) if args.dp_size > 1 else [None]:
        core, (control, *links) = start_core(args.api_server_count + 1, device)
        control.send((kwargs, logging.getLogger("jaxrt").getEffectiveLevel(), True))
        cores.append(core)
        controls.append(control)
        core_links.append(links)
    workers = []
    for i in range(args.api_server_count):
        link_fds = [links[i].fileno() for links in core_links]
        fds = [sock.fileno(), *link_fds]
        spec = [str(i), str(sock.fileno()), str(len(link_fds)), *map(str, link_fds), *argv]
        workers.append(spawn_python("jaxrt.launch_server", "_http_process_main", spec, fds))
        for links in core_links:
            links[i].close()
    print(f"jaxrt server listening on http://{args.host}:{sock.getsockname()[1]}", flush=True)
    rc = 0
    while not stop.wait(0.2):
        trouble = _engine_trouble(cores, controls)
        if trouble:
            logger.error("%s", trouble)
            rc = 1
            break
        gone = [w for w in workers if w.poll() is not None]
        if gone:
            logger.error("an HTTP process exited (code %s); stopping", gone[0].returncode)
            rc = 1
            break
    for w in workers:  # they drain their requests, then detach from the engine
        if w.poll() is None:
            w.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + args.shutdown_timeout + 60
    for w in workers:
        try:
            w.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            w.kill()
            w.wait()
    for control in controls:
        try:
            control.send(("shutdown",))
        except OSError:
            pass
    for core, control in zip(cores, controls, strict=True):
        try:
            core.wait(timeout=90)
        except subprocess.TimeoutExpired:
            core.kill()
            core.wait()
        control.close()
    if own_metrics_dir:
        shutil.rmtree(os.environ.pop("PROMETHEUS_MULTIPROC_DIR"), ignore_errors=True)
    return rc


def _engine_trouble(cores: list, controls: list) -> str | None:
    """Why the engine processes cannot serve (one failed to start, or exited), or None."""
    for core, control in zip(cores, controls, strict=True):
        if control.poll():
            try:
                msg = control.recv()
            except (EOFError, OSError):
                msg = ("failed", "the engine process exited")
            if msg[0] == "failed":
                return f"the engine failed to start: {msg[1]}"
        if core.poll() is not None:
            return f"the engine process exited (code {core.returncode})"
    return None


def _http_process_main(*argv: str) -> None:
    """One HTTP process of ``--api-server-count``: ``argv`` = index, listening socket fd, the number of engine
    processes (``--dp-size``), a connection fd to each, then the server's own flags."""
    index, sock_fd, n = map(int, argv[:3])
    link_fds = [int(fd) for fd in argv[3 : 3 + n]]
    args = build_parser().parse_args(argv[3 + n :])
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    kwargs = server_engine_kwargs(args)

    def factory():
        if n > 1:
            from jaxrt.data_parallel import DataParallelEngine

            return DataParallelEngine.attach(link_fds, index, args.load_balance_method, **kwargs)
        from jaxrt.engine_process import EngineProcess

        return EngineProcess.attach(link_fds[0], index, **kwargs)

    from jaxrt.server.app import create_app

    state = build_state(args, factory)
    app = create_app(state)
    server = make_server(app, args.host, args.port, args.log_level, args.shutdown_timeout, state)
    state.on_load_failure = lambda e: setattr(server, "should_exit", True)
    server.run(sockets=[socket.socket(fileno=sock_fd)])
    sys.exit(1 if state.load_error is not None else 0)


if __name__ == "__main__":
    sys.exit(main())
