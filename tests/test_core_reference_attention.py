"""The pure-jnp ragged paged attention and KV write against a naive per-sequence numpy computation."""

from __future__ import annotations

import numpy as np
import pytest

from jaxrt.kernels import ragged_paged_attention, write_kv


def naive(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, scale, window, cap):
    out = np.zeros_like(q)
    ps = k_pages.shape[1]
    group = q.shape[1] // k_pages.shape[2]
    for s in range(num_seqs):
        kv_len = kv_lens[s]
        pages = page_indices[s, : -(-kv_len // ps)]
        k = k_pages[pages].reshape(-1, *k_pages.shape[2:])[:kv_len]
        v = v_pages[pages].reshape(-1, *v_pages.shape[2:])[:kv_len]
        q0, q1 = cu_q_lens[s], cu_q_lens[s + 1]
        for r in range(q0, q1):
            pos = kv_len - (q1 - q0) + (r - q0)
            for h in range(q.shape[1]):
                sc = k[:, h // group] @ q[r, h] * scale
                if cap:
                    sc = cap * np.tanh(sc / cap)
                keys = np.arange(kv_len)
                ok = keys <= pos
                if window:
                    ok &= keys > pos - window
                sc = np.where(ok, sc, -np.inf)
                p = np.exp(sc - sc.max())
                out[r, h] = (p / p.sum()) @ v[:, h // group]
    return out


@pytest.mark.parametrize(
    ("q_lens", "ctx_lens", "page_size", "heads", "window", "cap"),
    [
        ([1, 1, 1], [1, 15, 17], 16, (4, 2), None, None),  # decodes at 1, page-1, page+1
        ([5, 1, 16], [5, 33, 32], 16, (8, 8), None, None),  # prefill, decode, full-page chunk; MHA
        ([7, 3], [20, 3], 4, (6, 1), 5, None),  # chunked prefill on cached context; MQA; sliding window
        ([2, 1], [9, 40], 8, (4, 2), None, 3.0),  # soft-cap
    ],
)
def test_reference_matches_naive(q_lens, ctx_lens, page_size, heads, window, cap):
    rng = np.random.default_rng(0)
    hq, hkv = heads
    d = 16
    num_pages, pps, max_seqs = 40, 8, 4
    k_pages = rng.normal(size=(num_pages, page_size, hkv, d)).astype(np.float32)
    v_pages = rng.normal(size=(num_pages, page_size, hkv, d)).astype(np.float32)
    n = len(q_lens)
    kv_lens = np.zeros(max_seqs, np.int32)
    kv_lens[:n] = ctx_lens
    perm = rng.permutation(np.arange(1, num_pages))
    page_indices = perm[: max_seqs * pps].reshape(max_seqs, pps).astype(np.int32)
    cu = np.zeros(max_seqs + 1, np.int32)
    cu[1 : n + 1] = np.cumsum(q_lens)
    cu[n + 1 :] = cu[n]
    # Poison every slot no sequence may read: a NaN there must not reach any output.
    used = np.zeros((num_pages, page_size), bool)
    for i in range(n):
        for j in range(ctx_lens[i]):
            used[page_indices[i, j // page_size], j % page_size] = True
    k_pages[~used] = np.nan
    v_pages[~used] = np.nan
    num_tokens = int(cu[n]) + 3  # three padding rows
    q = rng.normal(size=(num_tokens, hq, d)).astype(np.float32)
    scale = d**-0.5
    got = np.asarray(
        ragged_paged_attention(
            q,
            k_pages,
            v_pages,
            kv_lens,
            page_indices,
            cu,
            np.array([n], np.int32),
            sm_scale=scale,
            sliding_window=window,
            soft_cap=cap,
            backend="reference",
        )
    )
    exp = naive(
        q, np.nan_to_num(k_pages), np.nan_to_num(v_pages), kv_lens, page_indices, cu, n, scale, window, cap
    )
    np.testing.assert_allclose(got, exp, atol=2e-5, rtol=1e-5)
    assert np.all(got[cu[n] :] == 0)  # padding rows


def test_write_kv_drops_padding_and_validation_errors():
    k_pages = np.zeros((4, 2, 1, 3), np.float32)
    new = np.ones((3, 1, 3), np.float32)
    k2, v2 = write_kv(k_pages, k_pages, new, 2 * new, np.array([5, -1, 0], np.int32))
    k2, v2 = np.asarray(k2), np.asarray(v2)
    assert k2[2, 1].sum() == 3 and k2[0, 0].sum() == 3 and k2.sum() == 6 and v2.sum() == 12
    q = np.zeros((2, 4, 16), np.float32)
    kp = np.zeros((4, 2, 3, 16), np.float32)
    i1 = np.zeros(2, np.int32)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        ragged_paged_attention(
            q,
            kp,
            kp,
            i1,
            np.zeros((2, 2), np.int32),
            np.zeros(3, np.int32),
            np.zeros(1, np.int32),
            sm_scale=1.0,
        )
    with pytest.raises(ValueError, match="int32"):
        ragged_paged_attention(
            q,
            np.zeros((4, 2, 2, 16), np.float32),
            np.zeros((4, 2, 2, 16), np.float32),
            i1.astype(np.int64),
            np.zeros((2, 2), np.int32),
            np.zeros(3, np.int32),
            np.zeros(1, np.int32),
            sm_scale=1.0,
        )
