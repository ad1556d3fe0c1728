"""The gated MLP block (SwiGLU / GeGLU) as one call: the Mosaic GPU kernel where it applies, else XLA."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxrt.kernels import mosaic_gpu, mosaic_mlp, mosaic_skinny
from jaxrt.kernels.attention import resolve_backend
from jaxrt.kernels.reference import MLP_ACTIVATIONS, gated_mlp_reference, rms_norm

MLP_BACKENDS = ("auto", "mosaic", "reference")


def mlp_kernel_applies(
    num_tokens: int, hidden: int, intermediate: int, dtype, act: str, down_by_columns: bool = False
) -> bool:
    """Whether ``gated_mlp(backend="auto")`` runs the Mosaic GPU kernel for this shape on this machine."""
    return (
        mosaic_mlp.supports(num_tokens, hidden, intermediate, dtype, act) is None
        and (not down_by_columns or mosaic_skinny.supports(num_tokens, intermediate, hidden, dtype) is None)
        and mosaic_gpu.hopper_available()
    )


def gated_mlp(
    x: jax.Array,
    w_gate_up: jax.Array,
    w_down: jax.Array,
    *,
    act: str = "silu",
    residual: jax.Array | None = None,
    backend: str = "auto",
    deterministic: bool = False,
    down_by_columns: bool = False,
    overlap_down: bool = False,
    one_kernel: bool = False,
) -> jax.Array:
    """``residual + down(act(x @ W_gate) * (x @ W_up))``.

    x: [num_tokens, hidden]; w_gate_up: [hidden, 2 * intermediate] (gate columns, then up columns);
    w_down: [intermediate, hidden]; residual: [num_tokens, hidden] or None; all one dtype; act: one of
    ``kernels.reference.MLP_ACTIVATIONS``. backend: "auto" (the Mosaic GPU kernel for a few bf16 tokens on
    a Hopper GPU, ``mosaic_mlp.supports``; else XLA), "mosaic" (the kernel, or a ValueError saying why
    not), "reference" (XLA). The kernel accumulates in f32 and rounds once, so its results differ from
    XLA's bf16 products in the last bits. deterministic (the kernel only): each 64-column block's partial
    output is stored and XLA sums them in a fixed order, so equal inputs give bitwise equal results; False
    adds them into one f32 output with TMA reductions instead, whose order varies from run to run.
    down_by_columns (the kernel only): two kernels, the gated product ``h`` and then the down projection
    with each program owning output columns (``MlpConfig.down_by_columns``): no partial outputs, the same
    result from run to run; needs an intermediate size that is a multiple of 256. overlap_down (with
    down_by_columns): the second kernel is launched with PDL (``MlpConfig.overlap_down``). one_kernel (with
    down_by_columns): both phases in one kernel, a grid-wide barrier on a GMEM semaphore between them
    (``MlpConfig.fused_columns``; GPU only; experimental: see there).
    """
    if (overlap_down or one_kernel) and not down_by_columns:
        raise ValueError("overlap_down and one_kernel need down_by_columns=True")
    if overlap_down and one_kernel:
        raise ValueError("overlap_down and one_kernel are two different forms")
    if backend not in MLP_BACKENDS:
        raise ValueError(f"backend must be one of {MLP_BACKENDS}, got {backend!r}")
    if act not in MLP_ACTIVATIONS:
        raise ValueError(f"act must be one of {sorted(MLP_ACTIVATIONS)}, got {act!r}")
    if x.ndim != 2:
        raise ValueError(f"x must be [num_tokens, hidden], got shape {x.shape}")
    num_tokens, hidden = x.shape
    if w_gate_up.ndim != 2 or w_gate_up.shape[0] != hidden or w_gate_up.shape[1] % 2:
        raise ValueError(f"w_gate_up must be [{hidden}, 2 * intermediate], got {w_gate_up.shape}")
    intermediate = w_gate_up.shape[1] // 2
    if w_down.shape != (intermediate, hidden):
        raise ValueError(f"w_down must be [{intermediate}, {hidden}], got {w_down.shape}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual must be {x.shape}, got {residual.shape}")
    dtypes = {jnp.dtype(a.dtype) for a in (x, w_gate_up, w_down) + (() if residual is None else (residual,))}
    if len(dtypes) != 1:
        raise ValueError(
            f"x, w_gate_up, w_down and residual must share one dtype, got {sorted(map(str, dtypes))}"
        )
    use_kernel = backend == "mosaic" or (
        backend == "auto"
        and mlp_kernel_applies(num_tokens, hidden, intermediate, x.dtype, act, down_by_columns)
    )
    if use_kernel:
        config = None
        if down_by_columns:
            config = mosaic_mlp.default_config(hidden, num_tokens)
            if config is not None and one_kernel:
                config = dataclasses.replace(config, fused_columns=True)
            elif config is not None:
                config = dataclasses.replace(config, down_by_columns=True, overlap_down=overlap_down)
        return mosaic_mlp.gated_mlp_mgpu(
            x, w_gate_up, w_down, act=act, residual=residual, deterministic=deterministic, config=config
        )
    return gated_mlp_reference(x, w_gate_up, w_down, act=act, residual=residual)


def norm_gate_up_applies(
    num_tokens: int, hidden: int, intermediate: int, act: str, backend: str | None
) -> bool:
    """Whether ``norm_gate_up`` runs its one kernel (``kernels.decode_mlp``) for this call on ``backend`` (an
    attention backend name: the kernel is part of ``pallas_gpu``)."""
    from jaxrt.kernels import decode_mlp

    return (
        resolve_backend(backend) == "pallas_gpu"
        and decode_mlp.supports(num_tokens, hidden, intermediate, act) is None
    )


def norm_gate_up(
    x: jax.Array,
    norm_weight: jax.Array,
    w_gate_up: jax.Array,
    *,
    eps: float,
    norm_offset: float = 0.0,
    norm_scale_f32: bool = False,
    act: str = "silu",
    backend: str | None = None,
    interpret: bool = False,
) -> jax.Array:
    """The MLP's gated product from the residual stream: ``act(gate) * up`` of ``rms_norm(x) @ w_gate_up``.

    x: ``[num_tokens, hidden]``; norm_weight: ``[hidden]`` with ``eps``, ``norm_offset`` and
    ``norm_scale_f32`` as ``kernels.reference.rms_norm`` takes them; w_gate_up: ``[hidden, 2 * intermediate]``
    (gate columns, then up columns); act: one of ``kernels.reference.MLP_ACTIVATIONS``. Returns ``[num_tokens,
    intermediate]`` in x.dtype. On the "pallas_gpu" backend a lone token (``decode_mlp.supports``) takes one
    Pallas kernel (``kernels.decode_mlp``); everything else the norm, XLA's product and the activation.
    """
    if act not in MLP_ACTIVATIONS:
        raise ValueError(f"act must be one of {sorted(MLP_ACTIVATIONS)}, got {act!r}")
    if x.ndim != 2:
        raise ValueError(f"x must be [num_tokens, hidden], got shape {x.shape}")
    num_tokens, hidden = x.shape
    if norm_weight.shape != (hidden,):
        raise ValueError(f"norm_weight must be [{hidden}], got {norm_weight.shape}")
    if w_gate_up.ndim != 2 or w_gate_up.shape[0] != hidden or w_gate_up.shape[1] % 2:
        raise ValueError(f"w_gate_up must be [{hidden}, 2 * intermediate], got {w_gate_up.shape}")
    if not x.dtype == norm_weight.dtype == w_gate_up.dtype:
        raise ValueError(
            f"x {x.dtype}, norm_weight {norm_weight.dtype} and w_gate_up {w_gate_up.dtype} must share one dtype"
        )
    intermediate = w_gate_up.shape[1] // 2
    if norm_gate_up_applies(num_tokens, hidden, intermediate, act, backend):
        from jaxrt.kernels import decode_mlp

        return decode_mlp.norm_gate_up_gpu(
            x,
            norm_weight,
            w_gate_up,
            eps=float(eps),
            norm_offset=float(norm_offset),
            norm_scale_f32=bool(norm_scale_f32),
            act=act,
            interpret=interpret,
        )
    gate, up = jnp.split(
        rms_norm(x, norm_weight, eps, offset=norm_offset, scale_f32=norm_scale_f32) @ w_gate_up, 2, axis=-1
    )
    return MLP_ACTIVATIONS[act](gate) * up
