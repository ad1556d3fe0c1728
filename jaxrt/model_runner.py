"""Owns the device side: parameters, the paged KV pool, the compiled step per shape bucket."""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxrt import envs
from jaxrt.batch import (
    DecodeLoopOutput,
    ForwardBatch,
    PackedLayout,
    SampleMode,
    SamplingBatch,
    StepOutput,
    build_batch,
    history_buckets,
    page_table_delta,
    pick_bucket,
    token_buckets,
)
from jaxrt.config import EngineConfig, ModelConfig
from jaxrt.kernels import cudnn_prefill, resolve_backend
from jaxrt.models.layers import KVCache, is_sliding_layer
from jaxrt.page_table import NULL_PAGE
from jaxrt.sampling_params import MAX_LOGIT_BIAS
from jaxrt.scheduler import SchedulerOutput, cdiv
from jaxrt.step import (
    ForwardFn,
    make_decode_loop,
    make_forward_step,
    make_packed_programs,
    make_sample_step,
)

logger = logging.getLogger(__name__)

_START_MODES = (SampleMode(), SampleMode(sampling=True))  # the sampler variants start-up compiles

CPU_KV_POOL_BYTES = 1 << 30  # default KV pool on CPU, where memory stats are unavailable
POOL_GRANULE_BYTES = 256 << 20  # accelerator KV pool budgets are rounded down to this


def enable_compilation_cache() -> None:
    if not envs.compilation_cache_enabled() or jax.config.jax_compilation_cache_dir:
        return
    path = envs.cache_dir() / "xla"
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def kv_bytes_per_page(cfg: EngineConfig) -> int:
    m = cfg.model
    itemsize = jnp.dtype(cfg.cache.kv_dtype or cfg.dtype).itemsize
    return 2 * m.num_layers * cfg.cache.page_size * m.num_kv_heads * m.head_dim * itemsize


def state_bytes(cfg: EngineConfig) -> int:
    """Device bytes of the recurrent-state slots (models with ``state_specs``): ``max_running_requests + 1``
    slots of every spec."""
    per_slot = sum(int(np.prod(s.shape)) * jnp.dtype(s.dtype).itemsize for s in cfg.model.state_specs)
    return (cfg.scheduler.max_running_requests + 1) * per_slot if per_slot else 0


def plan_num_pages(cfg: EngineConfig, device: jax.Device) -> int:
    """KV pool size: explicit ``num_pages``, else ``mem_fraction_static`` of device memory minus what is in use."""
    if cfg.cache.num_pages is not None:
        return cfg.cache.num_pages
    per_page = kv_bytes_per_page(cfg)
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        budget = int(stats["bytes_limit"] * cfg.cache.mem_fraction_static) - int(stats.get("bytes_in_use", 0))
        # The pool's shape is an input of every compiled program: a page count that moves with small
        # differences in memory in use between runs is a persistent-cache miss for all of them. Round down.
        budget -= budget % POOL_GRANULE_BYTES
    else:
        pages_per_seq = cdiv(cfg.scheduler.context_length, cfg.cache.page_size)
        want = cfg.scheduler.max_running_requests * pages_per_seq + 1
        budget = min(want * per_page, CPU_KV_POOL_BYTES)
    if stats and "bytes_limit" in stats and cfg.model.state_specs:
        budget -= state_bytes(cfg)  # the recurrent-state slots come out of the same budget
        if budget < 0:
            raise ValueError(
                f"recurrent state for {cfg.scheduler.max_running_requests} running requests needs "
                f"{state_bytes(cfg) / 2**30:.1f} GiB, more than mem_fraction_static leaves; lower "
                "max_running_requests"
            )
    if per_page == 0:  # no attention layers (state-only model): pages only count tokens
        return (
            cdiv(cfg.scheduler.context_length, cfg.cache.page_size) * cfg.scheduler.max_running_requests + 1
        )
    num_pages = budget // per_page
    min_pages = cdiv(cfg.scheduler.context_length, cfg.cache.page_size) + 1
    if num_pages < min_pages:
        raise ValueError(
            f"KV pool of {num_pages} pages cannot hold one request of context_length "
            f"{cfg.scheduler.context_length}; raise mem_fraction_static or lower context_length"
        )
    return int(num_pages)


# Entries per page-table update: one compiled shape; a step that gains more pages (a burst of admissions with
# long cached prefixes) writes them in several updates. A decode step of 256 requests gains at most 512.
_DELTA = 4096


def _set_pages(table: jax.Array, rows: jax.Array, cols: jax.Array, pages: jax.Array) -> jax.Array:
    return table.at[rows, cols].set(pages, mode="drop")


# One jitted identity for every call below: jit's cache then compiles it once per distinct shape, not per call.
_identity = jax.jit(lambda t: t, donate_argnums=0)


def _like_step_output(tree: Any, device: jax.Device) -> Any:
    """Commit ``tree`` to ``device`` and pass it through a (donating) identity jit, so its arrays are placed
    exactly as a jitted step's outputs are. The programs are lowered for (and first run with) such arrays where
    serving passes the previous step's outputs (KV pool, ``prev_tokens``, logits); an array that only went
    through ``device_put`` can carry a sharding that compares unequal on some platforms (seen on the GPU).
    """
    return _identity(jax.device_put(tree, device))


class StagedStep(NamedTuple):
    """A single step's host data packed and on its way to the device (:meth:`ModelRunner.stage`)."""

    forward_key: tuple
    sample_key: tuple
    forward_buf: jax.Array  # [layout size] int32: (ForwardBatch, page-table delta)
    sample_buf: jax.Array  # [layout size] int32: SamplingBatch


def has_cudnn_layers(m: ModelConfig) -> bool:
    """Whether any attention layer of the model may take cuDNN's prefill path (``cudnn_prefill.supports``: no
    logit soft-cap, no sliding window). Where none can (Gemma 2 soft-caps every layer; a window on every layer),
    the fresh-prompt and prefixed programs would trace the same as the normal ones, so none are made."""
    if m.attn_logit_softcap is not None:
        return False
    return any(not is_sliding_layer(m, i) for i in range(m.num_layers))


class ModelRunner:
    def __init__(self, cfg: EngineConfig, forward: ForwardFn, params: Any) -> None:
        """``forward`` is the model as a pure function (see `jaxrt.step`); ``params`` its weights pytree."""
        self.cfg = cfg
        self.device = jax.devices()[0]
        # Everything the step takes is committed to one device, so every call (warm-up included) presents
        # the same argument placement to jit's cache: a placement change is a silent recompile.
        self.state = jax.device_put(params, self.device)
        self.page_size = cfg.cache.page_size
        self.num_pages = plan_num_pages(cfg, self.device)
        self.pages_per_seq = cdiv(cfg.scheduler.context_length, self.page_size)
        m = cfg.model
        kv_dtype = jnp.dtype(cfg.cache.kv_dtype or cfg.dtype)
        shape = (self.num_pages, self.page_size, m.num_kv_heads, m.head_dim)
        # Recurrent state (models with state_specs): one slot per running request plus a scratch slot that
        # padding sequences read and write; the scheduler hands out slots 0..max_running_requests-1.
        self.num_state_slots = cfg.scheduler.max_running_requests + 1 if m.state_specs else 0
        # The donated cache pytree: one (k_pages, v_pages) per attention layer, then one
        # [num_state_slots, *spec.shape] array per state spec (docs/contracts.md, "Recurrent state").
        self.kv_caches: list[KVCache | jax.Array] = _like_step_output(
            [(jnp.zeros(shape, kv_dtype), jnp.zeros(shape, kv_dtype)) for _ in range(m.num_layers)]
            + [jnp.zeros((self.num_state_slots, *s.shape), s.dtype) for s in m.state_specs],
            self.device,
        )
        self.token_buckets = token_buckets(
            cfg.scheduler.chunked_prefill_size, single=cfg.scheduler.single_token_bucket
        )
        # Penalties read up to a context's tokens, besides up to MAX_LOGIT_BIAS bias entries.
        self.history_buckets = history_buckets(cfg.scheduler.context_length + MAX_LOGIT_BIAS)
        # Fresh-prompt programs (kernels.cudnn_prefill; JAXRT_CUDNN_PREFILL): on pallas_gpu with cuDNN (XLA's
        # attention in the interpreter), half-precision models, the token buckets of >= MIN_TOKENS.
        interpret = envs.attention_interpret()
        fresh_ok = (
            envs.cudnn_prefill()
            and resolve_backend(cfg.attention_backend) == "pallas_gpu"
            and cudnn_prefill.available(interpret, cfg.dtype, kv_dtype)
            and has_cudnn_layers(m)
        )
        self.fresh_impl = ("xla" if interpret else "cudnn") if fresh_ok else None
        self.fresh_buckets = (
            [n for n in self.token_buckets if n >= cudnn_prefill.MIN_TOKENS] if self.fresh_impl else []
        )
        # The same for prompts behind a cached prefix (later chunks of long prompts, radix-cache hits): programs
        # per packed prefix buffer size on a few buckets (cudnn_prefill.bucket_capacities).
        self.bucket_capacities = cudnn_prefill.bucket_capacities(
            self.fresh_buckets, cfg.scheduler.context_length
        )
        # One jitted model function inside every program: its trace for a token bucket is made once and
        # serves the single step and both decode-loop variants of that bucket (jit caches it by argument types).
        forward = jax.jit(forward)
        self.num_decode_steps = cfg.scheduler.num_continuous_decode_steps
        self._forward, self._sample, self._decode_loop = make_packed_programs(
            make_forward_step(forward),
            make_sample_step(cfg.scheduler.max_running_requests),
            make_decode_loop(
                forward, cfg.scheduler.max_running_requests, self.num_decode_steps, self.page_size
            )
            if self.num_decode_steps > 1
            else None,
        )
        self._layouts: dict[tuple, PackedLayout] = {}
        self._no_prev = _like_step_output(
            jnp.zeros((cfg.scheduler.max_running_requests,), jnp.int32), self.device
        )
        # The page table on the device: row r holds the page ids of the running request that owns row r
        # (Request.page_row); the last row is all NULL_PAGE, for padding sequences. Each step carries only the
        # pages its requests gained since (page_table_delta), never a [num_seqs, pages_per_seq] table, and
        # writes them itself (donated in, returned updated); a delta past the step's capacity goes first
        # through a separate update (_write_pages).
        self.pad_row = cfg.scheduler.max_running_requests
        self.page_table = _like_step_output(
            jnp.full((self.pad_row + 1, self.pages_per_seq), NULL_PAGE, jnp.int32), self.device
        )
        self._set_pages = jax.jit(_set_pages, donate_argnums=0)
        # Shapes and placements of the params, the pool, prev_tokens and the page table, for lowering: programs
        # are lowered from these, never from the live arrays (a background lowering must not read a pool that a
        # step is donating at the same moment).
        self._abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
            (self.state, self.kv_caches, self._no_prev, self.page_table),
        )
        self._programs: dict[tuple, jax.stages.Compiled] = {}
        self._ready = False  # set after start-up: later compiles are logged
        # Background compilation (precompile(background=True)): the programs start-up left for later.
        self._background: threading.Thread | None = None
        self._closing = False
        self._unwarmed: list[tuple] = []  # compiled in the background, not run yet (see warm_pending)
        # Called (from a compile thread) each time a background program becomes ready.
        self.on_compiled: Callable[[], None] | None = None
        self.startup_breakdown: dict[str, float] = {}
        logger.info(
            "KV pool: %d pages x %d tokens (%.1f MiB)",
            self.num_pages,
            self.page_size,
            self.num_pages * kv_bytes_per_page(cfg) / 2**20,
        )
        if m.state_specs:
            logger.info(
                "recurrent state: %d arrays x %d slots (%.1f MiB)",
                len(m.state_specs),
                self.num_state_slots,
                state_bytes(cfg) / 2**20,
            )

    def num_seqs_for(self, num_tokens: int) -> int:
        return min(num_tokens, self.cfg.scheduler.max_running_requests)

    def _batch(
        self,
        sched: SchedulerOutput,
        num_tokens: int,
        history_len: int,
        stop_ids: dict[str, list[int]],
        constrained: bool = False,
    ) -> tuple[ForwardBatch, SamplingBatch, SampleMode]:
        return build_batch(
            sched,
            num_tokens=num_tokens,
            num_seqs=self.num_seqs_for(num_tokens),
            pages_per_seq=None,  # the steps read pages from the device page table
            page_size=self.page_size,
            vocab_size=self.cfg.model.vocab_size,
            history_len=history_len,
            stop_ids=stop_ids,
            pad_row=self.pad_row,
            constrained=constrained,
        )

    def delta_capacity(self, key: tuple) -> int:
        """Page-table entries program ``key`` writes itself: what its tokens can gain in pages (plus one page
        boundary per sequence), capped at ``_DELTA``. Requests admitted with a long cached prefix can gain
        more at once: those go first through :meth:`_write_pages`."""
        kind, n = key[0], key[1]
        tokens = n * (self.num_decode_steps if kind == "decode_loop" else 1)
        return min(_DELTA, cdiv(tokens, self.page_size) + 2 * self.num_seqs_for(n))

    def take_delta(self, sched: SchedulerOutput, capacity: int) -> np.ndarray:
        """The pages the scheduled requests gained since their last step (marked as held: once per dispatched
        step), as ``[3, capacity]`` int32 (rows, cols, page ids) for the step to write; out-of-range rows pad
        it (dropped). Entries past ``capacity`` are written now (asynchronous scatters ordered before the
        step)."""
        rows, cols, pages = page_table_delta(sched)
        for lo in range(capacity, rows.size, _DELTA):
            self._write_pages(rows[lo : lo + _DELTA], cols[lo : lo + _DELTA], pages[lo : lo + _DELTA])
        delta = np.zeros((3, capacity), np.int32)
        delta[0] = self.pad_row + 1  # out of range: dropped
        n = min(capacity, rows.size)
        delta[0, :n], delta[1, :n], delta[2, :n] = rows[:n], cols[:n], pages[:n]
        return delta

    def _write_pages(self, rows: np.ndarray, cols: np.ndarray, pages: np.ndarray) -> None:
        """One page-table update of ``_DELTA`` entries (one compiled shape); the unused tail is dropped."""
        pad = _DELTA - rows.size
        rows = np.pad(rows, (0, pad), constant_values=self.pad_row + 1)  # out of range: dropped
        cols, pages = np.pad(cols, (0, pad)), np.pad(pages, (0, pad))
        self.page_table = self._set_pages(self.page_table, rows, cols, pages)

    # ------------------------------------------------------------------------------------------ programs
    # Every program the engine runs is traced and lowered once, compiled once (from the persistent cache when
    # it holds it), and its executable called directly: `jax.stages.Compiled` takes jit's C++ dispatch path,
    # nothing is traced a second time to find a cached executable, and an argument whose shape or placement
    # drifted is an error instead of a silent recompile. Host data reaches each as one packed buffer (one
    # host-to-device copy per program call; see PackedLayout). Keys:
    #   ("forward", num_tokens)                      the model on a token bucket
    #   ("forward", num_tokens, "fresh")             the same for a batch of fresh prompts (cudnn_prefill)
    #   ("forward", num_tokens, "prefixed", capacity) for a few prompts behind cached prefixes (cudnn_prefill)
    #   either of those + ("decodes",)               the same with decodes before the prompts (split_attention)
    #   ("forward", num_tokens, "logprobs")          also the prompt log-probabilities of every row (on first use)
    #   ("sample", num_seqs, history_len, SampleMode) the sampler variant
    #   ("decode_loop", num_tokens, SampleMode)       num_decode_steps decode steps in one program

    def _host_data(
        self,
        kind: str,
        n: int,
        history_len: int,
        constrained: bool,
        sched: SchedulerOutput,
        stop_ids: dict[str, list[int]],
    ) -> tuple[Any, SampleMode]:
        """What a ``kind`` program on token bucket ``n`` takes from the host for ``sched``, as the tree its
        :class:`PackedLayout` packs, and the sampler variant the batch needs. The model programs' trees carry the
        page-table delta, which this marks as held (see :meth:`take_delta`): once per dispatched step."""
        fb, sb, mode = self._batch(sched, n, history_len, stop_ids, constrained)
        if kind == "sample":
            return sb, mode
        delta = self.take_delta(sched, self.delta_capacity((kind, n)))
        if kind == "forward":
            return (fb, delta), mode
        steps = np.zeros(self.num_seqs_for(n), np.int32)
        steps[: len(sched.scheduled)] = [s.num_steps for s in sched.scheduled]
        return (fb, sb, steps, delta), mode

    @staticmethod
    def _bucket(key: tuple) -> tuple[str, int, int, bool]:
        """(kind, token bucket, history length, constrained) of program ``key``."""
        if key[0] == "sample":
            return key[0], key[1], key[2], key[3].constrained
        return key[0], key[1], 1, False

    def layout(self, key: tuple) -> PackedLayout:
        """How program ``key``'s host data is packed (from its empty batch: the bucket fixes every shape)."""
        layout = self._layouts.get(key)
        if layout is None:
            layout = self._layouts[key] = PackedLayout.of(self._empty_tree(key))
        return layout

    def _empty_tree(self, key: tuple) -> Any:
        """Program ``key``'s host data for an empty batch."""
        tree = self._host_data(*self._bucket(key), SchedulerOutput(), {})[0]
        if key[-1] == "logprobs":
            fb, delta = tree
            tree = (dataclasses.replace(fb, targets=np.full(key[1], -1, np.int32)), delta)
        return tree

    def _example_args(self, key: tuple, abstract: bool = False) -> tuple:
        """The dynamic arguments of program ``key`` for an empty batch (no sequence: nothing is read or written).
        ``abstract``: params, pool, prev_tokens, page table and the sampler's logits as shapes only (lowering)."""
        kind, n = key[0], key[1]
        layout = self.layout(key)
        buf = layout.pack(self._empty_tree(key))
        if not abstract:
            buf = jax.device_put(buf, self.device)
        state, kv_caches, no_prev, table = (
            self._abstract if abstract else (self.state, self.kv_caches, self._no_prev, self.page_table)
        )
        if kind == "sample":
            shape, dtype = (n, self.cfg.model.vocab_size), self.logits_dtype
            placed = jax.sharding.SingleDeviceSharding(self.device)
            logits = (
                jax.ShapeDtypeStruct(shape, dtype, sharding=placed)
                if abstract
                else _like_step_output(jnp.zeros(shape, dtype), self.device)
            )
            return logits, buf
        return state, kv_caches, buf, no_prev, table

    @functools.cached_property
    def logits_dtype(self) -> jnp.dtype:
        """The model's logits dtype (its compute dtype, or f32 where it scales or soft-caps them): what the
        sampler programs take. From the largest bucket's trace, which its lowering reuses."""
        key = ("forward", self.token_buckets[-1])
        args = self._example_args(key, abstract=True)
        return jnp.dtype(self._forward.eval_shape(*args, layout=self.layout(key))[0].dtype)

    def _lower(self, key: tuple) -> jax.stages.Lowered:
        args = self._example_args(key, abstract=True)
        if key[0] == "forward":
            fresh = self.fresh_impl if key[2:3] in (("fresh",), ("prefixed",)) else None
            capacity = key[3] if key[2:3] == ("prefixed",) else 0
            decodes = key[-1] == "decodes"
            return self._forward.lower(
                *args, layout=self.layout(key), fresh=fresh, prefix_capacity=capacity, decodes=decodes
            )
        fn = self._sample if key[0] == "sample" else self._decode_loop
        assert fn is not None, key
        return fn.lower(*args, layout=self.layout(key), mode=key[-1])

    def _compile(self, lowered: jax.stages.Lowered, key: tuple) -> jax.stages.Compiled:
        """XLA-compile the program ``key``. On GPU the matrix products go to cuBLAS, not XLA's Triton GEMM
        fusions (``JAXRT_TRITON_GEMM``): measured faster on the whole step (cuBLAS takes the residual adds
        into its epilogue) although some lone GEMMs are slower. Except in an fp8 model's programs whose
        products are weight-only GEMMs (``quantization.fp8_linear``): there a Triton fusion converts the fp8
        weights inside the GEMM, which cuBLAS cannot."""
        options = {}
        if self.device.platform == "gpu" and not (envs.triton_gemm() or self._weight_only_gemms(key)):
            options["xla_gpu_enable_triton_gemm"] = False
        return lowered.compile(compiler_options=options or None)

    def _weight_only_gemms(self, key: tuple) -> bool:
        from jaxrt.models.quantization import MIN_FP8_GEMM_ROWS

        return (
            self.cfg.quantization == "fp8"
            and key[0] in ("forward", "decode_loop")
            and MIN_FP8_GEMM_ROWS <= key[1] <= envs.fp8_weight_only_rows()
        )

    def _warm(self, key: tuple) -> None:
        """Run a compiled program once on an empty batch, so the first request finds its device code loaded."""
        out = self._programs[key](*self._example_args(key))
        if key[0] != "sample":
            out, self.kv_caches, self.page_table = out  # the pool and the page table were donated
        jax.block_until_ready(out)

    def _program(self, key: tuple) -> jax.stages.Compiled:
        """The compiled program for ``key``; lowered and compiled here on first use (variants that start-up
        does not prepare: penalty history buckets, top log-probabilities)."""
        program = self._programs.get(key)
        if program is None:
            t0 = time.perf_counter()
            program = self._programs[key] = self._compile(self._lower(key), key)
            if self._ready:
                logger.info("compiled %s on first use in %.2f s", key, time.perf_counter() - t0)
        return program

    @property
    def num_compiles(self) -> int:
        """Programs compiled so far (each key once: an executable is never compiled again)."""
        return len(self._programs)

    @property
    def decode_buckets(self) -> list[int]:
        """Token buckets an all-decode batch can land in (continuous decode programs exist for these)."""
        top = pick_bucket(self.token_buckets, self.cfg.scheduler.max_running_requests)
        return [n for n in self.token_buckets if n <= top]

    def startup_keys(self) -> list[tuple]:
        """What start-up compiles: the model on every token bucket, the greedy and sampling samplers for
        their row counts, and (continuous decode) the decode loop on every decode bucket for both."""
        keys: list[tuple] = [("forward", n) for n in self.token_buckets]
        keys += [
            ("sample", s, 1, m)
            for s in sorted({self.num_seqs_for(n) for n in self.token_buckets})
            for m in _START_MODES
        ]
        if self._decode_loop is not None:
            keys += [("decode_loop", n, m) for n in self.decode_buckets for m in _START_MODES]
        cudnn = [("forward", n, "fresh") for n in self.fresh_buckets]
        cudnn += [("forward", n, "prefixed", c) for n, caps in self.bucket_capacities.items() for c in caps]
        # The variants with decodes before the prompts: only where a decode fits beside the least prompt work
        # cuDNN takes (MIN_WORK needs MIN_TOKENS prompt tokens), so not on the MIN_TOKENS bucket itself.
        return keys + cudnn + [(*k, "decodes") for k in cudnn if k[1] > cudnn_prefill.MIN_TOKENS]

    def first_keys(self) -> list[tuple]:
        """The programs that can run any step on their own: the model on the largest token bucket and on the
        largest decode bucket, and the greedy and sampling samplers for their rows. Any batch fits them
        (padded to the bucket); the other start-up programs are faster fits. Background compilation starts
        with these."""
        top, top_decode = self.token_buckets[-1], self.decode_buckets[-1]
        keys = [("forward", top), ("forward", top_decode)]
        keys += [
            ("sample", s, 1, m)
            for s in sorted({self.num_seqs_for(top_decode), self.num_seqs_for(top)})
            for m in _START_MODES
        ]
        return list(dict.fromkeys(keys))

    def precompile(self, background: bool = False) -> None:
        """Compile the start-up programs, then run each once on an empty batch (no sequence: nothing is read
        or written) so the first request finds the device code loaded.

        ``background``: compile only :meth:`first_keys` now; the rest compile in a background thread while
        the engine serves (steps use the smallest bucket whose programs are ready, and single decode steps
        until a decode loop is; :meth:`wait_compiled` waits for them). Start-up to the first token is then
        one compile deep instead of all of them.

        Tracing and lowering of the start-up set stay on this thread; XLA's compiles run side by side in
        ``JAXRT_COMPILE_WORKERS`` threads (it compiles without the GIL; a persistent-cache hit is a load).
        """
        keys = [k for k in self.startup_keys() if k not in self._programs]
        later: list[tuple] = []
        if background:
            first = set(self.first_keys())
            later = [k for k in keys if k not in first]
            keys = [k for k in keys if k in first]
            # The decode loops on the largest decode bucket first: they carry decode throughput.
            later.sort(key=lambda k: 0 if k[0] == "decode_loop" and k[1] == self.decode_buckets[-1] else 1)
        workers = max(1, min(envs.compile_workers(self.device.platform), len(keys)))
        bar = tqdm(keys, desc="Compiling step programs", disable=envs.disable_progress_bar(), leave=False)
        t0 = time.perf_counter()
        if workers > 1:
            from concurrent.futures import ThreadPoolExecutor

            # Each program goes to the compile threads as soon as it is lowered: compiles overlap tracing.
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="jaxrt-compile") as pool:
                futures = [pool.submit(self._compile, self._lower(k), k) for k in bar]
                t1 = time.perf_counter()
                compiled = [f.result() for f in futures]
        else:
            lowered = [self._lower(k) for k in bar]
            t1 = time.perf_counter()
            compiled = [self._compile(low, k) for low, k in zip(lowered, keys, strict=True)]
        self._programs.update(zip(keys, compiled, strict=True))
        t2 = time.perf_counter()
        for key in keys:
            self._warm(key)
        empty = np.zeros(0, np.int32)
        self._write_pages(empty, empty, empty)  # compiles and loads the page-table update
        t3 = time.perf_counter()
        self.startup_breakdown.update(trace_s=t1 - t0, compile_s=t2 - t1, warm_s=t3 - t2)
        self._ready = True
        logger.info(
            "%d programs: traced in %.1f s, compiles done %.1f s later (%d threads), first runs %.1f s%s",
            len(keys),
            t1 - t0,
            t2 - t1,
            workers,
            t3 - t2,
            f"; {len(later)} more compile in the background" if later else "",
        )
        if later:
            self._background = threading.Thread(
                target=self._compile_later, args=(later,), name="jaxrt-background-compile", daemon=True
            )
            self._background.start()

    def _compile_later(self, keys: list[tuple]) -> None:
        """Lower ``keys`` one by one on this thread and compile them in worker threads; each program is
        served from the moment its compile ends. Not run here on an empty batch (that would donate the live
        pool from this thread): the engine thread does it when idle (:meth:`warm_pending`), else its first
        step loads the device code."""
        from concurrent.futures import ThreadPoolExecutor

        t0 = time.perf_counter()
        workers = max(1, min(envs.compile_workers(self.device.platform), len(keys)))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="jaxrt-compile") as pool:
            for key in keys:
                if self._closing:
                    break
                try:
                    lowered = self._lower(key)
                except Exception:  # noqa: BLE001 - the step compiles it on first use and reports there
                    logger.exception("background lowering of %s failed", key)
                    continue
                pool.submit(self._compile_one, key, lowered)
        self.startup_breakdown["background_s"] = time.perf_counter() - t0
        logger.info("background compiles done in %.1f s (%d programs)", time.perf_counter() - t0, len(keys))

    def _compile_one(self, key: tuple, lowered: jax.stages.Lowered) -> None:
        if self._closing:
            return
        try:
            program = self._compile(lowered, key)
        except Exception:  # noqa: BLE001 - the step compiles it on first use and reports there
            logger.exception("background compile of %s failed", key)
            return
        if self._programs.setdefault(key, program) is program:
            self._unwarmed.append(key)
            if self.on_compiled is not None:
                self.on_compiled()

    @property
    def compiling(self) -> bool:
        """Background compiles still running (see :meth:`precompile`)."""
        return self._background is not None and self._background.is_alive()

    def wait_compiled(self, timeout: float | None = None) -> bool:
        """Wait for the background compiles; True when none is left."""
        if self._background is not None:
            self._background.join(timeout)
        return not self.compiling

    @property
    def has_unwarmed(self) -> bool:
        return bool(self._unwarmed)

    def warm_pending(self) -> int:
        """Run the programs that background compiles finished once each on an empty batch (loads their
        device code). Only on the thread that runs the steps, between steps: a warm run donates the pool."""
        n = 0
        while self._unwarmed:
            self._warm(self._unwarmed.pop())
            n += 1
        return n

    def close(self) -> None:
        """Stop starting background compiles (one already in XLA finishes on its own daemon thread)."""
        self._closing = True

    def release(self) -> None:
        """Free the device memory the runner holds, once no step can run any more (the engine's loop has
        ended): the KV pool, the page table and the other buffers it donates into its steps are deleted at
        once, the weights and compiled programs are dropped. A new engine in the same process then finds the
        memory free (its pool is sized from what is free), even where this runner's engine object lives on."""
        self.close()
        owned = jax.tree.leaves((self.kv_caches, self.page_table, self._no_prev))
        for leaf in owned:  # the runner's alone: every step takes them donated and hands them back
            if isinstance(leaf, jax.Array) and not leaf.is_deleted():
                leaf.delete()
        self.kv_caches, self.page_table, self._no_prev = [], None, None
        self.state = None  # the weights: freed when nothing else holds them
        self._programs.clear()
        self._unwarmed.clear()

    def _runnable(self, n: int, loop: bool) -> bool:
        """Whether bucket ``n`` has its start-up programs compiled: both decode-loop variants (``loop``), else
        the model and both sampler variants for its rows."""
        if loop:
            return all(("decode_loop", n, m) in self._programs for m in _START_MODES)
        rows = self.num_seqs_for(n)
        return ("forward", n) in self._programs and all(
            ("sample", rows, 1, m) in self._programs for m in _START_MODES
        )

    def pick(self, num_tokens: int, loop: bool = False) -> int:
        """The token bucket of a step: the smallest that fits, or while background compiles run, the
        smallest that fits and whose programs are ready (else the smallest that fits: compiled on use)."""
        exact = pick_bucket(self.token_buckets, num_tokens)
        if not self.compiling:
            return exact
        for n in self.decode_buckets if loop else self.token_buckets:
            if n >= num_tokens and self._runnable(n, loop):
                return n
        return exact

    def decode_loop_ready(self, num_tokens: int) -> bool:
        """Whether a continuous-decode dispatch of ``num_tokens`` rows has a compiled decode loop."""
        return self._decode_loop is not None and (
            not self.compiling
            or any(n >= num_tokens and self._runnable(n, True) for n in self.decode_buckets)
        )

    def prepare(
        self, sched: SchedulerOutput, stop_ids: dict[str, list[int]]
    ) -> tuple[ForwardBatch, SamplingBatch, SampleMode]:
        """Lay out a scheduled step in its bucket (host arrays)."""
        n = self.pick(sched.num_tokens)
        history_len = 1
        need = [s.request for s in sched.scheduled if s.sample and s.request.sampling_params.uses_history]
        if need:
            longest = max(
                (r.num_tokens if r.sampling_params.uses_penalties else 0) + len(r.sampling_params.bias_items)
                for r in need
            )
            # A history of one entry means "none" to the sampler: at least 2. A row longer than the largest
            # bucket keeps its most recent tokens (build_batch).
            history_len = pick_bucket(self.history_buckets, min(max(longest, 2), self.history_buckets[-1]))
        constrained = any(s.sample and s.request.grammar is not None for s in sched.scheduled)
        return self._batch(sched, n, history_len, stop_ids, constrained)

    def stage(
        self, fb: ForwardBatch, sb: SamplingBatch, mode: SampleMode, delta: np.ndarray | None = None
    ) -> StagedStep:
        """Pack a laid-out step (host arrays) and its page-table ``delta`` (:meth:`take_delta`; none if
        None) and start their copies to the device."""
        n = fb.input_ids.shape[0]
        forward_key = self._forward_key(fb, n)
        sample_key = ("sample", self.num_seqs_for(n), sb.history.shape[-1], mode)
        if delta is None:
            delta = self.take_delta(SchedulerOutput(), self.delta_capacity(forward_key))
        bufs = (self.layout(forward_key).pack((fb, delta)), self.layout(sample_key).pack(sb))
        return StagedStep(forward_key, sample_key, *jax.device_put(bufs, self.device))

    def _forward_key(self, fb: ForwardBatch, n: int) -> tuple:
        """The model program for a laid-out batch on bucket ``n``: the one that also computes prompt
        log-probabilities for a batch with ``targets``; a cuDNN one (fresh prompts, or prompts behind cached
        prefixes) where ``cudnn_prefill.choose`` picks it and that program is compiled (or would compile on use
        anyway: no background compiles)."""
        if fb.targets is not None:
            return ("forward", n, "logprobs")
        if n in self.fresh_buckets:
            caps = self.bucket_capacities.get(n, ())
            capacity = cudnn_prefill.choose(fb.kv_lens, fb.cu_q_lens, fb.num_seqs, caps)
            if capacity is not None:
                key = ("forward", n, "fresh") if capacity == 0 else ("forward", n, "prefixed", capacity)
                if cudnn_prefill.leading_decodes(fb.kv_lens, fb.cu_q_lens, fb.num_seqs):
                    key += ("decodes",)
                if key in self._programs or not self.compiling:
                    return key
        return ("forward", n)

    def run_staged(self, staged: StagedStep, prev_tokens: jax.Array | None = None) -> StepOutput:
        """Enqueue the model and the sampler on a staged step (asynchronous: returns device arrays at once).
        Running the same staged step again is allowed (its page-table delta writes the same entries)."""
        prev_tokens = self._no_prev if prev_tokens is None else prev_tokens
        forward, sample = self._program(staged.forward_key), self._program(staged.sample_key)
        logits, self.kv_caches, self.page_table, *prompt = forward(
            self.state, self.kv_caches, staged.forward_buf, prev_tokens, self.page_table
        )
        out = sample(logits, staged.sample_buf)
        return dataclasses.replace(out, prompt=prompt[0]) if prompt else out

    def device_step(
        self, fb: ForwardBatch, sb: SamplingBatch, mode: SampleMode, prev_tokens: jax.Array | None = None
    ) -> StepOutput:
        """Enqueue the model and the sampler on a laid-out batch (asynchronous: returns device arrays at once)."""
        return self.run_staged(self.stage(fb, sb, mode), prev_tokens)

    def dispatch(
        self,
        sched: SchedulerOutput,
        stop_ids: dict[str, list[int]],
        prev: StepOutput | DecodeLoopOutput | None = None,
    ) -> StepOutput | DecodeLoopOutput:
        """Launch one scheduled step without waiting for it; returns device-side outputs.

        ``prev`` is the previous step's (device) output: tokens sampled there and not yet read back are fed
        from it (see ``Request.pending_rows``). A schedule with ``num_steps > 1`` (continuous decode) runs
        the decode loop and returns a :class:`DecodeLoopOutput`.
        """
        prev_tokens = prev.tokens if prev is not None else None
        if sched.num_steps > 1:
            return self._dispatch_loop(sched, stop_ids, prev_tokens)
        fb, sb, mode = self.prepare(sched, stop_ids)
        delta = self.take_delta(sched, self.delta_capacity(("forward", fb.input_ids.shape[0])))
        return self.run_staged(self.stage(fb, sb, mode, delta), prev_tokens)

    def _dispatch_loop(
        self, sched: SchedulerOutput, stop_ids: dict[str, list[int]], prev_tokens: jax.Array | None
    ) -> DecodeLoopOutput:
        assert self._decode_loop is not None and sched.num_steps <= self.num_decode_steps
        n = self.pick(sched.num_tokens, loop=True)
        tree, mode = self._host_data("decode_loop", n, 1, False, sched, stop_ids)
        assert not mode.top_logprobs, "top log-probabilities need single steps"
        key = ("decode_loop", n, mode)
        buf = jax.device_put(self.layout(key).pack(tree), self.device)
        prev_tokens = self._no_prev if prev_tokens is None else prev_tokens
        out, self.kv_caches, self.page_table = self._program(key)(
            self.state, self.kv_caches, buf, prev_tokens, self.page_table
        )
        return out

    @staticmethod
    def fetch(out: StepOutput | DecodeLoopOutput, num_rows: int) -> StepOutput | DecodeLoopOutput:
        """Read a dispatched step's outputs back to the host (blocks until the step is done)."""
        host = jax.device_get(out)
        if isinstance(host, DecodeLoopOutput):
            return DecodeLoopOutput(
                tokens=np.asarray(host.tokens[:num_rows]),
                all_tokens=np.asarray(host.all_tokens[:, :num_rows]),
                all_logprobs=np.asarray(host.all_logprobs[:, :num_rows]),
            )
        return StepOutput(
            tokens=np.asarray(host.tokens[:num_rows]),
            logprobs=np.asarray(host.logprobs[:num_rows]),
            top_ids=np.asarray(host.top_ids[:num_rows]),
            top_logprobs=np.asarray(host.top_logprobs[:num_rows]),
            prompt=host.prompt,
        )

    def run(self, sched: SchedulerOutput, stop_ids: dict[str, list[int]]) -> StepOutput:
        """Run one scheduled step synchronously; host outputs for the ``len(sched.scheduled)`` rows."""
        return self.fetch(self.dispatch(sched, stop_ids), len(sched.scheduled))
