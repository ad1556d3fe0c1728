"""Declarative weight maps (transformers tensor name -> jaxrt param path) and the streaming loader.

A family's map is a list of ``WeightRule(pattern, path, transform, sharding, fuse)``: ``pattern`` is a regex
over the checkpoint's tensor name, ``path`` the nnx state path (``/``-separated, regex groups substituted),
``transform`` one of ``None`` or ``"T"`` (transpose a torch ``[out, in]`` Linear weight into a Flax
``[in, out]`` kernel; the attention projections keep ``[out, in]``, see ``layers.OutInLinear``), ``sharding``
the logical axes for tensor parallelism (``"tp"`` marks the sharded one), ``fuse`` the parts of a fused
param and ``fuse_axis`` the param's axis they join along: jaxrt keeps q/k/v and gate/up as one ``qkv_proj`` /
``gate_up_proj`` matrix each (one GEMM per step, no per-step concatenation of weights), so the checkpoint's
separate tensors, told apart by the pattern's ``part`` group, are joined in ``fuse`` order once all arrived.
Checkpoints that are fused already (Phi-3) map straight onto them. (A tensor-parallel split of a fused param
must cut each part, not the joined axis: ``sharding`` records the logical axis only; nothing shards yet.)

The jaxrt modules name their parameters after transformers' modules, so most families share
``DECODER_WEIGHT_MAP``; a name the model has no parameter for is reported, never silently dropped.
The loader streams tensor by tensor (safetensors, sharded via the index file, read as views of the mmap-ed
files; or one GGUF file dequantized a tensor at a time), so the checkpoint is never copied in host memory:
host -> device transfers run asynchronously on a few threads, and each param's transpose / join / cast is one
jitted program on the device (compiled once per shape), with a bounded window of raw tensors in flight. It
reports missing and unexpected keys and shape mismatches by name.
"""

from __future__ import annotations

import functools
import json
import math
import mmap
import os
import re
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx


@dataclass(frozen=True)
class WeightRule:
    pattern: str
    path: str
    transform: str | None = None
    sharding: tuple[str | None, ...] = ()
    fuse: tuple[str, ...] = ()
    fuse_axis: int = -1


_L = r"model\.layers\.(\d+)"
_P = r"model/layers/\1"

DECODER_WEIGHT_MAP: list[WeightRule] = [
    WeightRule(r"model\.embed_tokens\.weight", "model/embed_tokens/embedding", None, ("tp", None)),
    WeightRule(
        rf"{_L}\.self_attn\.(?P<part>[qkv])_proj\.weight",
        rf"{_P}/self_attn/qkv_proj/weight",
        None,
        ("tp", None),
        fuse=("q", "k", "v"),
        fuse_axis=0,
    ),
    WeightRule(
        rf"{_L}\.self_attn\.(?P<part>[qkv])_proj\.bias",
        rf"{_P}/self_attn/qkv_proj/bias",
        None,
        ("tp",),
        fuse=("q", "k", "v"),
    ),
    WeightRule(rf"{_L}\.self_attn\.o_proj\.weight", rf"{_P}/self_attn/o_proj/weight", None, (None, "tp")),
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
    WeightRule(rf"{_L}\.self_attn\.qkv_proj\.weight", rf"{_P}/self_attn/qkv_proj/weight", None, ("tp", None)),
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


# safetensors dtype names -> numpy dtypes (bf16 and fp8 through ml_dtypes, which jax itself uses)
_SAFETENSORS_DTYPES: dict[str, Any] = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U64": np.uint64,
    "U32": np.uint32,
    "U16": np.uint16,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def iter_safetensors_file(path: str | Path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) of one safetensors file in file order, each array a read-only view of the mmap-ed file.

    Nothing is read here: the pages are read (from the page cache or disk) when the array is copied, e.g. by
    the host -> device transfer, so the checkpoint is never copied into host memory first. The header is
    validated (dtypes, sizes, offsets inside the file) and any problem raised as WeightLoadError.
    """
    path = Path(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 0 or 8 + n > size:
            raise WeightLoadError(f"{path}: not a safetensors file (truncated or bad header length)")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise WeightLoadError(f"{path}: unreadable safetensors header: {e}") from e
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size > 8 + n else None
    header.pop("__metadata__", None)
    base = 8 + n
    for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise WeightLoadError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        dtype = np.dtype(dtype)
        shape = tuple(info["shape"])
        begin, end = info["data_offsets"]
        count = math.prod(shape)
        if end - begin != count * dtype.itemsize or begin < 0 or base + end > size:
            raise WeightLoadError(
                f"{path}: tensor {name} ({info['dtype']} {list(shape)}) has bytes [{begin}, {end}) that do "
                f"not match its shape or lie outside the file's {size - base} data bytes"
            )
        if count == 0:
            yield name, np.zeros(shape, dtype)
            continue
        if hasattr(mmap, "MADV_WILLNEED"):  # start reading ahead while earlier tensors are transferred
            start = (base + begin) // mmap.PAGESIZE * mmap.PAGESIZE
            mm.madvise(mmap.MADV_WILLNEED, start, base + end - start)
        yield name, np.frombuffer(mm, dtype, count, base + begin).reshape(shape)


def iter_safetensors(model_dir: str | Path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) of every tensor of a safetensors checkpoint (all its shards), as mmap views."""
    for f in safetensors_files(model_dir):
        yield from iter_safetensors_file(f)


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


# FP8 checkpoints: a ``*.weight`` in float8 comes with ``*.weight_scale_inv`` (transformers' fp8 format) or
# ``*.weight_scale`` (compressed-tensors); both multiply. Static activation and KV scales are not used (jaxrt
# quantizes activations per token, and keeps its KV cache in the model's dtype).
_FP8_DTYPES = (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2))
_SCALE_SUFFIXES = (".weight_scale_inv", ".weight_scale")
_UNUSED_SCALES = re.compile(r".*\.(input_scale|k_scale|v_scale|kv_scale)$")


def dequantize_fp8(
    tensors: Iterator[tuple[str, Any]], block_size: tuple[int, int] | None = None
) -> Iterator[tuple[str, Any]]:
    """``tensors`` with each float8 weight and its scale joined into the f32 weight they stand for (under the
    weight's name, a device array); scales per tensor (one value), per output channel (``[out]`` or ``[out, 1]``) or per
    ``block_size`` block (``[ceil(out / bo), ceil(in / bi)]``). Other tensors pass through. A weight or scale
    left without its partner is a WeightLoadError."""
    weights: dict[str, Any] = {}  # base name -> float8 weight awaiting its scale
    scales: dict[str, Any] = {}
    for name, arr in tensors:
        if _UNUSED_SCALES.fullmatch(name):
            continue
        suffix = next((x for x in _SCALE_SUFFIXES if name.endswith(x)), None)
        if suffix is not None:
            base = name[: -len(suffix)]
            if base in weights:
                yield base + ".weight", _dequantize(base, weights.pop(base), arr, block_size)
            else:
                scales[base] = arr
        elif name.endswith(".weight") and np.dtype(arr.dtype) in _FP8_DTYPES:
            base = name[: -len(".weight")]
            if base in scales:
                yield name, _dequantize(base, arr, scales.pop(base), block_size)
            else:
                weights[base] = arr
        else:
            yield name, arr
    if weights or scales:
        raise WeightLoadError(
            f"fp8 checkpoint: weights without a scale {sorted(weights)}, scales without a weight {sorted(scales)}"
        )


def _dequantize(base: str, w: Any, scale: Any, block_size: tuple[int, int] | None) -> jax.Array:
    """The weight ``w * scale`` (f32), computed on the device: the float8 bytes cross to it, not f32 ones
    (and the host's float8 conversions are slow: ~170 MB/s on a CPU core)."""
    out, inp = w.shape
    s_shape = tuple(np.shape(scale))
    if math.prod(s_shape) == 1:
        kind = "tensor"
    elif s_shape in ((out,), (out, 1)):
        kind = "channel"
    elif block_size is not None and s_shape == (-(-out // block_size[0]), -(-inp // block_size[1])):
        kind = "block"
    else:
        raise WeightLoadError(
            f"{base}: fp8 scale of shape {list(s_shape)} fits neither a tensor, its {out} output channels nor "
            f"blocks of {block_size} of its {[out, inp]}"
        )
    return _dequantize_program(jnp.asarray(w), jnp.asarray(scale), kind, block_size)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _dequantize_program(w: jax.Array, s: jax.Array, kind: str, block_size: tuple[int, int] | None):
    w = w.astype(jnp.float32)
    s = s.astype(jnp.float32)
    out, inp = w.shape
    if kind == "tensor":
        return w * s.reshape(())
    if kind == "channel":
        return w * s.reshape(out, 1)
    bo, bi = block_size
    full = jnp.repeat(jnp.repeat(s, bo, axis=0), bi, axis=1)[:out, :inp]  # fused by XLA, never stored
    return w * full


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


# The load pipeline: host -> device transfers run on a few threads (``jax.device_put``, asynchronous) while
# the main thread maps names and dispatches each param's transform (transpose, join of a fused param's parts,
# cast) as a jitted program. Device memory holds the params plus up to ``TRANSFER_WINDOW_BYTES`` of raw
# tensors (more only for one larger tensor, or parts of fused params still waiting for their siblings).
TRANSFER_THREADS = 4
TRANSFER_WINDOW_BYTES = 1 << 30
_LOOKAHEAD = 2  # params whose transform waits for later transfers to be submitted first


@functools.partial(jax.jit, static_argnames=("transpose", "dtype", "axis"))
def _assemble(*parts: jax.Array, transpose: bool, dtype: np.dtype, axis: int = -1) -> jax.Array:
    """One param from its checkpoint tensor(s): joined along ``axis``, transposed if ``transpose``, cast.
    Compiled once per (part shapes, dtypes, transform): a decoder's layers share theirs."""
    x = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=axis)
    return (x.T if transpose else x).astype(dtype)


@jax.jit
def _join_rows(*parts: jax.Array) -> jax.Array:
    """Parts of a transposed fused param joined before the transpose: ``concat(parts, 0).T`` is
    ``concat([p.T ...], -1)``. A program of its own: XLA:CPU fused into the transpose runs 2-3x slower."""
    return jnp.concatenate(parts, axis=0)


def _timed_put(tensor: Any, device: Any) -> tuple[jax.Array, float, int | None]:
    """(array on ``device``, seconds in ``jax.device_put``, address of the host data or None)."""
    if isinstance(tensor, jax.Array):
        return tensor, 0.0, None
    t0 = time.perf_counter()
    arr = jax.device_put(tensor, device)
    return arr, time.perf_counter() - t0, tensor.ctypes.data if isinstance(tensor, np.ndarray) else None


def _owned(arr: jax.Array, host_ptr: int | None) -> jax.Array:
    """``arr`` in a buffer of its own. On CPU, ``jax.device_put`` of an aligned read-only array (an mmap view
    of a safetensors file) may alias its memory: a param would then be the page cache of the file."""
    on_cpu = host_ptr is not None and all(d.platform == "cpu" for d in arr.devices())
    return jnp.copy(arr) if on_cpu and arr.unsafe_buffer_pointer() == host_ptr else arr


@dataclass
class _Job:
    key: tuple[Any, ...]
    name: str
    transfers: list[Future]
    nbytes: int
    transpose: bool
    axis: int = -1  # the param's axis a fused param's parts join along


def load_weights(
    abstract_state: nnx.State,
    tensors: Iterator[tuple[str, Any]],
    rules: list[WeightRule],
    dtype: jnp.dtype,
    skip: tuple[str, ...] = (),
    stats: dict[str, Any] | None = None,
) -> nnx.State:
    """Fill ``abstract_state`` (from ``nnx.eval_shape``) with checkpoint tensors, cast to ``dtype``.

    ``tensors`` yields (transformers name, array): numpy arrays (mmap views for safetensors, see
    ``iter_safetensors``) or jax arrays. Transfers, transforms and reading overlap; the returned params are
    ready (blocked on). Raises WeightLoadError naming every missing or unexpected tensor and every shape
    mismatch.

    ``stats``, when given, receives a breakdown: ``tensors`` and ``bytes`` transferred, ``programs`` (distinct
    transform programs), ``peak_inflight_bytes`` (most raw tensor bytes on the device or on their way at
    once), and seconds: ``read_s`` (pulling from ``tensors``: headers, GGUF dequantization), ``dispatch_s``
    (submitting transfers, dispatching transforms, first calls' compiles included), ``compile_s`` (those first
    calls), ``wait_s`` (blocked on the transfer window and the final sync), ``transfer_call_s`` (time inside
    ``jax.device_put`` on the transfer threads, summed).
    """
    dtype = np.dtype(dtype)
    # Where jnp.asarray would put them: ``jax.default_device`` is thread-local, the transfer threads miss it.
    device = jax.config.jax_default_device
    if isinstance(device, str):
        device = jax.devices(device)[0]
    flat = dict(nnx.to_flat_state(abstract_state))
    loaded: dict[tuple[Any, ...], jax.Array] = {}
    assigned: set[tuple[Any, ...]] = set()  # params a transform (or the plain transfer) will produce
    unexpected, mismatched = [], []
    st = dict.fromkeys(("read_s", "dispatch_s", "compile_s", "wait_s"), 0.0)
    n_tensors = n_bytes = 0
    programs: set[tuple[Any, ...]] = set()

    def shape_of(key: tuple[Any, ...]) -> tuple[int, ...]:
        return tuple(flat[key].get_value().shape)

    parts: dict[tuple[Any, ...], dict[str, tuple[str, tuple[int, ...], Future, int]]] = {}  # awaiting parts
    jobs: deque[_Job] = deque()  # all parts submitted, transform not dispatched yet
    running: deque[tuple[jax.Array, int]] = deque()  # dispatched: (param, raw bytes it frees once done)
    raw_bytes = 0  # raw tensors on the device (or on their way) not yet known to be consumed
    put_seconds: list[float] = []
    peak = [0]  # most raw bytes in flight at once

    def dispatch(job: _Job) -> None:
        nonlocal raw_bytes
        arrs, ptrs = [], []
        for fut in job.transfers:
            arr, dt, ptr = fut.result()
            arrs.append(arr)
            ptrs.append(ptr)
            put_seconds.append(dt)
        if not job.transpose and len(arrs) == 1 and arrs[0].dtype == dtype:
            loaded[job.key] = _owned(arrs[0], ptrs[0])  # the transferred tensor is the param
            raw_bytes -= job.nbytes
            return
        sig = (tuple((a.shape, a.dtype) for a in arrs), job.transpose, dtype)
        t0 = time.perf_counter()
        if job.transpose and len(arrs) > 1:
            arrs = [_join_rows(*arrs)]
        out = _assemble(*arrs, transpose=job.transpose, dtype=dtype, axis=job.axis)
        if sig not in programs:
            programs.add(sig)
            st["compile_s"] += time.perf_counter() - t0
        loaded[job.key] = out
        running.append((out, job.nbytes))

    def retire() -> bool:
        """Make room in the transfer window: dispatch the oldest waiting transform, else wait for the oldest
        running one. False when there is nothing to retire (only fused parts awaiting their siblings)."""
        nonlocal raw_bytes
        if jobs:
            dispatch(jobs.popleft())
        elif running:
            out, nbytes = running.popleft()
            t0 = time.perf_counter()
            out.block_until_ready()
            st["wait_s"] += time.perf_counter() - t0
            raw_bytes -= nbytes
        else:
            return False
        return True

    with ThreadPoolExecutor(TRANSFER_THREADS, thread_name_prefix="jaxrt-load") as pool:

        def submit(tensor: Any) -> tuple[Future, int]:
            nonlocal raw_bytes, n_tensors, n_bytes
            nbytes = int(tensor.nbytes)
            t0 = time.perf_counter()
            while raw_bytes + nbytes > TRANSFER_WINDOW_BYTES and retire():
                pass
            raw_bytes += nbytes
            peak[0] = max(peak[0], raw_bytes)
            n_tensors += 1
            n_bytes += nbytes
            fut = pool.submit(_timed_put, tensor, device)
            st["dispatch_s"] += time.perf_counter() - t0
            return fut, nbytes

        it = iter(tensors)
        while True:
            t0 = time.perf_counter()
            item = next(it, None)
            st["read_s"] += time.perf_counter() - t0
            if item is None:
                break
            name, tensor = item
            if any(p.fullmatch(name) for p in IGNORED) or name in skip:
                continue
            hit = map_name(rules, name)
            if hit is None or hit[0] not in flat:
                unexpected.append(name)
                continue
            key, rule, part = hit
            transpose = rule.transform == "T"
            shape = tuple(np.shape(tensor))
            if transpose:
                shape = shape[::-1]
            if not rule.fuse:
                if shape != shape_of(key):
                    mismatched.append(f"{name}: checkpoint {shape} vs model {shape_of(key)}")
                    continue
                fut, nbytes = submit(tensor)
                jobs.append(_Job(key, name, [fut], nbytes, transpose))
                assigned.add(key)
            else:
                fut, nbytes = submit(tensor)
                got = parts.setdefault(key, {})
                got[part] = (name, shape, fut, nbytes)
                if len(got) < len(rule.fuse):
                    continue
                del parts[key]
                name = " + ".join(got[p][0] for p in rule.fuse)
                shapes = [got[p][1] for p in rule.fuse]
                nbytes = sum(got[p][3] for p in rule.fuse)
                ax = rule.fuse_axis % len(shapes[0]) if shapes[0] else 0
                if not all(shapes) or len({s[:ax] + s[ax + 1 :] for s in shapes}) != 1:
                    mismatched.append(
                        f"{name}: checkpoint parts {', '.join(map(str, shapes))} do not join along axis "
                        f"{rule.fuse_axis}; model {shape_of(key)}"
                    )
                    raw_bytes -= nbytes
                    continue
                joined = (*shapes[0][:ax], sum(s[ax] for s in shapes), *shapes[0][ax + 1 :])
                if joined != shape_of(key):
                    mismatched.append(f"{name}: checkpoint {joined} vs model {shape_of(key)}")
                    raw_bytes -= nbytes
                    continue
                jobs.append(
                    _Job(key, name, [got[p][2] for p in rule.fuse], nbytes, transpose, rule.fuse_axis)
                )
                assigned.add(key)
            t0 = time.perf_counter()
            while len(jobs) > _LOOKAHEAD:
                dispatch(jobs.popleft())
            st["dispatch_s"] += time.perf_counter() - t0

        missing = ["/".join(map(str, k)) for k in flat if k not in assigned and k not in parts]
        missing += [
            f"{'/'.join(map(str, k))} (has {', '.join(v[0] for v in got.values())}; lacks the other parts)"
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
        t0 = time.perf_counter()
        while jobs:
            dispatch(jobs.popleft())
        st["dispatch_s"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(list(loaded.values()))
    st["wait_s"] += time.perf_counter() - t0
    if stats is not None:
        stats.update(
            tensors=n_tensors,
            bytes=n_bytes,
            programs=len(programs),
            peak_inflight_bytes=peak[0],
            **st,
            transfer_call_s=sum(put_seconds),
        )
    for key, arr in loaded.items():
        flat[key] = flat[key].replace(arr)
    return nnx.from_flat_state(flat)
