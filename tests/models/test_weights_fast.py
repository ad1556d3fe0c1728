"""The safetensors load pipeline (mmap views, asynchronous transfers, jitted per-shape transforms): params
bit-identical to a reference built from the transformers state dict with numpy alone, for a Llama (q/k/v and
gate/up joined at load, biases too) and a Phi-3 (fused in the checkpoint), f32 and bf16 checkpoints, bf16 and
f32 targets, one file or two shards that split the parts of a fused param; the transfer window; params never
aliasing the mmap-ed file; the header checks and the load breakdown."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from models_testing import FAMILIES, make_checkpoint

from jaxrt.converters import checkpoint, loader, weights
from jaxrt.converters.loader import build_native_model, load_hf_config, native_model_config
from jaxrt.converters.weights import WeightLoadError, iter_safetensors_file


def _state_dict(hf, dtype: str) -> dict[str, np.ndarray]:
    """The transformers model's tensors as numpy, in ``dtype`` (bf16 through torch's own rounding)."""
    import torch

    out = {}
    for k, v in hf.state_dict().items():
        if dtype == "bfloat16":
            out[k] = v.detach().to(torch.bfloat16).view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            out[k] = v.detach().float().numpy()
    return out


def _reference(sd: dict[str, np.ndarray], n_layers: int, dtype: str) -> dict[str, np.ndarray]:
    """jaxrt's flat params written out by hand from transformers names: kernels are ``weight.T``; q/k/v and
    gate/up joined along the output axis (unless the checkpoint has them joined already)."""
    ref = {
        "model.embed_tokens.embedding": sd["model.embed_tokens.weight"],
        "model.norm.weight": sd["model.norm.weight"],
    }
    if "lm_head.weight" in sd:
        ref["lm_head.kernel"] = sd["lm_head.weight"].T
    for i in range(n_layers):
        p, q = f"model.layers.{i}.", f"model.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            ref[q + norm + ".weight"] = sd[p + norm + ".weight"]
        # the attention projections are stored [out, in] as transformers stores them, the MLP's [in, out]
        for mod, fused, names, param, t in (
            ("self_attn", "qkv_proj", ("q_proj", "k_proj", "v_proj"), "weight", False),
            ("mlp", "gate_up_proj", ("gate_proj", "up_proj"), "kernel", True),
        ):
            if f"{p}{mod}.{fused}.weight" in sd:
                w = sd[f"{p}{mod}.{fused}.weight"]
            else:
                w = np.concatenate([sd[f"{p}{mod}.{n}.weight"] for n in names], 0)
            ref[f"{q}{mod}.{fused}.{param}"] = w.T if t else w
            if f"{p}{mod}.{names[0]}.bias" in sd:
                ref[f"{q}{mod}.{fused}.bias"] = np.concatenate([sd[f"{p}{mod}.{n}.bias"] for n in names])
        ref[f"{q}self_attn.o_proj.weight"] = sd[f"{p}self_attn.o_proj.weight"]
        ref[f"{q}mlp.down_proj.kernel"] = sd[f"{p}mlp.down_proj.weight"].T
        for mod, name in (("self_attn", "o_proj"), ("mlp", "down_proj")):
            if f"{p}{mod}.{name}.bias" in sd:
                ref[f"{q}{mod}.{name}.bias"] = sd[f"{p}{mod}.{name}.bias"]
    target = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32
    return {k: np.ascontiguousarray(v).astype(target) for k, v in ref.items()}


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint16 if a.dtype.itemsize == 2 else np.uint32)


def _write(out: Path, src: Path, sd: dict[str, np.ndarray], shards: int) -> str:
    """A checkpoint of ``sd`` with ``src``'s config: one file, or ``shards`` files (tensors dealt round-robin
    in name order, so a layer's q/k/v land in different files) with the index file."""
    import torch
    from safetensors.torch import save_file

    out.mkdir()
    shutil.copy(src / "config.json", out / "config.json")

    def torch_of(a: np.ndarray) -> torch.Tensor:
        if a.dtype == ml_dtypes.bfloat16:
            return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
        return torch.from_numpy(a.copy())

    names = sorted(sd)
    if shards == 1:
        save_file({n: torch_of(sd[n]) for n in names}, str(out / "model.safetensors"))
        return str(out)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = names[s::shards]
        save_file({n: torch_of(sd[n]) for n in part}, str(out / fname))
        weight_map.update(dict.fromkeys(part, fname))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return str(out)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """family -> (checkpoint dir written by transformers, transformers model)."""
    out = {}
    for family, seed in (("llama", 31), ("phi3", 32)):
        config_cls, overrides = FAMILIES[family]
        out[family] = make_checkpoint(tmp_path_factory.mktemp(family), config_cls, seed=seed, **overrides)
    return out


def _load(path: str, dtype: str):
    cfg = native_model_config(load_hf_config(path))
    return build_native_model(cfg, path, dtype, "reference", use_cache=False)[1]


@pytest.mark.parametrize("family", ["llama", "phi3"])
@pytest.mark.parametrize("src_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shards", [1, 2])
def test_params_bit_identical_to_numpy_reference(tmp_path, sources, family, src_dtype, shards):
    path, hf = sources[family]
    sd = _state_dict(hf, src_dtype)
    ckpt = _write(tmp_path / "ckpt", Path(path), sd, shards)
    assert len(list(Path(ckpt).glob("*.safetensors"))) == shards
    n_bytes = sum(a.nbytes for a in sd.values())
    for dtype in ("bfloat16", "float32"):
        state = _load(ckpt, dtype)
        info = dict(loader.last_load_info)
        got = {k: np.asarray(v) for k, v in checkpoint.state_to_flat(state).items()}
        ref = _reference(sd, hf.config.num_hidden_layers, dtype)
        assert got.keys() == ref.keys()
        for k in ref:
            assert got[k].dtype == ref[k].dtype and got[k].shape == ref[k].shape, k
            np.testing.assert_array_equal(
                _bits(got[k]), _bits(ref[k]), err_msg=f"{k} ({src_dtype} -> {dtype})"
            )
        assert info["source"] == "safetensors"
        assert info["tensors"] == len(sd) and info["bytes"] == n_bytes
        assert info["programs"] >= 1 and info["seconds"] > 0
        for key in ("read_s", "dispatch_s", "compile_s", "wait_s"):
            assert 0 <= info[key] <= info["seconds"], key
        assert info["transfer_call_s"] >= 0  # summed over the transfer threads


def test_transfer_window_bounds_tensors_in_flight(tmp_path, sources, monkeypatch):
    """A window smaller than any tensor: one raw tensor (or a fused param's parts) at a time, same params."""
    path, hf = sources["llama"]
    sd = _state_dict(hf, "bfloat16")
    ckpt = _write(tmp_path / "ckpt", Path(path), sd, 1)
    wide = {k: np.asarray(v) for k, v in checkpoint.state_to_flat(_load(ckpt, "float32")).items()}
    assert loader.last_load_info["peak_inflight_bytes"] > 3 * max(a.nbytes for a in sd.values())
    monkeypatch.setattr(weights, "TRANSFER_WINDOW_BYTES", 1)
    narrow = {k: np.asarray(v) for k, v in checkpoint.state_to_flat(_load(ckpt, "float32")).items()}
    biggest_fused = max(
        sum(sd[f"model.layers.0.{m}.{p}_proj.{w}"].nbytes for p in parts)
        for m, parts in (("self_attn", "qkv"), ("mlp", ("gate", "up")))
        for w in ("weight", "bias")
    )
    # One tensor at a time, or the parts of one fused param (the embedding is the largest single tensor).
    assert loader.last_load_info["peak_inflight_bytes"] <= max(
        biggest_fused, *(a.nbytes for a in sd.values())
    )
    for k in wide:
        np.testing.assert_array_equal(_bits(narrow[k]), _bits(wide[k]), err_msg=k)


def _write_aligned(path: Path, tensors: dict[str, np.ndarray], align: int = 64) -> None:
    """A valid safetensors file whose data section and every tensor start at a multiple of ``align``."""
    header, offset = {}, 0
    for name, a in tensors.items():
        assert a.nbytes % align == 0
        header[name] = {"dtype": {np.float32: "F32"}[a.dtype.type], "shape": list(a.shape)}
        header[name]["data_offsets"] = [offset, offset + a.nbytes]
        offset += a.nbytes
    text = json.dumps(header).encode()
    text += b" " * (-(8 + len(text)) % align)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for a in tensors.values():
            f.write(np.ascontiguousarray(a).tobytes())


def test_params_do_not_alias_the_mmaped_file(tmp_path, sources):
    """On CPU, jax.device_put of an aligned read-only mmap view can alias it: a param loaded with no transform
    must still own its memory, or rewriting the checkpoint would change the model."""
    path, hf = sources["llama"]
    sd = _state_dict(hf, "float32")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copy(Path(path) / "config.json", ckpt / "config.json")
    st = ckpt / "model.safetensors"
    _write_aligned(st, sd)
    _, view = next(n for n in iter_safetensors_file(st) if n[0] == "model.norm.weight")
    if jax.default_backend() == "cpu" and jax.device_put(view).unsafe_buffer_pointer() != view.ctypes.data:
        pytest.skip("this jax copies read-only host arrays on device_put: nothing to guard against")
    del view
    state = _load(str(ckpt), "float32")
    before = {k: np.array(v) for k, v in checkpoint.state_to_flat(state).items()}
    with open(st, "r+b") as f:  # rewrite the data in place: the mapping's unmodified pages follow the file
        n = int.from_bytes(f.read(8), "little")
        f.seek(8 + n)
        f.write(b"\0" * (st.stat().st_size - 8 - n))
    after = {k: np.asarray(v) for k, v in checkpoint.state_to_flat(state).items()}
    assert np.abs(before["model.norm.weight"]).sum() > 0
    for k in before:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)


def test_safetensors_header_problems_are_weight_load_errors(tmp_path):
    good = tmp_path / "good.safetensors"
    _write_aligned(good, {"a": np.arange(16, dtype=np.float32), "b": np.ones((4, 4), np.float32)})
    names = [(n, a.shape, a.dtype) for n, a in iter_safetensors_file(good)]
    assert names == [("a", (16,), np.float32), ("b", (4, 4), np.float32)]

    raw = good.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])

    def variant(name: str, data: bytes) -> Path:
        p = tmp_path / name
        p.write_bytes(data)
        return p

    def with_header(name: str, h: dict, data: bytes) -> Path:
        text = json.dumps(h).encode()
        return variant(name, len(text).to_bytes(8, "little") + text + data)

    cases = {
        "short": (variant("short.safetensors", raw[:5]), "not a safetensors file"),
        "length": (
            variant("len.safetensors", (1 << 40).to_bytes(8, "little") + raw[8:]),
            "not a safetensors",
        ),
        "json": (
            variant("json.safetensors", raw[:8] + b"{" * n + raw[8 + n :]),
            "unreadable safetensors header",
        ),
        "truncated": (variant("trunc.safetensors", raw[:-4]), "tensor b"),
        "dtype": (
            with_header("dt.safetensors", {**header, "a": {**header["a"], "dtype": "X9"}}, raw[8 + n :]),
            "X9",
        ),
        "size": (
            with_header("sz.safetensors", {**header, "a": {**header["a"], "shape": [17]}}, raw[8 + n :]),
            "tensor a",
        ),
    }
    for case, (p, match) in cases.items():
        with pytest.raises(WeightLoadError, match=match):
            list(iter_safetensors_file(p))
        assert case


def test_fused_param_errors_name_the_parts(tmp_path, sources):
    """A part missing: the fused param is reported with the parts it has; parts that cannot be joined: a shape
    mismatch naming all of them (never a raw concatenate error)."""
    path, hf = sources["llama"]
    sd = _state_dict(hf, "float32")
    lacking = dict(sd)
    del lacking["model.layers.1.self_attn.k_proj.weight"]
    with pytest.raises(WeightLoadError) as e:
        _load(_write(tmp_path / "lacking", Path(path), lacking, 2), "float32")
    msg = str(e.value)
    assert "model/layers/1/self_attn/qkv_proj/weight (has " in msg and "lacks the other parts" in msg
    assert "model.layers.1.self_attn.q_proj.weight" in msg and "model.layers.1.self_attn.v_proj.weight" in msg

    ragged = dict(sd)
    ragged["model.layers.0.mlp.up_proj.weight"] = sd["model.layers.0.mlp.up_proj.weight"][:, :-1].copy()
    with pytest.raises(WeightLoadError) as e:
        _load(_write(tmp_path / "ragged", Path(path), ragged, 1), "float32")
    msg = str(e.value)
    assert "model.layers.0.mlp.gate_proj.weight + model.layers.0.mlp.up_proj.weight" in msg
    assert "do not join" in msg and "model/layers/0/mlp/gate_up_proj/kernel" in msg  # and so it is missing


def test_params_land_on_the_callers_default_device(tmp_path, sources):
    """``jax.default_device`` is thread-local: the transfer threads must still put the params where the caller
    asked (two host devices in a subprocess). f32 target: the f32 checkpoint's norms and embedding are the
    transferred arrays themselves, no transform moves them."""
    import os
    import subprocess
    import sys

    path, _ = sources["llama"]
    script = (
        "import jax\n"
        "from jaxrt.converters.loader import build_native_model, load_hf_config, native_model_config\n"
        f"cfg = native_model_config(load_hf_config({path!r}))\n"
        "dev = jax.devices()[1]\n"
        "with jax.default_device(dev):\n"
        f"    _, state = build_native_model(cfg, {path!r}, 'float32', 'reference', use_cache=False)\n"
        "leaves = jax.tree.leaves(state)\n"
        "where = {str(d) for x in leaves for d in x.devices()}\n"
        "assert leaves and all(x.devices() == {dev} for x in leaves), where\n"
        "print('OK')\n"
    )
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=tmp_path
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
