"""From a checkpoint directory to an nnx (graphdef, state) pair ready for the jitted step."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
from flax import nnx

from jaxrt.config import ModelConfig
from jaxrt.converters.hf_config import model_config_from_hf
from jaxrt.converters.weights import WEIGHT_MAPS, iter_tensors, load_weights
from jaxrt.models import MODEL_REGISTRY, get_model_class

logger = logging.getLogger(__name__)


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

    return AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)


def has_native(architecture: str) -> bool:
    return architecture in MODEL_REGISTRY and architecture in WEIGHT_MAPS


def native_model_config(hf_config: Any) -> ModelConfig:
    cfg = model_config_from_hf(hf_config)
    if cfg.sliding_window is not None and cfg.sliding_window < cfg.max_position_embeddings:
        logger.info("%s: sliding window %d handled by the attention kernel", cfg.architecture, cfg.sliding_window)
    return cfg


def build_native_model(
    cfg: ModelConfig, model_path: str | Path, dtype: str, attention_backend: str, interpret: bool = False
) -> tuple[nnx.GraphDef, nnx.State]:
    """Abstract-init the nnx model (no random weights materialised), then stream the checkpoint into it."""
    cls = get_model_class(cfg.architecture)
    jdtype = jnp.dtype(dtype)
    abstract = nnx.eval_shape(
        lambda: cls(
            cfg, dtype=jdtype, rngs=nnx.Rngs(0), attention_backend=attention_backend, interpret=interpret
        )
    )
    graphdef, abstract_state = nnx.split(abstract)
    skip = ("lm_head.weight",) if cfg.tie_word_embeddings else ()
    state = load_weights(
        abstract_state, iter_tensors(model_path), WEIGHT_MAPS[cfg.architecture], jdtype, skip
    )
    return graphdef, state
