"""Frozen configuration dataclasses, built once at the edge and validated in ``__post_init__``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters (transformers' ``rope_parameters``)."""

    theta: float = 10000.0
    rope_type: str = "default"  # default | linear | llama3 | dynamic | yarn | longrope
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    partial_rotary_factor: float = 1.0
    extra: tuple[tuple[str, Any], ...] = ()  # family-specific keys, kept hashable

    SUPPORTED = ("default", "linear", "llama3", "dynamic", "yarn", "longrope")

    def __post_init__(self) -> None:
        if self.rope_type not in self.SUPPORTED:
            raise ValueError(f"rope_type {self.rope_type!r} is not supported (supported: {self.SUPPORTED})")
        if self.theta <= 0 or self.factor <= 0:
            raise ValueError("rope theta and factor must be positive")


@dataclass(frozen=True)
class StateSpec:
    """One recurrent-state array of a model (a Mamba layer's conv window, its SSM state, ...).

    The runner allocates it as ``[num_state_slots, *shape]``: one slot per running request plus a scratch slot.
    """

    shape: tuple[int, ...]  # per slot
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if not all(isinstance(d, int) and d > 0 for d in self.shape):
            raise ValueError(f"StateSpec.shape must be positive ints, got {self.shape}")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only LM, independent of where it came from."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = field(default_factory=RopeConfig)
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    sliding_window: int | None = None
    dtype: str = "bfloat16"  # the checkpoint's dtype
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Per-layer attention kind ("full_attention" | "sliding_attention"); empty: `sliding_window` (if set)
    # applies to every layer.
    layer_types: tuple[str, ...] = ()
    local_rope: RopeConfig | None = None  # rope of sliding-window layers when it differs (Gemma 3)
    attn_scale: float | None = None  # softmax scale when not head_dim**-0.5 (Gemma 2/3, Granite)
    attn_logit_softcap: float | None = None  # cap * tanh(scores / cap) before the softmax (Gemma 2)
    final_logit_softcap: float | None = None  # the same on the output logits (Gemma 2/3)
    embedding_multiplier: float = 1.0  # Granite
    residual_multiplier: float = 1.0  # Granite
    logits_scaling: float = 1.0  # Granite: logits are divided by it
    # Per-request recurrent state (state-space / linear-attention / short-convolution layers), in the order
    # the model reads them; empty for attention-only models. ``num_layers`` counts the KV (attention) layers
    # only, so a model without attention has ``num_layers == 0`` and at least one state spec.
    state_specs: tuple[StateSpec, ...] = ()
    # How the checkpoint stores its weights when quantized (its ``quantization_config.quant_method``; "fp8":
    # float8 projection weights with scales, read by dequantizing them), and the fp8 scales' block shape
    # ``(out, in)`` when they are per block.
    checkpoint_quantization: str | None = None
    checkpoint_block_size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_layers < 0 or (self.num_layers == 0 and not self.state_specs):
            raise ValueError(
                f"ModelConfig.num_layers must be positive (or 0 with state_specs), got {self.num_layers}"
            )
        if self.layer_types and len(self.layer_types) != self.num_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        if self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )

    @property
    def sm_scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else self.head_dim**-0.5

    def replace(self, **kwargs: Any) -> ModelConfig:
        return dataclasses.replace(self, **kwargs)


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV pool and radix prefix cache."""

    page_size: int = 16
    mem_fraction_static: float = 0.85
    num_pages: int | None = None  # explicit pool size; overrides mem_fraction_static
    disable_radix_cache: bool = False
    kv_dtype: str | None = None  # None: the model's compute dtype

    def __post_init__(self) -> None:
        if not 1 <= self.page_size <= 128:
            raise ValueError(f"page_size must be in [1, 128], got {self.page_size}")
        if not 0.0 < self.mem_fraction_static < 1.0:
            raise ValueError(f"mem_fraction_static must be in (0, 1), got {self.mem_fraction_static}")
        if self.num_pages is not None and self.num_pages < 2:
            raise ValueError(f"num_pages must be >= 2, got {self.num_pages}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Token budget and concurrency of the catch-up scheduler."""

    max_running_requests: int = 64
    chunked_prefill_size: int = 2048  # max tokens per step (prefill chunks + decodes)
    context_length: int = 2048
    max_queued_requests: int | None = None
    # Decode steps per dispatch when every running request is decoding (SGLang's flag of the same name).
    num_continuous_decode_steps: int = 1
    # A 1-token program besides the powers of two from 8: a lone decode stream's attention projections run as
    # one-row products instead of 8-row GEMMs (the Engine turns it on for GPUs, where that is faster).
    single_token_bucket: bool = False

    def __post_init__(self) -> None:
        if self.num_continuous_decode_steps < 1:
            raise ValueError(
                f"num_continuous_decode_steps must be >= 1, got {self.num_continuous_decode_steps}"
            )
        if self.max_running_requests < 1:
            raise ValueError(f"max_running_requests must be >= 1, got {self.max_running_requests}")
        if self.chunked_prefill_size < self.max_running_requests:
            raise ValueError(
                f"chunked_prefill_size ({self.chunked_prefill_size}) must be >= max_running_requests "
                f"({self.max_running_requests}) so every running request can decode in one step"
            )
        if self.context_length < 2:
            raise ValueError(f"context_length must be >= 2, got {self.context_length}")


QUANTIZATION_METHODS = ("fp8",)  # jaxrt.models.quantization


def validate_quantization(quantization: str | None) -> str | None:
    """``None`` or a supported method; a ValueError naming the field otherwise."""
    if quantization is None or quantization in QUANTIZATION_METHODS:
        return quantization
    raise ValueError(
        f"quantization must be one of {list(QUANTIZATION_METHODS)} or None, got {quantization!r}"
    )


@dataclass(frozen=True)
class EngineConfig:
    model_path: str
    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    impl: str = "native"  # resolved: native | transformers
    dtype: str = "float32"  # compute dtype
    attention_backend: str = "auto"
    random_seed: int = 0
    compile_buckets: bool = True
    trust_remote_code: bool = False
    stream_interval: int = 1  # output tokens between a stream's chunks (the first token goes at once)
    quantization: str | None = None  # None | "fp8" (jaxrt.models.quantization)

    def __post_init__(self) -> None:
        if self.stream_interval < 1:
            raise ValueError(f"stream_interval must be >= 1, got {self.stream_interval}")
        if self.impl not in ("native", "transformers"):
            raise ValueError(f"impl must be 'native' or 'transformers', got {self.impl!r}")
        validate_quantization(self.quantization)
        if self.quantization is not None and self.impl != "native":
            raise ValueError(
                f"quantization={self.quantization!r} needs a native model; {self.model.architecture} runs "
                "through the transformers fallback"
            )
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.scheduler.context_length > self.model.max_position_embeddings:
            raise ValueError(
                f"context_length ({self.scheduler.context_length}) exceeds the model's "
                f"max_position_embeddings ({self.model.max_position_embeddings})"
            )
