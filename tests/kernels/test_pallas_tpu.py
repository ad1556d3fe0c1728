"""The "pallas_tpu" ragged paged attention backend, run on CPU in Pallas interpret mode.

Inputs are fresh per case, with NaN in every pool page no sequence references, in the slots past kv_len of
each last page and in the padding rows of q; results are compared with a float64 numpy oracle and the jnp
reference. Interpret mode checks the semantics only: Mosaic TPU tiling and VMEM limits are untested here.
"""

from __future__ import annotations

import dataclasses
import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrt.kernels import (
    pallas_tpu,
    ragged_paged_attention,
    ragged_paged_attention_reference,
    resolve_backend,
)
from jaxrt.kernels.pallas_tpu import TpuConfig, ragged_paged_attention_tpu
from jaxrt.kernels.testing import make_batch, oracle, rel_err

_REF = jax.jit(ragged_paged_attention_reference, static_argnames=("sm_scale", "sliding_window", "soft_cap"))
DT = {"f32": np.float32, "bf16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class Case:
    q_lens: tuple
    kv_lens: tuple
    hq: int = 8
    hkv: int = 2
    d: int = 64
    page: int = 16
    dtype: str = "f32"
    window: int | None = None
    cap: float | None = None
    decode: bool = False  # as many token rows as sequence slots (the decode tiling)
    config: TpuConfig | None = None

    def __str__(self):
        cfg = "" if self.config is None else f"-cfg{dataclasses.astuple(self.config)}"
        return (
            f"q{list(self.q_lens)}-kv{list(self.kv_lens)}-h{self.hq}/{self.hkv}-d{self.d}-p{self.page}-{self.dtype}"
            f"-w{self.window}-cap{self.cap}{'-decode' if self.decode else ''}{cfg}"
        )


def _mixed(p):
    return (1, 11, 1, 1, 17), (1, p + 11, p - 1, p + 1, 17)


def _decode(p):
    return (1,) * 5, (1, p - 1, p, p + 1, 2 * p + 3)


def run_case(case: Case):
    rng = np.random.default_rng(zlib.crc32(str(case).encode()))
    max_seqs = len(case.q_lens) + 1
    n_tok = max_seqs if case.decode else sum(case.q_lens) + 3
    b = make_batch(
        rng,
        case.q_lens,
        case.kv_lens,
        num_q_heads=case.hq,
        num_kv_heads=case.hkv,
        head_dim=case.d,
        page_size=case.page,
        dtype=DT[case.dtype],
        max_num_seqs=max_seqs,
        num_tokens=n_tok,
    )
    kw = dict(sm_scale=1 / math.sqrt(case.d), sliding_window=case.window, soft_cap=case.cap)
    out = ragged_paged_attention_tpu(*map(jnp.asarray, b.args()), interpret=True, config=case.config, **kw)
    out = np.asarray(out.astype(jnp.float32), np.float64)
    assert np.all(np.isfinite(out)), "non-finite output"
    assert np.all(out[b.num_real_tokens :] == 0), "padding rows must be zero"
    want = oracle(b, **kw)
    ref = np.asarray(_REF(*map(jnp.asarray, b.clean_args()), **kw).astype(jnp.float32), np.float64)
    tol = 1e-5 if case.dtype == "f32" else 2e-2
    assert rel_err(out, want) < tol, f"vs numpy oracle: {rel_err(out, want):.2e}"
    assert rel_err(out, ref) < tol, f"vs jnp reference: {rel_err(out, ref):.2e}"


CASES = [
    Case(*_mixed(16)),
    Case(*_mixed(16), dtype="bf16"),
    Case(*_decode(16), decode=True),
    Case(*_mixed(16), hq=4, hkv=4),
    Case(*_mixed(16), hq=8, hkv=1),
    Case(*_mixed(16), hq=6, hkv=2),
    Case(*_mixed(16), d=128, hq=4, hkv=2),
    Case(*_mixed(16), window=6, cap=4.0),
    Case(*_decode(16), decode=True, window=5, cap=3.0, dtype="bf16"),
    Case(*_mixed(8), page=8, config=TpuConfig(block_rows=16, pages_per_step=3)),
    Case(*_mixed(32), page=32, config=TpuConfig(block_rows=8, pages_per_step=1)),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_oracle_and_reference(case):
    run_case(case)


def test_public_entry_point_and_registration():
    assert resolve_backend("pallas_tpu") == "pallas_tpu"
    assert resolve_backend("auto", platform="cpu") == "reference"
    rng = np.random.default_rng(5)
    b = make_batch(
        rng, [1, 6], [3, 20], num_q_heads=4, num_kv_heads=2, head_dim=64, page_size=16, num_tokens=8
    )
    f = jax.jit(lambda *a: ragged_paged_attention(*a, sm_scale=0.125, backend="pallas_tpu", interpret=True))
    out = np.asarray(f(*map(jnp.asarray, b.args())), np.float64)
    np.testing.assert_allclose(out, oracle(b, sm_scale=0.125), atol=2e-5, rtol=2e-5)


def test_unsupported_page_size_falls_back_to_reference():
    rng = np.random.default_rng(6)
    b = make_batch(rng, [2, 1], [7, 3], num_q_heads=4, num_kv_heads=2, head_dim=64, page_size=4, poison=False)
    assert pallas_tpu.supports(b.q.shape, b.k_pages.shape, b.k_pages.dtype) is not None
    args = tuple(map(jnp.asarray, b.args()))
    out = ragged_paged_attention(*args, sm_scale=0.3, backend="pallas_tpu", interpret=True)
    np.testing.assert_allclose(np.asarray(out, np.float64), oracle(b, sm_scale=0.3), atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match="page_size"):
        ragged_paged_attention_tpu(*args, sm_scale=0.3, interpret=True)


SLOW_CASES = [
    Case(*_mixed(p), d=d, page=p, dtype=dt, window=w, cap=c, hq=hq, hkv=hkv)
    for d, p, dt, (w, c), (hq, hkv) in [
        (64, 16, "f32", (9, 5.0), (16, 2)),
        (128, 16, "bf16", (None, None), (8, 1)),
        (128, 32, "f32", (None, 5.0), (4, 4)),
        (256, 16, "bf16", (13, None), (4, 2)),
        (64, 64, "f32", (None, None), (6, 2)),
    ]
]


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW_CASES, ids=str)
def test_more_shapes(case):
    run_case(case)
