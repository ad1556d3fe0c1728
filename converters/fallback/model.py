"""Build a transformers causal LM as a pure JAX ``forward(params, kv_caches, batch)`` for jaxrt's jitted step.

The model is instantiated from its transformers code (``AutoModelForCausalLM.from_config``, remote code allowed)
with parameters on the meta device, so no random weights are ever materialised; buffers that its constructor
computes (rotary ``inv_freq``, causal-mask tables) are real and become jit inputs next to the weights. The
forward is traced into JAX with torchax: the torch ops of the model's own code run as JAX ops on tracers inside
jaxrt's single jitted step, with attention routed through ``attn_implementation="jaxrt"`` into the paged KV pool.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrt.config import ModelConfig, StateSpec
from jaxrt.converters.fallback.adapters import ATTENTION_ADAPTERS, EAGER_MASK_CLASSES, install_adapters
from jaxrt.converters.fallback.attention import (
    ATTN_IMPLEMENTATION,
    CTX_KWARG,
    FallbackError,
    LayerSpec,
    StepContext,
    register_attention,
)
from jaxrt.converters.fallback.experts import EXPERTS_IMPLEMENTATION, register_experts
from jaxrt.converters.fallback.recurrent import MIXER_ADAPTERS, MIXER_FORWARDS, install_mixer_adapters
from jaxrt.converters.fallback.torchax_compat import import_torchax
from jaxrt.converters.fallback.weights import expected_tensors, jax_dtype, load_params, torch_to_jax

logger = logging.getLogger(__name__)

# Module class names of recurrent / state-space mixers: refused unless an adapter in recurrent.py serves them.
_RECURRENT_MODULE = re.compile(
    r"Mamba|Mixer2?$|SSM|Rwkv|RWKV|xLSTM|mLSTM|sLSTM|Recurrent|RecurrentBlock|LinearAttention|Lightning|"
    r"GatedDeltaNet|DeltaNet|ShortConv|KimiDelta|Rglru",
)
# Sparse-attention (DSA-style) indexers that pick the top-k keys per query.
_INDEXER_MODULE = re.compile(r"Indexer$")
_MAX_POSITION_FIELDS = (
    "max_position_embeddings",
    "n_positions",
    "n_ctx",
    "max_seq_len",
    "seq_length",
    "max_len",
)
_PROBE_TOKENS = 8


@dataclass(frozen=True)
class FallbackPlan:
    """Everything static about one model's forward, found by the build-time probe."""

    layers: tuple[LayerSpec, ...]
    head_dim: int
    num_kv_heads: int
    vocab_size: int
    states: tuple[StateSpec, ...] = ()  # recurrent-state arrays, in the order the mixers claim them


def checkpoint_dtype(hf_config: Any) -> str:
    """The checkpoint's float dtype name (for picking a default compute dtype)."""
    d = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    name = str(d).replace("torch.", "") if d is not None else "float32"
    return name if name in ("float32", "bfloat16", "float16") else "float32"


def _torch_dtype(dtype: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def build_meta_model(hf_config: Any, dtype: str, trust_remote_code: bool):
    """The transformers model with meta parameters and real buffers, in eval mode, attention set to jaxrt."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    register_attention()
    register_experts()
    config = copy.deepcopy(hf_config)
    name = (getattr(config, "architectures", None) or [type(config).__name__])[0]
    kwargs: dict[str, Any] = {
        "trust_remote_code": trust_remote_code,
        "attn_implementation": ATTN_IMPLEMENTATION,
        "dtype": _torch_dtype(dtype),
    }

    def build(attn_implementation: str):
        kw = {**kwargs, "attn_implementation": attn_implementation}
        with init_empty_weights(include_buffers=False):
            try:
                return AutoModelForCausalLM.from_config(
                    copy.deepcopy(config), experts_implementation=EXPERTS_IMPLEMENTATION, **kw
                )
            except (ValueError, KeyError, TypeError) as e:
                if "experts_implementation" not in str(e):
                    raise
                return AutoModelForCausalLM.from_config(copy.deepcopy(config), **kw)

    table_error = None
    try:
        model = build(ATTN_IMPLEMENTATION)
        if any(type(m).__name__ in EAGER_MASK_CLASSES for m in model.modules()):
            model = build("eager")
    except KeyError as e:
        if ATTN_IMPLEMENTATION not in str(e):
            raise
        # Attention classes from a fixed table: build the eager classes, then adapt their attention core.
        table_error = e
        model = build("eager")
        model.config._attn_implementation = ATTN_IMPLEMENTATION  # no [T, T] masks built at the model level
    # Parameter tying is skipped for meta-initialised weights; tie now so tied names share one param.
    model.tie_weights()
    adapted = install_adapters(model)
    mixers = install_mixer_adapters(model)
    if mixers:
        adapted.append(f"{len(mixers)} recurrent mixers")
    if table_error is not None and not set(adapted) & set(ATTENTION_ADAPTERS):
        raise FallbackError(
            f"{name} picks its attention classes from a fixed table keyed by attn_implementation (KeyError "
            f"{table_error}) instead of calling transformers' attention interface, and jaxrt has no adapter for "
            "them, so it cannot plug in its paged attention"
        ) from table_error
    if adapted:
        logger.info("transformers fallback: adapters for %s", ", ".join(adapted))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _forward_kwarg_names(model: Any) -> frozenset[str]:
    try:
        return frozenset(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return frozenset()


def _module_names(model: Any) -> dict[int, str]:
    return {id(m): name or type(m).__name__ for name, m in model.named_modules()}


def adapted_mixers(model: Any) -> list[str]:
    """Names of the recurrent mixers whose forward `install_mixer_adapters` rebound."""
    return [
        name
        for name, m in model.named_modules()
        if (type(m).__name__ in MIXER_ADAPTERS or type(m).__name__ in MIXER_FORWARDS)
        and "forward" in m.__dict__
    ]


def _recurrent_modules(model: Any, covered: list[str] = ()) -> list[str]:
    """Recurrent-looking modules (by class name) not served by an adapter: when some are served (``covered``:
    adapted mixers and modules that called the attention interface), modules inside, around or equal to a served
    one (its decoder block, its gated norm) and per-token norms / MLPs are not counted."""
    from transformers import PreTrainedModel

    def is_covered(name: str) -> bool:
        return any(name == c or name.startswith(c + ".") or c.startswith(name + ".") for c in covered)

    return [
        f"{name} ({type(m).__name__})"
        for name, m in model.named_modules()
        if not isinstance(m, PreTrainedModel)
        and _RECURRENT_MODULE.search(type(m).__name__)
        and not (covered and (is_covered(name) or _is_norm_or_mlp(type(m).__name__)))
    ]


def _watch_convolutions(model: Any, called: set[str]) -> list[Any]:
    """Forward hooks recording which ``nn.Conv1d`` (token-mixing convolutions) run during the probe."""
    import torch

    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Conv1d):
            hooks.append(m.register_forward_pre_hook(lambda *_, name=name: called.add(name)))
    return hooks


class FallbackModel:
    """A meta-device transformers model plus what jaxrt needs to run it as ``forward(params, kv, batch)``."""

    def __init__(self, model: Any, attention_backend: str | None = None, interpret: bool = False) -> None:
        self.torchax = import_torchax()
        self.model = model
        self.backend = None if attention_backend in (None, "auto") else attention_backend
        self.interpret = interpret
        self.names = _module_names(model)
        self.kwarg_names = _forward_kwarg_names(model)
        self.buffers = {n: torch_to_jax(b) for n, b in model.named_buffers() if not b.is_meta}
        self.plan: FallbackPlan | None = None
        # Project only each sequence's last row to the vocabulary (logits_to_keep as an index tensor).
        self.keep_logits = "logits_to_keep" in self.kwarg_names

    # ------------------------------------------------------------------------------------------- tracing

    def _call_model(self, params: dict[str, jax.Array], batch: Any, ctx: StepContext) -> jax.Array:
        """Run the torch model on jax values (inside a trace). Returns logits ``[rows, vocab]`` (jax)."""
        import torch
        from torchax import interop

        env = self.torchax.default_env()
        tensors = {**self.buffers, **params}
        input_ids = jnp.asarray(batch.input_ids)[None, :]
        position_ids = jnp.asarray(batch.positions)[None, :]
        keep = self.keep_logits
        with env, torch.no_grad(), _context_on_modules(self.model, ctx):
            t_params, t_ids, t_pos = interop.torch_view((tensors, input_ids, position_ids))
            kwargs: dict[str, Any] = {
                "input_ids": t_ids,
                "position_ids": t_pos,
                "use_cache": False,
                "return_dict": True,
                CTX_KWARG: ctx,
            }
            if "cache_position" in self.kwarg_names:
                kwargs["cache_position"] = interop.torch_view(jnp.asarray(batch.positions))
            if keep:
                kwargs["logits_to_keep"] = interop.torch_view(jnp.asarray(batch.logits_indices))
            out = torch.func.functional_call(
                self.model, t_params, args=(), kwargs=kwargs, tie_weights=True, strict=False
            )
            logits = out["logits"] if isinstance(out, dict) or hasattr(out, "keys") else out[0]
            logits = interop.jax_view(logits)
        logits = logits[0]
        if not keep or logits.shape[0] != batch.logits_indices.shape[0]:
            if logits.shape[0] == batch.input_ids.shape[0]:
                logits = logits[batch.logits_indices]
            elif logits.shape[0] != batch.logits_indices.shape[0]:
                raise FallbackError(
                    f"unexpected logits shape {logits.shape} for {batch.input_ids.shape[0]} tokens"
                )
        return logits  # in the model's own dtype, as transformers gives them; the sampler reads them in f32

    def probe(self, abstract_params: dict[str, Any]) -> FallbackPlan:
        """Trace the forward once abstractly: record every attention call, check the model is usable."""
        model_name = type(self.model).__name__
        mixers = adapted_mixers(self.model)
        if not mixers:
            _refuse_recurrent(self.model, [])
        indexers = [(n, m) for n, m in self.model.named_modules() if _INDEXER_MODULE.search(type(m).__name__)]
        if indexers:
            name, m = indexers[0]
            k = getattr(m, "index_topk", None) or getattr(self.model.config, "index_topk", "k")
            raise FallbackError(
                f"{model_name} has sparse-attention indexers ({name} ({type(m).__name__}), ...): each query attends "
                f"only to the top-{k} keys its indexer selects. jaxrt's paged attention is dense; the two agree "
                f"only while a sequence is at most {k} tokens long, so serving it would change the model's "
                "output on longer contexts"
            )
        batch = _probe_batch(_PROBE_TOKENS)
        ctx = StepContext(batch=batch, kv_caches=None, module_names=self.names)
        called_convs: set[str] = set()
        hooks = _watch_convolutions(self.model, called_convs)
        try:
            logits = jax.eval_shape(lambda p: self._call_model(p, batch, ctx), abstract_params)
        except FallbackError:
            raise
        except Exception as e:
            if not self.keep_logits:
                raise FallbackError(_trace_failure(self.model, e)) from e
            # Some modeling code cannot index with a tensor logits_to_keep; full logits, gathered afterwards.
            self.keep_logits = False
            ctx = StepContext(batch=batch, kv_caches=None, module_names=self.names)
            try:
                logits = jax.eval_shape(lambda p: self._call_model(p, batch, ctx), abstract_params)
            except FallbackError:
                raise
            except Exception:
                raise FallbackError(_trace_failure(self.model, e)) from e
        finally:
            for h in hooks:
                h.remove()
        if not ctx.specs and not ctx.state_specs:
            raise FallbackError(
                f"{model_name} never called the attention interface: its attention layers compute attention "
                "themselves instead of through `ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`, so "
                "jaxrt cannot give them the paged KV cache"
            )
        num_layers = getattr(self.model.config, "num_hidden_layers", None)
        if mixers:
            # modules that called the attention interface are attention, whatever their class is called
            _refuse_recurrent(self.model, mixers + [s.module for s in ctx.specs])
            _check_hybrid_layers(self.model, ctx.specs, mixers)
        elif isinstance(num_layers, int) and len(ctx.specs) < num_layers:
            called = {s.module for s in ctx.specs}
            raise FallbackError(
                f"{model_name}: only {len(ctx.specs)} of {num_layers} layers routed attention through the "
                f"attention interface (called: {sorted(called)[:4]}...); the other layers would run without "
                "their KV cache"
            )
        _check_config_window(self.model, ctx.specs)
        # convolutions inside an adapted mixer run on per-token windows the adapter built from its state
        convs = sorted(c for c in called_convs if not any(c.startswith(m + ".") for m in mixers))
        if convs:
            raise FallbackError(
                f"{model_name} runs causal convolutions over the token sequence ({', '.join(convs[:3])}): they "
                "carry state across tokens that jaxrt's paged KV pool cannot hold"
            )
        if mixers and len(ctx.state_specs) < len(mixers):
            raise FallbackError(
                f"{model_name}: {len(mixers)} recurrent mixers but only {len(ctx.state_specs)} state reads in the "
                "probe; some mixer ran a path the fallback does not adapt"
            )
        # One pool layout: the most kv heads any layer has; layers with fewer get their heads repeated.
        pool_kv_heads = max((s.num_kv_heads for s in ctx.specs), default=1)
        for s in ctx.specs:
            if pool_kv_heads % s.num_kv_heads or s.num_q_heads % pool_kv_heads:
                kv_heads = sorted({x.num_kv_heads for x in ctx.specs})
                raise FallbackError(
                    f"{model_name}: layers have kv-head counts {kv_heads} that do not fit one KV pool layout "
                    f"({s.module}: {s.num_q_heads} query heads, {s.num_kv_heads} kv heads)"
                )
        head_dim = max((max(s.qk_head_dim, s.v_head_dim) for s in ctx.specs), default=1)
        rows = logits.shape
        if len(rows) != 2 or rows[0] != batch.logits_indices.shape[0]:
            raise FallbackError(f"{model_name}: unexpected logits shape {rows}")
        return FallbackPlan(
            layers=tuple(ctx.specs),
            head_dim=int(head_dim),
            num_kv_heads=pool_kv_heads,
            vocab_size=int(rows[1]),
            states=tuple(ctx.state_specs),
        )

    def forward(self, params: dict[str, jax.Array], kv_caches: list, batch: Any):
        """jaxrt ``ForwardFn``: logits ``[num_seqs, vocab]`` f32 and the updated caches (KV layers, then the
        recurrent-state arrays)."""
        plan = self.plan
        num_kv = len(plan.layers)
        ctx = StepContext(
            batch=batch,
            kv_caches=kv_caches[:num_kv],
            states=kv_caches[num_kv:],
            expected_states=list(plan.states),
            module_names=self.names,
            expected=list(plan.layers),
            head_dim=plan.head_dim,
            num_kv_heads=plan.num_kv_heads,
            backend=self.backend,
            interpret=self.interpret,
        )
        logits = self._call_model(params, batch, ctx)
        if ctx.num_calls != len(plan.layers):
            raise FallbackError(
                f"{type(self.model).__name__}: {ctx.num_calls} attention calls in this trace, "
                f"{len(plan.layers)} at build time"
            )
        if len(ctx.state_specs) != len(plan.states):
            raise FallbackError(
                f"{type(self.model).__name__}: {len(ctx.state_specs)} recurrent-state reads in this trace, "
                f"{len(plan.states)} at build time"
            )
        return logits, [*ctx.kv_caches, *ctx.states]


def _is_norm_or_mlp(class_name: str) -> bool:
    """Per-token modules of recurrent families whose names match the recurrent pattern (``MambaRMSNorm``,
    ``RecurrentGemmaMlp``)."""
    return "Norm" in class_name or class_name.endswith(("Mlp", "MLP", "FeedForward"))


def _refuse_recurrent(model: Any, served: list[str]) -> None:
    recurrent = _recurrent_modules(model, served)
    if recurrent:
        raise FallbackError(
            f"{type(model).__name__} has recurrent / state-space layers ({', '.join(recurrent[:3])}"
            f"{', ...' if len(recurrent) > 3 else ''}) whose per-request state jaxrt cannot keep: the transformers "
            "fallback has no adapter for them"
        )


def _check_hybrid_layers(model: Any, specs: list[LayerSpec], mixers: list[str]) -> None:
    """In a hybrid model, every attention module of a decoder layer must have called the attention interface or
    be (part of) an adapted recurrent mixer; layers of only an MLP or MoE (Nemotron-H) have neither."""
    import torch

    served = [s.module for s in specs] + mixers

    def is_served(name: str) -> bool:
        return any(name == x or name.startswith(x + ".") or x.startswith(name + ".") for x in served)

    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.ModuleList) or not name.endswith("layers"):
            continue
        for i, layer in enumerate(m):
            for sub_name, sub in layer.named_modules():
                full = f"{name}.{i}.{sub_name}" if sub_name else f"{name}.{i}"
                if "Attention" in type(sub).__name__ and not is_served(full):
                    raise FallbackError(
                        f"{type(model).__name__}: {full} ({type(sub).__name__}) routed no attention through the "
                        "attention interface; it would run without its KV cache"
                    )


def _check_config_window(model: Any, specs: list[LayerSpec]) -> None:
    """Refuse a model whose config declares one sliding window for all layers that its layers do not pass to the
    attention call: transformers then applies it only through the ``[T, T]`` mask it builds (Moshi), which jaxrt
    does not build, so attention would reach past the window."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    window = getattr(config, "sliding_window", None)
    if not isinstance(window, int) or window <= 0 or getattr(config, "layer_types", None):
        return
    if not getattr(config, "use_sliding_window", True):
        return
    unwindowed = [s.module for s in specs if s.sliding_window is None]
    if unwindowed:
        raise FallbackError(
            f"{type(model).__name__}: config.sliding_window={window} applies to every layer, but "
            f"{unwindowed[0]} (and {len(unwindowed) - 1} more) call attention without a sliding window: the "
            "window would only be applied through transformers' attention mask, which jaxrt does not build"
        )


@contextlib.contextmanager
def _context_on_modules(model: Any, ctx: StepContext):
    """Make ``ctx`` reachable from every module for the duration of one traced call.

    The context normally travels through ``**kwargs`` from the model's forward to the attention call; some
    decoder layers call their attention module without forwarding them (Nemotron, StableLM). The attention
    function then finds the context on the module it is called with. Removed again after the call, so a module
    never holds a context outside the trace that created it.
    """
    modules = [m for _, m in model.named_modules()]
    for m in modules:
        m.__dict__[CTX_KWARG] = ctx
    try:
        yield
    finally:
        for m in modules:
            m.__dict__.pop(CTX_KWARG, None)


_DATA_DEPENDENT = (
    jax.errors.ConcretizationTypeError,
    jax.errors.TracerArrayConversionError,
    jax.errors.TracerBoolConversionError,
    jax.errors.TracerIntegerConversionError,
)


def _trace_failure(model: Any, e: BaseException) -> str:
    """A one-paragraph reason why the model's forward could not be traced, pointing at the model's code."""
    import traceback

    name = type(model).__name__
    where = ""
    for frame in reversed(traceback.extract_tb(e.__traceback__)):
        if "modeling_" in Path(frame.filename).name or "transformers_modules" in frame.filename:
            where = f" at {Path(frame.filename).name}:{frame.lineno} (`{(frame.line or '').strip()[:80]}`)"
            break
    first = (str(e).strip().splitlines() or [""])[0][:200]
    if isinstance(e, _DATA_DEPENDENT):
        why = (
            "its forward has data-dependent Python control flow or host transfers (.item(), .cpu(), nonzero)"
        )
    else:
        why = "its forward cannot be traced into JAX with jaxrt attention"
    if not getattr(type(model), "_supports_attention_backend", True):
        why += " (the class does not support transformers' attention interface: _supports_attention_backend=False)"
    return f"{name}: {why}{where}: {type(e).__name__}: {first}"


def _probe_batch(num_tokens: int):
    """Two sequences (a prefill chunk and a decode) over a tiny page table: shapes for the abstract trace.

    Built from an empty `build_batch` so that fields added to `ForwardBatch` later get their usual shapes.
    """
    from jaxrt.batch import build_batch
    from jaxrt.scheduler import SchedulerOutput

    n = num_tokens
    empty, *_ = build_batch(
        SchedulerOutput(),
        num_tokens=n,
        num_seqs=2,
        pages_per_seq=1,
        page_size=16,
        vocab_size=2,
        history_len=1,
        stop_ids={},
    )
    return dataclasses.replace(
        empty,
        positions=np.concatenate([np.arange(n - 1), [5]]).astype(np.int32),
        slot_mapping=np.arange(n, dtype=np.int32),
        cu_q_lens=np.array([0, n - 1, n], np.int32),
        kv_lens=np.array([n - 1, 6], np.int32),
        page_indices=np.array([[1], [2]], np.int32),
        num_seqs=np.array([2], np.int32),
        logits_indices=np.array([n - 2, n - 1], np.int32),
    )


def _max_positions(hf_config: Any) -> int:
    for name in _MAX_POSITION_FIELDS:
        v = getattr(hf_config, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return 1 << 20  # no learned/limited positions declared: the engine's context_length decides


def _eos_ids(hf_config: Any) -> tuple[int, ...]:
    eos = getattr(hf_config, "eos_token_id", None)
    if eos is None:
        return ()
    if isinstance(eos, int):
        return (eos,)
    return tuple(int(e) for e in eos)


def fallback_model_config(hf_config: Any, plan: FallbackPlan, dtype_name: str) -> ModelConfig:
    """A jaxrt ModelConfig sized from what the model actually does (the probe), not from config field names."""
    arch = (
        getattr(hf_config, "architectures", None)
        or [type(hf_config).__name__.replace("Config", "ForCausalLM")]
    )[0]
    first = plan.layers[0] if plan.layers else LayerSpec("", 1, 1, 1, 1, 1.0, None, None)
    hidden = getattr(hf_config, "hidden_size", None)
    inter = getattr(hf_config, "intermediate_size", None)
    return ModelConfig(
        architecture=arch,
        vocab_size=plan.vocab_size,
        hidden_size=hidden
        if isinstance(hidden, int) and hidden > 0
        else first.num_q_heads * first.qk_head_dim,
        intermediate_size=inter if isinstance(inter, int) and inter > 0 else 1,
        num_layers=len(plan.layers),
        num_heads=first.num_q_heads,
        num_kv_heads=plan.num_kv_heads,
        head_dim=plan.head_dim,
        max_position_embeddings=_max_positions(hf_config),
        sliding_window=None,  # per layer, inside the fallback's attention calls
        dtype=dtype_name,
        bos_token_id=getattr(hf_config, "bos_token_id", None),
        eos_token_ids=_eos_ids(hf_config),
        state_specs=plan.states,
    )


def build_fallback(
    model_path: str | Path,
    hf_config: Any,
    dtype: str,
    attention_backend: str | None = "auto",
    trust_remote_code: bool = False,
    interpret: bool = False,
):
    """``(ModelConfig, forward_fn, params)`` for any transformers causal LM whose attention uses the interface.

    Raises `FallbackError` with the reason when the model cannot run on jaxrt (no attention interface, dropped
    kwargs, recurrent layers, ...), before any weight is read.
    """
    import_torchax()
    model = build_meta_model(hf_config, dtype, trust_remote_code)
    fm = FallbackModel(model, attention_backend=attention_backend, interpret=interpret)
    abstract = {
        name: jax.ShapeDtypeStruct(tuple(t.shape), jax_dtype(t.dtype))
        for name, t in expected_tensors(model).items()
    }
    fm.plan = fm.probe(abstract)
    cfg = fallback_model_config(hf_config, fm.plan, checkpoint_dtype(hf_config))
    logger.info(
        "transformers fallback: %s, %d attention layers, %d kv heads x %d, %d recurrent-state arrays, vocab %d",
        type(model).__name__,
        cfg.num_layers,
        cfg.num_kv_heads,
        cfg.head_dim,
        len(cfg.state_specs),
        cfg.vocab_size,
    )
    params = load_params(model, model_path)
    return cfg, fm.forward, params
