"""transformers ``PretrainedConfig`` -> frozen jaxrt ``ModelConfig``.

What a family's transformers modeling code reads from its config (and what it ignores) is decided here, so
that the nnx modules only see numbers: e.g. Mistral applies ``sliding_window`` to every layer while Qwen and
Gemma apply it to the ``sliding_attention`` entries of ``layer_types``; Gemma 3 ignores
``attn_logit_softcapping``; Gemma 2/3 scale attention by ``query_pre_attn_scalar``.
"""

from __future__ import annotations

from typing import Any

from jaxrt.config import ModelConfig, RopeConfig

_KNOWN_ROPE_KEYS = {
    "rope_theta",
    "rope_type",
    "type",
    "factor",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_position_embeddings",
    "partial_rotary_factor",
}

# How each family's transformers code applies `sliding_window`: to every layer, or per `layer_types`.
_WINDOW_ALL_LAYERS = {"MistralForCausalLM", "Phi3ForCausalLM"}
# Qwen2/Qwen3/Gemma 2/Gemma 3 (and unlisted families) follow `layer_types`.
_NO_WINDOW = {"LlamaForCausalLM", "GemmaForCausalLM", "GraniteForCausalLM", "Olmo2ForCausalLM"}


def _rope_params(hf: Any) -> dict[str, Any]:
    # transformers 5 keeps rope settings in `rope_parameters`; older configs use rope_theta + rope_scaling.
    params = dict(getattr(hf, "rope_parameters", None) or {})
    scaling = getattr(hf, "rope_scaling", None)
    if isinstance(scaling, dict) and not _is_per_layer_type(scaling):
        params = {**scaling, **params}
    if "rope_theta" not in params and getattr(hf, "rope_theta", None) is not None:
        params["rope_theta"] = hf.rope_theta
    return params


def _is_per_layer_type(params: dict[str, Any]) -> bool:
    return any(isinstance(v, dict) for v in params.values()) and (
        "full_attention" in params or "sliding_attention" in params
    )


def _freeze(v: Any) -> Any:
    return tuple(_freeze(x) for x in v) if isinstance(v, (list, tuple)) else v


def _rope_from_params(p: dict[str, Any], hf: Any) -> RopeConfig:
    rope_type = p.get("rope_type", p.get("type", "default")) or "default"
    if rope_type in ("su", "yarn") and type(hf).__name__ == "Phi3Config":
        rope_type = "longrope"  # Phi-3's own aliases
    max_pos = getattr(hf, "max_position_embeddings", None)
    orig = p.get("original_max_position_embeddings")
    if rope_type in ("llama3", "yarn", "longrope"):
        # transformers gives priority to a top-level `original_max_position_embeddings` (Phi-3).
        orig = getattr(hf, "original_max_position_embeddings", None) or orig or max_pos
    factor = p.get("factor")
    if factor is None and rope_type in ("yarn", "longrope") and orig and max_pos:
        factor = max_pos / orig
    extra = tuple(
        sorted((k, _freeze(v)) for k, v in p.items() if k not in _KNOWN_ROPE_KEYS and v is not None)
    )
    return RopeConfig(
        theta=float(p.get("rope_theta", 10000.0)),
        rope_type=rope_type,
        factor=float(factor or 1.0),
        low_freq_factor=float(p.get("low_freq_factor", 1.0)),
        high_freq_factor=float(p.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=orig,
        partial_rotary_factor=float(
            p.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", 1.0) or 1.0) or 1.0
        ),
        extra=extra,
    )


def rope_config_from_hf(hf: Any) -> RopeConfig:
    """The rope of full-attention layers (the only one for most families)."""
    return rope_configs_from_hf(hf)[0]


def rope_configs_from_hf(hf: Any) -> tuple[RopeConfig, RopeConfig | None]:
    """(global rope, local rope of sliding-window layers or None when it is the same)."""
    params = dict(getattr(hf, "rope_parameters", None) or {})
    if _is_per_layer_type(params):  # Gemma 3: {"full_attention": {...}, "sliding_attention": {...}}
        full = params.get("full_attention") or {}
        local = params.get("sliding_attention")
        g = _rope_from_params(dict(full), hf)
        return g, (_rope_from_params(dict(local), hf) if local else None)
    return _rope_from_params(_rope_params(hf), hf), None


def _eos_ids(hf: Any) -> tuple[int, ...]:
    eos = getattr(hf, "eos_token_id", None)
    if eos is None:
        return ()
    if isinstance(eos, int):
        return (eos,)
    return tuple(int(e) for e in eos)


def _dtype_name(hf: Any) -> str:
    d = getattr(hf, "dtype", None) or getattr(hf, "torch_dtype", None)
    name = str(d).replace("torch.", "") if d is not None else "float32"
    return name if name in ("float32", "bfloat16", "float16") else "float32"


def _window(hf: Any, arch: str, num_layers: int) -> tuple[int | None, tuple[str, ...]]:
    window = getattr(hf, "sliding_window", None)
    if not getattr(hf, "use_sliding_window", True) or arch in _NO_WINDOW:
        window = None
    layer_types = tuple(getattr(hf, "layer_types", None) or ())
    if arch in _WINDOW_ALL_LAYERS or len(layer_types) != num_layers:
        layer_types = ()  # (families not listed anywhere follow their layer_types, transformers' convention)
    return (int(window) if window else None), layer_types


def _hidden_act(hf: Any, arch: str) -> str:
    if arch in ("Gemma2ForCausalLM", "Gemma3ForCausalLM"):
        return getattr(hf, "hidden_activation", None) or "gelu_pytorch_tanh"
    return getattr(hf, "hidden_act", None) or "silu"


def _attn_scale(hf: Any, arch: str) -> float | None:
    if arch in ("Gemma2ForCausalLM", "Gemma3ForCausalLM"):
        return float(hf.query_pre_attn_scalar) ** -0.5
    if arch == "GraniteForCausalLM":
        return float(hf.attention_multiplier)
    return None


def model_config_from_hf(hf: Any) -> ModelConfig:
    """Read the fields every jaxrt family needs; a missing required field is a ValueError naming it."""
    arch = (getattr(hf, "architectures", None) or [type(hf).__name__.replace("Config", "ForCausalLM")])[0]
    try:
        num_heads = hf.num_attention_heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // num_heads
        num_layers = hf.num_hidden_layers
        sliding_window, layer_types = _window(hf, arch, num_layers)
        rope, local_rope = rope_configs_from_hf(hf)
        granite = arch == "GraniteForCausalLM"
        return ModelConfig(
            architecture=arch,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            max_position_embeddings=getattr(hf, "max_position_embeddings", 2048),
            rms_norm_eps=float(getattr(hf, "rms_norm_eps", 1e-6)),
            rope=rope,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            attention_bias=bool(getattr(hf, "attention_bias", False)),
            mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            hidden_act=_hidden_act(hf, arch),
            sliding_window=sliding_window,
            dtype=_dtype_name(hf),
            bos_token_id=getattr(hf, "bos_token_id", None),
            eos_token_ids=_eos_ids(hf),
            layer_types=layer_types,
            local_rope=local_rope,
            attn_scale=_attn_scale(hf, arch),
            attn_logit_softcap=(
                getattr(hf, "attn_logit_softcapping", None) if arch == "Gemma2ForCausalLM" else None
            ),
            final_logit_softcap=getattr(hf, "final_logit_softcapping", None),
            embedding_multiplier=float(hf.embedding_multiplier) if granite else 1.0,
            residual_multiplier=float(hf.residual_multiplier) if granite else 1.0,
            logits_scaling=float(hf.logits_scaling) if granite else 1.0,
            **_checkpoint_quantization(hf),
        )
    except AttributeError as e:
        raise ValueError(f"config of {arch} lacks a field jaxrt needs: {e}") from e


def _checkpoint_quantization(hf: Any) -> dict[str, Any]:
    """``checkpoint_quantization`` / ``checkpoint_block_size`` from ``quantization_config``: "fp8" for
    transformers' fp8 checkpoints (``quant_method: fp8``, scales per tensor or per ``weight_block_size`` block)
    and compressed-tensors' float8 ones (per tensor, channel or block); any other method by its name (the
    native loader refuses those). GGUF files are dequantized by the loader itself."""
    qc = getattr(hf, "quantization_config", None)
    if not qc:
        return {}
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    method = qc.get("quant_method")
    if method in (None, "gguf"):
        return {}
    block = None
    if method == "fp8":
        block = qc.get("weight_block_size")
    elif method == "compressed-tensors":
        weights = [g.get("weights") or {} for g in (qc.get("config_groups") or {}).values()]
        if weights and all(w.get("type") == "float" and w.get("num_bits") == 8 for w in weights):
            method = "fp8"
            blocks = {tuple(w["block_structure"]) for w in weights if w.get("block_structure")}
            block = blocks.pop() if len(blocks) == 1 else None
        else:
            method = "compressed-tensors (not float8)"
    return {
        "checkpoint_quantization": method,
        "checkpoint_block_size": tuple(int(b) for b in block) if block else None,
    }
