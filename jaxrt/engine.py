"""The offline engine: SGLang-style ``generate`` / ``async_generate`` / streaming over one engine loop.

One background thread owns the scheduler and the device: it drains an inbox of commands (new requests,
aborts, cache flushes), runs a step, and hands its tokens to the output processor (`jaxrt.output`), which
sends each request's outputs to that request's sink (a queue for synchronous callers, an asyncio queue for
async ones). Callers never touch the scheduler directly, so the
server, the CLI and ``generate`` all share one path.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import numpy as np

from jaxrt.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, validate_quantization
from jaxrt.grammar import GrammarTokenizer, compile_grammar
from jaxrt.output import OutputProcessor, Sink, Track
from jaxrt.page_table import PageAllocator
from jaxrt.radix_cache import RadixCache
from jaxrt.request import FinishReason, Request
from jaxrt.sampling_params import SamplingParams
from jaxrt.scheduler import Scheduler, SchedulerOutput, max_pages_for
from jaxrt.tokenizer import IncrementalDetokenizer, Tokenizer

logger = logging.getLogger("jaxrt")


def _platform() -> str:
    import jax

    return jax.default_backend()


def _default_dtype(checkpoint_dtype: str, platform: str) -> str:
    if platform == "cpu":
        return "float32"
    return "float16" if checkpoint_dtype == "float16" else "bfloat16"


class EngineAPI:
    """What every engine handle offers callers: validation and tokenization of requests, ``generate`` /
    ``async_generate`` / streaming on top of ``_submit_many``, and model info.

    Subclasses: :class:`Engine` (the loop on a thread of this process) and
    `jaxrt.engine_process.EngineProcess` (the loop in a process of its own). They set ``config``,
    ``tokenizer``, ``model_path``, ``served_model_name``, ``eos_ids`` and ``_rng``, and implement
    ``_submit_many``, ``_check_alive``, ``_num_usable_pages`` and ``abort``.
    """

    config: EngineConfig
    tokenizer: Tokenizer | None
    model_path: str
    served_model_name: str
    eos_ids: set[int]
    _rng: np.random.Generator

    # ------------------------------------------------------------------------------- for subclasses

    def _submit_many(
        self,
        items: list[tuple[dict[str, Any], Sink]],
        stream: bool,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> list[str]:
        """Queue prepared requests (``_prepare``'s specs) together; returns their ids. Each sink gets the
        request's output dicts (or the exception that ended it): called on ``loop``'s thread when ``loop`` is
        given, else on any thread (so it must be thread-safe)."""
        raise NotImplementedError

    def _check_alive(self) -> None:
        """Raise RuntimeError if the engine can no longer answer (its loop died or it was shut down)."""
        raise NotImplementedError

    @property
    def _num_usable_pages(self) -> int:
        raise NotImplementedError

    def abort(self, request_id: str) -> None:
        """Abort a request: it finishes with ``finish_reason.type == "abort"`` and frees all it holds."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------ public API

    @property
    def context_length(self) -> int:
        return self.config.scheduler.context_length

    def generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        stream: bool = False,
        return_logprob: bool | None = None,
        top_logprobs_num: int | None = None,
        logprob_start_len: int | None = None,
    ) -> dict[str, Any] | list[dict[str, Any]] | Iterator[dict[str, Any]]:
        """Generate for one prompt or a batch. Returns SGLang-shaped dicts; ``stream=True`` yields chunks.

        ``return_logprob``: each output token's log-probability in ``meta_info.output_token_logprobs`` (with
        ``top_logprobs_num`` > 0 also the most likely tokens, ``output_top_logprobs``); with
        ``logprob_start_len`` >= 0 also the prompt's tokens from that position on (``input_token_logprobs`` /
        ``input_top_logprobs``; the prompt's first token has None), as SGLang's. Those positions are computed,
        not read from the prefix cache."""
        specs, single = self._prepare(
            prompt, sampling_params, input_ids, return_logprob, top_logprobs_num, logprob_start_len
        )
        if stream:
            if len(specs) != 1:
                raise ValueError("stream=True takes a single prompt with n=1")
            return self._stream_sync(specs[0])
        sinks = [queue.SimpleQueue() for _ in specs]
        self._submit_many([(spec, q.put) for spec, q in zip(specs, sinks, strict=True)], stream=False)
        results = [self._wait(q) for q in sinks]
        return results[0] if single else results

    def _submit(self, spec: dict[str, Any], sink: Sink, stream: bool, loop=None) -> str:
        return self._submit_many([(spec, sink)], stream, loop)[0]

    def _stream_sync(self, spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
        q: queue.SimpleQueue = queue.SimpleQueue()
        rid = self._submit(spec, q.put, stream=True)
        try:
            while True:
                chunk = self._wait(q)
                yield chunk
                if chunk["meta_info"]["finish_reason"] is not None:
                    return
        finally:
            self.abort(rid)  # no-op if finished; frees everything if the consumer stopped early

    def _wait(self, q: queue.SimpleQueue) -> dict[str, Any]:
        while True:
            try:
                item = q.get(timeout=0.5)
            except queue.Empty:
                self._check_alive()
                continue
            if isinstance(item, BaseException):
                raise item
            return item

    def async_generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        stream: bool = False,
        return_logprob: bool | None = None,
        top_logprobs_num: int | None = None,
        logprob_start_len: int | None = None,
    ):
        """Async twin of :meth:`generate`.

        ``await engine.async_generate(...)`` gives the result; with ``stream=True`` the return value is an
        async iterator of chunks (``async for chunk in engine.async_generate(..., stream=True)``; awaiting it
        first also works, as in SGLang).
        """
        specs, single = self._prepare(
            prompt, sampling_params, input_ids, return_logprob, top_logprobs_num, logprob_start_len
        )
        if stream:
            if len(specs) != 1:
                raise ValueError("stream=True takes a single prompt with n=1")
            return _AsyncStream(self, specs[0])
        return self._async_batch(specs, single)

    async def _async_batch(self, specs: list[dict[str, Any]], single: bool):
        loop = asyncio.get_running_loop()
        futures = []
        submissions = []
        for spec in specs:
            fut = loop.create_future()

            def sink(item, fut=fut):  # on the loop's thread
                if fut.done():
                    return
                if isinstance(item, BaseException):
                    fut.set_exception(item)
                elif item["meta_info"]["finish_reason"] is not None:
                    fut.set_result(item)

            submissions.append((spec, sink))
            futures.append(fut)
        futures = list(zip(self._submit_many(submissions, stream=False, loop=loop), futures, strict=True))
        try:
            results = [await fut for _, fut in futures]
        except asyncio.CancelledError:
            for rid, _ in futures:
                self.abort(rid)
            raise
        return results[0] if single else results

    def get_model_info(self) -> dict[str, Any]:
        m = self.config.model
        return {
            "model_path": self.model_path,
            "tokenizer_path": self.model_path,
            "served_model_name": self.served_model_name,
            "is_generation": True,
            "architecture": m.architecture,
            "impl": self.config.impl,
            "dtype": self.config.dtype,
            "context_length": self.context_length,
            "vocab_size": m.vocab_size,
        }

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        raise NotImplementedError

    # ====================================================================================== intake

    def _prepare(
        self, prompt, sampling_params, input_ids, return_logprob, top_logprobs_num, logprob_start_len=None
    ):
        """Validate everything up front; a bad request raises ValueError before anything is queued."""
        if (prompt is None) == (input_ids is None):
            raise ValueError("pass exactly one of prompt or input_ids")
        if prompt is not None:
            single = isinstance(prompt, str)
            prompts = [prompt] if single else list(prompt)
            if not all(isinstance(p, str) for p in prompts):
                raise ValueError("prompt must be a string or a list of strings")
            if self.tokenizer is None:
                raise ValueError(
                    "prompt: text needs the tokenizer (engine started with skip_tokenizer_init); pass input_ids"
                )
            token_lists = [self.tokenizer.encode(p) if p else [] for p in prompts]
        else:
            single = bool(input_ids) and isinstance(input_ids[0], int) or input_ids == []
            token_lists = [list(input_ids)] if single else [list(x) for x in input_ids]
        if not token_lists:
            raise ValueError("prompt: empty batch")
        if isinstance(sampling_params, list):
            if len(sampling_params) != len(token_lists):
                raise ValueError(
                    f"sampling_params: got {len(sampling_params)} for a batch of {len(token_lists)} prompts"
                )
            sps = [SamplingParams.from_dict(s) for s in sampling_params]
        else:
            sps = [SamplingParams.from_dict(sampling_params) for _ in token_lists]
        vocab = self.config.model.vocab_size
        page_size = self.config.cache.page_size
        specs = []
        for ids, sp in zip(token_lists, sps, strict=True):
            if return_logprob is not None:
                sp.return_logprob = bool(return_logprob)
            if top_logprobs_num is not None:
                sp.top_logprobs_num = int(top_logprobs_num)
            if logprob_start_len is not None:
                sp.logprob_start_len = logprob_start_len
            sp.validate(vocab)
            self._validate_ids(ids)
            grammar = self._compile_constraint(sp)
            max_new = min(sp.max_new_tokens, self.context_length - len(ids))
            pages = max_pages_for(len(ids) + max_new, self.context_length, page_size)
            if pages > self._num_usable_pages:
                raise ValueError(
                    f"max_new_tokens: prompt + max_new_tokens needs {pages} KV pages, "
                    f"the pool has {self._num_usable_pages}"
                )
            for i in range(sp.n):
                seed = sp.seed + i if sp.seed is not None else int(self._rng.integers(0, 2**31 - 1))
                specs.append({"ids": ids, "sp": sp, "seed": seed, "max_new": max_new, "grammar": grammar})
            if sp.n > 1:
                single = False
        return specs, single

    def _compile_constraint(self, sp: SamplingParams) -> str | None:
        """The llguidance grammar of ``sp``'s regex / json_schema / ebnf (None without one); a ValueError
        naming the field if it is not valid or the engine has no tokenizer."""
        if sp.constraint is None:
            return None
        kind, text = sp.constraint
        if self.tokenizer is None:
            raise ValueError(
                f"sampling_params.{kind}: constrained decoding needs the tokenizer "
                "(engine started with skip_tokenizer_init)"
            )
        return compile_grammar(kind, text)

    def _validate_ids(self, ids: list[int]) -> None:
        if not ids:
            raise ValueError("prompt: empty prompt (no tokens)")
        vocab = self.config.model.vocab_size
        if any(not isinstance(t, (int, np.integer)) or t < 0 or t >= vocab for t in ids):
            raise ValueError(f"input_ids: token ids must be integers in [0, {vocab})")
        if len(ids) >= self.context_length:
            raise ValueError(
                f"prompt: {len(ids)} tokens is too long for context_length {self.context_length} "
                "(at least one token must be generated)"
            )


class Engine(EngineAPI):
    """Generate text from a transformers causal LM with jaxrt.

    ``Engine()`` with no ``model_path`` uses the default model (SmolLM2-135M-Instruct, fully offline).
    Use as a context manager, or call :meth:`shutdown`.

    ``dp_size=N`` (N > 1; SGLang's data parallelism) returns a `jaxrt.data_parallel.DataParallelEngine`
    instead: N replicas of the engine, each in a process of its own on one GPU, behind this same API.
    """

    def __new__(cls, *args: Any, dp_size: int = 1, **kwargs: Any):
        if dp_size != 1 or isinstance(dp_size, bool):  # it validates dp_size (a ValueError naming it)
            from jaxrt.data_parallel import DataParallelEngine

            return DataParallelEngine(*args, dp_size=dp_size, **kwargs)
        return super().__new__(cls)

    def __init__(
        self,
        model_path: str | None = None,
        impl: str = "auto",
        dtype: str | None = None,
        trust_remote_code: bool = False,
        quantization: str | None = None,
        page_size: int = 16,
        mem_fraction_static: float = 0.85,
        max_running_requests: int | None = None,
        chunked_prefill_size: int | None = None,
        context_length: int | None = None,
        disable_radix_cache: bool = False,
        random_seed: int = 0,
        attention_backend: str | None = None,
        num_pages: int | None = None,
        chat_template: str | None = None,
        max_queued_requests: int | None = None,
        skip_warmup: bool = False,
        served_model_name: str | None = None,
        skip_tokenizer_init: bool = False,
        disable_overlap_schedule: bool = False,
        num_continuous_decode_steps: int | None = None,
        background_compile: bool | None = None,
        stream_interval: int = 1,
        single_token_bucket: bool | None = None,
        dp_size: int = 1,  # taken by __new__: only 1 gets here
    ) -> None:
        import jax

        from jaxrt import envs
        from jaxrt.converters.loader import (
            build_native_model,
            has_native,
            load_hf_config,
            native_model_config,
            resolve_model_path,
        )
        from jaxrt.model_runner import ModelRunner, enable_compilation_cache
        from jaxrt.step import nnx_forward

        t0 = time.perf_counter()
        if impl not in ("auto", "native", "transformers"):
            raise ValueError(f"impl must be 'auto', 'native' or 'transformers', got {impl!r}")
        validate_quantization(quantization)
        if model_path is None:
            from jaxrt.default_model import DEFAULT_MODEL_NAME, default_model_path

            model_path = default_model_path()
            served_model_name = served_model_name or DEFAULT_MODEL_NAME
        model_path = resolve_model_path(model_path)
        self.model_path = model_path
        self.served_model_name = served_model_name or model_path.rstrip("/").split("/")[-1]
        enable_compilation_cache()

        hf_config = load_hf_config(model_path, trust_remote_code)
        phases = _Phases(t0)
        phases.mark("config_s")
        jax.devices()  # the platform's client starts here, not inside the weights' first copy
        phases.mark("backend_s")
        if _platform() == "gpu":
            from jaxrt.kernels import pallas_gpu

            pallas_gpu.set_mosaic_decode(envs.mosaic_decode())
        from jaxrt.sampler import set_greedy_kernel

        set_greedy_kernel("gpu" if _platform() == "gpu" and envs.greedy_kernel() else None)
        arch = (getattr(hf_config, "architectures", None) or ["?"])[0]
        if impl == "auto":
            impl = "native" if has_native(arch) else "transformers"
            logger.info("impl=auto chose %s for %s", impl, arch)
        if quantization is not None and impl != "native":
            raise ValueError(
                f"quantization={quantization!r} needs a native model: {arch} runs through the transformers "
                "fallback (impl='transformers')"
            )
        fallback = None
        if impl == "transformers":
            from jaxrt.converters.fallback import build_fallback, checkpoint_dtype

            dtype = dtype or _default_dtype(checkpoint_dtype(hf_config), _platform())
            fallback = build_fallback(  # (ModelConfig, forward, params)
                model_path,
                hf_config,
                dtype,
                attention_backend or envs.attention_backend(),
                trust_remote_code,
                interpret=envs.attention_interpret(),
            )
        if fallback:
            phases.mark("weights_s")  # the traced transformers model with its weights on the device
        model_cfg: ModelConfig = fallback[0] if fallback else native_model_config(hf_config)
        if quantization is None and not fallback and model_cfg.checkpoint_quantization == "fp8":
            quantization = "fp8"  # an fp8 checkpoint is served in fp8 (as vLLM and SGLang do)
            logger.info("the checkpoint stores fp8 weights: serving with quantization='fp8'")
        platform = _platform()
        dtype = dtype or _default_dtype(model_cfg.dtype, platform)
        context_length = context_length or model_cfg.max_position_embeddings
        on_cpu = platform == "cpu"
        max_running_requests = max_running_requests or (16 if on_cpu else 256)
        chunked_prefill_size = chunked_prefill_size or (512 if on_cpu else 8192)
        chunked_prefill_size = max(chunked_prefill_size, max_running_requests)
        backend = attention_backend or envs.attention_backend()
        if model_cfg.state_specs and not disable_radix_cache:
            # A cached prefix has KV pages but no snapshot of the recurrent state after it.
            logger.info("radix prefix cache disabled: %s has recurrent state", model_cfg.architecture)
            disable_radix_cache = True

        self.config = EngineConfig(
            model_path=model_path,
            model=model_cfg,
            cache=CacheConfig(
                page_size=page_size,
                mem_fraction_static=mem_fraction_static,
                num_pages=num_pages,
                disable_radix_cache=disable_radix_cache,
            ),
            scheduler=SchedulerConfig(
                max_running_requests=max_running_requests,
                chunked_prefill_size=chunked_prefill_size,
                context_length=context_length,
                max_queued_requests=max_queued_requests,
                # Several decode steps per dispatch hide the host's per-step work behind the device; on the
                # CPU there is nothing to hide, and single steps stream token by token.
                num_continuous_decode_steps=num_continuous_decode_steps or (1 if on_cpu else 4),
                # A program for one token (a lone decode stream): its attention projections skip 8-row GEMMs.
                single_token_bucket=platform == "gpu" if single_token_bucket is None else single_token_bucket,
            ),
            impl=impl,
            dtype=dtype,
            attention_backend=backend,
            random_seed=random_seed,
            trust_remote_code=trust_remote_code,
            stream_interval=stream_interval,
            quantization=quantization,
        )
        # skip_tokenizer_init (SGLang's flag): token ids in, token ids out, no text.
        self.tokenizer = (
            None if skip_tokenizer_init else Tokenizer(model_path, trust_remote_code, chat_template)
        )
        self.eos_ids = set(model_cfg.eos_token_ids) | (
            self.tokenizer.eos_token_ids if self.tokenizer else set()
        )
        self._read_generation_config_eos(model_path)
        phases.mark("tokenizer_s")

        if fallback:
            self.runner = ModelRunner(self.config, fallback[1], fallback[2])
        else:
            graphdef, state = build_native_model(
                model_cfg,
                model_path,
                dtype,
                backend,
                interpret=envs.attention_interpret(),
                quantization=quantization,
            )
            phases.mark("weights_s")
            self.runner = ModelRunner(self.config, nnx_forward(graphdef), state)
        phases.mark("pool_s")
        self.device = (platform, jax.devices()[0].device_kind)  # where the engine runs: (platform, kind)
        self.allocator = PageAllocator(self.runner.num_pages)
        self.radix = RadixCache(self.allocator, page_size, disabled=disable_radix_cache)
        self.scheduler = Scheduler(
            self.config.scheduler,
            self.allocator,
            self.radix,
            page_size,
            num_state_slots=max_running_requests if model_cfg.state_specs else 0,
        )
        # Loading by phase (seconds): config, the device platform's start, weights on the device, tokenizer (and
        # generation config), KV pool. `startup_breakdown` adds the runner's phases.
        self._load_phases = phases.seconds
        if not skip_warmup:
            # Background compilation (default on GPU/TPU): serve once the programs that fit any step are
            # compiled, the faster-fitting rest compile behind it (see ModelRunner.precompile). On the CPU the
            # compile threads would compete with the engine loop for the cores.
            if background_compile is None:
                background_compile = not on_cpu
            self.runner.precompile(background=background_compile)

        self.overlap_schedule = not disable_overlap_schedule
        self._rng = np.random.default_rng(random_seed)
        self._inbox: list[tuple[str, Any]] = []
        self._cv = threading.Condition()
        self.runner.on_compiled = self._wake  # the loop runs each background-compiled program once when idle
        self._stopping = False
        self._dead: BaseException | None = None
        # llguidance's view of the tokenizer (it reads the vocabulary on the first constrained request).
        self._grammar_tok = (
            GrammarTokenizer(self.tokenizer.hf, self.config.model.vocab_size, sorted(self.eos_ids))
            if self.tokenizer is not None
            else None
        )
        # Called on the loop's thread after every pass that may have handed outputs to sinks (and after the
        # last); the engine process sends the pass's OutputDelta records in one message from here.
        self.on_loop_end: Callable[[], None] | None = None
        self.stats = {
            "num_generated_tokens": 0,
            "num_prompt_tokens": 0,
            "num_cached_tokens": 0,
            "num_steps": 0,
            # Host time of the engine loop, by phase (seconds, cumulative): scheduling, building and
            # dispatching the step, waiting for its outputs, and handling them. Waiting is the device's
            # share; the rest is host work that overlap scheduling hides behind the device.
            "host_schedule_s": 0.0,
            "host_dispatch_s": 0.0,
            "host_wait_s": 0.0,
            "host_process_s": 0.0,
        }
        self.output = OutputProcessor(
            self.tokenizer, self.context_length, self.stats, stream_interval=stream_interval
        )
        self._thread = threading.Thread(target=self._loop, name="jaxrt-engine", daemon=True)
        self._thread.start()
        self.startup_seconds = time.perf_counter() - t0
        logger.info(
            "engine ready in %.1f s (%s)",
            self.startup_seconds,
            ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in self.startup_breakdown.items()),
        )

    def _read_generation_config_eos(self, model_path: str) -> None:
        try:
            from transformers import GenerationConfig

            gc = GenerationConfig.from_pretrained(model_path)
        except Exception:
            return
        eos = gc.eos_token_id
        if eos is not None:
            self.eos_ids |= {eos} if isinstance(eos, int) else set(eos)

    # ===================================================================================== public API

    @property
    def startup_breakdown(self) -> dict[str, float]:
        """Start-up seconds by phase: loading (``_load_phases``), then the runner's tracing, compiling, first
        runs and, once background compiles end, ``background_s``."""
        return {**self._load_phases, **self.runner.startup_breakdown}

    def abort(self, request_id: str) -> None:
        """Abort a request: it finishes with ``finish_reason.type == "abort"`` and frees all it holds."""
        self._post("abort", request_id)

    def flush_cache(self) -> bool:
        """Drop all cached prefixes. Returns False (and does nothing) while requests are running."""
        done = threading.Event()
        result: list[bool] = []
        self._post("flush", (done, result))
        done.wait(timeout=60)
        return bool(result and result[0])

    def get_server_info(self) -> dict[str, Any]:
        c = self.config
        return {
            **self.get_model_info(),
            "page_size": c.cache.page_size,
            "num_pages": self.runner.num_pages,
            "max_running_requests": c.scheduler.max_running_requests,
            "chunked_prefill_size": c.scheduler.chunked_prefill_size,
            "num_continuous_decode_steps": c.scheduler.num_continuous_decode_steps,
            "single_token_bucket": c.scheduler.single_token_bucket,
            "stream_interval": c.stream_interval,
            "disable_radix_cache": c.cache.disable_radix_cache,
            "attention_backend": c.attention_backend,
            "quantization": c.quantization,
            "token_buckets": self.runner.token_buckets,
            "startup_seconds": self.startup_seconds,
            "startup_breakdown": self.startup_breakdown,
            "compiling": self.runner.compiling,
        }

    def load_stats(self) -> dict[str, Any]:
        """A consistent-enough snapshot for metrics (read without stopping the loop)."""
        used = self.allocator.num_used
        return {
            "num_running_reqs": len(self.scheduler.running),
            "num_queue_reqs": len(self.scheduler.waiting),
            "num_used_pages": used,
            "token_usage": used / max(1, self.allocator.num_usable),
            "num_cached_pages": self.radix.num_cached_pages,
            "num_preemptions": self.scheduler.num_preemptions,
            **self.stats,
        }

    def wait_compiled(self, timeout: float | None = None) -> bool:
        """Wait until the programs compiling in the background (``background_compile``) are ready; True when
        none is left. Benchmarks call it before timing."""
        done = self.runner.wait_compiled(timeout)
        # Load their device code now, on the engine thread, not in a timed step (a dead loop is not waited for).
        if done and self._thread.is_alive():
            warmed = threading.Event()
            self._post("warm", warmed)
            while not warmed.wait(0.5) and self._thread.is_alive():
                pass
        return done

    def shutdown(self) -> None:
        """Stop the loop; requests still in flight finish with an abort. Then the device memory of the KV
        pool and the weights is freed, so another engine can start in the same process."""
        self.runner.close()
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join(timeout=60)
        if not self._thread.is_alive():  # no step in flight or to come: the buffers can go
            self.runner.release()

    # ===================================================================================== intake

    @property
    def _num_usable_pages(self) -> int:
        return self.allocator.num_usable

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise RuntimeError("the engine loop died") from self._dead
        if not self._thread.is_alive():
            raise RuntimeError("the engine is shut down")

    def _submit_many(
        self,
        items: list[tuple[dict[str, Any], Sink]],
        stream: bool,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> list[str]:
        """Hand a batch of prepared requests to the loop together: the scheduler sees the whole batch at once.

        A spec may carry ``rid`` (its request id; default a fresh one) and ``deltas`` (its sink takes
        `jaxrt.output.OutputDelta` records, no text: the engine-process protocol)."""
        if loop is not None:  # sinks run on the loop's thread; the engine calls them from its own
            items = [(spec, functools.partial(loop.call_soon_threadsafe, sink)) for spec, sink in items]
        tracks = [self._track(spec, sink, stream) for spec, sink in items]
        with self._cv:
            self._inbox.extend(("add", track) for track in tracks)
            self._cv.notify_all()
        return [track.request.request_id for track in tracks]

    def _track(self, spec: dict[str, Any], sink: Sink, stream: bool) -> Track:
        if self._dead is not None:
            raise RuntimeError("the engine loop died") from self._dead
        if self._stopping:
            raise RuntimeError("the engine is shutting down")
        sp: SamplingParams = spec["sp"]
        sp = dataclasses.replace(sp, max_new_tokens=spec["max_new"])
        rid = spec.get("rid") or uuid.uuid4().hex
        req = Request(
            request_id=rid,
            prompt_token_ids=list(map(int, spec["ids"])),
            sampling_params=sp,
            seed=spec["seed"],
        )
        if spec.get("grammar") is not None:
            req.grammar = self._grammar_tok.matcher(spec["grammar"])
        stop_ids = list(sp.stop_token_ids) + ([] if sp.ignore_eos else sorted(self.eos_ids))
        deltas = bool(spec.get("deltas"))
        # With deltas the text is made on the other side; here only stop strings need it.
        detok = self.tokenizer is not None and (bool(sp.stop) or not deltas)
        track = Track(
            request=req,
            sink=sink,
            stream=stream,
            detok=IncrementalDetokenizer(self.tokenizer, sp.skip_special_tokens) if detok else None,
            deltas=deltas,
            stop_ids=stop_ids,
            eos_ids=set() if sp.ignore_eos else self.eos_ids,
            return_logprob=sp.return_logprob or sp.top_logprobs_num > 0,
            top_logprobs_num=sp.top_logprobs_num,
        )
        return track

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    def _post(self, kind: str, payload: Any) -> None:
        with self._cv:
            self._inbox.append((kind, payload))
            self._cv.notify_all()

    # ===================================================================================== the loop

    def _loop(self) -> None:
        """Overlap schedule: step N+1 is built and dispatched before step N's tokens are read back.

        Decode inputs that step N sampled reach step N+1 on the device (``prev_tokens``), so the host work
        of one step (scheduling, batch layout, stop checks, detokenization) hides behind the device work of
        the next. Batches with penalties need the real token history, so they run synchronously.
        """
        inflight: tuple[SchedulerOutput, Any] | None = None
        try:
            while True:
                with self._cv:
                    while (
                        not self._inbox
                        and not self.scheduler.has_work
                        and inflight is None
                        and not self._stopping
                        and not self.runner.has_unwarmed
                    ):
                        self._cv.wait()  # a finished background compile wakes it too (_wake)
                    inbox, self._inbox = self._inbox, []
                    stopping = self._stopping
                for kind, payload in inbox:
                    self._apply(kind, payload)
                if inflight is None and not self.scheduler.has_work and self.runner.has_unwarmed:
                    self.runner.warm_pending()  # idle: load background-compiled programs' device code
                if stopping:
                    if inflight is not None:
                        self._process(*inflight)
                    for rid in list(self.output.tracks):
                        self._abort(rid, "the engine is shutting down")
                    self._loop_end()
                    return
                if inflight is not None and not self._can_overlap():
                    self._process(*inflight)
                    inflight = None
                launched = self._launch(inflight)
                if inflight is not None:
                    self._process(*inflight)
                inflight = launched
                self._loop_end()
                if launched is None and self.scheduler.has_work:
                    time.sleep(0.0005)  # nothing runnable until results arrive or requests finish
        except BaseException as e:  # noqa: BLE001 - reported to every waiter
            logger.exception("engine loop died")
            self._dead = e
            for track in list(self.output.tracks.values()):
                track.sink(RuntimeError(f"engine loop died: {e}"))
            self._loop_end()

    def _loop_end(self) -> None:
        if self.on_loop_end is not None:
            self.on_loop_end()

    def _can_overlap(self) -> bool:
        if not self.overlap_schedule:
            return False
        s = self.scheduler
        # Penalties and grammars read the tokens sampled by the step before; a logit bias alone is fixed.
        return not any(r.sampling_params.uses_penalties or r.grammar for r in (*s.running, *s.waiting))

    def _apply(self, kind: str, payload: Any) -> None:
        if kind == "add":
            track: Track = payload
            self.output.tracks[track.request.request_id] = track
            try:
                self.scheduler.add_request(track.request)
            except ValueError as e:
                self.output.tracks.pop(track.request.request_id)
                track.sink(e)
        elif kind == "abort":
            self._abort(payload, "aborted by the client")
        elif kind == "warm":
            self.runner.warm_pending()
            payload.set()
        elif kind == "flush":
            done, result = payload
            result.append(self.scheduler.flush_cache())
            done.set()

    def _abort(self, rid: str, message: str) -> None:
        track = self.output.tracks.get(rid)
        if track is None:
            return
        req = self.scheduler.abort(rid)
        if req is not None:
            req.finish_reason = FinishReason("abort", message=message)
        self.output.emit(track, final=True)

    def _launch(self, prev: tuple[SchedulerOutput, Any] | None) -> tuple[SchedulerOutput, Any] | None:
        """Schedule and dispatch one step (not waiting for it). Returns (schedule, device outputs) or None."""
        t0 = time.perf_counter()
        sched: SchedulerOutput = self.scheduler.schedule()
        num_steps = self.config.scheduler.num_continuous_decode_steps
        if num_steps > 1 and not self.runner.decode_loop_ready(sched.num_tokens):
            num_steps = 1  # its decode loop is still compiling in the background
        self.scheduler.extend_decode(sched, num_steps, _continuous_ok)
        t1 = time.perf_counter()
        self.stats["host_schedule_s"] += t1 - t0
        if sched.is_empty:
            return None
        # Stop ids are only laid out for rows still under min_new_tokens (the batch suppresses them there).
        stop_ids = {
            s.request.request_id: self.output.tracks[s.request.request_id].stop_ids
            for s in sched.scheduled
            if s.request.num_outputs < s.request.sampling_params.min_new_tokens
        }
        try:
            dev = self.runner.dispatch(sched, stop_ids, prev[1] if prev is not None else None)
        except Exception as e:
            # A real fault in the step: fail the requests in it, keep serving the rest.
            logger.exception("step failed; aborting its %d requests", len(sched.scheduled))
            for s in sched.scheduled:
                self._abort(s.request.request_id, f"internal error: {e}")
            return None
        self.scheduler.commit(sched)
        for i, s in enumerate(sched.scheduled):
            if s.sample:
                s.request.pending_rows.extend([i] * s.num_steps)
        self.stats["host_dispatch_s"] += time.perf_counter() - t1
        return sched, dev

    def _process(self, sched: SchedulerOutput, dev: Any) -> None:
        """Read a step's tokens back; append them, check stop conditions, stream or finish."""
        t0 = time.perf_counter()
        try:
            out = self.runner.fetch(dev, len(sched.scheduled))
        except Exception as e:
            logger.exception("step failed; aborting its %d requests", len(sched.scheduled))
            for s in sched.scheduled:
                self._abort(s.request.request_id, f"internal error: {e}")
            return
        self.stats["num_steps"] += 1
        now = time.perf_counter()
        self.stats["host_wait_s"] += now - t0
        self.output.process(sched, out, now, self.scheduler.finish)
        self.stats["host_process_s"] += time.perf_counter() - now


class _Phases:
    """Seconds between successive marks, by name (the start-up breakdown)."""

    def __init__(self, t0: float) -> None:
        self.last = t0
        self.seconds: dict[str, float] = {}

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = now - self.last
        self.last = now


def _continuous_ok(req: Request) -> bool:
    """Whether ``req`` may take several decode steps per dispatch: its sampling needs nothing from the host
    between tokens (no penalties over the token history or logit bias, no stop-id suppression, no top
    log-probs)."""
    sp = req.sampling_params
    return (
        not sp.uses_history
        and req.grammar is None
        and req.num_outputs >= sp.min_new_tokens
        and sp.top_logprobs_num == 0
    )


class _AsyncStream:
    """Async iterator of a streamed request's chunks; awaiting it returns itself (SGLang's idiom)."""

    def __init__(self, engine: EngineAPI, spec: dict[str, Any]) -> None:
        self._engine = engine
        self._spec = spec
        self._queue: asyncio.Queue | None = None
        self._rid: str | None = None
        self._done = False

    def __await__(self):
        async def _self():
            return self

        return _self().__await__()

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self

    def _start(self) -> None:
        loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        q = self._queue
        self._rid = self._engine._submit(self._spec, q.put_nowait, True, loop)

    @property
    def request_id(self) -> str | None:
        return self._rid

    async def __anext__(self) -> dict[str, Any]:
        if self._done:
            raise StopAsyncIteration
        if self._queue is None:
            self._start()
        assert self._queue is not None
        try:
            item = await self._queue.get()
        except asyncio.CancelledError:
            self.aclose_sync()
            raise
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if item["meta_info"]["finish_reason"] is not None:
            self._done = True
        return item

    def aclose_sync(self) -> None:
        if self._rid is not None and not self._done:
            self._engine.abort(self._rid)
        self._done = True

    async def aclose(self) -> None:
        self.aclose_sync()
