"""Building blocks shared by the model families: norms, rotary embeddings, paged attention, gated MLPs.

A family is a :class:`Family` (the few structural switches that tell, say, Gemma 2 from Llama) plus a weight
map in ``jaxrt.converters.weights``; everything numeric (sizes, windows, soft caps, rope) comes from
``ModelConfig``. :class:`DecoderForCausalLM` assembles the blocks; each family module subclasses it with
its own ``family``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrt import envs
from jaxrt.batch import ForwardBatch
from jaxrt.config import ModelConfig, RopeConfig
from jaxrt.kernels import (  # apply_rope stays importable from here; its definition is in kernels.reference
    QKNorm,
    add_rms_norm,
    add_rms_norm_kernel_applies,
    apply_rope,  # noqa: F401
    attention_metadata,
    gated_mlp,
    mlp_kernel_applies,
    norm_gate_up,
    norm_gate_up_applies,
    norm_qkv_kernel_applies,
    norm_qkv_rope_write,
    ragged_paged_attention,
    rope_write_kv,
)
from jaxrt.kernels.reference import rms_norm, token_metadata
from jaxrt.models.quantization import Fp8Linear

KVCache = tuple[jax.Array, jax.Array]  # (k_pages, v_pages): [num_pages, page_size, num_kv_heads, head_dim]

SLIDING = "sliding_attention"


def as_dtype(name: str) -> jnp.dtype:
    return jnp.dtype(name)


@dataclass(frozen=True)
class Family:
    """The structural differences between decoder families (transformers' modeling code, not its config)."""

    qkv_bias: bool | None = None  # bias on q/k/v projections; None: ModelConfig.attention_bias
    o_bias: bool | None = None  # bias on the output projection; None: ModelConfig.attention_bias
    qk_norm: str | None = None  # None | "head" (RMSNorm over head_dim: Qwen3, Gemma 3) | "full" (OLMo 2)
    norm_offset: float = 0.0  # Gemma's RMSNorm scales by (1 + w)
    norm_scale_f32: bool = False  # scale by the weight in f32, then cast (Gemma, OLMo 2); else Llama's order
    norm_placement: str = (
        "pre"  # "pre" (Llama) | "sandwich" (Gemma 2/3: pre and post norms) | "post" (OLMo 2)
    )
    embed_scale_sqrt_hidden: bool = False  # Gemma: embeddings * sqrt(hidden_size), rounded to the dtype
    attn_soft_cap: bool = True  # honour ModelConfig.attn_logit_softcap (transformers' Gemma 3 ignores it)

    def __post_init__(self) -> None:
        if self.qk_norm not in (None, "head", "full"):
            raise ValueError(f"qk_norm must be None, 'head' or 'full', got {self.qk_norm!r}")
        if self.norm_placement not in ("pre", "sandwich", "post"):
            raise ValueError(f"norm_placement must be pre, sandwich or post, got {self.norm_placement!r}")


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis (``kernels.reference.rms_norm``: statistics in f32; ``offset=1`` is Gemma's
    ``x * (1 + w)``; ``scale_f32`` scales before the cast, as Gemma and OLMo 2 do)."""

    def __init__(
        self,
        dim: int,
        eps: float,
        *,
        dtype: jnp.dtype,
        rngs: nnx.Rngs,
        offset: float = 0.0,
        scale_f32: bool = False,
    ) -> None:
        self.weight = nnx.Param(jnp.zeros((dim,), dtype) if offset else jnp.ones((dim,), dtype))
        self.eps = eps
        self.offset = offset
        self.scale_f32 = scale_f32 or bool(offset)

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight[...], self.eps, offset=self.offset, scale_f32=self.scale_f32)

    def after_add(
        self, x: jax.Array, h: jax.Array, backend: str | None, interpret: bool = False
    ) -> tuple[jax.Array, jax.Array]:
        """(x + h, this norm of it): one kernel where ``kernels.add_rms_norm`` has one for the call on
        ``backend`` (decode-sized steps on pallas_gpu; ``JAXRT_FUSED_ADD_NORM``), else XLA's ops."""
        w = self.weight[...]
        if (
            envs.fused_add_norm()
            and x.dtype == h.dtype == w.dtype
            and add_rms_norm_kernel_applies(x.shape[0], x.shape[1], backend)
        ):
            norm = dict(offset=self.offset, scale_f32=self.scale_f32)
            return add_rms_norm(x, h, w, self.eps, **norm, backend=backend, interpret=interpret)
        x = x + h
        return x, self(x)


# ----------------------------------------------------------------------------------------------- rotary


def _extra(rope: RopeConfig) -> dict:
    return dict(rope.extra)


def rope_inv_freq(rope: RopeConfig, rotary_dim: int, long: bool = False) -> np.ndarray:
    """Inverse frequencies [rotary_dim // 2] of transformers' position-independent rope types (numpy, at trace
    time). ``dynamic`` gives its base frequencies (valid up to ``max_position_embeddings``); ``longrope`` its
    short factors, or the long ones with ``long=True``.
    """
    exponents = np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    t = rope.rope_type
    if t == "linear":
        inv_freq = inv_freq / rope.factor
    elif t == "llama3":
        old_len = rope.original_max_position_embeddings or 8192
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled)
    elif t == "yarn":
        ex = _extra(rope)
        base, factor, dim = rope.theta, rope.factor, rotary_dim
        orig = rope.original_max_position_embeddings
        beta_fast = ex.get("beta_fast") or 32
        beta_slow = ex.get("beta_slow") or 1

        def correction_dim(rot: float) -> float:
            return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if ex.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
        extrapolation = 1 - ramp
        inv_freq = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
    elif t == "longrope":
        ex = _extra(rope)
        ext = np.asarray(ex["long_factor" if long else "short_factor"], np.float64)
        inv_freq = 1.0 / (ext * rope.theta**exponents)
    return inv_freq.astype(np.float32)


def rope_attention_factor(rope: RopeConfig) -> float:
    """transformers' ``attention_scaling``: multiplies cos and sin (yarn, longrope), 1 otherwise."""
    ex = _extra(rope)
    if rope.rope_type == "yarn":
        if ex.get("attention_factor") is not None:
            return float(ex["attention_factor"])

        def mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if ex.get("mscale") and ex.get("mscale_all_dim"):
            return mscale(rope.factor, ex["mscale"]) / mscale(rope.factor, ex["mscale_all_dim"])
        return mscale(rope.factor)
    if rope.rope_type == "longrope":
        if ex.get("attention_factor") is not None:
            return float(ex["attention_factor"])
        if rope.factor <= 1.0:
            return 1.0
        return math.sqrt(1 + math.log(rope.factor) / math.log(rope.original_max_position_embeddings))
    return 1.0


def rope_cos_sin(
    rope: RopeConfig,
    rotary_dim: int,
    positions: jax.Array,
    seq_lens: jax.Array | None = None,
    max_position_embeddings: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """cos, sin ``[num_tokens, rotary_dim // 2]`` (f32) for each token's position.

    ``dynamic`` and ``longrope`` depend on the sequence length, as in transformers: ``seq_lens`` is each
    token's sequence length after this step (its KV length), which is what transformers sees for a one-shot
    prefill and for every decode step.
    """
    pos = positions.astype(jnp.float32)[:, None]
    if rope.rope_type == "dynamic":
        assert seq_lens is not None and max_position_embeddings is not None
        exps = jnp.asarray(np.arange(0, rotary_dim, 2, dtype=np.float32) / rotary_dim)
        length = jnp.maximum(seq_lens, max_position_embeddings).astype(jnp.float32)
        f = rope.factor
        base = rope.theta * ((f * length / max_position_embeddings) - (f - 1)) ** (
            rotary_dim / (rotary_dim - 2)
        )
        inv = 1.0 / (base[:, None] ** exps[None, :])
        freqs = pos * inv
    elif rope.rope_type == "longrope":
        assert seq_lens is not None
        short = jnp.asarray(rope_inv_freq(rope, rotary_dim))
        long = jnp.asarray(rope_inv_freq(rope, rotary_dim, long=True))
        use_long = (seq_lens > rope.original_max_position_embeddings)[:, None]
        freqs = pos * jnp.where(use_long, long[None, :], short[None, :])
    else:
        freqs = pos * jnp.asarray(rope_inv_freq(rope, rotary_dim))[None, :]
    scale = rope_attention_factor(rope)
    cos, sin = jnp.cos(freqs), jnp.sin(freqs)
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return cos, sin


def needs_seq_lens(rope: RopeConfig) -> bool:
    return rope.rope_type in ("dynamic", "longrope")


# ---------------------------------------------------------------------------------------------- modules


def linear(din: int, dout: int, bias: bool, dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(din, dout, use_bias=bias, dtype=dtype, param_dtype=dtype, rngs=rngs)


class OutInLinear(nnx.Module):
    """``x @ weight.T (+ bias)`` with ``weight`` stored ``[out, in]``, as transformers stores a Linear.

    The attention projections use it: XLA runs a single row's product (a lone decode token) with this layout
    as one reduction kernel, which also takes the RMSNorm before it, where the ``[in, out]`` layout takes a
    cuBLAS split-K GEMM and its reduce (Llama-3.2-1B's qkv 4.6 vs 18.7 us, o 3.7 vs 12.9 us on an H200); from
    8 rows both layouts run the same cuBLAS GEMMs at the same speed. The MLP keeps ``[in, out]`` kernels: its
    down projection is up to 2 us slower stored ``[out, in]`` at 16-64 rows, and the fused MLP kernels read
    ``[in, out]`` (benchmarks/RESULTS.md)."""

    def __init__(self, din: int, dout: int, bias: bool, dtype: jnp.dtype, rngs: nnx.Rngs) -> None:
        init = nnx.initializers.lecun_normal(in_axis=-1, out_axis=-2)
        self.weight = nnx.Param(init(rngs.params(), (dout, din), dtype))
        self.bias = nnx.Param(jnp.zeros((dout,), dtype)) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.weight[...]
        y = jax.lax.dot_general(x.astype(w.dtype), w, (((x.ndim - 1,), (1,)), ((), ())))
        return y if self.bias is None else y + self.bias[...]


def _norm_factory(cfg: ModelConfig, family: Family, dtype: jnp.dtype, rngs: nnx.Rngs):
    return partial(
        RMSNorm,
        eps=cfg.rms_norm_eps,
        dtype=dtype,
        rngs=rngs,
        offset=family.norm_offset,
        scale_f32=family.norm_scale_f32,
    )


def is_sliding_layer(cfg: ModelConfig, layer_idx: int) -> bool:
    if cfg.sliding_window is None:
        return False
    return not cfg.layer_types or cfg.layer_types[layer_idx] == SLIDING


class PagedAttention(nnx.Module):
    """Multi-head attention with GQA whose K/V live in the paged pool and are read by `ragged_paged_attention`.

    Per layer: sliding window (``is_sliding_layer``), its rope (``local_rope`` on sliding layers when set),
    optional q/k RMSNorm, logit soft-capping, the softmax scale ``cfg.sm_scale``.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        dtype: jnp.dtype,
        rngs: nnx.Rngs,
        attention_backend: str = "auto",
        interpret: bool = False,
        sliding_window: int | None = None,
        family: Family | None = None,
        layer_idx: int | None = None,
    ) -> None:
        family = family or Family()
        h, hd = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
        qkv_bias = cfg.attention_bias if family.qkv_bias is None else family.qkv_bias
        o_bias = cfg.attention_bias if family.o_bias is None else family.o_bias
        # q, k and v as one matrix: one GEMM per step (the loader joins the checkpoint's three).
        self.qkv_proj = OutInLinear(h, (cfg.num_heads + 2 * cfg.num_kv_heads) * hd, qkv_bias, dtype, rngs)
        self.o_proj = OutInLinear(cfg.num_heads * hd, h, o_bias, dtype, rngs)
        self.qk_norm = None
        if family.qk_norm is not None:
            norm = _norm_factory(cfg, family, dtype, rngs)
            full = family.qk_norm == "full"
            self.q_norm = norm(cfg.num_heads * hd if full else hd)  # their weights; the norm itself runs
            self.k_norm = norm(cfg.num_kv_heads * hd if full else hd)  # inside rope_write_kv, as this spec
            n = self.q_norm
            self.qk_norm = QKNorm(family.qk_norm, n.eps, offset=n.offset, scale_f32=n.scale_f32)
        if layer_idx is not None:
            sliding = is_sliding_layer(cfg, layer_idx)
            sliding_window = cfg.sliding_window if sliding else None
            self.rope = cfg.local_rope if (sliding and cfg.local_rope is not None) else cfg.rope
        else:
            self.rope = cfg.rope
        self.rotary_dim = int(hd * self.rope.partial_rotary_factor)
        self.max_position_embeddings = cfg.max_position_embeddings
        self.sm_scale = cfg.sm_scale
        self.soft_cap = cfg.attn_logit_softcap if family.attn_soft_cap else None
        self.sliding_window = sliding_window
        self.attention_backend = attention_backend
        self.interpret = interpret

    def _kv_write_backend(self) -> str:
        """Where (the q/k norm,) rope and the KV write run: ``rope_write_kv``'s backend. The attention
        backend's, so that on pallas_gpu one kernel does it; "reference" (XLA's ops) with
        ``JAXRT_FUSED_KV_WRITE=0`` (read when the step is traced)."""
        return self.attention_backend if envs.fused_kv_write() else "reference"

    def metadata(self, num_tokens: int, dtype: jnp.dtype, kv: KVCache, batch: ForwardBatch):
        """The attention backend's per-step planning for this layer's shapes (shareable across layers)."""
        q = jax.ShapeDtypeStruct((num_tokens, self.num_heads, self.head_dim), dtype)
        return attention_metadata(
            q,
            kv[0],
            batch.kv_lens,
            batch.page_indices,
            batch.cu_q_lens,
            batch.num_seqs,
            backend=self.attention_backend,
            decodes=batch.decodes,  # set only in cuDNN programs (with ``fresh``)
        )

    def takes_input_norm(self, num_tokens: int) -> bool:
        """Whether this call (of ``num_tokens`` tokens) takes the residual stream and the RMSNorm before it
        (``input_norm``) rather than the normed rows: a lone decode token on pallas_gpu, where one kernel
        norms, projects, ropes and writes k and v (``kernels.norm_qkv_rope_write``; ``JAXRT_FUSED_QKV``)."""
        if isinstance(self.qkv_proj, Fp8Linear):  # a quantized projection: XLA's products
            return False
        return envs.fused_qkv() and norm_qkv_kernel_applies(
            num_tokens,
            self.qkv_proj.weight.shape[1],
            self.head_dim,
            self.rotary_dim,
            self.qk_norm,
            self._kv_write_backend(),
        )

    def __call__(
        self, x: jax.Array, batch: ForwardBatch, kv: KVCache, metadata=None, input_norm: RMSNorm | None = None
    ) -> tuple[jax.Array, KVCache]:
        """x: the normed rows, or with ``input_norm`` (where ``takes_input_norm``) the residual stream."""
        t = x.shape[0]
        seq_lens = None
        if needs_seq_lens(self.rope):
            seq_ids, _, _ = token_metadata(t, batch.cu_q_lens, batch.kv_lens, batch.num_seqs)
            seq_lens = batch.kv_lens[seq_ids]
        cos, sin = rope_cos_sin(
            self.rope, self.rotary_dim, batch.positions, seq_lens, self.max_position_embeddings
        )
        # The rotary tables, the pools, the slots and the heads: both paths below take them as rope_write_kv does.
        rope_kv = (cos, sin, kv[0], kv[1], batch.slot_mapping)
        common = dict(
            num_q_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            backend=self._kv_write_backend(),
            interpret=self.interpret,
        )
        if input_norm is not None:  # one kernel from the residual stream: norm, q/k/v, rope, KV write
            bias = None if self.qkv_proj.bias is None else self.qkv_proj.bias[...]
            q, k_pages, v_pages = norm_qkv_rope_write(
                x,
                input_norm.weight[...],
                self.qkv_proj.weight[...],
                bias,
                *rope_kv,
                eps=input_norm.eps,
                norm_offset=input_norm.offset,
                norm_scale_f32=input_norm.scale_f32,
                **common,
            )
            return self._attend(q, k_pages, v_pages, batch, metadata)
        qkv = self.qkv_proj(x)
        norm = {}
        if self.qk_norm is not None:
            norm = dict(
                qk_norm=self.qk_norm, qk_norm_weights=(self.q_norm.weight[...], self.k_norm.weight[...])
            )
        # On pallas_gpu one kernel (norms,) ropes q and k and writes k and v, reading qkv's columns in place.
        q, k_pages, v_pages = rope_write_kv(qkv, *rope_kv, **norm, **common)
        return self._attend(q, k_pages, v_pages, batch, metadata)

    def _attend(self, q, k_pages, v_pages, batch: ForwardBatch, metadata) -> tuple[jax.Array, KVCache]:
        t = q.shape[0]
        o = ragged_paged_attention(
            q,
            k_pages,
            v_pages,
            batch.kv_lens,
            batch.page_indices,
            batch.cu_q_lens,
            batch.num_seqs,
            sm_scale=self.sm_scale,
            sliding_window=self.sliding_window,
            soft_cap=self.soft_cap,
            backend=self.attention_backend,
            interpret=self.interpret,
            metadata=metadata,
            fresh_prompt=batch.fresh,
            prefix_capacity=batch.prefix_capacity,
            decodes=batch.decodes,
        )
        return self.o_proj(o.reshape(t, self.num_heads * self.head_dim)), (k_pages, v_pages)


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": partial(jax.nn.gelu, approximate=False),
    "gelu_pytorch_tanh": partial(jax.nn.gelu, approximate=True),
    "gelu_tanh": partial(jax.nn.gelu, approximate=True),
    "gelu_new": partial(jax.nn.gelu, approximate=True),
    "gelu_fast": partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}


# hidden_act -> the activation of kernels.gated_mlp, where it has the same one
KERNEL_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
}


class GatedMLP(nnx.Module):
    """down(act(gate(x)) * up(x)): SwiGLU (Llama), GeGLU (Gemma). gate and up are one matrix (one GEMM per
    step); the loader joins a checkpoint's separate gate_proj and up_proj. At a few tokens on a Hopper GPU
    the block (with the residual add) is one Mosaic GPU kernel (``kernels.gated_mlp``; ``JAXRT_FUSED_MLP``).
    """

    def __init__(self, cfg: ModelConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs) -> None:
        h, i = cfg.hidden_size, cfg.intermediate_size
        if cfg.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {cfg.hidden_act!r} (supported: {sorted(ACTIVATIONS)})")
        self.gate_up_proj = linear(h, 2 * i, cfg.mlp_bias, dtype, rngs)
        self.down_proj = linear(i, h, cfg.mlp_bias, dtype, rngs)
        self.act = cfg.hidden_act
        self.bias = cfg.mlp_bias

    def takes_input_norm(self, num_tokens: int, backend: str) -> bool:
        """Whether this call (of ``num_tokens`` tokens, the attention ``backend``'s) takes the residual stream
        and the RMSNorm before it (``input_norm``) rather than the normed rows: a lone decode token on
        pallas_gpu, where one kernel norms, multiplies by the gate/up weights and applies the activation
        (``kernels.norm_gate_up``; ``JAXRT_FUSED_GATE_UP``), unless ``JAXRT_FUSED_MLP`` picks a Mosaic MLP."""
        act = KERNEL_ACTIVATIONS.get(self.act)
        if isinstance(self.gate_up_proj, Fp8Linear):  # a quantized projection: XLA's products
            return False
        w = self.gate_up_proj.kernel
        return (
            envs.fused_gate_up()
            and envs.fused_mlp() == "0"
            and act is not None
            and not self.bias
            and norm_gate_up_applies(num_tokens, w.shape[0], w.shape[1] // 2, act, backend)
        )

    def __call__(
        self,
        x: jax.Array,
        residual: jax.Array | None = None,
        input_norm: RMSNorm | None = None,
        backend: str | None = None,
        interpret: bool = False,
    ) -> jax.Array:
        """x: [num_tokens, hidden] -> [num_tokens, hidden]; ``residual + mlp(x)`` when residual is given. With
        ``input_norm`` (where ``takes_input_norm``) x is the residual stream and the norm runs in the kernel
        of the gated product (``backend``, ``interpret``: the attention backend's)."""
        if input_norm is not None:
            h = norm_gate_up(
                x,
                input_norm.weight[...],
                self.gate_up_proj.kernel[...],
                eps=input_norm.eps,
                norm_offset=input_norm.offset,
                norm_scale_f32=input_norm.scale_f32,
                act=KERNEL_ACTIVATIONS[self.act],
                backend=backend,
                interpret=interpret,
            )
        else:
            out = self._mosaic_block(x, residual)
            if out is not None:
                return out
            gate, up = jnp.split(self.gate_up_proj(x), 2, axis=-1)
            h = ACTIVATIONS[self.act](gate) * up
        out = self.down_proj(h)
        return out if residual is None else residual + out

    def _mosaic_block(self, x: jax.Array, residual: jax.Array | None) -> jax.Array | None:
        """The whole block as the Mosaic GPU kernel where ``JAXRT_FUSED_MLP`` asks for it and it applies,
        else None."""
        act = KERNEL_ACTIVATIONS.get(self.act)
        mode = envs.fused_mlp()
        quantized = isinstance(self.gate_up_proj, Fp8Linear)
        if act is not None and not self.bias and mode != "0" and not quantized:
            wgu, wd = self.gate_up_proj.kernel[...], self.down_proj.kernel[...]
            columns = mode.startswith("columns")
            if mlp_kernel_applies(x.shape[0], wd.shape[1], wd.shape[0], x.dtype, act, columns):
                return gated_mlp(
                    x,
                    wgu,
                    wd,
                    act=act,
                    residual=residual,
                    backend="mosaic",
                    deterministic=mode == "deterministic",
                    down_by_columns=columns,
                    overlap_down=mode == "columns-pdl",
                )
        return None


class DecoderLayer(nnx.Module):
    """Attention + MLP with the family's norm placement; parameter names follow transformers'."""

    def __init__(
        self,
        cfg: ModelConfig,
        family: Family,
        layer_idx: int,
        *,
        dtype: jnp.dtype,
        rngs: nnx.Rngs,
        **attn_kwargs,
    ) -> None:
        norm = _norm_factory(cfg, family, dtype, rngs)
        h = cfg.hidden_size
        self.placement = family.norm_placement
        if self.placement != "post":
            self.input_layernorm = norm(h)
        self.self_attn = PagedAttention(
            cfg, dtype=dtype, rngs=rngs, family=family, layer_idx=layer_idx, **attn_kwargs
        )
        self.post_attention_layernorm = norm(h)
        if self.placement == "sandwich":
            self.pre_feedforward_layernorm = norm(h)
        if self.placement != "pre":
            self.post_feedforward_layernorm = norm(h)
        self.mlp = GatedMLP(cfg, dtype=dtype, rngs=rngs)
        self.residual_multiplier = cfg.residual_multiplier

    def _residual(self, x: jax.Array, h: jax.Array) -> jax.Array:
        if self.residual_multiplier != 1.0:
            h = h * self.residual_multiplier
        return x + h

    def __call__(
        self, x: jax.Array, batch: ForwardBatch, kv: KVCache, metadata=None
    ) -> tuple[jax.Array, KVCache]:
        if self.placement == "pre":
            attn, t = self.self_attn, x.shape[0]
            if attn.takes_input_norm(t):  # one kernel from the norm to the KV write
                h, kv = attn(x, batch, kv, metadata, input_norm=self.input_layernorm)
            else:
                h, kv = attn(self.input_layernorm(x), batch, kv, metadata)
            backend, norm = attn.attention_backend, self.post_attention_layernorm
            if self.residual_multiplier != 1.0:
                x = self._residual(x, h)
                return self._residual(x, self.mlp(norm(x))), kv
            # The MLP's residual add goes into the MLP (one kernel with its down projection on GPUs).
            if self.mlp.takes_input_norm(t, backend):  # norm + gate/up: one kernel
                x = x + h
                return self.mlp(x, residual=x, input_norm=norm, backend=backend, interpret=attn.interpret), kv
            x, xn = norm.after_add(x, h, backend, attn.interpret)  # one kernel at decode sizes on GPUs
            return self.mlp(xn, residual=x), kv
        if self.placement == "sandwich":
            h, kv = self.self_attn(self.input_layernorm(x), batch, kv, metadata)
            x = self._residual(x, self.post_attention_layernorm(h))
            h = self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
            return self._residual(x, h), kv
        h, kv = self.self_attn(x, batch, kv, metadata)  # "post" (OLMo 2): norms on the branch outputs only
        x = self._residual(x, self.post_attention_layernorm(h))
        return self._residual(x, self.post_feedforward_layernorm(self.mlp(x))), kv


class DecoderModel(nnx.Module):
    def __init__(
        self, cfg: ModelConfig, family: Family, *, dtype: jnp.dtype, rngs: nnx.Rngs, **attn_kwargs
    ) -> None:
        self.embed_tokens = nnx.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=dtype, rngs=rngs
        )
        self.layers = nnx.List(
            [
                DecoderLayer(cfg, family, i, dtype=dtype, rngs=rngs, **attn_kwargs)
                for i in range(cfg.num_layers)
            ]
        )
        self.norm = _norm_factory(cfg, family, dtype, rngs)(cfg.hidden_size)
        self.embed_scale = math.sqrt(cfg.hidden_size) if family.embed_scale_sqrt_hidden else None
        self.embedding_multiplier = cfg.embedding_multiplier

    def __call__(self, batch: ForwardBatch, kv_caches: list[KVCache]) -> tuple[jax.Array, list[KVCache]]:
        x = self.embed_tokens(batch.input_ids)
        if self.embed_scale is not None:
            x = x * jnp.asarray(self.embed_scale, x.dtype)  # transformers rounds the scale to the dtype
        if self.embedding_multiplier != 1.0:
            x = x * self.embedding_multiplier
        # The attention backend plans the batch once per step; every layer with the same shapes reuses it.
        plans: dict[tuple, object] = {}
        new_caches = []
        for layer, kv in zip(self.layers, kv_caches, strict=True):
            attn = layer.self_attn
            key = (attn.num_heads, attn.head_dim, x.dtype, kv[0].shape, kv[0].dtype, attn.attention_backend)
            if key not in plans:
                plans[key] = attn.metadata(x.shape[0], x.dtype, kv, batch)
            graphdef, params = nnx.split(layer)
            x, kv = _layer_step(graphdef, params, x, batch, kv, plans[key])
            new_caches.append(kv)
        return self.norm(x), new_caches


@partial(jax.jit, static_argnums=0)
def _layer_step(graphdef: nnx.GraphDef, params: nnx.State, x, batch: ForwardBatch, kv: KVCache, plan):
    """One decoder layer as a jitted function of its parameters: inside a step, layers with the same structure
    and shapes share one trace (jit caches it by graphdef and argument types), so tracing a bucket costs one
    layer, not ``num_layers``. XLA inlines the calls: the compiled step is the same as with the layers
    unrolled."""
    return nnx.merge(graphdef, params)(x, batch, kv, plan)


class DecoderForCausalLM(nnx.Module):
    """A decoder-only LM over a ragged batch; returns the logits of each sequence's last token only.

    Subclasses set ``family``; the call contract is the same for all of them.
    """

    family: ClassVar[Family] = Family()

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        dtype: jnp.dtype,
        rngs: nnx.Rngs,
        attention_backend: str = "auto",
        interpret: bool = False,
    ) -> None:
        self.config = cfg
        self.model = DecoderModel(
            cfg, self.family, dtype=dtype, rngs=rngs, attention_backend=attention_backend, interpret=interpret
        )
        if not cfg.tie_word_embeddings:
            self.lm_head = nnx.Linear(
                cfg.hidden_size, cfg.vocab_size, use_bias=False, dtype=dtype, param_dtype=dtype, rngs=rngs
            )

    def __call__(self, batch: ForwardBatch, kv_caches: list[KVCache]) -> tuple[jax.Array, list[KVCache]]:
        hidden, kv_caches = self.model(batch, kv_caches)
        last = hidden[batch.logits_indices]  # [num_seqs, hidden]
        return self.compute_logits(last), kv_caches

    def compute_logits(self, hidden: jax.Array) -> jax.Array:
        cfg = self.config
        if cfg.tie_word_embeddings:
            logits = self.model.embed_tokens.attend(hidden)
        else:
            logits = self.lm_head(hidden)
        # In the compute dtype, as transformers' lm_head gives them (the sampler reads them in f32 inside its
        # reductions: no f32 copy of [num_seqs, vocab] per step); f32 where they are scaled or soft-capped.
        if cfg.logits_scaling != 1.0 or cfg.final_logit_softcap is not None:
            logits = logits.astype(jnp.float32)
        if cfg.logits_scaling != 1.0:
            logits = logits / cfg.logits_scaling
        if cfg.final_logit_softcap is not None:
            logits = cfg.final_logit_softcap * jnp.tanh(logits / cfg.final_logit_softcap)
        return logits
