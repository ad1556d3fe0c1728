"""The fresh-prompt path of ``pallas_gpu`` attention (``kernels.cudnn_prefill``).

On CPU the path's own code (gathering the pages, masking past the prompt, the host's choice, the routing in
``ragged_paged_attention``) runs with ``jax.nn.dot_product_attention``'s XLA implementation against the
float64 oracle on NaN-poisoned pools; on an NVIDIA GPU the whole call, cuDNN included, against the oracle.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxrt.kernels import cudnn_prefill, ragged_paged_attention
from jaxrt.kernels.testing import make_batch, oracle, rel_err

HEADS = dict(num_q_heads=8, num_kv_heads=2, head_dim=64)


def _batch(seed, q_lens, kv_lens, num_tokens, dtype=jnp.bfloat16, page_size=16):
    return make_batch(
        np.random.default_rng(seed),
        q_lens,
        kv_lens,
        **HEADS,
        page_size=page_size,
        dtype=dtype,
        max_num_seqs=4,
        num_tokens=num_tokens,
    )


def _assert_oracle(got, b, sm_scale=0.125) -> np.ndarray:
    """``got`` (as f32) against the float64 oracle: real rows within 1e-2, padding rows zero, no NaN."""
    got = np.asarray(got.astype(jnp.float32))
    n = b.num_real_tokens
    assert not np.isnan(got).any()
    assert rel_err(got[:n], oracle(b, sm_scale=sm_scale)[:n]) < 1e-2
    assert (got[n:] == 0).all()
    return got


FRESH_CASES = [[1], [15], [16], [17], [64], [1, 1], [15, 17], [16, 16, 31], [7, 30, 1, 20]]


@pytest.mark.parametrize("q_lens", FRESH_CASES, ids=str)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_fresh_attention_matches_the_oracle(q_lens, dtype):
    """Fresh prompts packed in a 64-token step: their rows match dense causal attention within each prompt,
    the padding rows are zero, and no NaN from the poisoned slots past a prompt (or pages past its table)
    gets in."""
    b = _batch(sum(q_lens) + len(q_lens), q_lens, q_lens, 64, dtype)
    args = [jnp.asarray(a) for a in b.args()]
    _assert_oracle(cudnn_prefill.fresh_attention(*args, sm_scale=0.125, implementation="xla"), b)


@pytest.mark.parametrize("page_size", [8, 48])
def test_fresh_attention_takes_any_page_size(page_size):
    """The K/V rows are gathered token by token, so prompts need not fill whole pages of any size."""
    b = _batch(page_size, [30, 17], [30, 17], 64, page_size=page_size)
    args = [jnp.asarray(a) for a in b.args()]
    got = np.asarray(
        cudnn_prefill.fresh_attention(*args, sm_scale=0.125, implementation="xla").astype(jnp.float32)
    )
    assert rel_err(got[:47], oracle(b, sm_scale=0.125)[:47]) < 1e-2
    assert (got[47:] == 0).all()


PREFIXED_CASES = [
    # (q_lens, kv_lens): chunks behind cached prefixes, decodes, and fresh prompts beside them
    ([16], [40]),
    ([1], [30]),
    ([17], [17 + 32]),  # a prefix of whole pages
    ([20, 17], [20, 50]),  # a fresh prompt beside a chunk behind a prefix
    ([5, 1, 30], [5, 33, 94]),
    ([10, 3, 9, 12], [26, 3, 100, 13]),
]


@pytest.mark.parametrize("q_lens,kv_lens", PREFIXED_CASES, ids=str)
def test_prefixed_attention_matches_the_oracle(q_lens, kv_lens):
    """Chunks behind cached prefixes, attended as their own tokens (causal) and their prefix (gathered into the
    packed buffer, unmasked), merged by log-sum-exp: every real row matches the oracle over the whole kv,
    padding rows are zero, and no NaN from poisoned slots gets in. Without the prefix part the rows behind a
    prefix would differ (checked: the merge is what makes them right)."""
    b = _batch(sum(kv_lens), q_lens, kv_lens, 64)
    args = [jnp.asarray(a) for a in b.args()]
    need = sum(max(kv - q, 1) for q, kv in zip(q_lens, kv_lens, strict=True))  # every sequence's, packed
    lead = next((i for i, q in enumerate(q_lens) if q != 1), len(q_lens))  # split_attention's decodes
    rest = sum(max(kv - q, 1) for q, kv in zip(q_lens[lead:], kv_lens[lead:], strict=True))
    assert cudnn_prefill.prefix_rows(b.kv_lens, b.cu_q_lens, b.num_seqs) == rest
    got = cudnn_prefill.fresh_attention(*args, sm_scale=0.125, implementation="xla", prefix_capacity=256)
    got = _assert_oracle(got, b)
    # A capacity of exactly what the batch needs gives the same rows.
    tight = cudnn_prefill.fresh_attention(*args, sm_scale=0.125, implementation="xla", prefix_capacity=need)
    np.testing.assert_allclose(np.asarray(tight.astype(jnp.float32)), got, atol=1e-2)
    own = cudnn_prefill.fresh_attention(*args, sm_scale=0.125, implementation="xla")
    n = b.num_real_tokens
    assert rel_err(np.asarray(own.astype(jnp.float32))[:n], oracle(b, sm_scale=0.125)[:n]) > 0.05


CHOOSE_CASES = [
    # (q_lens, kv_lens, choice with capacities (8192, 32768)): None = paged kernel, 0 = fresh program
    ([2048], [2048], 0),
    ([2047], [2047], None),
    ([1024], [2048], None),  # 1024 * (1024 + 2 * 1024) < 2048^2
    ([1024], [2560], None),  # 1024 * (1024 + 2 * 1536) >= 2048^2, but under MIN_TOKENS new tokens
    ([2048], [6000], 8192),
    ([1024, 1024], [9024, 1024], 8192),  # 8000 + 1 prefix rows
    ([1024, 1024], [9324, 1024], 32768),  # 8300 + 1
    ([512], [40000], None),  # no capacity holds the prefix
    ([100], [30100], None),  # a short chunk behind a long prefix: work enough, but under MIN_TOKENS new
    ([1100], [5196], None),  # likewise (measured slower)
    ([2048], [3548], 8192),
    ([1, 2048], [4000, 2048], 0),  # a decode before a fresh prompt: the paged kernel takes it
    ([2048, 1], [2048, 4000], 8192),  # one after it: packed with its prefix, as a chunk
    ([1] * 9 + [2048], [3000] * 9 + [2048], 0),  # more than MAX_SEQS sequences, the decodes first
    ([1] * 9 + [2048], [30000] * 9 + [8192], 8192),  # decodes before a chunk behind a prefix
    ([1] * 9 + [1024], [3000] * 9 + [1024], None),  # the prompt alone weighs: too little work
    ([1], [5000], None),  # a decode alone: nothing for cuDNN
    ([1] * 3, [5000] * 3, None),
    ([1024] * 9, [2048] * 9, None),  # more than MAX_SEQS prompts
    ([1] + [1024] * 9, [70] + [2048] * 9, None),
]


@pytest.mark.parametrize("q_lens,kv_lens,choice", CHOOSE_CASES, ids=[str(c[:2]) for c in CHOOSE_CASES])
def test_choose_weighs_the_work_and_fits_the_prefix(q_lens, kv_lens, choice):
    """The host's choice: the fresh program for fresh batches, the prefixed one with the smallest buffer that
    holds the prefixes, and the paged kernel for more than MAX_SEQS sequences after the leading one-token ones
    (which the paged kernel takes inside the cuDNN programs), too little attention (``q * (q + 2 * prefix)``
    summed under ``MIN_WORK``), fewer than MIN_TOKENS new tokens behind a prefix, or a prefix no buffer
    holds."""
    assert cudnn_prefill.MIN_WORK == 2048 * 2048
    b = make_batch(
        np.random.default_rng(0), q_lens, kv_lens, **HEADS, page_size=16, max_num_seqs=12, poison=False
    )
    assert cudnn_prefill.choose(b.kv_lens, b.cu_q_lens, b.num_seqs, (8192, 32768)) == choice
    lead = next((i for i, q in enumerate(q_lens) if q != 1), len(q_lens))
    assert cudnn_prefill.leading_decodes(b.kv_lens, b.cu_q_lens, b.num_seqs) == lead


def test_bucket_capacities_all_sizes_on_the_largest_bucket_one_below():
    assert cudnn_prefill.bucket_capacities([2048, 4096, 8192], 131072) == {
        4096: [8192],
        8192: [8192, 32768, 131072],
    }
    assert cudnn_prefill.bucket_capacities([2048], 4096) == {2048: [8192]}
    assert cudnn_prefill.bucket_capacities([], 4096) == {}


def test_prefix_capacities_step_by_four_to_a_context():
    assert cudnn_prefill.prefix_capacities(2048) == [8192]
    assert cudnn_prefill.prefix_capacities(8192) == [8192]
    assert cudnn_prefill.prefix_capacities(8193) == [8192, 32768]
    assert cudnn_prefill.prefix_capacities(131072) == [8192, 32768, 131072]


CHOICE_CASES = [
    # (q_lens, kv_lens, fresh)
    ([40], [40], True),
    ([64], [64], True),
    ([40], [56], False),  # a cached prefix
    ([20, 20], [20, 20], True),  # two prompts
    ([20, 1, 5], [20, 1, 5], True),  # a one-token prompt is fresh too
    ([20, 20], [20, 36], False),  # one of two behind a prefix
    ([1], [30], False),  # a decode
    ([30, 1], [30, 30], False),  # a decode after a prompt (packed with its prefix, so not fresh)
    ([1, 1, 30], [30, 7, 30], True),  # decodes before a prompt (split_attention)
    ([1] * 12 + [4] * 8, [9] * 12 + [4] * 8, True),
    ([1, 30, 20], [30, 30, 40], False),
    ([4] * 8, [4] * 8, True),  # MAX_SEQS prompts
    ([4] * 9, [4] * 9, False),  # more: the packed segments' slots are MAX_SEQS
]


@pytest.mark.parametrize("q_lens,kv_lens,fresh", CHOICE_CASES, ids=[str(c[:2]) for c in CHOICE_CASES])
def test_batch_is_fresh(q_lens, kv_lens, fresh):
    """1 to MAX_SEQS prompts without a prefix, after any one-token sequences, make a fresh batch (what a
    fresh-prompt program may run)."""
    b = make_batch(
        np.random.default_rng(0), q_lens, kv_lens, **HEADS, page_size=16, max_num_seqs=20, num_tokens=64
    )
    assert cudnn_prefill.batch_is_fresh(b.kv_lens, b.cu_q_lens, b.num_seqs) == fresh


@pytest.mark.parametrize(
    "q_lens,prefers",
    [
        ([2048], True),
        ([2047], False),
        ([1024] * 4, True),
        ([1024] * 2, False),
        ([512] * 8, False),
        ([2000, 500], True),
        ([1500], False),
    ],
)
def test_choose_weighs_a_fresh_batchs_causal_work(q_lens, prefers):
    """The host takes the fresh program for fresh batches with at least a 2048-token prompt's causal work
    (sum of squared lengths), not for shorter or fewer prompts."""
    assert cudnn_prefill.MIN_WORK == 2048 * 2048
    b = make_batch(
        np.random.default_rng(0), q_lens, q_lens, **HEADS, page_size=16, max_num_seqs=8, poison=False
    )
    assert cudnn_prefill.batch_is_fresh(b.kv_lens, b.cu_q_lens, b.num_seqs)
    assert (cudnn_prefill.choose(b.kv_lens, b.cu_q_lens, b.num_seqs) == 0) == prefers


def test_pallas_gpu_attention_takes_the_fresh_path_only_when_told(monkeypatch):
    """``ragged_paged_attention`` on pallas_gpu (interpreted) runs ``fresh_attention`` with ``fresh_prompt``
    and the paged kernel without: both against the oracle, and the two differ (another computation, not the
    same one twice)."""
    monkeypatch.setattr(cudnn_prefill, "MIN_TOKENS", 64)  # a small step stands in for a long prompt's
    b = _batch(3, [40], [40], 64, page_size=16)
    args = [jnp.asarray(a) for a in b.args()]

    def call(fresh=None):
        o = ragged_paged_attention(
            *args, sm_scale=0.125, backend="pallas_gpu", interpret=True, fresh_prompt=fresh
        )
        return np.asarray(o.astype(jnp.float32))

    paged, fresh = call(), call("xla")
    want = oracle(b, sm_scale=0.125)
    for got in (paged, fresh):
        assert rel_err(got[:40], want[:40]) < 1e-2
        assert (got[40:] == 0).all()
    assert not np.array_equal(paged, fresh)


SPLIT_CASES = [
    # (q_lens, kv_lens, prefix_capacity): decodes first, then prompts or chunks; more sequences than MAX_SEQS
    ([1, 1, 1, 20, 9], [40, 1, 17, 20, 9], 0),  # decodes (one of them a one-token prompt), fresh prompts
    ([1, 1, 1, 1, 16, 30], [33, 90, 16, 5, 50, 30], 128),  # a chunk behind a prefix, a fresh prompt
    ([1, 1, 1, 12, 1], [70, 3, 48, 40, 20], 128),  # a decode after the chunk goes with it
    ([20, 9], [20, 9], 0),  # no decodes
    ([1, 1, 1], [30, 16, 65], 0),  # decodes alone (the program never gets this, but it must hold)
]


@pytest.mark.parametrize("q_lens,kv_lens,capacity", SPLIT_CASES, ids=str)
def test_split_attention_takes_the_leading_decodes_apart(monkeypatch, q_lens, kv_lens, capacity):
    """Through ``ragged_paged_attention`` on pallas_gpu (interpreted) with ``fresh_prompt`` and ``decodes``:
    the leading one-token sequences go to the paged kernel, the rest to ``fresh_attention`` shifted past them. With
    cuDNN's segment slots cut to 2 (``MAX_SEQS``), batches of up to six sequences still match the oracle in
    every real row (the decodes cannot have gone through the packed path), padding rows are zero, and no NaN
    from the poisoned slots gets in."""
    monkeypatch.setattr(cudnn_prefill, "MAX_SEQS", 2)
    monkeypatch.setattr(cudnn_prefill, "MIN_TOKENS", 64)  # a small step stands in for a long prompt's
    b = make_batch(
        np.random.default_rng(sum(kv_lens)), q_lens, kv_lens, **HEADS, page_size=16, dtype=jnp.bfloat16,
        max_num_seqs=8, num_tokens=64,
    )  # fmt: skip
    args = [jnp.asarray(a) for a in b.args()]
    if capacity:
        assert cudnn_prefill.prefix_rows(b.kv_lens, b.cu_q_lens, b.num_seqs) <= capacity
    else:
        fresh = any(q > 1 for q in q_lens)  # a prompt after the decodes
        assert cudnn_prefill.batch_is_fresh(b.kv_lens, b.cu_q_lens, b.num_seqs) == fresh
    got = ragged_paged_attention(
        *args, sm_scale=0.125, backend="pallas_gpu", interpret=True, fresh_prompt="xla",
        prefix_capacity=capacity, decodes=True,
    )  # fmt: skip
    got = _assert_oracle(got, b)


@pytest.mark.parametrize(
    "change,reason",
    [
        (dict(num_tokens=1024), "tokens"),
        (dict(q_dtype=jnp.float32, kv_dtype=jnp.float32), "dtypes"),
        (dict(kv_dtype=jnp.float16), "dtypes"),
        (dict(head_dim=72 + 4), "head_dim"),
        (dict(head_dim=512), "head_dim"),
        (dict(soft_cap=50.0), "soft-cap"),
        (dict(sliding_window=128), "sliding window"),
    ],
)
def test_scope(change, reason):
    """Calls outside the path's scope keep the paged kernel, and say why."""
    base = dict(
        num_tokens=4096,
        q_dtype=jnp.bfloat16,
        kv_dtype=jnp.bfloat16,
        head_dim=128,
        page_size=16,
        soft_cap=None,
        sliding_window=None,
    )
    assert _why(**base) is None
    assert _why(**{**base, "page_size": 48}) is None  # rows are gathered per token: any page size
    base.update(change)
    why = _why(**base)
    assert why is not None and reason in why


def _why(num_tokens, q_dtype, kv_dtype, head_dim, page_size, soft_cap, sliding_window):
    return cudnn_prefill.supports(
        (num_tokens, 32, head_dim),
        q_dtype,
        (100, page_size, 8, head_dim),
        kv_dtype,
        sliding_window,
        soft_cap,
    )


def test_available_for_half_precision_models():
    bf16, f32 = jnp.bfloat16, jnp.float32
    assert cudnn_prefill.available(True, bf16, bf16)
    assert not cudnn_prefill.available(True, f32, f32)
    assert not cudnn_prefill.available(True, bf16, f32)


@pytest.mark.gpu
@pytest.mark.skipif(not cudnn_prefill.cudnn_available(), reason="needs an NVIDIA GPU with cuDNN")
@pytest.mark.parametrize(
    "q_lens,kv_lens,num_tokens",
    [
        ([2000], [2000], 2048),
        ([2048], [2048], 2048),
        ([1500], [1500], 4096),
        ([1500], [1700], 2048),
        ([700, 1300], [700, 1300], 2048),
        ([1000, 1, 17, 900], [1000, 1, 17, 900], 2048),
        ([512] * 4, [512] * 4, 2048),
        ([700, 1300], [700, 1400], 2048),
        ([2048], [6000], 2048),
        ([100, 1, 1900], [9000, 700, 1900], 2048),
        ([1024, 1024], [1024, 3000], 2048),
        ([1, 1], [4000, 17], 2048),
    ],
)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_pallas_gpu_calls_against_the_oracle_on_gpu(q_lens, kv_lens, num_tokens, head_dim):
    """Through ``ragged_paged_attention`` on pallas_gpu: batches of fresh prompts take cuDNN (``fresh_prompt``;
    one prompt or several packed), those with prefixes cuDNN in two parts merged by cuDNN's log-sum-exps
    (``prefix_capacity``), and the same batches the paged kernel; every real row matches the oracle, padding
    rows are zero."""
    b = make_batch(
        np.random.default_rng(head_dim),
        q_lens,
        kv_lens,
        num_q_heads=16,
        num_kv_heads=4,
        head_dim=head_dim,
        page_size=16,
        dtype=jnp.bfloat16,
        max_num_seqs=4,
        num_tokens=num_tokens,
    )
    args = [jnp.asarray(a) for a in b.args()]
    assert cudnn_prefill.applies(args[0], args[1], None, None)
    fresh = cudnn_prefill.batch_is_fresh(b.kv_lens, b.cu_q_lens, b.num_seqs)
    assert fresh == (q_lens == kv_lens)
    need = cudnn_prefill.prefix_rows(b.kv_lens, b.cu_q_lens, b.num_seqs)
    want = oracle(b, sm_scale=head_dim**-0.5)
    n = b.num_real_tokens
    for how in [dict(fresh_prompt=None), dict(fresh_prompt="cudnn", prefix_capacity=0 if fresh else need)]:
        got = ragged_paged_attention(*args, sm_scale=head_dim**-0.5, backend="pallas_gpu", **how)
        got = np.asarray(got.astype(jnp.float32))
        assert rel_err(got[:n], want[:n]) < 1e-2, how
        assert (got[n:] == 0).all(), how


@pytest.mark.gpu
@pytest.mark.skipif(not cudnn_prefill.cudnn_available(), reason="needs an NVIDIA GPU with cuDNN")
@pytest.mark.parametrize(
    "decodes,context,q_len,prefix,num_tokens",
    [
        (64, 1000, 1900, 0, 2048),  # a fresh prompt beside a full decode batch (the Mosaic decode kernel)
        (200, 500, 600, 1500, 2048),  # a chunk behind a prefix
        (5, 3000, 1500, 2000, 2048),  # a few long decodes (the Triton kernel's split decode tiling)
    ],
)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_split_attention_against_the_oracle_on_gpu(decodes, context, q_len, prefix, num_tokens, head_dim):
    """Decodes laid out before a prompt, more sequences than cuDNN's slots: through ``ragged_paged_attention``
    on pallas_gpu with ``fresh_prompt="cudnn"``, the decodes take the paged kernel on a decode batch's shape
    (``split_attention``) and the prompt cuDNN; every real row matches the oracle, padding rows are zero."""
    q_lens = [1] * decodes + [q_len]
    kv_lens = [context] * decodes + [prefix + q_len]
    b = make_batch(
        np.random.default_rng(decodes + head_dim), q_lens, kv_lens, num_q_heads=16, num_kv_heads=4,
        head_dim=head_dim, page_size=16, dtype=jnp.bfloat16, max_num_seqs=256, num_tokens=num_tokens,
    )  # fmt: skip
    args = [jnp.asarray(a) for a in b.args()]
    need = cudnn_prefill.prefix_rows(b.kv_lens, b.cu_q_lens, b.num_seqs)
    assert need == max(prefix, 1)
    got = ragged_paged_attention(
        *args, sm_scale=head_dim**-0.5, backend="pallas_gpu", fresh_prompt="cudnn",
        prefix_capacity=need if prefix else 0, decodes=True,
    )  # fmt: skip
    got = np.asarray(got.astype(jnp.float32))
    want = oracle(b, sm_scale=head_dim**-0.5)
    n = b.num_real_tokens
    assert rel_err(got[:decodes], want[:decodes]) < 1e-2
    assert rel_err(got[decodes:n], want[decodes:n]) < 1e-2
    assert (got[n:] == 0).all()
