"""jaxrt: serve Hugging Face transformers causal LMs from JAX/XLA, with paged attention and a radix cache."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from jaxrt.engine import Engine
    from jaxrt.sampling_params import SamplingParams

__all__ = ["Engine", "SamplingParams", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy, so that `import jaxrt.kernels` or the CLI's --help do not pay for jax + transformers imports.
    if name == "Engine":
        from jaxrt.engine import Engine

        return Engine
    if name == "SamplingParams":
        from jaxrt.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'jaxrt' has no attribute {name!r}")
