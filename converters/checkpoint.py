"""Converted checkpoints: jaxrt params saved with Orbax, reloaded without re-reading safetensors or GGUF.

Two uses, one format:

- ``convert_checkpoint(src, dst, dtype=None)`` (``jaxrt convert SRC DST``) writes a self-contained,
  servable directory: ``params/`` (Orbax), ``jaxrt_converted.json`` (what it was made from) and the source's
  config, generation config and tokenizer files. ``Engine(model_path=dst)`` loads it directly.
- An automatic cache under ``jaxrt.envs.cache_dir() / "converted"``, keyed by the checkpoint's weight files
  (resolved path, names, sizes, modification times), the compute dtype and the model's parameter layout. The
  loader restores from it whenever an entry exists. It writes one after loading a GGUF file (dequantizing is
  the slow part: 21 s vs 1.3 s from the entry for the default model on CPU) or a safetensors checkpoint of at
  least ``AUTO_CACHE_MIN_BYTES`` (default: never, since streaming safetensors is as fast as restoring; see
  benchmarks/RESULTS.md). ``JAXRT_CONVERTED_CACHE=1`` writes entries for every checkpoint, ``0`` turns the
  cache off. Stale entries (source gone or changed) are dropped when a new entry is written, and at most
  ``MAX_CACHE_ENTRIES`` are kept (least recently used go first).

Params are stored as a flat ``{"model.layers.0.self_attn.qkv_proj.weight": array}`` dict (``weight``:
``[out, in]`` as in transformers; ``kernel``: Flax's ``[in, out]``), so the layout is readable without
jaxrt; restoring casts to the requested dtype and places arrays on the default device.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrt import envs

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # bump when weight maps or the stored layout change: old cache entries stop matching
META_FILE = "jaxrt_converted.json"
PARAMS_DIR = "params"
# Safetensors checkpoints from this size on are written to the cache automatically; None: never (measured
# on CPU, restoring the Orbax copy is not faster than streaming safetensors: benchmarks/RESULTS.md, Loading).
AUTO_CACHE_MIN_BYTES: int | None = None
MAX_CACHE_ENTRIES = 8
# Non-weight files a servable directory needs (config, generation config, tokenizer, chat template).
_COPY_SUFFIXES = (".json", ".txt", ".model", ".tiktoken", ".jinja", ".py")
_SKIP_FILES = ("model.safetensors.index.json", META_FILE)


def converted_cache_mode() -> str:
    """``JAXRT_CONVERTED_CACHE``: ``auto`` (default: use entries, write them for GGUF sources and checkpoints
    of at least ``AUTO_CACHE_MIN_BYTES``), ``1`` (also write them for every checkpoint), ``0`` (off)."""
    v = os.environ.get("JAXRT_CONVERTED_CACHE", "auto").strip().lower()
    if v in ("0", "off", "false", "no"):
        return "off"
    return "always" if v in ("1", "on", "true", "yes", "always") else "auto"


def converted_cache_enabled() -> bool:
    return converted_cache_mode() != "off"


def cache_root() -> Path:
    return envs.cache_dir() / "converted"


def is_converted(model_dir: str | Path) -> bool:
    d = Path(model_dir)
    return (d / META_FILE).is_file() and (d / PARAMS_DIR).is_dir()


# ------------------------------------------------------------------------------------- flat params <-> Orbax


def _flat_name(key: tuple[Any, ...]) -> str:
    return ".".join(str(k) for k in key)


def state_to_flat(state: nnx.State) -> dict[str, jax.Array]:
    return {_flat_name(k): v.get_value() for k, v in nnx.to_flat_state(state)}


def param_layout(abstract_state: nnx.State) -> list[tuple[str, list[int], str]]:
    out = []
    for k, v in nnx.to_flat_state(abstract_state):
        val = v.get_value()
        out.append((_flat_name(k), list(val.shape), str(val.dtype)))
    return sorted(out)


def _checkpointer(restore_gb: float | None = None):
    import orbax.checkpoint as ocp

    # OCDBT + zarr2 without compression: measured fastest to restore (zstd decompression costs more than the
    # extra bytes); the files are about the size of the params. `restore_concurrent_gb` bounds the host
    # buffers in flight: unbounded, a restore briefly holds the params twice.
    handler = ocp.PyTreeCheckpointHandler(
        use_ocdbt=True, use_zarr3=False, use_compression=False, restore_concurrent_gb=restore_gb
    )
    return ocp.Checkpointer(handler)


def _restore_budget_gb(sizes: list[int]) -> float:
    """In-flight restore bytes: the largest array (a smaller budget cannot hold it), at least 1/8 of the total
    and 128 MiB, so that reads still overlap. Orbax counts this budget in decimal GB (1e9 bytes)."""
    return max(max(sizes, default=0) * 1.05, sum(sizes) / 8, 128 << 20) / 1e9


def save_params(state: nnx.State, directory: str | Path) -> None:
    """Write ``state``'s arrays with Orbax to ``directory`` (which must not exist yet)."""
    import orbax.checkpoint as ocp

    with _checkpointer() as ckptr:
        ckptr.save(Path(directory).absolute(), args=ocp.args.PyTreeSave(state_to_flat(state)))


def stored_shapes(directory: str | Path) -> dict[str, tuple[int, ...]]:
    with _checkpointer() as ckptr:
        meta = ckptr.metadata(Path(directory).absolute())
    tree = getattr(meta, "item_metadata", None) or meta
    tree = getattr(tree, "tree", None) or tree
    return {name: tuple(m.shape) for name, m in dict(tree).items()}


def restore_params(directory: str | Path, abstract_state: nnx.State) -> nnx.State:
    """Restore into the layout of ``abstract_state`` (from ``nnx.eval_shape``), cast to its dtypes, on the
    default device. Raises ValueError naming missing/unexpected params or shape mismatches."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    flat = list(nnx.to_flat_state(abstract_state))
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target, restore_args = {}, {}
    for k, v in flat:
        val = v.get_value()
        name = _flat_name(k)
        target[name] = jax.ShapeDtypeStruct(val.shape, val.dtype, sharding=sharding)
        restore_args[name] = ocp.ArrayRestoreArgs(sharding=sharding, dtype=val.dtype)
    shapes = stored_shapes(directory)
    missing = sorted(set(target) - set(shapes))
    unexpected = sorted(set(shapes) - set(target))
    mismatched = [
        f"{n}: stored {shapes[n]} vs model {tuple(target[n].shape)}"
        for n in sorted(set(target) & set(shapes))
        if shapes[n] != tuple(target[n].shape)
    ]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"converted checkpoint {directory} does not fit the model: missing {missing}, "
            f"unexpected {unexpected}, shape mismatches {mismatched}"
        )
    sizes = [int(np.prod(t.shape)) * np.dtype(t.dtype).itemsize for t in target.values()]
    with _checkpointer(_restore_budget_gb(sizes)) as ckptr:
        restored = ckptr.restore(directory, args=ocp.args.PyTreeRestore(target, restore_args=restore_args))
    return nnx.from_flat_state([(k, v.replace(restored[_flat_name(k)])) for k, v in flat])


# ---------------------------------------------------------------------------------------- automatic cache


def _file_signature(model_dir: str | Path) -> list[tuple[str, int, int]]:
    from jaxrt.converters.weights import checkpoint_files

    d = Path(model_dir)
    files = [*checkpoint_files(d), d / "config.json"]
    sig = []
    for f in files:
        if f.exists():
            st = f.stat()  # follows symlinks (Hugging Face cache snapshots point at blobs)
            sig.append((f.name, st.st_size, st.st_mtime_ns))
    return sig


def checkpoint_bytes(model_dir: str | Path) -> int:
    from jaxrt.converters.weights import checkpoint_files

    return sum(f.stat().st_size for f in checkpoint_files(model_dir))


def cache_key(model_dir: str | Path, dtype: str, abstract_state: nnx.State) -> str:
    payload = {
        "format": FORMAT_VERSION,
        "source": str(Path(model_dir).resolve()),
        "files": _file_signature(model_dir),
        "dtype": str(jnp.dtype(dtype)),
        "params": param_layout(abstract_state),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def cache_lookup(key: str) -> Path | None:
    entry = cache_root() / key
    if is_converted(entry):
        try:
            os.utime(entry / META_FILE)  # least-recently-used bookkeeping
        except OSError:
            pass
        return entry
    return None


def _write_entry(
    state: nnx.State, dst: Path, meta: dict[str, Any], copy_from: str | Path | None, hf_config: Any = None
) -> None:
    """Write a converted directory atomically: a temporary sibling, then one rename."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".tmp-{dst.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_params(state, tmp / PARAMS_DIR)
        if copy_from is not None:
            _copy_side_files(Path(copy_from), tmp, hf_config)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        try:
            os.rename(tmp, dst)
        except OSError:
            if not is_converted(dst):
                raise
            # another process wrote the same entry first: keep theirs
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _is_stale(entry: Path) -> bool:
    try:
        meta = json.loads((entry / META_FILE).read_text())
        src = Path(meta["source"])
        return not src.is_dir() or [list(x) for x in _file_signature(src)] != meta["source_files"]
    except Exception:
        return True


def _evict(keep: str) -> None:
    root = cache_root()
    entries = [e for e in root.iterdir() if e.is_dir() and not e.name.startswith(".") and e.name != keep]
    live = []
    for e in entries:
        if _is_stale(e):
            shutil.rmtree(e, ignore_errors=True)
        else:
            live.append(e)
    live.sort(key=lambda e: (e / META_FILE).stat().st_mtime, reverse=True)
    for e in live[MAX_CACHE_ENTRIES - 1 :]:
        shutil.rmtree(e, ignore_errors=True)


def should_auto_cache(model_dir: str | Path) -> bool:
    from jaxrt.converters.weights import gguf_file

    mode = converted_cache_mode()
    if mode != "auto":
        return mode == "always"
    if gguf_file(model_dir) is not None:
        return True
    return AUTO_CACHE_MIN_BYTES is not None and checkpoint_bytes(model_dir) >= AUTO_CACHE_MIN_BYTES


def cache_store(
    key: str, state: nnx.State, model_dir: str | Path, architecture: str, dtype: str
) -> Path | None:
    """Write the cache entry for ``key``; failures are logged, never raised (the cache is an optimisation)."""
    dst = cache_root() / key
    try:
        t0 = time.perf_counter()
        meta = _meta(model_dir, architecture, dtype)
        _write_entry(state, dst, meta, copy_from=None)
        _evict(keep=key)
        logger.info("cached converted params of %s in %s (%.1f s)", model_dir, dst, time.perf_counter() - t0)
        return dst
    except Exception as e:  # disk full, read-only cache dir, ...
        logger.warning("could not write the converted-params cache %s: %s", dst, e)
        return None


def _meta(model_dir: str | Path, architecture: str, dtype: str) -> dict[str, Any]:
    return {
        "format": FORMAT_VERSION,
        "architecture": architecture,
        "dtype": str(jnp.dtype(dtype)),
        "source": str(Path(model_dir).resolve()),
        "source_files": [list(x) for x in _file_signature(model_dir)],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


# ------------------------------------------------------------------------------------------ jaxrt convert


def _copy_side_files(src: Path, dst: Path, hf_config: Any) -> None:
    from jaxrt.converters.weights import gguf_file

    g = gguf_file(src)
    if g is None:
        for f in src.iterdir():
            if f.is_file() and f.suffix in _COPY_SUFFIXES and f.name not in _SKIP_FILES:
                shutil.copy2(f, dst / f.name)
        return
    # GGUF: config and tokenizer come out of the GGUF metadata.
    cfg = hf_config.to_dict()
    cfg.pop("quantization_config", None)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    try:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(src), gguf_file=g.name).save_pretrained(str(dst))
    except Exception as e:
        logger.warning("no tokenizer could be extracted from %s: %s", g, e)


def convert_checkpoint(src: str | Path, dst: str | Path | None, dtype: str | None = None) -> Path:
    """Convert a transformers checkpoint directory (safetensors or one GGUF file) into a jaxrt directory.

    ``dtype`` (float32 | bfloat16 | float16) defaults to the checkpoint's. ``dst`` must not exist or be empty.
    """
    from jaxrt.converters.loader import (
        abstract_model,
        load_hf_config,
        native_model_config,
        resolve_model_path,
        stream_weights,
    )

    if dst is None:
        raise ValueError("convert needs a destination directory: jaxrt convert SRC DST")
    src = Path(resolve_model_path(str(src)))
    dst = Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise ValueError(f"destination {dst} exists and is not empty")
    if dst.exists():
        dst.rmdir()
    hf_config = load_hf_config(str(src))
    cfg = native_model_config(hf_config)
    dtype = dtype or cfg.dtype
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    t0 = time.perf_counter()
    _, abstract_state = abstract_model(cfg, dtype, "reference")
    state = stream_weights(cfg, src, abstract_state, jnp.dtype(dtype))
    _write_entry(state, dst, _meta(src, cfg.architecture, dtype), copy_from=src, hf_config=hf_config)
    logger.info("converted %s -> %s (%s) in %.1f s", src, dst, dtype, time.perf_counter() - t0)
    return dst
