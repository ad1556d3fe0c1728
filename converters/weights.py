"""Declarative weight maps (transformers tensor name -> jaxrt param path) and the streaming loader.

A family's map is a list of ``WeightRule(pattern, path, transform, sharding, fuse)``: ``pattern`` is a regex
over the checkpoint's tensor name, ``path`` the nnx state path (``/``-separated, regex groups substituted),
``transform`` one of ``None`` or ``"T"`` (transpose a torch ``[out, in]`` Linear weight into a Flax
``[in, out]`` kernel), ``sharding`` the logical axes for tensor parallelism (``"tp"`` marks the sharded one),
and ``fuse`` the parts of a fused param: jaxrt keeps q/k/v and gate/up as one ``qkv_proj`` / ``gate_up_proj``
matrix each (one GEMM per step, no per-step concatenation of weights), so the checkpoint's separate tensors,
told apart by the pattern's ``part`` group, are joined along the last axis in ``fuse`` order once all arrived.
Checkpoints that are fused already (Phi-3) map straight onto them. (A tensor-parallel split of a fused param
must cut each part, not the joined axis: ``sharding`` records the logical axis only; nothing shards yet.)

The jaxrt modules name their parameters after transformers' modules, so most families share
``DECODER_WEIGHT_MAP``; a name the model has no parameter for is reported, never silently dropped.
The loader streams tensor by tensor (safetensors, sharded via the index file, or one GGUF file dequantized a
tensor at a time), so the checkpoint is never in host memory twice; it reports missing and unexpected keys
and shape mismatches by name.
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
import numpy as np
from flax import nnx
from safetensors import safe_open


@dataclass(frozen=True)
class WeightRule:
    pattern: str
    path: str
    transform: str | None = None
    sharding: tuple[str | None, ...] = ()
    fuse: tuple[str, ...] = ()


_L = r"model\.layers\.(\d+)"
_P = r"model/layers/\1"

DECODER_WEIGHT_MAP: list[WeightRule] = [
    WeightRule(r"model\.embed_tokens\.weight", "model/embed_tokens/embedding", None, ("tp", None)),
    WeightRule(
        rf"{_L}\.self_attn\.(?P<part>[qkv])_proj\.weight",
        rf"{_P}/self_attn/qkv_proj/kernel",
        "T",
        (None, "tp"),
        fuse=("q", "k", "v"),
    ),
    WeightRule(
        rf"{_L}\.self_attn\.(?P<part>[qkv])_proj\.bias",
        rf"{_P}/self_attn/qkv_proj/bias",
        None,
        ("tp",),
        fuse=("q", "k", "v"),
    ),
    WeightRule(rf"{_L}\.self_attn\.o_proj\.weight", rf"{_P}/self_attn/o_proj/kernel", "T", ("tp", None)),
    WeightRule(rf"{_L}\.self_attn\.o_proj\.bias", rf"{_P}/self_attn/o_proj/bias", None, (None,)),
    WeightRule(rf"{_L}\.self_attn\.([qk])_norm\.weight", rf"{_P}/self_attn/\2_norm/weight", None, (None,)),
    WeightRule(
        rf"{_L}\.mlp\.(?P<part>gate|up)_proj\.weight",
        rf"{_P}/mlp/gate_up_proj/kernel",
        "T",
        (None, "tp"),
        fuse=("gate", "up"),
    ),
    WeightRule(
        rf"{_L}\.mlp\.(?P<part>gate|up)_proj\.bias",
        rf"{_P}/mlp/gate_up_proj/bias",
        None,
        ("tp",),
        ("gate", "up"),
    ),
    WeightRule(rf"{_L}\.mlp\.down_proj\.weight", rf"{_P}/mlp/down_proj/kernel", "T", ("tp", None)),
    WeightRule(rf"{_L}\.mlp\.down_proj\.bias", rf"{_P}/mlp/down_proj/bias", None, (None,)),
    WeightRule(
        rf"{_L}\.(input_layernorm|post_attention_layernorm|pre_feedforward_layernorm|post_feedforward_layernorm)"
        r"\.weight",
        rf"{_P}/\2/weight",
        None,
        (None,),
    ),
    WeightRule(r"model\.norm\.weight", "model/norm/weight", None, (None,)),
    WeightRule(r"lm_head\.weight", "lm_head/kernel", "T", (None, "tp")),
]

LLAMA_WEIGHT_MAP = DECODER_WEIGHT_MAP

PHI3_WEIGHT_MAP: list[WeightRule] = [
    WeightRule(rf"{_L}\.self_attn\.qkv_proj\.weight", rf"{_P}/self_attn/qkv_proj/kernel", "T", (None, "tp")),
    WeightRule(rf"{_L}\.mlp\.gate_up_proj\.weight", rf"{_P}/mlp/gate_up_proj/kernel", "T", (None, "tp")),
    *DECODER_WEIGHT_MAP,
]

WEIGHT_MAPS: dict[str, list[WeightRule]] = {
    "LlamaForCausalLM": DECODER_WEIGHT_MAP,
    "MistralForCausalLM": DECODER_WEIGHT_MAP,
    "GraniteForCausalLM": DECODER_WEIGHT_MAP,
    "Qwen2ForCausalLM": DECODER_WEIGHT_MAP,
    "Qwen3ForCausalLM": DECODER_WEIGHT_MAP,
    "GemmaForCausalLM": DECODER_WEIGHT_MAP,
    "Gemma2ForCausalLM": DECODER_WEIGHT_MAP,
    "Gemma3ForCausalLM": DECODER_WEIGHT_MAP,
    "Olmo2ForCausalLM": DECODER_WEIGHT_MAP,
    "Phi3ForCausalLM": PHI3_WEIGHT_MAP,
}

# Tensors some checkpoints carry that no jaxrt model needs.
IGNORED = (re.compile(r".*rotary_emb\.inv_freq$"),)


class WeightLoadError(ValueError):
    pass


# ------------------------------------------------------------------------------------------ checkpoint files


def gguf_file(model_dir: str | Path) -> Path | None:
    """The one ``*.gguf`` of a checkpoint directory without safetensors, else None."""
    d = Path(model_dir)
    if any(d.glob("*.safetensors")):
        return None
    files = sorted(d.glob("*.gguf"))
    if len(files) > 1:
        raise WeightLoadError(f"{d} holds several GGUF files ({', '.join(f.name for f in files)}); keep one")
    return files[0] if files else None


def safetensors_files(model_dir: str | Path) -> list[Path]:
    d = Path(model_dir)
    index = d / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [d / f for f in sorted(set(weight_map.values()))]
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise WeightLoadError(f"no *.safetensors (or single *.gguf) files in {d}")
    return files


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The weight files of a checkpoint directory (safetensors shards, or its GGUF file)."""
    g = gguf_file(model_dir)
    return [g] if g is not None else safetensors_files(model_dir)


def iter_safetensors(model_dir: str | Path) -> Iterator[tuple[str, jax.Array]]:
    for f in safetensors_files(model_dir):
        with safe_open(str(f), framework="flax") as fh:
            for name in fh.keys():  # noqa: SIM118 - safe_open is not a dict
                yield name, fh.get_tensor(name)


def iter_gguf(path: str | Path) -> Iterator[tuple[str, np.ndarray]]:
    """Dequantize a GGUF file one tensor at a time, under transformers' tensor names.

    Uses transformers' GGUF support for the metadata, the GGUF -> transformers name map (built from the
    transformers model on the meta device, so no weights are allocated) and the per-architecture fix-ups
    (Llama's q/k permutation, Gemma's norm offset).
    """
    import torch
    from gguf import GGUFReader, dequantize
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
        read_field,
    )

    path = Path(path)
    parsed = load_gguf_checkpoint(str(path), return_tensors=False)
    hf_config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    with torch.device("meta"):
        meta_model = AutoModelForCausalLM.from_config(hf_config)
    reader = GGUFReader(str(path))
    architecture = read_field(reader, "general.architecture")[0]
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed["config"])
    name_map = get_gguf_hf_weights_map(meta_model, processor)
    del meta_model
    for tensor in reader.tensors:
        weights = dequantize(tensor.data, tensor.tensor_type)
        result = processor.process(
            weights=weights, name=tensor.name, tensor_key_mapping=name_map, parsed_parameters=parsed
        )
        if result.name in name_map:
            yield name_map[result.name], np.asarray(result.weights)


def iter_tensors(model_dir: str | Path) -> Iterator[tuple[str, Any]]:
    """Yield (transformers name, array) one tensor at a time (bf16 kept as bf16 for safetensors)."""
    g = gguf_file(model_dir)
    if g is not None:
        yield from iter_gguf(g)
    else:
        yield from iter_safetensors(model_dir)


# ---------------------------------------------------------------------------------------------- mapping


def _path_key(path: str) -> tuple[Any, ...]:
    return tuple(int(p) if p.isdigit() else p for p in path.split("/"))


def map_name(rules: list[WeightRule], name: str) -> tuple[tuple[Any, ...], WeightRule, str | None] | None:
    """(param key, rule, part of a fused param or None) of a tensor name."""
    for rule in rules:
        m = re.fullmatch(rule.pattern, name)
        if m:
            return _path_key(m.expand(rule.path)), rule, (m.group("part") if rule.fuse else None)
    return None


def load_weights(
    abstract_state: nnx.State,
    tensors: Iterator[tuple[str, Any]],
    rules: list[WeightRule],
    dtype: jnp.dtype,
    skip: tuple[str, ...] = (),
) -> nnx.State:
    """Fill ``abstract_state`` (from ``nnx.eval_shape``) with checkpoint tensors, cast to ``dtype``.

    Raises WeightLoadError naming every missing or unexpected tensor and every shape mismatch.
    """
    flat = dict(nnx.to_flat_state(abstract_state))
    wanted = dict(flat)
    loaded: dict[tuple[Any, ...], jax.Array] = {}
    unexpected, mismatched = [], []

    def shape_of(key: tuple[Any, ...]) -> tuple[int, ...]:
        return tuple(wanted[key].get_value().shape)

    parts: dict[tuple[Any, ...], dict[str, jax.Array]] = {}  # fused params still waiting for parts
    for name, tensor in tensors:
        if any(p.fullmatch(name) for p in IGNORED) or name in skip:
            continue
        hit = map_name(rules, name)
        if hit is None or hit[0] not in wanted:
            unexpected.append(name)
            continue
        key, rule, part = hit
        arr = jnp.asarray(tensor)
        if rule.transform == "T":
            arr = arr.T
        if rule.fuse:
            got = parts.setdefault(key, {})
            got[part] = (name, arr)
            if len(got) < len(rule.fuse):
                continue
            del parts[key]
            name = " + ".join(got[p][0] for p in rule.fuse)
            arr = jnp.concatenate([got[p][1] for p in rule.fuse], axis=-1)
        if tuple(arr.shape) != shape_of(key):
            mismatched.append(f"{name}: checkpoint {tuple(arr.shape)} vs model {shape_of(key)}")
            continue
        loaded[key] = arr.astype(dtype)
        del arr
    missing = ["/".join(map(str, k)) for k in wanted if k not in loaded and k not in parts]
    missing += [
        f"{'/'.join(map(str, k))} (has {', '.join(name for name, _ in got.values())}; lacks the other parts)"
        for k, got in parts.items()
    ]
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
