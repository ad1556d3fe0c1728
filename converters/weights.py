"""Declarative weight maps (transformers tensor name -> jaxrt param path) and the streaming loader.

A family's map is a list of ``WeightRule(pattern, path, transform, sharding)``: ``pattern`` is a regex over the
checkpoint's tensor name, ``path`` the nnx state path (``/``-separated, regex groups substituted), ``transform``
one of ``None`` or ``"T"`` (transpose a torch ``[out, in]`` Linear weight into a Flax ``[in, out]`` kernel),
and ``sharding`` the logical axes for tensor parallelism (``"tp"`` marks the sharded one).
The loader streams tensor by tensor from safetensors (sharded checkpoints via their index file), so the
checkpoint is never in memory twice, and reports missing and unexpected keys by name.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from safetensors import safe_open


@dataclass(frozen=True)
class WeightRule:
    pattern: str
    path: str
    transform: str | None = None
    sharding: tuple[str | None, ...] = ()


LLAMA_WEIGHT_MAP: list[WeightRule] = [
    WeightRule(r"model\.embed_tokens\.weight", "model/embed_tokens/embedding", None, ("tp", None)),
    WeightRule(
        r"model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.weight",
        r"model/layers/\1/self_attn/\2_proj/kernel",
        "T",
        (None, "tp"),
    ),
    WeightRule(
        r"model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.bias",
        r"model/layers/\1/self_attn/\2_proj/bias",
        None,
        ("tp",),
    ),
    WeightRule(
        r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight",
        r"model/layers/\1/self_attn/o_proj/kernel",
        "T",
        ("tp", None),
    ),
    WeightRule(
        r"model\.layers\.(\d+)\.self_attn\.o_proj\.bias",
        r"model/layers/\1/self_attn/o_proj/bias",
        None,
        (None,),
    ),
    WeightRule(
        r"model\.layers\.(\d+)\.mlp\.(gate|up)_proj\.weight",
        r"model/layers/\1/mlp/\2_proj/kernel",
        "T",
        (None, "tp"),
    ),
    WeightRule(
        r"model\.layers\.(\d+)\.mlp\.(gate|up)_proj\.bias", r"model/layers/\1/mlp/\2_proj/bias", None, ("tp",)
    ),
    WeightRule(
        r"model\.layers\.(\d+)\.mlp\.down_proj\.weight",
        r"model/layers/\1/mlp/down_proj/kernel",
        "T",
        ("tp", None),
    ),
    WeightRule(
        r"model\.layers\.(\d+)\.mlp\.down_proj\.bias", r"model/layers/\1/mlp/down_proj/bias", None, (None,)
    ),
    WeightRule(
        r"model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight",
        r"model/layers/\1/\2/weight",
        None,
        (None,),
    ),
    WeightRule(r"model\.norm\.weight", "model/norm/weight", None, (None,)),
    WeightRule(r"lm_head\.weight", "lm_head/kernel", "T", (None, "tp")),
]

WEIGHT_MAPS: dict[str, list[WeightRule]] = {
    "LlamaForCausalLM": LLAMA_WEIGHT_MAP,
    "MistralForCausalLM": LLAMA_WEIGHT_MAP,
}

# Tensors some checkpoints carry that no jaxrt model needs.
IGNORED = (re.compile(r".*rotary_emb\.inv_freq$"),)


class WeightLoadError(ValueError):
    pass


def safetensors_files(model_dir: str | Path) -> list[Path]:
    d = Path(model_dir)
    index = d / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [d / f for f in sorted(set(weight_map.values()))]
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise WeightLoadError(f"no *.safetensors files in {d}")
    return files


def iter_tensors(model_dir: str | Path) -> Iterator[tuple[str, jax.Array]]:
    """Yield (name, array) one tensor at a time, as jax arrays (bf16 kept as bf16)."""
    for f in safetensors_files(model_dir):
        with safe_open(str(f), framework="flax") as fh:
            for name in fh.keys():  # noqa: SIM118 - safe_open is not a dict
                yield name, fh.get_tensor(name)


def _path_key(path: str) -> tuple[Any, ...]:
    return tuple(int(p) if p.isdigit() else p for p in path.split("/"))


def map_name(rules: list[WeightRule], name: str) -> tuple[tuple[Any, ...], WeightRule] | None:
    for rule in rules:
        if re.fullmatch(rule.pattern, name):
            return _path_key(re.sub(rule.pattern, rule.path, name)), rule
    return None


def load_weights(
    abstract_state: nnx.State,
    tensors: Iterator[tuple[str, jax.Array]],
    rules: list[WeightRule],
    dtype: jnp.dtype,
    skip: tuple[str, ...] = (),
) -> nnx.State:
    """Fill ``abstract_state`` (from ``nnx.eval_shape``) with checkpoint tensors, cast to ``dtype``.

    Raises WeightLoadError naming every missing or unexpected tensor and every shape mismatch.
    """
    flat = dict(nnx.to_flat_state(abstract_state))
    wanted = {k: v for k, v in flat.items()}
    loaded: dict[tuple[Any, ...], jax.Array] = {}
    unexpected, mismatched = [], []
    for name, tensor in tensors:
        if any(p.fullmatch(name) for p in IGNORED) or name in skip:
            continue
        hit = map_name(rules, name)
        if hit is None or hit[0] not in wanted:
            unexpected.append(name)
            continue
        key, rule = hit
        arr = jnp.asarray(tensor)
        if rule.transform == "T":
            arr = arr.T
        target = wanted[key]
        if tuple(arr.shape) != tuple(target.get_value().shape):
            mismatched.append(
                f"{name}: checkpoint {tuple(arr.shape)} vs model {tuple(target.get_value().shape)}"
            )
            continue
        loaded[key] = arr.astype(dtype)
    missing = ["/".join(map(str, k)) for k in wanted if k not in loaded]
    problems = []
    if missing:
        problems.append(f"missing tensors for params: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors in checkpoint: {', '.join(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {'; '.join(mismatched)}")
    if problems:
        raise WeightLoadError("; ".join(problems))
    for key, arr in loaded.items():
        flat[key] = flat[key].replace(arr)
    return nnx.from_flat_state(flat)
