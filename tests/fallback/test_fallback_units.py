"""Pieces of the fallback on their own: sink attention, the ragged_dot experts, the weight loader's errors."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxrt.converters.fallback.torchax_compat import import_torchax
from jaxrt.kernels import ragged_paged_attention_reference


def _paged_case(seed=0, page_size=4, hq=4, hkv=2, d=8):
    rng = np.random.default_rng(seed)
    q_lens, kv_lens = [3, 1, 5], [7, 9, 5]
    num_pages = 16
    k_pages = rng.standard_normal((num_pages, page_size, hkv, d)).astype(np.float32)
    v_pages = rng.standard_normal((num_pages, page_size, hkv, d)).astype(np.float32)
    page_indices = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 0]], np.int32)
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    q = rng.standard_normal((int(cu[-1]) + 2, hq, d)).astype(np.float32)  # 2 padding rows
    return q, k_pages, v_pages, np.array(kv_lens, np.int32), page_indices, cu, q_lens


def _dense_with_sinks(q, k_pages, v_pages, kv_lens, page_indices, cu, q_lens, sinks, scale):
    hkv = k_pages.shape[2]
    group = q.shape[1] // hkv
    out = np.zeros_like(q)
    for i, ql in enumerate(q_lens):
        kl = kv_lens[i]
        k = k_pages[page_indices[i]].reshape(-1, hkv, q.shape[2])[:kl]
        v = v_pages[page_indices[i]].reshape(-1, hkv, q.shape[2])[:kl]
        for r in range(ql):
            pos = kl - ql + r
            for h in range(q.shape[1]):
                s = k[: pos + 1, h // group] @ q[cu[i] + r, h] * scale
                e = np.exp(s - max(s.max(), sinks[h]))
                z = e.sum() + np.exp(sinks[h] - max(s.max(), sinks[h]))
                out[cu[i] + r, h] = (e[:, None] * v[: pos + 1, h // group]).sum(0) / z
    return out


def test_sink_attention_matches_dense_and_reference():
    q, kp, vp, kv_lens, pages, cu, q_lens = _paged_case()
    sinks = np.array([0.5, -1.0, 2.0, 0.0], np.float32)
    args = (jnp.asarray(q), jnp.asarray(kp), jnp.asarray(vp), jnp.asarray(kv_lens), jnp.asarray(pages))
    num_seqs = jnp.array([3], jnp.int32)
    ours = ragged_paged_attention_reference(
        *args, jnp.asarray(cu), num_seqs, sinks=jnp.asarray(sinks), sm_scale=0.3
    )
    expected = _dense_with_sinks(q, kp, vp, kv_lens, pages, cu, q_lens, sinks, 0.3)
    np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-5)
    no_sink = ragged_paged_attention_reference(
        *args, jnp.asarray(cu), num_seqs, sinks=jnp.full(4, -1e30), sm_scale=0.3, sliding_window=3
    )
    ref = ragged_paged_attention_reference(*args, jnp.asarray(cu), num_seqs, sm_scale=0.3, sliding_window=3)
    np.testing.assert_allclose(np.asarray(no_sink), np.asarray(ref), atol=1e-5)


def test_alibi_attention_matches_dense():
    """ALiBi slopes on the paged XLA loop: softmax(q.k * scale + slope_h * (j - i)) over the causal keys."""
    q, kp, vp, kv_lens, pages, cu, q_lens = _paged_case(seed=1)
    slopes = np.array([0.5, 0.25, 0.125, 0.0625], np.float32)
    hkv, group, d = kp.shape[2], q.shape[1] // kp.shape[2], q.shape[2]
    expected = np.zeros_like(q)
    for i, ql in enumerate(q_lens):
        k = kp[pages[i]].reshape(-1, hkv, d)[: kv_lens[i]]
        v = vp[pages[i]].reshape(-1, hkv, d)[: kv_lens[i]]
        for r in range(ql):
            pos = kv_lens[i] - ql + r
            for h in range(q.shape[1]):
                s = k[: pos + 1, h // group] @ q[cu[i] + r, h] * 0.3 + slopes[h] * (np.arange(pos + 1) - pos)
                e = np.exp(s - s.max())
                expected[cu[i] + r, h] = (e[:, None] * v[: pos + 1, h // group]).sum(0) / e.sum()
    got = ragged_paged_attention_reference(
        *map(jnp.asarray, (q, kp, vp, kv_lens, pages, cu)),
        jnp.array([3], jnp.int32),
        sm_scale=0.3,
        alibi_slopes=jnp.asarray(slopes),
    )
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5)


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss"])
def test_jaxrt_experts_match_transformers(model_type):
    """experts_implementation="jaxrt" (ragged_dot) against transformers' batched_mm on the same module."""
    import jax
    from fallback_sweep import tiny_config
    from transformers import AutoModelForCausalLM
    from transformers.integrations.moe import batched_mm_experts_forward

    from jaxrt.converters.fallback.experts import jaxrt_experts_forward

    tx = import_torchax()
    from torchax import interop

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type), dtype=torch.float32)
    experts = next(m for m in model.modules() if type(m).__name__.endswith("Experts"))
    for p in experts.parameters():
        p.data.normal_(0, 0.2)
    hidden = torch.randn(7, model.config.hidden_size)
    idx = torch.stack([torch.randperm(experts.num_experts)[:2] for _ in range(7)])
    weights = torch.rand(7, 2)
    with torch.no_grad():
        expected = batched_mm_experts_forward(experts, hidden, idx, weights)
    params = {k: jnp.asarray(v.detach().numpy()) for k, v in experts.named_parameters()}

    @jax.jit
    def run(p, h, i, w):
        from torch.nn.utils.stateless import _reparametrize_module

        with tx.default_env(), torch.no_grad(), _reparametrize_module(experts, interop.torch_view(p)):
            res = jaxrt_experts_forward(experts, *interop.torch_view((h, i, w)))
        return interop.jax_view(res)

    args = (
        jnp.asarray(hidden.numpy()),
        jnp.asarray(idx.numpy().astype(np.int32)),
        jnp.asarray(weights.numpy()),
    )
    got = run(params, *args)
    np.testing.assert_allclose(np.asarray(got), expected.numpy(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "model_type, cls_name, overrides",
    [("dbrx", "DbrxExperts", {}), ("longcat_flash", "LongcatFlashExperts", {"zero_expert_num": 3})],
)
def test_expert_adapters_match_the_modules_own_forward(model_type, cls_name, overrides):
    """The static-shape adapters (adapters.py) against the data-dependent loop they replace, same weights."""
    import jax
    from fallback_sweep import tiny_config
    from transformers import AutoModelForCausalLM

    from jaxrt.converters.fallback.adapters import install_adapters

    tx = import_torchax()
    from torchax import interop

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), dtype=torch.float32)
    experts = next(m for m in model.modules() if type(m).__name__ == cls_name)
    for p in experts.parameters():
        p.data.normal_(0, 0.2)
    n_idx = getattr(experts, "total_experts", getattr(experts, "num_experts", 0))
    hidden = torch.randn(7, model.config.hidden_size)
    idx = torch.stack([torch.randperm(n_idx)[:2] for _ in range(7)])
    idx[0] = torch.tensor([n_idx - 1, 0])  # an identity expert for LongCat, the last routed one for DBRX
    weights = torch.rand(7, 2)
    with torch.no_grad():
        expected = experts(hidden, idx, weights)
    assert install_adapters(model) != [] and "forward" in experts.__dict__
    assert "forward" not in type(experts).__dict__ or type(experts).forward is not experts.forward
    params = {k: jnp.asarray(v.detach().numpy()) for k, v in experts.named_parameters()}

    @jax.jit
    def run(p, h, i, w):
        from torch.nn.utils.stateless import _reparametrize_module

        with tx.default_env(), torch.no_grad(), _reparametrize_module(experts, interop.torch_view(p)):
            res = experts(*interop.torch_view((h, i, w)))
        return interop.jax_view(res)

    got = run(params, jnp.asarray(hidden.numpy()), jnp.asarray(idx.numpy()), jnp.asarray(weights.numpy()))
    np.testing.assert_allclose(
        np.asarray(got).reshape(expected.shape), expected.numpy(), atol=1e-5, rtol=1e-5
    )


def test_adapters_skip_classes_outside_transformers():
    """A remote-code class that shares a name with an adapted transformers class keeps its own forward."""
    from jaxrt.converters.fallback.adapters import install_adapters

    DbrxExperts = type("DbrxExperts", (torch.nn.Module,), {"forward": lambda self, x: x})
    model = torch.nn.Sequential(DbrxExperts())
    assert install_adapters(model) == []
    assert "forward" not in model[0].__dict__


def test_missing_tensor_is_named(tmp_path):
    from fallback_testing import make_checkpoint
    from safetensors.torch import load_file, save_file

    from jaxrt.converters.fallback import build_fallback
    from jaxrt.converters.loader import load_hf_config
    from jaxrt.converters.weights import WeightLoadError

    path = make_checkpoint(tmp_path / "llama", "llama")
    f = tmp_path / "llama" / "model.safetensors"
    tensors = load_file(f)
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(WeightLoadError, match=r"missing tensors: model\.layers\.1\.mlp\.down_proj\.weight"):
        build_fallback(path, load_hf_config(path), "float32", "reference")
