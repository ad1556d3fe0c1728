"""Checkpoint safetensors -> flat ``{torch parameter name: jax.Array}`` for a transformers model built on meta.

Names are resolved with transformers' own loading rules (the model's weight renamings, base-model prefix
add/strip, and `WeightConverter`s such as per-expert -> fused MoE tensors), so whatever ``from_pretrained``
accepts for that class is accepted here. Plain tensors stream one at a time (read, cast to the dtype the model
declares for that parameter, handed to JAX, dropped); tensors that a converter merges are read lazily and
converted once the whole group has been seen.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrt.converters.weights import WeightLoadError, safetensors_files

logger = logging.getLogger(__name__)

_TORCH_TO_JAX = {
    "float32": jnp.float32,
    "float16": jnp.float16,
    "bfloat16": jnp.bfloat16,
    "float64": jnp.float32,  # no x64 in jaxrt
    "int64": jnp.int32,
    "int32": jnp.int32,
    "int16": jnp.int16,
    "int8": jnp.int8,
    "uint8": jnp.uint8,
    "bool": jnp.bool_,
}


def jax_dtype(torch_dtype: Any) -> jnp.dtype:
    name = str(torch_dtype).replace("torch.", "")
    if name not in _TORCH_TO_JAX:
        raise WeightLoadError(f"torch dtype {name} has no jaxrt equivalent")
    return jnp.dtype(_TORCH_TO_JAX[name])


def torch_to_jax(t: Any, dtype: jnp.dtype | None = None) -> jax.Array:
    """A CPU torch tensor as a jax array (bf16 via a bit view, no float round trip), optionally cast."""
    import torch

    t = t.detach()
    if t.dtype == torch.bfloat16:
        arr = jnp.asarray(t.contiguous().view(torch.int16).numpy()).view(jnp.bfloat16)
    else:
        arr = jnp.asarray(np.ascontiguousarray(t.numpy()))
    if dtype is not None and arr.dtype != dtype:
        arr = arr.astype(dtype)
    return arr


def expected_tensors(model: Any) -> dict[str, Any]:
    """``{name: meta tensor}`` for what the checkpoint must provide: parameters and persistent buffers.

    Tied parameters appear once (under the name ``named_parameters`` keeps); their aliases are in `tied_aliases`.
    """
    out = dict(model.named_parameters())
    persistent = set(model.state_dict().keys())
    for name, buf in model.named_buffers():
        if name in persistent:
            out[name] = buf
    return out


def tied_aliases(model: Any) -> dict[str, str]:
    """``{alias name: canonical name}`` for state-dict entries that share storage with another parameter."""
    canonical: dict[int, str] = {}
    for name, p in model.named_parameters():
        canonical.setdefault(id(p), name)
    aliases = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if canonical[id(p)] != name:
            aliases[name] = canonical[id(p)]
    return aliases


def _ordered_keys(files: list[Path]) -> list[tuple[str, Path]]:
    from safetensors import safe_open
    from transformers.core_model_loading import dot_natural_key

    keys = []
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            keys.extend((k, f) for k in fh.keys())  # noqa: SIM118 - safe_open is not a dict
    # converters that stack experts rely on natural order (experts.2 before experts.10), as transformers does
    return sorted(keys, key=lambda kf: dot_natural_key(kf[0]))


def load_params(model: Any, model_path: str | Path) -> dict[str, jax.Array]:
    """Load the checkpoint into ``{param name: jax.Array}`` matching `expected_tensors` (shapes and dtypes).

    Raises `WeightLoadError` naming missing, unexpected and mis-shaped tensors.
    """
    from safetensors import safe_open
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    files = safetensors_files(model_path)
    expected = expected_tensors(model)
    aliases = tied_aliases(model)
    meta_state = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None) or None
    mapping = get_model_conversion_mapping(model)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    ignore_unexpected = list(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])

    params: dict[str, jax.Array] = {}
    pending: dict[str, Any] = {}  # first target name -> converter collecting its sources
    unexpected, mismatched = [], []

    def accept(name: str, tensor: Any) -> None:
        name = aliases.get(name, name)
        if name not in expected:
            unexpected.append(name)
            return
        target = expected[name]
        if tuple(tensor.shape) != tuple(target.shape):
            mismatched.append(f"{name}: checkpoint {tuple(tensor.shape)} vs model {tuple(target.shape)}")
            return
        params[name] = torch_to_jax(tensor, jax_dtype(target.dtype))

    with contextlib.ExitStack() as stack:
        handles = {f: stack.enter_context(safe_open(str(f), framework="pt")) for f in files}
        for key, f in _ordered_keys(files):
            renamed, pattern = rename_source_key(key, renamings, converters, prefix, meta_state)
            if renamed not in meta_state and key in meta_state:
                renamed, pattern = rename_source_key(key, [], [], prefix, meta_state)
            if pattern is not None and renamed in meta_state:
                conv = pending.setdefault(renamed, copy.deepcopy(by_pattern[pattern]))
                conv.add_tensor(renamed, key, pattern, lambda fh=handles[f], k=key: fh.get_tensor(k))
                continue
            if renamed not in meta_state:
                if not any(re.search(p, key) for p in ignore_unexpected):
                    unexpected.append(key)
                continue
            accept(renamed, handles[f].get_tensor(key))
        for first, conv in pending.items():
            for name, tensor in conv.convert(first, model=model, config=model.config).items():
                accept(name, tensor[0] if isinstance(tensor, list) else tensor)
        pending.clear()

    missing = [n for n in expected if n not in params]
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors in checkpoint: {', '.join(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {'; '.join(mismatched)}")
    if missing or mismatched:
        raise WeightLoadError(f"{type(model).__name__} from {model_path}: " + "; ".join(problems))
    if unexpected:
        logger.warning("%s: ignoring %s", type(model).__name__, "; ".join(problems))
    return params
