"""The torchax import shim: applied only where torch lacks the named-tensor overloads, scoped to the import."""

from __future__ import annotations

import pytest
import torch
from torch._ops import OpOverloadPacket

from jaxrt.converters.fallback import torchax_compat


def test_import_torchax_and_restore():
    original = OpOverloadPacket.__getattr__
    tx = torchax_compat.import_torchax()
    assert tx.default_env() is not None
    assert OpOverloadPacket.__getattr__ is original  # shim removed after the import
    assert torchax_compat.import_torchax() is tx
    if torchax_compat.needs_named_overload_shim():
        with pytest.raises(AttributeError):
            torch.ops.aten.prod.dim_Dimname  # noqa: B018 - still missing outside the shim


def test_standins_only_for_missing_named_overloads():
    with torchax_compat.named_overload_standins():
        assert torch.ops.aten.prod.dim_int is not None  # real overloads untouched
        if torchax_compat.needs_named_overload_shim():
            stand_in = torch.ops.aten.prod.dim_Dimname
            assert isinstance(stand_in, torchax_compat.MissingOverload)
            assert stand_in in {stand_in: 1}  # usable as a dict key, as torchax's tables do
            with pytest.raises(RuntimeError, match="named-tensor"):
                stand_in(torch.ones(2))
            assert "dim_Dimname" not in torch.ops.aten.prod.__dict__  # not cached on the packet
        with pytest.raises(AttributeError):
            torch.ops.aten.prod.no_such_overload  # noqa: B018 - other missing names still fail


def test_torchax_runs_a_torch_module_as_jax():
    import jax
    import jax.numpy as jnp
    import numpy as np

    tx = torchax_compat.import_torchax()
    from torchax import interop

    lin = torch.nn.Linear(4, 3)
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    params = {k: jnp.asarray(v.detach().numpy()) for k, v in lin.state_dict().items()}

    @jax.jit
    def f(p, xj):
        with tx.default_env():
            out = torch.func.functional_call(lin, interop.torch_view(p), (interop.torch_view(xj),))
        return interop.jax_view(out)

    np.testing.assert_allclose(np.asarray(f(params, x)), lin(torch.from_numpy(x)).detach().numpy(), atol=1e-6)


def test_type_as_returns_a_new_tensor_and_accepts_views():
    """torch semantics: ``a.type_as(b)`` leaves ``a`` alone; works when ``b`` is one of torchax's lazy views."""
    import jax.numpy as jnp
    import torch

    from jaxrt.converters.fallback.torchax_compat import import_torchax

    tx = import_torchax()
    from torchax import interop

    with tx.default_env():
        a, b = interop.torch_view((jnp.ones((2, 3), jnp.float32), jnp.zeros((3, 2), jnp.bfloat16)))
        out = a.type_as(b)
        assert out.dtype == torch.bfloat16 and a.dtype == torch.float32
        assert a.type_as(b.transpose(0, 1)).dtype == torch.bfloat16
