"""From a checkpoint directory to an nnx (graphdef, state) pair ready for the jitted step.

A checkpoint directory is one of: a transformers safetensors checkpoint, a directory holding one ``.gguf``
file, or a jaxrt converted directory (``jaxrt convert``; Orbax params). Safetensors and GGUF checkpoints go
through the automatic converted-params cache (``jaxrt.converters.checkpoint``) when it has an entry.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from flax import nnx

from jaxrt.config import ModelConfig
from jaxrt.converters import checkpoint
from jaxrt.converters.hf_config import model_config_from_hf
from jaxrt.converters.weights import (
    WEIGHT_MAPS,
    WeightLoadError,
    dequantize_fp8,
    gguf_file,
    iter_tensors,
    load_weights,
)
from jaxrt.models import MODEL_REGISTRY, get_model_class

logger = logging.getLogger(__name__)

# How the last build_native_model got its params: ``source`` ("converted", "cache", "safetensors" or "gguf")
# and ``seconds``; for safetensors and GGUF also ``load_weights``' breakdown (tensors, bytes, programs,
# peak_inflight_bytes, read_s, dispatch_s, compile_s, wait_s, transfer_call_s).
last_load_info: dict[str, Any] = {}


def resolve_model_path(model_path: str) -> str:
    """A local directory, or a hub id already in the local Hugging Face cache. jaxrt never downloads."""
    if os.path.isdir(model_path):
        return model_path
    if os.path.exists(model_path):
        raise ValueError(f"model_path {model_path!r} is a file; pass the checkpoint directory")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(model_path, local_files_only=True)
    except Exception as e:
        raise ValueError(
            f"model_path {model_path!r} is not a local directory and is not in the local Hugging Face cache; "
            "with no network access it cannot be downloaded. Download it once (huggingface-cli download) or "
            "pass a local checkpoint directory."
        ) from e


def load_hf_config(model_path: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoConfig

    if not checkpoint.is_converted(model_path) and not (Path(model_path) / "config.json").exists():
        g = gguf_file(model_path)
        if g is not None:
            cfg = AutoConfig.from_pretrained(str(g.parent), gguf_file=g.name)
            if not getattr(cfg, "architectures", None):  # GGUF metadata has a model type, not a class
                from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

                arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(cfg.model_type)
                cfg.architectures = [arch] if arch else None
            return cfg
    return AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)


def has_native(architecture: str) -> bool:
    return architecture in MODEL_REGISTRY and architecture in WEIGHT_MAPS


def native_model_config(hf_config: Any) -> ModelConfig:
    cfg = model_config_from_hf(hf_config)
    if cfg.sliding_window is not None and cfg.sliding_window < cfg.max_position_embeddings:
        logger.info(
            "%s: sliding window %d handled by the attention kernel", cfg.architecture, cfg.sliding_window
        )
    return cfg


def abstract_model(
    cfg: ModelConfig, dtype: str, attention_backend: str, interpret: bool = False
) -> tuple[nnx.GraphDef, nnx.State]:
    """The model's graphdef and abstract state (shapes and dtypes only; nothing allocated)."""
    cls = get_model_class(cfg.architecture)
    jdtype = jnp.dtype(dtype)
    abstract = nnx.eval_shape(
        lambda: cls(
            cfg, dtype=jdtype, rngs=nnx.Rngs(0), attention_backend=attention_backend, interpret=interpret
        )
    )
    return nnx.split(abstract)


def stream_weights(
    cfg: ModelConfig,
    model_path: str | Path,
    abstract_state: nnx.State,
    dtype: jnp.dtype,
    stats: dict[str, Any] | None = None,
) -> nnx.State:
    """Read a safetensors or GGUF checkpoint tensor by tensor into ``abstract_state``'s layout (``stats``: see
    ``load_weights``)."""
    if cfg.architecture not in WEIGHT_MAPS:
        raise ValueError(f"no weight map for {cfg.architecture}")
    skip = ("lm_head.weight",) if cfg.tie_word_embeddings else ()
    rules = WEIGHT_MAPS[cfg.architecture]
    tensors = iter_tensors(model_path)
    if cfg.checkpoint_quantization == "fp8":
        tensors = dequantize_fp8(tensors, cfg.checkpoint_block_size)
    elif cfg.checkpoint_quantization is not None:
        raise WeightLoadError(
            f"{model_path}: quantization_config.quant_method {cfg.checkpoint_quantization!r} is not supported "
            "(jaxrt reads fp8 checkpoints: quant_method 'fp8', or compressed-tensors with float8 weights)"
        )
    return load_weights(abstract_state, tensors, rules, dtype, skip, stats)


def load_params(
    cfg: ModelConfig,
    model_path: str | Path,
    abstract_state: nnx.State,
    dtype: str,
    use_cache: bool | None = None,
) -> nnx.State:
    """Params for ``abstract_state``: from a converted directory, the automatic cache, or the checkpoint."""
    t0 = time.perf_counter()
    last_load_info.clear()
    if checkpoint.is_converted(model_path):
        state = checkpoint.restore_params(Path(model_path) / checkpoint.PARAMS_DIR, abstract_state)
        last_load_info.update(source="converted", seconds=time.perf_counter() - t0)
        return state
    enabled = checkpoint.converted_cache_enabled() if use_cache is None else use_cache
    key = checkpoint.cache_key(model_path, dtype, abstract_state) if enabled else None
    entry = checkpoint.cache_lookup(key) if key else None
    if entry is not None:
        try:
            state = checkpoint.restore_params(entry / checkpoint.PARAMS_DIR, abstract_state)
            last_load_info.update(source="cache", seconds=time.perf_counter() - t0, entry=str(entry))
            return state
        except Exception as e:
            logger.warning("ignoring unreadable converted-params cache entry %s: %s", entry, e)
    stats: dict[str, Any] = {}
    state = stream_weights(cfg, model_path, abstract_state, jnp.dtype(dtype), stats)
    source = "gguf" if gguf_file(model_path) is not None else "safetensors"
    last_load_info.update(source=source, seconds=time.perf_counter() - t0, **stats)
    if key and (use_cache or checkpoint.should_auto_cache(model_path)):
        checkpoint.cache_store(key, state, model_path, cfg.architecture, dtype)
    return state


def build_native_model(
    cfg: ModelConfig,
    model_path: str | Path,
    dtype: str,
    attention_backend: str,
    interpret: bool = False,
    use_cache: bool | None = None,
    quantization: str | None = None,
) -> tuple[nnx.GraphDef, nnx.State]:
    """Abstract-init the nnx model (no random weights materialised), then load its params into it.

    ``use_cache``: None follows ``JAXRT_CONVERTED_CACHE`` and the size policy of ``checkpoint``; True always
    writes the cache entry; False neither reads nor writes it. ``quantization`` ("fp8"): the loaded
    projections are quantized on the device (``jaxrt.models.quantization``); caches hold the unquantized
    params.
    """
    graphdef, abstract_state = abstract_model(cfg, dtype, attention_backend, interpret)
    state = load_params(cfg, model_path, abstract_state, dtype, use_cache)
    if quantization is None:
        return graphdef, state
    from jaxrt.models.quantization import quantize_model

    model = nnx.merge(graphdef, state)
    del state  # the bf16 projections go as each is replaced
    t0 = time.perf_counter()
    n = quantize_model(model, quantization)
    logger.info("quantized %d projections to %s in %.1f s", n, quantization, time.perf_counter() - t0)
    return nnx.split(model)
