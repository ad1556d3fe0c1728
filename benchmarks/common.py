"""Shared helpers for the benchmark scripts: random-weight checkpoints of real shapes, datasets, output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

# Real architectures with random weights: same speed as the released checkpoints.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    ),
    "smollm2-135m": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        bos_token_id=1,
        eos_token_id=2,
    ),
    "llama-3.2-1b": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=128000,
        eos_token_id=[128001, 128008, 128009],
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),
    "llama-3.1-8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=128000,
        eos_token_id=[128001, 128008, 128009],
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),
    "qwen3-0.6b": dict(  # q/k RMSNorm per head: the fused norm + rope + KV-write path
        vocab_size=151936,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        bos_token_id=151643,
        eos_token_id=151645,
    ),
    "phi-4-mini": dict(  # partial rotary (96 of 128 dims): the fused rope + KV-write kernel's column pieces
        vocab_size=200064,
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=32,
        num_attention_heads=24,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        original_max_position_embeddings=4096,
        partial_rotary_factor=0.75,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},  # the real one is longrope
        bos_token_id=199999,
        eos_token_id=199999,
        pad_token_id=199999,
    ),
}
# Presets of another architecture than Llama: (config class, model class) of transformers.
PRESET_CLASSES = {
    "qwen3-0.6b": ("Qwen3Config", "Qwen3ForCausalLM"),
    "phi-4-mini": ("Phi3Config", "Phi3ForCausalLM"),
}


def preset_classes(preset: str) -> tuple[str, str]:
    """(config class, model class) names in transformers of a ``PRESETS`` entry."""
    return PRESET_CLASSES.get(preset, ("LlamaConfig", "LlamaForCausalLM"))


def make_random_checkpoint(preset: str, out_dir: str | Path, dtype: str = "bfloat16") -> str:
    """Save a random-weight model of ``preset``'s shape (LlamaForCausalLM unless ``PRESET_CLASSES`` names
    another; normal x 0.02, norms 1) to ``out_dir``, with ``word_tokenizer`` of its vocabulary."""
    import torch
    import transformers

    out = Path(out_dir)
    if (out / "config.json").exists():
        return str(out)
    config_cls, model_cls = preset_classes(preset)
    cfg = getattr(transformers, config_cls)(**PRESETS[preset])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = getattr(transformers, model_cls)._from_config(cfg, dtype=getattr(torch, dtype))
    word_tokenizer(cfg.vocab_size).save_pretrained(out)
    model.save_pretrained(out)  # after the tokenizer: config.json marks a complete checkpoint
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return str(out)


def word_tokenizer(vocab_size: int):
    """A tokenizer for random-weight models: token ``i`` is the word ``t<i>``, words split on whitespace, no
    special tokens. Any id sequence decodes to text that encodes back to exactly those ids, so servers that
    take only text (``transformers serve``) get the same prompts as those that take ids, and every generated
    token streams as visible text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def ensure_checkpoint(args) -> str:
    """--model-path, or a --random-model preset built in a subprocess (so torch never shares the GPU with JAX)."""
    if args.model_path:
        return args.model_path
    out = Path(args.model_cache) / f"{args.random_model}-{args.random_dtype}"
    if not (out / "config.json").exists():
        here = str(Path(__file__).parent)
        code = (
            f"import sys; sys.path.insert(0, {here!r}); from common import make_random_checkpoint; "
            f"make_random_checkpoint({args.random_model!r}, {str(out)!r}, {args.random_dtype!r})"
        )
        subprocess.run([sys.executable, "-c", code], check=True, cwd=str(Path(__file__).parent))
    return str(out)


def add_model_args(p) -> None:
    p.add_argument("--model-path", default=None)
    p.add_argument("--random-model", default="llama-3.2-1b", choices=sorted(PRESETS))
    p.add_argument("--random-dtype", default="bfloat16")
    p.add_argument("--model-cache", default=os.environ.get("JAXRT_BENCH_MODELS", "/tmp/jaxrt-bench-models"))


def random_requests(
    num: int, input_len: int, output_len: int, range_ratio: float, vocab: int, seed: int
) -> list[tuple[list[int], int]]:
    """SGLang's 'random' dataset: lengths uniform in [ratio * len, len], token ids uniform over the vocab."""
    rng = np.random.default_rng(seed)
    in_lens = rng.integers(max(1, int(input_len * range_ratio)), input_len + 1, size=num)
    out_lens = rng.integers(max(1, int(output_len * range_ratio)), output_len + 1, size=num)
    return [
        (rng.integers(100, vocab - 100, size=int(i)).tolist(), int(o))
        for i, o in zip(in_lens, out_lens, strict=True)
    ]


def shared_prefix_requests(
    num_groups: int,
    per_group: int,
    system_len: int,
    question_len: int,
    output_len: int,
    vocab: int,
    seed: int,
) -> list[tuple[list[int], int]]:
    """SGLang's 'generated-shared-prefix' dataset: ``num_groups`` random system prompts of ``system_len``
    tokens, each followed by ``per_group`` random questions of ``question_len``; the requests of all groups
    are shuffled together (seeded), as conversations of many users interleave."""
    rng = np.random.default_rng(seed)
    reqs = []
    for _ in range(num_groups):
        system = rng.integers(100, vocab - 100, size=system_len).tolist()
        for _ in range(per_group):
            reqs.append((system + rng.integers(100, vocab - 100, size=question_len).tolist(), output_len))
    order = rng.permutation(len(reqs))
    return [reqs[i] for i in order]


def git_commit() -> str:
    if os.environ.get("JAXRT_COMMIT"):
        return os.environ["JAXRT_COMMIT"]
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                cwd=Path(__file__).parent,
            ).stdout.strip()
            or "unknown"
        )
    except OSError:
        return "unknown"


def device_name() -> str:
    import jax

    d = jax.devices()[0]
    return getattr(d, "device_kind", d.platform)


# Settings that change what is measured; recorded with every result when set.
_RECORDED_ENV = (
    "JAXRT_MOSAIC_DECODE",
    "JAXRT_GREEDY_KERNEL",
    "JAXRT_TRITON_GEMM",
    "JAXRT_ATTENTION_BACKEND",
    "JAXRT_FUSED_KV_WRITE",
    "JAXRT_FUSED_QKV",
    "JAXRT_FUSED_GATE_UP",
    "JAXRT_FUSED_MLP",
    "JAXRT_FP8_WEIGHT_ONLY_ROWS",
    "XLA_FLAGS",
)


def append_jsonl(path: str | None, record: dict[str, Any]) -> None:
    record = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": git_commit(), **record}
    env = {k: os.environ[k] for k in _RECORDED_ENV if k in os.environ}
    if env:
        record["env"] = env
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    print(json.dumps(record))


# Measured read-only bandwidth (bytes/s) of the cards the benchmarks ran on (``bench_bandwidth.py``: a
# reduction over 2 GiB, CUPTI): the decode floors and the kernels' "% of read bandwidth" divide by these.
READ_BW = {"H100": 3.188e12, "H200": 4.651e12}
HBM_READ_BW = READ_BW["H100"]  # the default where the device is not known (CPU smoke runs)


def read_bandwidth(kind: str | None = None) -> float:
    """The measured read bandwidth of ``kind`` (a device kind such as 'NVIDIA H200'; default: the first JAX
    device's), or of the H100 where none is known; ``JAXRT_READ_BW`` (bytes/s) overrides."""
    if os.environ.get("JAXRT_READ_BW"):
        return float(os.environ["JAXRT_READ_BW"])
    if kind is None:
        try:
            kind = device_name()
        except Exception:
            kind = ""
    for key, bw in READ_BW.items():
        if key.lower() in kind.lower():
            return bw
    return HBM_READ_BW


def cupti_seconds(compiled, args, iterations: int, exclude: tuple[str, ...] = ()) -> tuple[float, int]:
    """(median GPU kernel time of one call of ``compiled(*args)`` in seconds, kernels per call), from CUPTI
    over ``iterations`` calls (launch gaps not counted), leaving out kernels whose name contains one of
    ``exclude`` (an L2 flush, XLA's copies of undonated inputs). GPU only."""
    from jax.experimental.mosaic.gpu import profiler

    _, timings = profiler.measure(compiled, aggregate=False, iterations=iterations)(*args)
    kept = [[ms for name, ms in it if not any(e in name for e in exclude)] for it in timings]
    return float(np.median([sum(k) for k in kept])) * 1e-3, len(kept[0])


def check_and_time_layers(
    variants,
    make_args,
    outputs,
    *,
    layers: int,
    iterations: int,
    timed: bool,
    output_file: str | None,
    record: dict[str, Any],
    label_width: int = 26,
    exclude: tuple[str, ...] = (),
) -> int:
    """Runs each ``(label, compiled)`` of ``variants`` (a program of ``layers`` layers; the first variant is
    the reference) on ``make_args()``; ``outputs(result)`` gives numpy arrays (NaN where nothing was
    written) to compare with the reference's: the same NaN entries, values within a bf16 ulp at magnitudes up
    to 4 (rtol 2^-7, atol 2^-5). With ``timed``, the GPU kernel time per layer (``cupti_seconds``). Prints a
    line per variant, appends ``record`` with the results to ``output_file``; returns the failures."""
    failures, want = 0, None
    name = record.get("shape", "")
    for label, compiled in variants:
        got = outputs(compiled(*make_args()))
        if want is None:
            want, ok, err = got, True, 0.0
        else:
            ok = all(
                np.array_equal(np.isnan(a), np.isnan(b))
                and np.allclose(a, b, rtol=2**-7, atol=2**-5, equal_nan=True)
                for a, b in zip(got, want, strict=True)
            )
            err = max(float(np.nanmax(np.abs(a - b))) for a, b in zip(got, want, strict=True))
        failures += not ok
        us = kernels = None
        if timed:
            seconds, kernels = cupti_seconds(compiled, make_args(), iterations, exclude=exclude)
            us = seconds / layers * 1e6
        print(
            f"{name:>13} {label:{label_width}s} {'PASS' if ok else 'FAIL'} max|diff| {err:.3g}"
            + (f"  {us:6.2f} us per layer ({kernels / layers:.1f} kernels)" if timed else ""),
            flush=True,
        )
        append_jsonl(
            output_file,
            {
                **record,
                "variant": label,
                "ok": bool(ok),
                "max_abs_diff": err,
                "us_per_layer": us,
                "kernels_per_layer": None if kernels is None else kernels / layers,
                "layers": layers,
            },
        )
    return failures


def print_block(title: str, rows: list[tuple[str, Any]]) -> None:
    print(f"{'=' * 16} {title} {'=' * 16}")
    for k, v in rows:
        v = f"{v:.2f}" if isinstance(v, float) else v
        print(f"{k + ':':<42}{v}")
    print("=" * (34 + len(title)))


def trace_timeline(run, label: str, top: int = 12) -> None:
    """Trace ``run()`` with the JAX profiler and summarise the GPU timeline: busy vs idle time, the largest
    idle gaps with the device events on either side, and the host events that overlap those gaps (what the
    host was doing while the GPU waited). Needs ``jax.profiler.ProfileData`` (jax >= 0.4.36)."""
    import glob
    import tempfile

    import jax

    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        try:
            run()
        finally:
            jax.profiler.stop_trace()
        files = glob.glob(f"{d}/**/*.xplane.pb", recursive=True)
        if not files:
            print(f"[trace] {label}: no trace written")
            return
        data = jax.profiler.ProfileData.from_file(files[0])
    dev, host = [], []
    for plane in data.planes:
        if plane.name.startswith("/device:GPU"):
            for line in plane.lines:
                for e in line.events:
                    dev.append((e.start_ns, e.start_ns + e.duration_ns, e.name, line.name))
        elif plane.name == "/host:CPU":
            for line in plane.lines:
                for e in line.events:
                    if e.duration_ns > 0:
                        host.append((e.start_ns, e.start_ns + e.duration_ns, e.name, line.name))
    if not dev:
        print(f"[trace] {label}: no GPU events")
        return
    dev.sort()
    t0, t1 = dev[0][0], max(e[1] for e in dev)
    gaps, busy_end, busy = [], dev[0][0], 0.0
    prev = dev[0]
    for e in dev:
        if e[0] > busy_end:
            gaps.append((e[0] - busy_end, busy_end, e[0], prev[2], e[2]))
        if e[1] > busy_end:
            busy += e[1] - max(e[0], busy_end)
            busy_end, prev = e[1], e
    lines = sorted({e[3] for e in dev})
    print(
        f"[trace] {label}: span {(t1 - t0) / 1e6:.3f} ms, GPU busy {busy / 1e6:.3f} ms, idle "
        f"{(t1 - t0 - busy) / 1e6:.3f} ms in {len(gaps)} gaps; {len(dev)} device events on {lines}"
    )
    kinds: dict[str, float] = {}
    for s, t, name, _ in dev:
        if "memcpy" in name.lower() or "memset" in name.lower():
            kinds[name[:60]] = kinds.get(name[:60], 0.0) + (t - s)
    for name, ns in sorted(kinds.items(), key=lambda kv: -kv[1])[:6]:
        print(f"[trace]   copy/set {ns / 1e3:9.1f} us  {name}")
    for g, s, t, before, after in sorted(gaps, reverse=True)[:top]:
        # Host events overlapping the gap, innermost first: enclosing frames (much longer than the gap)
        # are skipped, so what remains is what the host was actually doing while the GPU waited.
        inner: dict[str, float] = {}
        for hs, ht, name, _ in host:
            ov = min(ht, t) - max(hs, s)
            if ov > 0.05 * g and (ht - hs) < 1.5 * g:
                inner[name[:50]] = inner.get(name[:50], 0.0) + ov
        host_txt = ", ".join(
            f"{n} ({v / 1e3:.0f})" for n, v in sorted(inner.items(), key=lambda kv: -kv[1])[:6]
        )
        print(
            f"[trace]   gap {g / 1e3:8.1f} us after {before[:40]!r} before {after[:40]!r}; host: {host_txt}"
        )
