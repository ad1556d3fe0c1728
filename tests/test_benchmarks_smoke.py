"""Every benchmark script runs in its tiny CPU mode, so the scripts cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.parametrize(
    "script",
    [
        "bench_offline.py",
        "bench_offline.py --dp-size 2",
        "bench_one_batch.py",
        "bench_hf.py",
        "bench_serving.py",
        "bench_serving.py --backend openai",
        "bench_serving.py --dataset-name generated-shared-prefix",
        "bench_load.py",
        "bench_sampler.py",
        "bench_skinny_gemm.py",
        "bench_fp8_gemm.py",
        "bench_bandwidth.py",
        "bench_kv_write.py",
        "bench_decode_qkv.py",
        "bench_decode_mlp.py",
        "bench_mlp.py",
        "bench_l2_prefetch.py",
    ],
)
def test_benchmark_smoke(script, tmp_path, default_model_dir):
    out = tmp_path / "results.jsonl"
    name, *extra = script.split()
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / name),
            "--smoke",
            *extra,
            "--output-file",
            str(out),
            "--model-cache",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records and all("commit" in r and "bench" in r for r in records)
    if name == "bench_serving.py":
        assert "Serving Benchmark Result" in proc.stdout
        assert records[0]["completed"] == records[0]["num_prompts"]
        if "generated-shared-prefix" in extra:  # 2 groups x 3 prompts of 24 shared + 8 own tokens
            assert records[0]["num_prompts"] == 6 and records[0]["input_tokens"] == 6 * 32
    if name == "bench_kv_write.py":  # the kernel checked against XLA's composition, every case
        assert len(records) == 12 and all(r["ok"] for r in records)
    if name == "bench_decode_qkv.py":  # the kernel checked against the separate kernels, both shapes
        assert len(records) == 4 and all(r["ok"] for r in records)
    if name == "bench_decode_mlp.py":  # the kernel checked against XLA's kernels, both shapes
        assert len(records) == 4 and all(r["ok"] for r in records)
    if name == "bench_offline.py":
        assert "Offline Throughput Benchmark Result" in proc.stdout
        assert records[0]["output_throughput"] > 0
        assert records[0]["dp_size"] == (2 if "--dp-size" in extra else 1)


def test_random_model_presets_load_natively(tmp_path):
    """Every ``--random-model`` preset is a config transformers builds and jaxrt runs natively (no weights
    made: the benchmarks build them on the GPU machine)."""
    import transformers

    sys.path.insert(0, str(BENCH))
    try:
        from common import PRESETS, preset_classes
    finally:
        sys.path.remove(str(BENCH))
    from jaxrt.converters.loader import has_native, load_hf_config, native_model_config

    for name, preset in PRESETS.items():
        config_cls, model_cls = preset_classes(name)
        cfg = getattr(transformers, config_cls)(**preset)
        cfg.architectures = [model_cls]
        cfg.save_pretrained(tmp_path / name)
        native = native_model_config(load_hf_config(str(tmp_path / name)))
        assert has_native(native.architecture), name
        assert native.num_layers == preset["num_hidden_layers"], name


@pytest.mark.parametrize(
    "records",
    [["h100-2026-11-27.jsonl"], ["h200-2026-11-28-baseline.jsonl", "h200-2026-11-28-serving.jsonl"]],
    ids=["steps-offline", "with-serving"],
)
def test_plot_results_makes_a_png(tmp_path, records):
    out = tmp_path / "plot.png"
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "plot_results.py"),
            *(str(BENCH / "results" / r) for r in records),
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_kernels_cold_l2_flush_passes_q_through():
    """``bench_kernels.py --l2 cold`` (the default) times each call on ``l2_flush(q, buf)``: q must come back
    bit for bit (interpret mode here), so the timed attention sees the same inputs as with ``--l2 warm``."""
    import importlib.util

    import jax.numpy as jnp
    import numpy as np

    spec = importlib.util.spec_from_file_location("bench_kernels_cold", BENCH / "bench_kernels.py")
    bk = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bk)
    bk.INTERPRET = True
    q = jnp.asarray(np.random.default_rng(0).standard_normal((3, 5, 64)), jnp.bfloat16)
    buf = bk.flush_buffer()[:2]
    out = bk.l2_flush(q, buf)
    assert out.shape == q.shape and out.dtype == q.dtype
    np.testing.assert_array_equal(np.asarray(out.view(jnp.uint16)), np.asarray(q.view(jnp.uint16)))
    f = lambda q, k: (q.astype(jnp.float32) * k).sum()  # noqa: E731
    assert float(bk.cold_fn(f)(q, 2.0, buf)) == float(f(q, 2.0))


def test_one_batch_profile_groups_name_every_jaxrt_kernel():
    """``bench_one_batch.py --profile-top`` sums kernel time by group: each of jaxrt's Pallas kernels lands in
    its own group, not in "other fusions" (XLA's elementwise fusions)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_one_batch_groups", BENCH / "bench_one_batch.py")
    bob = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCH))
    try:
        spec.loader.exec_module(bob)
    finally:
        sys.path.remove(str(BENCH))
    names = {  # kernel names as the GPU profile shows them (pallas_call names, cuBLAS, XLA fusions)
        "jaxrt_norm_qkv_rope_write": "norm + q/k/v + kv write",
        "jaxrt_norm_gate_up": "norm + gate/up",
        "jaxrt_add_rms_norm": "add + norm",
        "jaxrt_rope_write_kv": "kv write",
        "jaxrt_rpa_mgpu_h1_kv64_st4_s1_c2_mosaic_gpu_kernel": "attention",
        "jaxrt_greedy_row_stats": "sampler",
        "nvjet_sm90_tst_128x8_64x12_2x1_v_bz_NNT": "gemm",
        "loop_multiply_fusion_33": "other fusions",
    }
    assert {n: bob.kernel_group(n) for n in names} == names
