"""The transformers fallback: any transformers causal LM whose attention goes through transformers' attention
interface runs on jaxrt, traced into JAX (torchax) inside the same jitted step as native models, with its
attention reading and writing jaxrt's paged KV pool. See docs/fallback.md."""

from jaxrt.converters.fallback.attention import FallbackError
from jaxrt.converters.fallback.model import build_fallback, checkpoint_dtype

__all__ = ["FallbackError", "build_fallback", "checkpoint_dtype"]
