"""Public attention entry points: validate inputs, pick a backend, run it.

Backends (``backend=``):

- ``"reference"``: pure jnp (``kernels.reference``), any platform; the CPU default.
- ``"pallas_gpu"``: NVIDIA GPUs. Pallas kernels: on Hopper, decode batches that fill the GPU run one lowered
  through Mosaic GPU (``kernels.mosaic_gpu``, TMA + wgmma); every other call one lowered through Triton.
- ``"pallas_tpu"``: Pallas Mosaic TPU kernel.
- ``"auto"`` / ``None``: the best one registered for the default device's platform.

A backend that cannot take a call's shapes or dtypes (its ``supports`` predicate gives a reason) hands the
call to the reference, here, for every backend alike.

``interpret=True`` runs a Pallas backend in Pallas interpret mode (CPU tests).

The KV write: ``write_kv`` (an XLA scatter) and ``rope_write_kv``, which also ropes q and k of the fused
projection output; on "pallas_gpu" that is one Pallas kernel (``kernels.kv_write``), elsewhere jnp.

Planning: the Pallas backends turn ``cu_q_lens`` / ``kv_lens`` / ``num_seqs`` into a work list with a few
small XLA ops. That work depends only on the batch, not on the layer, so a model computes it once per step
with ``attention_metadata`` and passes it to every layer's ``ragged_paged_attention(..., metadata=...)``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxrt.kernels import cudnn_prefill
from jaxrt.kernels.reference import (
    QKNorm,
    ragged_paged_attention_reference,
    rms_norm,
    rope_write_kv_reference,
    write_kv_reference,
)

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class _Backend:
    # Signature of `ragged_paged_attention_reference` plus `interpret` (and `metadata` when `metadata_fn`).
    fn: Callable[..., jax.Array]
    # (q, k_pages) -> None if the backend takes them, else the reason it does not (objects with .shape/.dtype).
    supports: Callable[[Any, Any], str | None] | None
    # (q, k_pages, kv_lens, page_indices, cu_q_lens, num_seqs) -> a pytree the backend takes as `metadata`.
    metadata_fn: Callable[..., Any] | None


_BACKENDS: dict[str, _Backend] = {}
# platform -> preferred backend names, best first.
_PLATFORM_PREFERENCE: dict[str, list[str]] = {"gpu": [], "tpu": [], "cpu": []}
_FALLBACKS_LOGGED: set[tuple[str, str]] = set()

BACKEND_NAMES = ("auto", "reference", "pallas_gpu", "pallas_tpu")


def register_backend(
    name: str,
    fn: Callable[..., jax.Array],
    platforms: tuple[str, ...] = (),
    *,
    supports: Callable[[Any, Any], str | None] | None = None,
    metadata: Callable[..., Any] | None = None,
) -> None:
    """Register an attention backend and make it the preferred one for ``platforms``.

    fn: called like ``ragged_paged_attention_reference`` plus ``interpret=`` (and ``metadata=`` when
    ``metadata`` is given). supports: ``(q, k_pages) -> None | reason``; calls with a reason run the
    reference instead. metadata: ``(q, k_pages, kv_lens, page_indices, cu_q_lens, num_seqs) -> pytree``,
    the backend's per-batch planning (see ``attention_metadata``).
    """
    _BACKENDS[name] = _Backend(fn, supports, metadata)
    for platform in platforms:
        _PLATFORM_PREFERENCE.setdefault(platform, []).insert(0, name)


register_backend("reference", ragged_paged_attention_reference)


def _load_pallas_backends() -> None:
    # Imported lazily so that `import jaxrt.kernels` stays cheap and works where a Pallas backend is absent.
    import importlib

    for module in ("jaxrt.kernels.pallas_gpu", "jaxrt.kernels.pallas_tpu"):
        try:
            importlib.import_module(module)
        except ImportError:
            pass


def resolve_backend(backend: str | None = None, platform: str | None = None) -> str:
    """Name of the backend that ``backend`` ("auto" or None included) selects on ``platform``."""
    if backend not in (None, "auto") and backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")
    _load_pallas_backends()
    if backend in (None, "auto"):
        platform = platform or jax.default_backend()
        for name in _PLATFORM_PREFERENCE.get(platform, []):
            return name
        return "reference"
    if backend not in _BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not available in this installation")
    return backend


def _runnable_backend(backend: str | None, q, k_pages) -> str:
    """The backend that runs a call: the selected one, or the reference when it does not support the call
    (or the call has no query tokens: nothing for a kernel's grid to do)."""
    name = resolve_backend(backend)
    if q.shape[0] == 0:
        return "reference"
    supports = _BACKENDS[name].supports
    reason = None if supports is None else supports(q, k_pages)
    if reason is None:
        return name
    if (name, reason) not in _FALLBACKS_LOGGED:
        _FALLBACKS_LOGGED.add((name, reason))
        logger.warning("attention backend %r: %s; running the jnp reference instead", name, reason)
    return "reference"


@functools.partial(jax.tree_util.register_dataclass, data_fields=["plan", "split"], meta_fields=["backend"])
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    """Per-batch planning of one backend, shared by every attention call over the same batch.

    A pytree (it passes through ``jit`` / ``scan`` / nnx like any array); ``plan`` is backend-specific.
    ``split``: with ``attention_metadata(..., decodes=True)`` on pallas_gpu, how a cuDNN program's calls
    divide the batch (``cudnn_prefill.SplitPlan``) and the planning of its leading decodes' paged call.
    """

    backend: str
    plan: Any
    split: Any = None


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def validate_inputs(
    q: Any,
    k_pages: Any,
    v_pages: Any,
    kv_lens: jax.Array,
    page_indices: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array,
    sliding_window: int | None,
    soft_cap: float | None,
) -> None:
    """Shape and dtype checks shared by every backend (static, so free under jit).

    q, k_pages, v_pages: arrays or anything with ``.shape`` / ``.dtype``.
    """
    _check(len(q.shape) == 3, f"q must be [num_tokens, num_q_heads, head_dim], got shape {q.shape}")
    _check(
        len(k_pages.shape) == 4,
        f"k_pages must be [num_pages, page_size, num_kv_heads, head_dim], got shape {k_pages.shape}",
    )
    _check(k_pages.shape == v_pages.shape, f"k_pages {k_pages.shape} and v_pages {v_pages.shape} differ")
    _check(k_pages.dtype == v_pages.dtype, "k_pages and v_pages must have the same dtype")
    _, num_q_heads, head_dim = q.shape
    _, _, num_kv_heads, kv_head_dim = k_pages.shape
    _check(head_dim == kv_head_dim, f"q head_dim {head_dim} != kv head_dim {kv_head_dim}")
    _check(
        num_kv_heads > 0 and num_q_heads % num_kv_heads == 0,
        f"num_q_heads {num_q_heads} must be a multiple of num_kv_heads {num_kv_heads}",
    )
    _check(q.dtype in (jnp.float32, jnp.bfloat16, jnp.float16), f"q dtype {q.dtype} not supported")
    for name, arr, ndim in (
        ("kv_lens", kv_lens, 1),
        ("page_indices", page_indices, 2),
        ("cu_q_lens", cu_q_lens, 1),
        ("num_seqs", num_seqs, 1),
    ):
        _check(arr.ndim == ndim, f"{name} must have {ndim} dims, got shape {arr.shape}")
        _check(arr.dtype == jnp.int32, f"{name} must be int32, got {arr.dtype}")
    max_num_seqs = kv_lens.shape[0]
    _check(page_indices.shape[0] == max_num_seqs, "page_indices rows must equal len(kv_lens)")
    _check(cu_q_lens.shape[0] == max_num_seqs + 1, "cu_q_lens must have len(kv_lens) + 1 entries")
    _check(num_seqs.shape == (1,), f"num_seqs must have shape (1,), got {num_seqs.shape}")
    _check(sliding_window is None or sliding_window > 0, "sliding_window must be positive or None")
    _check(soft_cap is None or soft_cap > 0, "soft_cap must be positive or None")


def attention_metadata(
    q: Any,
    k_pages: Any,
    kv_lens: jax.Array,
    page_indices: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array,
    *,
    backend: str | None = None,
    decodes: bool = False,
) -> AttentionMetadata | None:
    """The planning ``ragged_paged_attention`` would do for this batch, to compute once and share.

    q / k_pages: the arrays of the attention calls, or anything with their ``.shape`` and ``.dtype``
    (e.g. ``jax.ShapeDtypeStruct``): only the static shapes are read. The result is valid for every call
    with the same ``q`` / ``k_pages`` shapes and dtypes, the same batch arrays and the same ``backend``,
    whatever its ``sm_scale``, ``sliding_window`` or ``soft_cap``. None when the selected backend does no
    planning (the reference) or would hand these shapes to the reference. ``decodes``: for calls with
    ``fresh_prompt`` and ``decodes`` (a cuDNN program's for decodes beside prompts), also their split of the
    batch (``AttentionMetadata.split``).
    """
    validate_inputs(q, k_pages, k_pages, kv_lens, page_indices, cu_q_lens, num_seqs, None, None)
    name = _runnable_backend(backend, q, k_pages)
    metadata_fn = _BACKENDS[name].metadata_fn
    if metadata_fn is None:
        return None
    split = None
    if decodes and name == "pallas_gpu" and kv_lens.shape[0] > 1:
        plan = cudnn_prefill.plan_split(kv_lens, cu_q_lens, num_seqs, page_indices)
        rows = jax.ShapeDtypeStruct((min(q.shape[0], kv_lens.shape[0]), *q.shape[1:]), q.dtype)
        split = (plan, attention_metadata(rows, k_pages, kv_lens, page_indices, cu_q_lens, plan.decodes))
    plan = metadata_fn(q, k_pages, kv_lens, page_indices, cu_q_lens, num_seqs)
    return AttentionMetadata(name, plan, split)


def ragged_paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    kv_lens: jax.Array,
    page_indices: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    backend: str | None = None,
    interpret: bool = False,
    metadata: AttentionMetadata | None = None,
    fresh_prompt: str | None = None,
    prefix_capacity: int = 0,
    decodes: bool = False,
) -> jax.Array:
    """Causal attention of a ragged batch (prefill chunks and decodes mixed) over a paged KV pool.

    q: [num_tokens, num_q_heads, head_dim]; k_pages, v_pages: [num_pages, page_size, num_kv_heads, head_dim];
    kv_lens: [max_num_seqs] int32; page_indices: [max_num_seqs, pages_per_seq] int32;
    cu_q_lens: [max_num_seqs + 1] int32; num_seqs: [1] int32. See `kernels.reference` for the semantics.
    metadata: ``attention_metadata(q, k_pages, kv_lens, page_indices, cu_q_lens, num_seqs, backend=backend)``
    of this batch, to share the planning between layers; computed here when None.
    fresh_prompt: None, or the caller's promise that the batch is 1 to ``cudnn_prefill.MAX_SEQS`` prompts with
    no cached prefix (``kernels.cudnn_prefill.batch_is_fresh``), after leading one-token sequences (decodes,
    any number) if ``decodes``; then "pallas_gpu" attends the prompts with ``cudnn_prefill.fresh_attention``
    of that implementation ("cudnn"; "xla" in the interpreter) over the gathered K/V rows, where
    ``cudnn_prefill.applies``, and the decodes with its paged kernel on their own
    (``cudnn_prefill.split_attention``). With ``prefix_capacity > 0`` the promise is wider: the sequences
    (after the decodes), at most ``MAX_SEQS``, each with new tokens, have cached prefixes that fit a packed
    buffer of that many rows (``cudnn_prefill.prefix_rows``); they are attended in two parts, own tokens and
    prefix, and merged.
    Returns [num_tokens, num_q_heads, head_dim] in q.dtype (padding rows zero).
    """
    validate_inputs(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, sliding_window, soft_cap)
    _check(
        fresh_prompt in (None, "cudnn", "xla"),
        f"fresh_prompt must be None, 'cudnn' or 'xla', got {fresh_prompt!r}",
    )
    _check(
        isinstance(prefix_capacity, int) and prefix_capacity >= 0,
        f"prefix_capacity must be an int >= 0, got {prefix_capacity!r}",
    )
    name = _runnable_backend(backend, q, k_pages)
    if metadata is not None and metadata.backend != name:
        raise ValueError(
            f"metadata was made for attention backend {metadata.backend!r}, this call runs {name!r}"
        )
    args = (q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs)
    kwargs = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
    if name == "reference":
        return ragged_paged_attention_reference(*args, **kwargs)
    fresh = fresh_prompt is not None and name == "pallas_gpu"
    if fresh and cudnn_prefill.applies(q, k_pages, sliding_window, soft_cap):
        cudnn = dict(sm_scale=sm_scale, implementation=fresh_prompt, prefix_capacity=prefix_capacity)
        if not decodes or kv_lens.shape[0] == 1:
            return cudnn_prefill.fresh_attention(*args, **cudnn)

        split, decodes_plan = (None, None) if metadata is None or metadata.split is None else metadata.split

        def paged(q_rows, decodes):  # the leading decodes: the paged kernel on a decode batch's shape
            return ragged_paged_attention(
                q_rows, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, decodes,
                sm_scale=sm_scale, backend=name, interpret=interpret, metadata=decodes_plan,
            )  # fmt: skip

        return cudnn_prefill.split_attention(*args, paged=paged, plan=split, **cudnn)
    entry = _BACKENDS[name]
    if entry.metadata_fn is not None:
        kwargs["metadata"] = None if metadata is None else metadata.plan
    return entry.fn(*args, interpret=interpret, **kwargs)


def write_kv(
    k_pages: jax.Array, v_pages: jax.Array, k: jax.Array, v: jax.Array, slot_mapping: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Write new K/V rows ``[num_tokens, num_kv_heads, head_dim]`` into their flat slots (-1 = skip).

    An XLA scatter; with the pools donated to the step it updates in place.
    """
    _check(k.shape == v.shape, f"k {k.shape} and v {v.shape} differ")
    _check(
        k.ndim == 3 and k.shape[1:] == k_pages.shape[2:], f"k {k.shape} does not match pages {k_pages.shape}"
    )
    _check(slot_mapping.shape == (k.shape[0],), "slot_mapping must be [num_tokens]")
    return write_kv_reference(k_pages, v_pages, k, v, slot_mapping)


_FLOATS = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _check_rope_kv(t, cos, sin, k_pages, v_pages, slot_mapping, num_kv_heads: int, head_dim: int) -> None:
    """The rotary tables, pools and slots of ``t`` tokens, as ``rope_write_kv`` and ``norm_qkv_rope_write``
    take them."""
    for name, arr in (("cos", cos), ("sin", sin)):
        _check(
            arr.ndim == 2 and arr.shape[0] == t and 2 * arr.shape[1] <= head_dim,  # 0: no rotary dims
            f"{name} must be [{t}, rotary_dim // 2] with rotary_dim <= head_dim {head_dim}, got {arr.shape}",
        )
        _check(arr.dtype == jnp.float32, f"{name} must be float32, got {arr.dtype}")
    _check(cos.shape == sin.shape, f"cos {cos.shape} and sin {sin.shape} differ")
    _check(
        k_pages.ndim == 4 and k_pages.shape[2:] == (num_kv_heads, head_dim),
        f"k_pages must be [num_pages, page_size, {num_kv_heads}, {head_dim}], got {k_pages.shape}",
    )
    _check(k_pages.shape == v_pages.shape, f"k_pages {k_pages.shape} and v_pages {v_pages.shape} differ")
    _check(k_pages.dtype == v_pages.dtype, f"k_pages {k_pages.dtype} and v_pages {v_pages.dtype} differ")
    _check(k_pages.dtype in _FLOATS, f"k_pages dtype {k_pages.dtype} not supported")
    _check(slot_mapping.shape == (t,), f"slot_mapping must be [{t}], got {slot_mapping.shape}")
    _check(slot_mapping.dtype == jnp.int32, f"slot_mapping must be int32, got {slot_mapping.dtype}")


def rope_write_kv(
    qkv: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    slot_mapping: jax.Array,
    *,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    qk_norm: QKNorm | None = None,
    qk_norm_weights: tuple[jax.Array, jax.Array] | None = None,
    backend: str | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(Norm,) rope q and k of the fused projection output and write k and v into their pool slots, in one
    step.

    qkv: ``[num_tokens, (num_q_heads + 2 * num_kv_heads) * head_dim]``, q columns first, then k, then v;
    cos, sin: ``[num_tokens, rotary_dim // 2]`` float32 (rotate-half rope on the first ``rotary_dim`` dims);
    k_pages, v_pages: ``[num_pages, page_size, num_kv_heads, head_dim]``; slot_mapping: ``[num_tokens]`` int32
    flat slot ``page * page_size + offset``, -1 for padding rows (dropped). qk_norm: the model's RMSNorm of q
    and k before rope (``kernels.reference.QKNorm``: Qwen3 / Gemma 3 per head, OLMo 2 over all heads), with
    ``qk_norm_weights = (q weight, k weight)``: ``[head_dim]`` each for ``"head"``,
    ``[num_q_heads * head_dim]`` / ``[num_kv_heads * head_dim]`` for ``"full"``.
    Returns (roped q ``[num_tokens, num_q_heads, head_dim]`` in qkv.dtype, k_pages, v_pages).

    On the "pallas_gpu" backend one Pallas kernel (``kernels.kv_write``) does it where it can
    (``kv_write.supports``: head_dim a multiple of 8, some rotary dims); everywhere else the jnp composition
    ``kernels.reference.rope_write_kv_reference`` (split, ``QKNorm``, ``apply_rope``, ``write_kv_reference``).
    With the pools donated to the step both update them in place.
    """
    _check(
        num_q_heads > 0 and num_kv_heads > 0 and head_dim > 0,
        f"num_q_heads {num_q_heads}, num_kv_heads {num_kv_heads} and head_dim {head_dim} must be positive",
    )
    width = (num_q_heads + 2 * num_kv_heads) * head_dim
    _check(
        qkv.ndim == 2 and qkv.shape[1] == width,
        f"qkv must be [num_tokens, {width}] ((num_q_heads + 2 * num_kv_heads) * head_dim), got {qkv.shape}",
    )
    _check(qkv.dtype in _FLOATS, f"qkv dtype {qkv.dtype} not supported")
    _check_rope_kv(qkv.shape[0], cos, sin, k_pages, v_pages, slot_mapping, num_kv_heads, head_dim)
    _check(
        (qk_norm is None) == (qk_norm_weights is None),
        "qk_norm and qk_norm_weights must be given together",
    )
    if qk_norm is not None:
        _check(isinstance(qk_norm, QKNorm), f"qk_norm must be a kernels.reference.QKNorm, got {qk_norm!r}")
        _check(
            isinstance(qk_norm_weights, (tuple, list)) and len(qk_norm_weights) == 2,
            "qk_norm_weights must be (q weight, k weight)",
        )
        full = qk_norm.mode == "full"
        for name, w, count in (
            ("q", qk_norm_weights[0], num_q_heads),
            ("k", qk_norm_weights[1], num_kv_heads),
        ):
            want = ((count if full else 1) * head_dim,)
            _check(
                w.shape == want,
                f"qk_norm_weights' {name} weight must be {list(want)} for mode {qk_norm.mode!r}, got {w.shape}",
            )
            _check(w.dtype in _FLOATS, f"qk_norm_weights' {name} weight dtype {w.dtype} not supported")
    args = (qkv, cos, sin, k_pages, v_pages, slot_mapping)
    heads = dict(
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        qk_norm=qk_norm,
        qk_norm_weights=None if qk_norm_weights is None else tuple(qk_norm_weights),
    )
    if resolve_backend(backend) == "pallas_gpu":
        from jaxrt.kernels import kv_write

        reason = kv_write.supports(qkv.shape[0], cos.shape, head_dim)
        if reason is None:
            return kv_write.rope_write_kv_gpu(*args, **heads, interpret=interpret)
        if ("rope_write_kv", reason) not in _FALLBACKS_LOGGED:
            _FALLBACKS_LOGGED.add(("rope_write_kv", reason))
            logger.info("rope_write_kv: %s; running the jnp composition", reason)
    return rope_write_kv_reference(*args, **heads)


def norm_qkv_kernel_applies(
    num_tokens: int, hidden: int, head_dim: int, rotary_dim: int, qk_norm, backend: str | None
) -> bool:
    """Whether ``norm_qkv_rope_write`` runs its one kernel (``kernels.decode_qkv``) for this call on
    ``backend``; else it runs the norm, the product and ``rope_write_kv`` as before."""
    from jaxrt.kernels import decode_qkv

    return (
        resolve_backend(backend) == "pallas_gpu"
        and decode_qkv.supports(num_tokens, hidden, head_dim, rotary_dim, qk_norm) is None
    )


def norm_qkv_rope_write(
    x: jax.Array,
    norm_weight: jax.Array,
    w_qkv: jax.Array,
    bias: jax.Array | None,
    cos: jax.Array,
    sin: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    slot_mapping: jax.Array,
    *,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    eps: float,
    norm_offset: float = 0.0,
    norm_scale_f32: bool = False,
    backend: str | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The attention block's input: ``rope_write_kv(rms_norm(x) @ w_qkv.T + bias, ...)``.

    x: ``[num_tokens, hidden]`` (the residual stream); norm_weight: ``[hidden]`` with ``eps``,
    ``norm_offset`` and ``norm_scale_f32`` as ``kernels.reference.rms_norm`` takes them; w_qkv:
    ``[(num_q_heads + 2 * num_kv_heads) * head_dim, hidden]`` (stored ``[out, in]``, q rows first, then k,
    then v); bias: ``[(num_q_heads + 2 * num_kv_heads) * head_dim]`` or None; the rest as ``rope_write_kv``
    (full rotary: cos, sin ``[num_tokens, head_dim // 2]``). Returns (roped q ``[num_tokens, num_q_heads,
    head_dim]`` in x.dtype, k_pages, v_pages).

    On the "pallas_gpu" backend a lone token (``decode_qkv.supports``) takes one Pallas kernel
    (``kernels.decode_qkv``); everything else runs ``rms_norm``, the product and ``rope_write_kv``.
    """
    width = (num_q_heads + 2 * num_kv_heads) * head_dim
    _check(x.ndim == 2, f"x must be [num_tokens, hidden], got shape {x.shape}")
    t, hidden = x.shape
    _check(x.dtype in _FLOATS, f"x dtype {x.dtype} not supported")
    _check(norm_weight.shape == (hidden,), f"norm_weight must be [{hidden}], got {norm_weight.shape}")
    _check(
        w_qkv.shape == (width, hidden), f"w_qkv must be [{width}, {hidden}] ([out, in]), got {w_qkv.shape}"
    )
    _check(
        w_qkv.dtype == x.dtype and norm_weight.dtype == x.dtype,
        f"x {x.dtype}, norm_weight {norm_weight.dtype} and w_qkv {w_qkv.dtype} must share one dtype",
    )
    if bias is not None:
        _check(bias.shape == (width,), f"bias must be [{width}], got {bias.shape}")
        _check(bias.dtype == x.dtype, f"bias dtype {bias.dtype} must be x's {x.dtype}")
    heads = dict(num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim)
    if norm_qkv_kernel_applies(t, hidden, head_dim, 2 * cos.shape[-1], None, backend):
        from jaxrt.kernels import decode_qkv

        _check_rope_kv(t, cos, sin, k_pages, v_pages, slot_mapping, num_kv_heads, head_dim)
        return decode_qkv.norm_qkv_rope_write_gpu(
            x,
            norm_weight,
            w_qkv,
            bias,
            cos,
            sin,
            k_pages,
            v_pages,
            slot_mapping,
            **heads,
            eps=float(eps),
            norm_offset=float(norm_offset),
            norm_scale_f32=bool(norm_scale_f32),
            interpret=interpret,
        )
    xn = rms_norm(x, norm_weight, eps, offset=norm_offset, scale_f32=norm_scale_f32)
    qkv = jax.lax.dot_general(xn, w_qkv, (((1,), (1,)), ((), ())))
    if bias is not None:
        qkv = qkv + bias
    return rope_write_kv(
        qkv, cos, sin, k_pages, v_pages, slot_mapping, **heads, backend=backend, interpret=interpret
    )
