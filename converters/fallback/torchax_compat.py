"""Import torchax on torch builds that dropped the named-tensor (``Dimname``) operator overloads.

torchax 0.0.13 names overloads such as ``torch.ops.aten.prod.dim_Dimname`` and ``aten.std.names_dim`` in its
module-level tables (AMP policy, decomposition lists). torch 2.13 removed named tensors, so merely *reading* those
attributes raises ``AttributeError`` and ``import torchax`` fails. The tables only ever use those entries as dict
keys and list members (no named-tensor op is ever dispatched), so during the import this module makes
``OpOverloadPacket.__getattr__`` return an inert stand-in for exactly those missing named overloads, then restores
the original method.

The shim is applied only when this torch lacks the named overloads (``needs_named_overload_shim``); on torch 2.11
(the GPU machine) it is never applied. The shim can go once a torchax release imports cleanly on the torch
versions jaxrt supports: ``import_torchax`` then reduces to ``import torchax`` plus the ``type_as`` fix below
(which can go once torchax's ``type_as`` has torch's semantics).

One behaviour fix, on every torch: torchax 0.0.13's ``Tensor.type_as`` casts ``self`` *in place* and returns it
(torch returns a new tensor and leaves ``self`` alone), and fails on torchax's lazy ``View`` arguments
(Gemma-3n's RMSNorm: ``normed.type_as(hidden_states)``). `import_torchax` replaces it with torch's semantics,
``self.to(other.dtype)``.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Iterator
from types import ModuleType

# Overload names of the removed named-tensor variants: dim_Dimname, Dimname_Scalar, dimname, names_dim, ...
NAMED_OVERLOAD = re.compile(r"dimname|names", re.IGNORECASE)


class MissingOverload:
    """Stand-in for an operator overload this torch does not have. Hashable (by identity); never callable."""

    __slots__ = ("packet", "name")

    def __init__(self, packet: str, name: str) -> None:
        self.packet = packet
        self.name = name

    def __repr__(self) -> str:
        return f"<missing overload {self.packet}.{self.name}>"

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self!r}: this torch build has no named-tensor overloads")


def needs_named_overload_shim() -> bool:
    """True when this torch has dropped the named-tensor overloads that torchax 0.0.13 references."""
    import torch

    try:
        torch.ops.aten.prod.dim_Dimname  # noqa: B018 - probing the attribute is the point
    except AttributeError:
        return True
    return False


@contextlib.contextmanager
def named_overload_standins() -> Iterator[None]:
    """While active, a missing *named-tensor* overload resolves to a `MissingOverload` (not cached on the packet).

    Any other missing overload still raises ``AttributeError``. The original ``__getattr__`` is restored on exit.
    """
    from torch._ops import OpOverloadPacket

    original = OpOverloadPacket.__getattr__

    def __getattr__(self, key: str):
        try:
            return original(self, key)
        except AttributeError:
            if not key.startswith("__") and NAMED_OVERLOAD.search(key):
                return MissingOverload(str(self), key)
            raise

    OpOverloadPacket.__getattr__ = __getattr__
    try:
        yield
    finally:
        OpOverloadPacket.__getattr__ = original


def _import_and_init() -> ModuleType:
    import torchax
    import torchax.interop  # noqa: F401

    # The op tables (ops.jaten, decompositions, amp) load lazily when the default environment is first built.
    torchax.default_env()
    return torchax


def _type_as(self, other):
    """torch's ``Tensor.type_as``: a tensor in ``other``'s dtype; ``self`` is not modified."""
    return self.to(other.dtype)


def _fix_type_as(torchax: ModuleType) -> None:
    torchax.tensor.Tensor.type_as = _type_as


def import_torchax() -> ModuleType:
    """``import torchax`` and build its default environment (which loads the op tables), with the
    named-overload shim around exactly that step only where this torch needs it."""
    mod = sys.modules.get("torchax")
    if mod is not None and getattr(mod, "_env", None) is not None:
        _fix_type_as(mod)
        return mod
    if not needs_named_overload_shim():
        mod = _import_and_init()
    else:
        with named_overload_standins():
            mod = _import_and_init()
    _fix_type_as(mod)
    return mod
