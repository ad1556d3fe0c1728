"""Data parallelism: several replicas of the engine, one GPU each, behind one handle (SGLang's ``--dp-size``).

A model that fits on one GPU serves about N times the requests on N GPUs when each runs a whole engine of its
own. :class:`DataParallelEngine` starts ``dp_size`` `jaxrt.engine_process.EngineProcess` replicas, replica
``i`` seeing only the ``i``-th visible GPU (``CUDA_VISIBLE_DEVICES`` in its environment), and keeps the
Engine's API on top of them: requests are validated and tokenized once here (``EngineAPI._prepare``), then
each goes to one replica, chosen by ``load_balance_method`` (SGLang's names):

- ``round_robin`` (the default, as in SGLang): replicas in turn;
- ``shortest_queue``: the replica with the fewest of this handle's requests in flight (ties in turn);
- ``cache_aware`` (sglang-router's policy): the replica that was last sent the longest page-aligned prefix of
  the prompt, when that covers at least half of it (a conversation's next turn, a shared system prompt), so
  the prompt meets its cached pages there; otherwise, or when the replicas' loads differ by more than
  ``CACHE_AWARE_BALANCE`` requests, the shortest queue. The prefixes are remembered here, per page of tokens
  (``CachePrefixIndex``), not read from the replicas: a replica may have evicted one since.

The ``n`` samples of one prompt go to the same replica, so they share its prefix cache. Each replica has its own
KV pool and radix cache (a prefix cached by one replica is not seen by the others). Aborts go to the replica
that holds the request; ``load_stats`` sums the replicas' counters; ``get_server_info`` adds ``dp_size`` and
each replica's own info under ``replicas``. The server's HTTP processes (``--api-server-count``) each hold a
handle (``DataParallelEngine.attach``) connected to every replica.

On CPU (``JAX_PLATFORMS=cpu``) the replicas are processes of their own on the one CPU device, which tests use.
TPUs are not split this way (one process owns a host's chips): ``dp_size > 1`` there is refused.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from jaxrt.config import validate_quantization
from jaxrt.engine import EngineAPI
from jaxrt.output import Sink

logger = logging.getLogger("jaxrt")

LOAD_BALANCE_METHODS = ("round_robin", "shortest_queue", "cache_aware")
# cache_aware: the least share of a prompt a replica's remembered prefix must cover, and the load gap (requests
# in flight) past which the shortest queue wins regardless (sglang-router's cache_threshold and
# balance_abs_threshold defaults).
CACHE_AWARE_MIN_MATCH = 0.5
CACHE_AWARE_BALANCE = 32


class CachePrefixIndex:
    """Which replica was last sent each page-aligned prefix of the prompts routed so far: a chained hash per
    ``page_size`` tokens, least recently used ones dropped past ``capacity`` entries."""

    def __init__(self, page_size: int, capacity: int = 1 << 20) -> None:
        self.page_size = page_size
        self.capacity = capacity
        self._owner: OrderedDict[int, int] = OrderedDict()

    def _keys(self, ids: list[int]) -> list[int]:
        keys, h, p = [], 0, self.page_size
        for start in range(0, len(ids) - p + 1, p):
            h = hash((h, *ids[start : start + p]))
            keys.append(h)
        return keys

    def match(self, ids: list[int]) -> tuple[int | None, int]:
        """(the replica holding the longest remembered prefix of ``ids``, its length in tokens); (None, 0)."""
        best, length = None, 0
        for i, key in enumerate(self._keys(ids)):
            owner = self._owner.get(key)
            if owner is None:
                break
            best, length = owner, (i + 1) * self.page_size
        return best, length

    def insert(self, ids: list[int], replica: int) -> None:
        for key in self._keys(ids):
            self._owner[key] = replica
            self._owner.move_to_end(key)
        while len(self._owner) > self.capacity:
            self._owner.popitem(last=False)


def validate_dp_args(dp_size: Any, load_balance_method: Any = "round_robin") -> None:
    """ValueErrors naming the field for a ``dp_size`` that is not an integer >= 1 or an unknown method."""
    if not isinstance(dp_size, int) or isinstance(dp_size, bool) or dp_size < 1:
        raise ValueError(f"dp_size must be an integer >= 1, got {dp_size!r}")
    if load_balance_method not in LOAD_BALANCE_METHODS:
        raise ValueError(
            f"load_balance_method must be one of {LOAD_BALANCE_METHODS}, got {load_balance_method!r}"
        )


def replica_devices(dp_size: int, environ: Mapping[str, str] | None = None) -> list[str | None]:
    """The GPU each of ``dp_size`` replicas sees (its ``CUDA_VISIBLE_DEVICES``): the first ``dp_size`` of this
    process's ``CUDA_VISIBLE_DEVICES``, or ``0 .. dp_size - 1`` when it is unset. None for every replica when
    JAX is limited to platforms without CUDA (``JAX_PLATFORMS=cpu``): they all share the host."""
    environ = os.environ if environ is None else environ
    platforms = [p.strip() for p in environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms and not any(p in ("cuda", "gpu") for p in platforms):
        return [None] * dp_size
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return [str(i) for i in range(dp_size)]
    ids = [d.strip() for d in visible.split(",") if d.strip()]
    if len(ids) < dp_size:
        raise ValueError(
            f"dp_size: {dp_size} replicas need {dp_size} GPUs, CUDA_VISIBLE_DEVICES={visible!r} lists {len(ids)}"
        )
    return ids[:dp_size]


class DataParallelEngine(EngineAPI):
    """``dp_size`` engine replicas, each in a process of its own on one GPU, behind the Engine's API.

    Takes the Engine's keyword arguments (every replica gets the same) plus ``dp_size`` and
    ``load_balance_method`` (see the module). ``jaxrt.Engine(..., dp_size=N)`` with N > 1 returns one.
    Construction starts the replicas together and returns once all are ready; if one fails, the others are
    stopped and RuntimeError names it.
    """

    def __init__(
        self,
        model_path: str | None = None,
        *,
        dp_size: int,
        load_balance_method: str = "round_robin",
        **engine_kwargs: Any,
    ) -> None:
        from jaxrt.engine_process import EngineProcess

        validate_dp_args(dp_size, load_balance_method)
        validate_quantization(engine_kwargs.get("quantization"))
        t0 = time.perf_counter()
        devices = replica_devices(dp_size)
        with ThreadPoolExecutor(dp_size, thread_name_prefix="jaxrt-dp-start") as pool:
            shared: dict = {}  # one tokenizer for every replica's handle
            futures = [
                pool.submit(EngineProcess, model_path, visible_devices=d, tokenizers=shared, **engine_kwargs)
                for d in devices
            ]
        self._setup(futures, devices, load_balance_method, engine_kwargs.get("random_seed", 0), 0, t0)

    @classmethod
    def attach(
        cls, fds: list[int], index: int, load_balance_method: str = "round_robin", **engine_kwargs: Any
    ) -> DataParallelEngine:
        """A handle on replicas that another process started (``start_core``), one connection ``fd`` each:
        what each HTTP process of ``--dp-size`` with ``--api-server-count`` holds (``index`` as in
        ``EngineProcess.attach``). Every HTTP process is connected to every replica, so an abort broadcast
        through replica 0 reaches each other process once."""
        from jaxrt.engine_process import EngineProcess

        validate_dp_args(len(fds), load_balance_method)
        t0 = time.perf_counter()
        self = cls.__new__(cls)
        with ThreadPoolExecutor(len(fds), thread_name_prefix="jaxrt-dp-attach") as pool:
            shared: dict = {}  # one tokenizer for every replica's handle
            futures = [pool.submit(EngineProcess.attach, fd, index, shared, **engine_kwargs) for fd in fds]
        seed = engine_kwargs.get("random_seed", 0)
        self._setup(futures, [None] * len(fds), load_balance_method, seed, index, t0)
        return self

    def _setup(self, futures, devices, load_balance_method: str, seed: int, index: int, t0: float) -> None:
        replicas, errors = [], []
        for i, fut in enumerate(futures):
            try:
                replicas.append(fut.result())
            except BaseException as e:  # noqa: BLE001 - reported below, after the others are stopped
                where = f" (CUDA_VISIBLE_DEVICES={devices[i]})" if devices[i] is not None else ""
                errors.append(f"replica {i}{where}: {e}")
        platforms = {r.device[0] for r in replicas}
        if not errors and len(platforms) > 1:
            errors.append(f"the replicas run on different platforms: {[r.device for r in replicas]}")
        if not errors and platforms == {"tpu"} and len(replicas) > 1:
            errors.append("dp_size > 1 splits GPUs; on TPU one engine process owns the host's chips")
        if errors:
            _shutdown_all(replicas)
            raise RuntimeError("data-parallel start failed: " + "; ".join(errors))
        self.replicas: list[Any] = replicas
        self.dp_size = len(replicas)
        self.load_balance_method = load_balance_method
        first = replicas[0]
        self.config = first.config
        self.tokenizer = first.tokenizer
        self.model_path = first.model_path
        self.served_model_name = first.served_model_name
        self.eos_ids = first.eos_ids
        self.device = first.device
        self._rng = np.random.default_rng(seed if index == 0 else [seed, index])
        self._turn = itertools.count()
        self._prefixes = CachePrefixIndex(self.config.cache.page_size)
        self._route_lock = threading.Lock()  # the prefix index: requests come from several threads
        self.startup_seconds = time.perf_counter() - t0
        logger.info(
            "%d replicas ready in %.1f s (%s)", self.dp_size, self.startup_seconds, load_balance_method
        )

    # ============================================================== several HTTP processes (aborts)

    @property
    def on_abort_broadcast(self):
        """Another HTTP process's abort by client id (``EngineProcess.on_abort_broadcast``): they come through
        replica 0, which every HTTP process is connected to."""
        return self.replicas[0].on_abort_broadcast

    @on_abort_broadcast.setter
    def on_abort_broadcast(self, callback) -> None:
        self.replicas[0].on_abort_broadcast = callback

    @property
    def abort_broadcast_timeout(self) -> float:
        return self.replicas[0].abort_broadcast_timeout

    def broadcast_abort(self, rid: str | None, abort_all: bool = False):
        """Ask the other HTTP processes to abort their requests with client id ``rid`` (or all): through
        replica 0 only, so each hears it once (``EngineProcess.broadcast_abort``)."""
        return self.replicas[0].broadcast_abort(rid, abort_all)

    # ===================================================================================== routing

    def _pick(self, load: list[int] | None, ids: list[int]) -> int:
        """The replica for a prompt: in turn without ``load``, else the shortest queue (ties in turn), unless
        ``cache_aware`` finds one holding most of its prefix."""
        start = next(self._turn) % self.dp_size
        if load is None:
            return start
        chosen = min(range(self.dp_size), key=lambda j: (load[j], (j - start) % self.dp_size))
        if self.load_balance_method != "cache_aware":
            return chosen
        with self._route_lock:
            owner, matched = self._prefixes.match(ids)
            balanced = max(load) - min(load) <= CACHE_AWARE_BALANCE
            if owner is not None and balanced and matched >= CACHE_AWARE_MIN_MATCH * len(ids):
                chosen = owner
            self._prefixes.insert(ids, chosen)
        return chosen

    def _submit_many(
        self,
        items: list[tuple[dict[str, Any], Sink]],
        stream: bool,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> list[str]:
        self._check_alive()
        load = [len(r._seqs) for r in self.replicas] if self.load_balance_method != "round_robin" else None
        by_prompt: dict[int, int] = {}  # id of a prompt's token list -> its replica (n > 1 shares the list)
        groups: dict[int, list[int]] = {}
        for i, (spec, _) in enumerate(items):
            r = by_prompt.get(id(spec["ids"]))
            if r is None:
                r = by_prompt[id(spec["ids"])] = self._pick(load, spec["ids"])
            if load is not None:
                load[r] += 1
            groups.setdefault(r, []).append(i)
        rids: list[str] = [""] * len(items)
        for r, idx in groups.items():
            for i, rid in zip(
                idx, self.replicas[r]._submit_many([items[i] for i in idx], stream, loop), strict=True
            ):
                rids[i] = rid
        return rids

    def abort(self, request_id: str) -> None:
        """Abort a request: it finishes with ``finish_reason.type == "abort"`` and frees all it holds."""
        for r in self.replicas:
            if request_id in r._seqs:
                r.abort(request_id)
                return

    def _check_alive(self) -> None:
        for i, r in enumerate(self.replicas):
            try:
                r._check_alive()
            except RuntimeError as e:
                raise RuntimeError(f"data-parallel replica {i}: {e}") from e

    @property
    def _num_usable_pages(self) -> int:
        return min(r._num_usable_pages for r in self.replicas)

    # ================================================================================== public API

    @property
    def startup_breakdown(self) -> dict[str, float]:
        """Each phase's longest time over the replicas (they start together)."""
        parts = [r.startup_breakdown for r in self.replicas]
        return {k: max(p.get(k, 0.0) for p in parts) for k in parts[0]}

    def load_stats(self) -> dict[str, Any]:
        """The replicas' counters summed (``token_usage``: used pages over all replicas' pages)."""
        stats = [r.load_stats() for r in self.replicas]
        out = {
            k: sum(s.get(k, 0) for s in stats)
            for k, v in stats[0].items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "token_usage"
        }
        usable = sum(r._num_usable_pages for r in self.replicas)
        out["token_usage"] = out.get("num_used_pages", 0) / max(1, usable)
        return out

    def get_server_info(self) -> dict[str, Any]:
        infos = [r.get_server_info() for r in self.replicas]
        return {
            **infos[0],
            "dp_size": self.dp_size,
            "load_balance_method": self.load_balance_method,
            "num_pages": sum(i["num_pages"] for i in infos),
            "compiling": any(i.get("compiling") for i in infos),
            "startup_seconds": self.startup_seconds,
            "startup_breakdown": self.startup_breakdown,
            "engine_process_pid": [i.get("engine_process_pid") for i in infos],
            "replicas": infos,
        }

    def flush_cache(self) -> bool:
        """Drop every replica's cached prefixes. False if a replica had requests running (it keeps its cache;
        the idle ones are flushed)."""
        return all([r.flush_cache() for r in self.replicas])

    def wait_compiled(self, timeout: float | None = None) -> bool:
        return all([r.wait_compiled(timeout) for r in self.replicas])

    def shutdown(self) -> None:
        """Stop every replica: requests still in flight finish with an abort."""
        _shutdown_all(self.replicas)


def _shutdown_all(replicas: list[Any]) -> None:
    if not replicas:
        return
    with ThreadPoolExecutor(len(replicas), thread_name_prefix="jaxrt-dp-stop") as pool:
        for fut in [pool.submit(r.shutdown) for r in replicas]:
            try:
                fut.result()
            except Exception as e:  # noqa: BLE001 - stop the others regardless
                logger.warning("stopping a data-parallel replica: %s", e)
