"""The greedy sampler kernel (``kernels/greedy.py``) against jnp: Pallas interpret mode on CPU, the
Triton lowering for CUDA (jax.export) on any machine, and a real run on a GPU (``mark gpu``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxrt_testing import export_triton_for_h100

from jaxrt.kernels import greedy_row_stats_reference
from jaxrt.kernels.greedy import greedy_row_stats


def _case(rng, rows, vocab, dtype, num_stops=4):
    logits = (rng.normal(size=(rows, vocab)) * 4).astype(np.float32)
    stop_ids = np.full((rows, num_stops), -1, np.int32)
    suppress = np.zeros(rows, bool)
    logits[1, 5] = logits[1].max() + 3  # row 1: its best id is a suppressed stop id; the runner-up wins
    stop_ids[1, :2] = [5, vocab - 1]
    suppress[1] = True
    stop_ids[2, 0] = int(logits[2].argmax())  # row 2: a stop id that is not suppressed (past min_new_tokens)
    top = logits[3].max() + 1
    logits[3, [7, vocab - 2]] = top  # row 3: a tie across chunks: the lower index wins
    logits[4, ::3] = -np.inf  # row 4: -inf logits add nothing to the normaliser
    x = jnp.asarray(logits, dtype)
    return x, jnp.asarray(stop_ids), jnp.asarray(suppress)


def _check(got, x, stop_ids, suppress, atol):
    """Against the pure-jnp reference, and the case's hand-set rows (the reference's own semantics)."""
    lse, arg, mx = (np.asarray(o) for o in got)
    want_lse, want_arg, want_mx = (np.asarray(o) for o in greedy_row_stats_reference(x, stop_ids, suppress))
    np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=atol)
    np.testing.assert_array_equal(arg, want_arg)
    np.testing.assert_array_equal(mx, want_mx)
    logits = np.asarray(x.astype(jnp.float32))
    allowed = np.where(np.isin(np.arange(logits.shape[1]), [5, logits.shape[1] - 1]), -np.inf, logits[1])
    assert arg[1] == allowed.argmax() != 5  # its best id is a suppressed stop id: the best of the rest wins
    assert arg[2] == int(stop_ids[2, 0])  # a stop id that is not suppressed stays
    assert arg[3] == 7  # a tie across chunks: the lower index
    finite = logits[4][np.isfinite(logits[4])]
    np.testing.assert_allclose(lse[4], np.log(np.exp(finite.astype(np.float64)).sum()), rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("vocab,chunk", [(1000, 256), (512, 512), (300, 1024)])
def test_matches_jnp_in_interpret_mode(dtype, vocab, chunk):
    rng = np.random.default_rng(vocab)
    x, stop_ids, suppress = _case(rng, 6, vocab, dtype)
    _check(greedy_row_stats(x, stop_ids, suppress, chunk=chunk, interpret=True), x, stop_ids, suppress, 1e-4)


@pytest.mark.parametrize(
    "args,match",
    [
        (((4, 10, 3), (4, 8), (4,)), "logits must be"),
        (((4, 10), (3, 8), (4,)), "stop_ids must be"),
        (((4, 10), (4, 8), (5,)), "suppress must be"),
    ],
)
def test_validates_shapes(args, match):
    (ls, ss, ps) = args
    with pytest.raises(ValueError, match=match):
        greedy_row_stats(
            jnp.zeros(ls, jnp.bfloat16), jnp.zeros(ss, jnp.int32), jnp.zeros(ps, bool), interpret=True
        )
    with pytest.raises(ValueError, match="chunk"):
        greedy_row_stats(
            jnp.zeros((4, 10)), jnp.zeros((4, 8), jnp.int32), jnp.zeros(4, bool), chunk=100, interpret=True
        )


def test_no_rows():
    """Zero rows give empty statistics, as the reference does."""
    args = (jnp.zeros((0, 1000), jnp.bfloat16), jnp.zeros((0, 8), jnp.int32), jnp.zeros((0,), bool))
    got = greedy_row_stats(*args, interpret=True)
    want = greedy_row_stats_reference(*args)
    assert (
        [(g.shape, g.dtype) for g in got]
        == [(w.shape, w.dtype) for w in want]
        == [
            ((0,), jnp.float32),
            ((0,), jnp.int32),
            ((0,), jnp.float32),
        ]
    )


@pytest.mark.skipif(
    jax.__version_info__ < (0, 11),
    reason="jax >= 0.11 lowers Pallas to CUDA on CPU",
)
def test_lowers_for_cuda():
    """The Pallas -> Triton IR lowering at the decode step's shape, for an H100, on any machine (the Triton ->
    PTX compile happens in XLA on the GPU: ``test_matches_jnp_on_gpu``)."""
    x = jax.ShapeDtypeStruct((256, 128256), jnp.bfloat16)
    stops = jax.ShapeDtypeStruct((256, 8), jnp.int32)
    sup = jax.ShapeDtypeStruct((256,), jnp.bool_)
    exp = export_triton_for_h100(jax.jit(greedy_row_stats), x, stops, sup)
    assert [a.shape for a in exp.out_avals] == [(256,), (256,), (256,)]
    assert "jaxrt_greedy_row_stats" in exp.mlir_module()


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
def test_matches_jnp_on_gpu():
    rng = np.random.default_rng(0)
    x, stop_ids, suppress = _case(rng, 256, 128256, jnp.bfloat16, num_stops=8)
    _check(greedy_row_stats(x, stop_ids, suppress), x, stop_ids, suppress, 1e-3)
