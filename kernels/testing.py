"""Test helpers for the attention kernels: random ragged paged batches and a float64 numpy oracle.

Shared by ``tests/kernels/*`` and ``benchmarks/bench_kernels.py``; numpy only (no jax at import time).
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class Batch:
    """A ragged batch in the layout of ``ragged_paged_attention`` (numpy arrays)."""

    q: np.ndarray  # [num_tokens, num_q_heads, head_dim]
    k_pages: np.ndarray  # [num_pages, page_size, num_kv_heads, head_dim]
    v_pages: np.ndarray
    kv_lens: np.ndarray  # [max_num_seqs] int32
    page_indices: np.ndarray  # [max_num_seqs, pages_per_seq] int32
    cu_q_lens: np.ndarray  # [max_num_seqs + 1] int32
    num_seqs: np.ndarray  # [1] int32

    def args(self) -> tuple[np.ndarray, ...]:
        return (
            self.q,
            self.k_pages,
            self.v_pages,
            self.kv_lens,
            self.page_indices,
            self.cu_q_lens,
            self.num_seqs,
        )

    def clean_args(self) -> tuple[np.ndarray, ...]:
        """args() with NaN poison replaced by zeros (for implementations that may touch masked slots)."""

        def clean(x):
            if np.issubdtype(x.dtype, np.integer):
                return x
            xf = np.asarray(x, np.float32)  # (bfloat16 is not an np.floating subtype)
            return np.where(np.isnan(xf), 0.0, xf).astype(x.dtype)

        return tuple(clean(x) for x in self.args())

    @property
    def num_real_tokens(self) -> int:
        return int(self.cu_q_lens[int(self.num_seqs[0])])


def make_batch(
    rng: np.random.Generator,
    q_lens,
    kv_lens,
    *,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    dtype=np.float32,
    max_num_seqs: int | None = None,
    num_tokens: int | None = None,
    pages_per_seq: int | None = None,
    spare_pages: int = 2,
    poison: bool = True,
) -> Batch:
    """Random batch. Pages are a random permutation of the pool; page-table entries past a sequence's last
    page are random (possibly other sequences' pages); with ``poison``, every pool page no sequence uses and
    every slot past a sequence's kv_len in its last page is NaN, so reading a wrong slot shows up.

    ``dtype`` may be any numpy-compatible dtype name jnp understands (e.g. ``jnp.bfloat16``); values are
    rounded to it, so an oracle computed from the returned arrays sees exactly what the kernel sees.
    """
    n = len(q_lens)
    assert len(kv_lens) == n and all(kv >= q for q, kv in zip(q_lens, kv_lens, strict=True))
    max_num_seqs = max_num_seqs or n
    num_tokens = num_tokens if num_tokens is not None else int(sum(q_lens))
    assert num_tokens >= sum(q_lens) and max_num_seqs >= n
    need = [-(-kv // page_size) for kv in kv_lens]
    pages_per_seq = pages_per_seq or max(max(need, default=0), 1) + 1
    num_pages = sum(need) + spare_pages
    perm = rng.permutation(num_pages)
    pt = rng.integers(0, num_pages, size=(max_num_seqs, pages_per_seq)).astype(np.int32)
    used = np.zeros(num_pages, bool)
    o = 0
    for i, c in enumerate(need):
        pt[i, :c] = perm[o : o + c]
        used[perm[o : o + c]] = True
        o += c
    k = rng.standard_normal((num_pages, page_size, num_kv_heads, head_dim)).astype(np.float32)
    v = rng.standard_normal((num_pages, page_size, num_kv_heads, head_dim)).astype(np.float32)
    if poison:
        k[~used] = np.nan
        v[~used] = np.nan
        for i, kv in enumerate(kv_lens):
            if kv % page_size:
                last = pt[i, need[i] - 1]
                k[last, kv % page_size :] = np.nan
                v[last, kv % page_size :] = np.nan
    q = rng.standard_normal((num_tokens, num_q_heads, head_dim)).astype(np.float32)
    if poison:
        q[int(sum(q_lens)) :] = np.nan  # padding rows of q must not leak into anything
    cu = np.zeros(max_num_seqs + 1, np.int32)
    cu[1 : n + 1] = np.cumsum(q_lens)
    cu[n + 1 :] = cu[n]
    kvl = np.zeros(max_num_seqs, np.int32)
    kvl[:n] = kv_lens
    if np.dtype(dtype) != np.float32:
        q, k, v = (x.astype(dtype) for x in (q, k, v))
    return Batch(q, k, v, kvl, pt, cu, np.array([n], np.int32))


def oracle(
    batch: Batch, *, sm_scale: float, sliding_window: int | None = None, soft_cap: float | None = None
) -> np.ndarray:
    """Dense per-sequence causal attention in float64; padding rows are zero."""
    q = np.asarray(batch.q, np.float64)
    kp = np.asarray(batch.k_pages, np.float64)
    vp = np.asarray(batch.v_pages, np.float64)
    _, page, hkv, d = kp.shape
    g = q.shape[1] // hkv
    out = np.zeros_like(q)
    for i in range(int(batch.num_seqs[0])):
        s0, s1 = int(batch.cu_q_lens[i]), int(batch.cu_q_lens[i + 1])
        ql, kvl = s1 - s0, int(batch.kv_lens[i])
        if ql == 0:
            continue
        pages = batch.page_indices[i, : -(-kvl // page)]
        k = np.repeat(kp[pages].reshape(-1, hkv, d)[:kvl], g, axis=1)
        v = np.repeat(vp[pages].reshape(-1, hkv, d)[:kvl], g, axis=1)
        s = np.einsum("qhd,khd->hqk", q[s0:s1], k) * sm_scale
        if soft_cap is not None:
            s = soft_cap * np.tanh(s / soft_cap)
        qpos = kvl - ql + np.arange(ql)
        kpos = np.arange(kvl)
        mask = kpos[None, :] <= qpos[:, None]
        if sliding_window is not None:
            mask &= kpos[None, :] > qpos[:, None] - sliding_window
        s = np.where(mask[None], s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out[s0:s1] = np.einsum("hqk,khd->qhd", p, v)
    return out


def rel_err(x, ref) -> float:
    """||x - ref|| / ||ref|| in float64."""
    x = np.asarray(x, np.float64)
    ref = np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))
