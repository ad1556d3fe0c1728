"""Every environment flag jaxrt reads, typed, in one place."""

from __future__ import annotations

import os
from pathlib import Path


def _get(name: str, default: str) -> str:
    return os.environ.get(name, default)


def cache_dir() -> Path:
    """Root of jaxrt's caches (converted default model, compilation cache). ``JAXRT_CACHE_DIR``."""
    return Path(_get("JAXRT_CACHE_DIR", str(Path.home() / ".cache" / "jaxrt"))).expanduser()


def attention_backend() -> str:
    """Attention backend override: auto | reference | pallas_gpu | pallas_tpu. ``JAXRT_ATTENTION_BACKEND``."""
    return _get("JAXRT_ATTENTION_BACKEND", "auto")


def mosaic_decode() -> bool:
    """Decode batches on Hopper GPUs use the Mosaic GPU attention kernel (TMA + wgmma) instead of the Triton
    one. ``JAXRT_MOSAIC_DECODE`` (default 1; 0 keeps every call on the Triton kernel)."""
    return _get("JAXRT_MOSAIC_DECODE", "1") == "1"


def cudnn_prefill() -> bool:
    """On the pallas_gpu attention backend a step of fresh prompts (no cached prefix, at most 8) in a bucket of
    >= 2048 tokens runs a program whose attention is cuDNN's fused flash attention instead of the paged Triton
    kernel (``kernels.cudnn_prefill``). ``JAXRT_CUDNN_PREFILL`` (default 1; 0 compiles no such program).
    Read when the engine's model runner is built."""
    return _get("JAXRT_CUDNN_PREFILL", "1") == "1"


def greedy_kernel() -> bool:
    """On GPUs the greedy sampler's statistics (logsumexp, argmax) come from one Pallas kernel reading the
    logits once instead of XLA's reductions. ``JAXRT_GREEDY_KERNEL`` (default 1; 0 keeps XLA's)."""
    return _get("JAXRT_GREEDY_KERNEL", "1") == "1"


def fused_kv_write() -> bool:
    """On the pallas_gpu attention backend one Pallas kernel (norms q and k where the model does,) ropes them
    and writes k and v into the paged pools (``kernels.rope_write_kv``) instead of three to five XLA kernels.
    ``JAXRT_FUSED_KV_WRITE`` (default 1; 0 keeps XLA's, for A/B measurements). Read when a step is traced."""
    return _get("JAXRT_FUSED_KV_WRITE", "1") == "1"


def fused_qkv() -> bool:
    """On the pallas_gpu attention backend a lone decode token's RMSNorm, q/k/v projection, rope and KV write
    run as one Pallas kernel (``kernels.norm_qkv_rope_write``) instead of four kernels.
    ``JAXRT_FUSED_QKV`` (default 1; 0 keeps the separate kernels, for A/B measurements). Read when a step is
    traced."""
    return _get("JAXRT_FUSED_QKV", "1") == "1"


def fused_add_norm() -> bool:
    """On the pallas_gpu attention backend the residual add after attention and the RMSNorm before the MLP run
    as one Pallas kernel for decode-sized steps (``kernels.add_rms_norm``) instead of XLA's two.
    On an H200 it takes one kernel per layer off a Llama-3.2-1B batch-1 step (0.965 against 0.996 ms); at
    batch 64 it changes nothing (benchmarks/RESULTS.md, "Engine", eighteenth round).
    ``JAXRT_FUSED_ADD_NORM`` (default 1; 0 keeps XLA's, for A/B measurements). Read when a step is traced."""
    return _get("JAXRT_FUSED_ADD_NORM", "1") == "1"


def fused_gate_up() -> bool:
    """On the pallas_gpu attention backend run a lone decode token's RMSNorm before the MLP, gate/up projection
    and activation as one Pallas kernel (``kernels.norm_gate_up``) instead of XLA's four kernels.
    ``JAXRT_FUSED_GATE_UP``: "0" (default) XLA's kernels; "1" the kernel. Off because it is slower on an
    H200: 27.0 us per Llama-3.2-1B layer at its best tiling against 22.2 for XLA's kernels (benchmarks/
    RESULTS.md, "Engine", seventeenth round). Read when a step is traced."""
    return _get("JAXRT_FUSED_GATE_UP", "0") == "1"


FUSED_MLP_MODES = ("0", "1", "deterministic", "columns", "columns-pdl")


def fused_mlp() -> str:
    """On Hopper GPUs run the gated MLP block of a few tokens (decode batches up to 16) as one Mosaic GPU
    kernel that streams the gate/up and down weights (``kernels.gated_mlp``) instead of XLA's three to four
    kernels. ``JAXRT_FUSED_MLP``: "0" (default) XLA's kernels; "1" the kernel adding its partial outputs with
    TMA reductions (the faster, but the order of the additions varies from run to run, so results are not
    bitwise reproducible); "deterministic" the kernel storing its per-block partials for XLA to sum in a fixed
    order; "columns" two kernels, the gated product and then the down projection with each program owning
    output columns (reproducible, no partials); "columns-pdl" the same with the second kernel launched early
    (``MlpConfig.overlap_down``). On an H200 "1" makes the Llama-3.2-1B decode step 1-6% faster at 1-8
    sequences, "deterministic" is slower than XLA at one, and both "columns" modes were 7-10% slower while
    their down kernel read 32-byte rows of the weight; with 64-column slabs in K splits the "columns" block
    takes 33.6 us at one token against XLA's 32.4 (benchmarks/RESULTS.md, "Engine", fourteenth to sixteenth
    rounds), hence the default. Read when a step is traced."""
    value = _get("JAXRT_FUSED_MLP", "0")
    if value not in FUSED_MLP_MODES:
        raise ValueError(f"JAXRT_FUSED_MLP must be one of {FUSED_MLP_MODES}, got {value!r}")
    return value


def attention_interpret() -> bool:
    """Run Pallas attention in interpret mode (CPU testing of kernels). ``JAXRT_ATTENTION_INTERPRET``."""
    return _get("JAXRT_ATTENTION_INTERPRET", "0") == "1"


def compilation_cache_enabled() -> bool:
    """Use JAX's persistent compilation cache under ``cache_dir()``. ``JAXRT_COMPILATION_CACHE`` (default 1)."""
    return _get("JAXRT_COMPILATION_CACHE", "1") == "1"


def triton_gemm() -> bool:
    """Let XLA emit its Triton GEMM fusions on GPU (``JAXRT_TRITON_GEMM=1``). Off by default: the step's
    matrix products then go to cuBLAS, which also takes the residual adds into its epilogue (H100, 1B model:
    decode step at batch 256 2.94 -> 2.75 ms, prefill 1k 4.78 -> 4.64 ms; benchmarks/RESULTS.md)."""
    return _get("JAXRT_TRITON_GEMM", "0") == "1"


def fp8_weight_only_rows() -> int:
    """In an fp8 model (``quantization="fp8"``), products of 8 to this many rows multiply the activations by
    the fp8 weights converted inside the GEMM (weight-only; the engine compiles those programs with XLA's
    Triton GEMM fusions on, which take the conversion), instead of quantizing the activations for cuBLASLt's
    fp8 GEMM. ``JAXRT_FP8_WEIGHT_ONLY_ROWS`` (default 32; 0: fp8 GEMMs from 8 rows). On an H200 the 8B shape
    decodes 8 sequences in 3.31 ms this way against 5.15-6.99 ms with fp8 GEMMs (bf16: 4.75; RESULTS.md)."""
    return int(_get("JAXRT_FP8_WEIGHT_ONLY_ROWS", "32"))


def compile_workers(platform: str) -> int:
    """Threads that compile the step's buckets side by side at start-up. ``JAXRT_COMPILE_WORKERS``
    (default: up to 8 on accelerators, 1 (serial) on CPU, where the compiles compete with the host)."""
    value = _get("JAXRT_COMPILE_WORKERS", "")
    if value:
        return max(1, int(value))
    return 1 if platform == "cpu" else max(1, min(8, (os.cpu_count() or 2) // 2))


def disable_progress_bar() -> bool:
    return _get("JAXRT_DISABLE_PROGRESS", "0") == "1"
