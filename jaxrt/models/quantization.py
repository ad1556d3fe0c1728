"""FP8 quantization of a loaded model's linear layers (``Engine(quantization="fp8")``, ``--quantization fp8``).

The scheme is vLLM's and SGLang's ``fp8`` online quantization with finer scales (as compressed-tensors'
``FP8_DYNAMIC``): after the checkpoint is loaded, each projection weight of the decoder layers (q/k/v, o,
gate/up, down) becomes ``float8_e4m3fn`` with one f32 scale per output channel (its absolute maximum over 448,
e4m3's largest value). Products of more than ``envs.fp8_weight_only_rows()`` rows quantize each token's
activations the same way and run on the two fp8 operands, ``y = (xq @ wq.T) * sx * sw`` (Hopper and Ada GPUs
multiply fp8 at twice bf16's rate); smaller ones (decode steps) multiply the unquantized activations by the
fp8 weights, which halves the bytes they read (see ``fp8_linear``). Embeddings, the LM head and norms keep
the model's dtype. Checkpoints stored in fp8 are dequantized as they load (``converters.weights
.dequantize_fp8``) and quantized here like any other.

Weights are stored ``[out, in]`` (each output's inputs contiguous), the layout fp8 GEMMs take. Layers with an
fp8 weight run XLA's products, never the fused Mosaic kernels that read bf16 weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrt import envs

FP8 = jnp.float8_e4m3fn
FP8_MAX = 448.0  # float8_e4m3fn's largest finite value
# Scales never fall below this: an all-zero row or weight channel quantizes to zeros, not NaN.
_MIN_SCALE = 1e-12


def quantize_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x: [..., n] -> (xq [..., n] float8_e4m3fn, scale [...] f32) with ``xq * scale ~= x`` per row: the row's
    absolute maximum maps to 448."""
    xf = x.astype(jnp.float32)
    scale = jnp.maximum(jnp.max(jnp.abs(xf), axis=-1) / FP8_MAX, _MIN_SCALE)
    xq = jnp.clip(xf / scale[..., None], -FP8_MAX, FP8_MAX).astype(FP8)
    return xq, scale


# Below this many rows the product is weight-only (see fp8_linear): XLA runs a row count under cuBLASLt's
# fp8 minimum as a bf16 GEMM on weights converted every call (4x slower than bf16 for Llama-3.2-1B's MLP on an
# H200, benchmarks/RESULTS.md), while the reduction form reads the fp8 weights once.
MIN_FP8_GEMM_ROWS = 8


def fp8_linear(
    x: jax.Array, weight: jax.Array, weight_scale: jax.Array, bias: jax.Array | None = None
) -> jax.Array:
    """x [num_tokens, in] (any float dtype) @ dequantized ``weight`` [out, in] fp8 (``weight_scale`` [out] f32)
    -> [num_tokens, out] in x's dtype.

    - Fewer than ``MIN_FP8_GEMM_ROWS`` rows (a lone decode token): x stays unquantized and the product is a
      multiply-and-sum over ``in`` in f32, one reduction kernel that reads the fp8 weights.
    - Up to ``envs.fp8_weight_only_rows()`` rows (small decode batches): x stays unquantized, the weights are
      converted inside the GEMM (XLA's Triton fusion; the engine turns those on for these programs).
    - More: x quantized per token, one fp8 x fp8 product (cuBLASLt's fp8 GEMM on Hopper) with its result in
      x's dtype (f32 for f32 inputs), both scales applied in one elementwise pass that XLA fuses into the
      consumer where it can. Prefill and large batches: twice bf16's tensor-core rate."""
    if x.shape[0] < MIN_FP8_GEMM_ROWS:
        prod = x.astype(jnp.float32)[:, None, :] * weight.astype(jnp.float32)[None, :, :]
        y = prod.sum(axis=-1) * weight_scale[None, :]
    elif x.shape[0] <= envs.fp8_weight_only_rows():
        w = weight.astype(x.dtype)
        y = jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        y = y * weight_scale[None, :]
    else:
        xq, sx = quantize_rows(x)
        acc = x.dtype if x.dtype in (jnp.bfloat16, jnp.float16) else jnp.float32
        y = jax.lax.dot_general(xq, weight, (((1,), (1,)), ((), ())), preferred_element_type=acc)
        y = y.astype(jnp.float32) * sx[:, None] * weight_scale[None, :]
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype)


class Fp8Linear(nnx.Module):
    """``x @ W.T (+ bias)`` with ``W`` stored ``[out, in]`` in float8_e4m3fn and one f32 scale per output."""

    def __init__(self, weight: jax.Array, weight_scale: jax.Array, bias: jax.Array | None) -> None:
        self.weight = nnx.Param(weight)  # [out, in] float8_e4m3fn
        self.weight_scale = nnx.Param(weight_scale)  # [out] f32
        self.bias = nnx.Param(bias) if bias is not None else None  # [out], the model's dtype

    @classmethod
    def from_weight(cls, w_out_in: jax.Array, bias: jax.Array | None) -> Fp8Linear:
        return cls(*_quantize_weight(w_out_in), bias)

    def __call__(self, x: jax.Array) -> jax.Array:
        bias = None if self.bias is None else self.bias[...]
        return fp8_linear(x, self.weight[...], self.weight_scale[...], bias)


@jax.jit
def _quantize_weight(w_out_in: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[out, in] -> (float8_e4m3fn [out, in], f32 [out]): per output channel, as ``quantize_rows``."""
    return quantize_rows(w_out_in)


def dequantize(wq: jax.Array, scale: jax.Array) -> jax.Array:
    """The f32 values an fp8 tensor and its per-row scales stand for (tests and checks)."""
    return wq.astype(jnp.float32) * scale[..., None]


def quantize_model(model: nnx.Module, method: str) -> int:
    """Replace, in place, the projections of every decoder layer of ``model`` (a ``DecoderForCausalLM``) by
    their ``method`` form; returns how many were replaced. The bf16 weights are dropped one by one, so the
    peak is the bf16 model plus one fp8 matrix."""
    if method != "fp8":
        raise ValueError(f"quantization must be 'fp8', got {method!r}")
    from jaxrt.models.layers import OutInLinear

    n = 0
    for layer in model.model.layers:
        for parent, name in (
            (layer.self_attn, "qkv_proj"),
            (layer.self_attn, "o_proj"),
            (layer.mlp, "gate_up_proj"),
            (layer.mlp, "down_proj"),
        ):
            lin = getattr(parent, name)
            if isinstance(lin, OutInLinear):
                w = lin.weight[...]  # [out, in]
            elif isinstance(lin, nnx.Linear):
                w = lin.kernel[...].T  # Flax's [in, out]
            else:
                raise TypeError(f"cannot quantize {type(lin).__name__} at {name}")
            bias = None if lin.bias is None else lin.bias[...]
            setattr(parent, name, Fp8Linear.from_weight(w, bias))
            n += 1
    return n
