"""Prometheus metrics with SGLang-like names (prefix ``jaxrt:``), one CollectorRegistry per app.

Engine-side numbers (running/queued requests, KV usage, token counters, preemptions) are read from
``engine.load_stats()`` at scrape time by a custom collector; per-request latencies are histograms observed
by the server when a request finishes. With several HTTP processes (``--api-server-count``) the launcher sets
``PROMETHEUS_MULTIPROC_DIR``: each process's counters and histograms go to files there and every scrape sums
them (prometheus-client's multiprocess mode), so any process answers for all.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)


class _EngineCollector:
    """Gauges and counters read from the engine at scrape time."""

    def __init__(self, get_engine: Callable[[], Any]) -> None:
        self._get_engine = get_engine
        self._samples: deque[tuple[float, int]] = deque()

    def describe(self):
        return []

    def _throughput(self, generated: int) -> float:
        t = time.monotonic()
        self._samples.append((t, generated))
        while len(self._samples) > 2 and t - self._samples[1][0] > 30.0:
            self._samples.popleft()
        t0, g0 = self._samples[0]
        return (generated - g0) / (t - t0) if t > t0 else 0.0

    def collect(self):
        engine = self._get_engine()
        if engine is None:
            return
        st = engine.load_stats()
        page_size = engine.config.cache.page_size
        labels = [engine.served_model_name]

        def gauge(name: str, doc: str, value: float):
            g = GaugeMetricFamily(f"jaxrt:{name}", doc, labels=["model_name"])
            g.add_metric(labels, float(value))
            return g

        def counter(name: str, doc: str, value: float):
            c = CounterMetricFamily(f"jaxrt:{name}", doc, labels=["model_name"])
            c.add_metric(labels, float(value))
            return c

        prompt = st.get("num_prompt_tokens", 0)
        yield gauge("num_running_reqs", "Requests in the running batch.", st["num_running_reqs"])
        yield gauge("num_queue_reqs", "Requests waiting in the scheduler queue.", st["num_queue_reqs"])
        yield gauge(
            "num_used_tokens", "KV slots in use (pages x page size).", st["num_used_pages"] * page_size
        )
        yield gauge("token_usage", "Fraction of the KV pool in use.", st["token_usage"])
        yield gauge("num_cached_pages", "KV pages held by the radix prefix cache.", st["num_cached_pages"])
        yield gauge(
            "cache_hit_rate",
            "Prompt tokens served from the prefix cache / prompt tokens (since start).",
            st.get("num_cached_tokens", 0) / prompt if prompt else 0.0,
        )
        yield gauge(
            "gen_throughput",
            "Generated tokens per second (since the previous scrape, up to 30 s back).",
            self._throughput(st.get("num_generated_tokens", 0)),
        )
        yield counter("num_preemptions", "Running requests preempted for KV space.", st["num_preemptions"])
        yield counter("prompt_tokens", "Prompt tokens prefilled or reused.", prompt)
        yield counter("generation_tokens", "Tokens generated.", st.get("num_generated_tokens", 0))
        yield counter(
            "cached_tokens", "Prompt tokens served from the prefix cache.", st.get("num_cached_tokens", 0)
        )


class Metrics:
    def __init__(self, get_engine: Callable[[], Any]) -> None:
        self._get_engine = get_engine
        self.registry = CollectorRegistry()
        r = self.registry
        lab = ["model_name"]
        self.ttft = Histogram(
            "jaxrt:time_to_first_token_seconds",
            "Time to first token.",
            lab,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "jaxrt:inter_token_latency_seconds",
            "Mean time between output tokens, one observation per request.",
            lab,
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "jaxrt:e2e_request_latency_seconds",
            "End-to-end request latency.",
            lab,
            buckets=_E2E_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "jaxrt:num_requests", "Finished sequences by finish reason.", [*lab, "finish_reason"], registry=r
        )
        self.aborted = Counter(
            "jaxrt:num_aborted_requests", "Sequences aborted (client or server).", lab, registry=r
        )
        self.rejected = Counter(
            "jaxrt:num_rejected_requests",
            "Requests refused with 503 because the queue was full.",
            lab,
            registry=r,
        )
        self.http_errors = Counter(
            "jaxrt:http_errors", "Error responses by status code.", [*lab, "status"], registry=r
        )
        r.register(_EngineCollector(get_engine))

    def _model(self) -> str:
        engine = self._get_engine()
        return engine.served_model_name if engine is not None else ""

    def observe_finish(self, meta: dict[str, Any]) -> None:
        m = self._model()
        fr = (meta.get("finish_reason") or {}).get("type", "unknown")
        self.requests.labels(m, fr).inc()
        if fr == "abort":
            self.aborted.labels(m).inc()
        e2e = meta.get("e2e_latency")
        if e2e is not None:
            self.e2e.labels(m).observe(e2e)
        ttft = meta.get("ttft")
        if ttft is not None and fr != "abort":
            self.ttft.labels(m).observe(ttft)
            n = meta.get("completion_tokens", 0)
            if n > 1 and e2e is not None:
                self.itl.labels(m).observe(max(0.0, e2e - ttft) / (n - 1))

    def count_abort(self, n: int = 1) -> None:
        self.aborted.labels(self._model()).inc(n)
        self.requests.labels(self._model(), "abort").inc(n)

    def count_rejected(self) -> None:
        self.rejected.labels(self._model()).inc()

    def count_error(self, status: int) -> None:
        self.http_errors.labels(self._model(), str(status)).inc()

    def render(self) -> bytes:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # every HTTP process's samples, summed
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            registry.register(_EngineCollector(self._get_engine))
            return generate_latest(registry)
        return generate_latest(self.registry)
