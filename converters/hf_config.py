"""transformers ``PretrainedConfig`` -> frozen jaxrt ``ModelConfig``."""

from __future__ import annotations

from typing import Any

from jaxrt.config import ModelConfig, RopeConfig


def _rope_params(hf: Any) -> dict[str, Any]:
    # transformers 5 keeps rope settings in `rope_parameters`; older configs use rope_theta + rope_scaling.
    params = dict(getattr(hf, "rope_parameters", None) or {})
    scaling = getattr(hf, "rope_scaling", None)
    if isinstance(scaling, dict):
        params = {**scaling, **params}
    if "rope_theta" not in params and getattr(hf, "rope_theta", None) is not None:
        params["rope_theta"] = hf.rope_theta
    return params


def rope_config_from_hf(hf: Any) -> RopeConfig:
    p = _rope_params(hf)
    rope_type = p.get("rope_type", p.get("type", "default")) or "default"
    known = {
        "rope_theta",
        "rope_type",
        "type",
        "factor",
        "low_freq_factor",
        "high_freq_factor",
        "original_max_position_embeddings",
        "partial_rotary_factor",
    }
    extra = tuple(sorted((k, v) for k, v in p.items() if k not in known and not isinstance(v, (list, dict))))
    return RopeConfig(
        theta=float(p.get("rope_theta", 10000.0)),
        rope_type=rope_type,
        factor=float(p.get("factor", 1.0) or 1.0),
        low_freq_factor=float(p.get("low_freq_factor", 1.0)),
        high_freq_factor=float(p.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=p.get("original_max_position_embeddings"),
        partial_rotary_factor=float(
            p.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", 1.0) or 1.0)
        ),
        extra=extra,
    )


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


def model_config_from_hf(hf: Any) -> ModelConfig:
    """Read the fields every jaxrt family needs; a missing required field is a ValueError naming it."""
    arch = (getattr(hf, "architectures", None) or [type(hf).__name__.replace("Config", "ForCausalLM")])[0]
    num_heads = hf.num_attention_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // num_heads
    sliding_window = getattr(hf, "sliding_window", None)
    if not getattr(hf, "use_sliding_window", True):
        sliding_window = None
    try:
        return ModelConfig(
            architecture=arch,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            max_position_embeddings=getattr(hf, "max_position_embeddings", 2048),
            rms_norm_eps=float(getattr(hf, "rms_norm_eps", 1e-6)),
            rope=rope_config_from_hf(hf),
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            attention_bias=bool(getattr(hf, "attention_bias", False)),
            mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            hidden_act=getattr(hf, "hidden_act", "silu"),
            sliding_window=sliding_window,
            dtype=_dtype_name(hf),
            bos_token_id=getattr(hf, "bos_token_id", None),
            eos_token_ids=_eos_ids(hf),
        )
    except AttributeError as e:
        raise ValueError(f"config of {arch} lacks a field jaxrt needs: {e}") from e
