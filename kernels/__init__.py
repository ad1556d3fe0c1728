"""jaxrt attention kernels: ragged paged attention over a paged KV pool, the KV write, and references."""

if __name__ == "kernels":
    # Imported as a top-level `kernels` (a checkout's root on sys.path): that name belongs to the Hugging Face
    # `kernels` package, which transformers probes for. Refuse, so the probe sees "not installed".
    raise ImportError("this folder is jaxrt.kernels; import it as jaxrt.kernels")

from jaxrt.kernels.attention import (
    BACKEND_NAMES,
    ragged_paged_attention,
    register_backend,
    resolve_backend,
    write_kv,
)
from jaxrt.kernels.reference import ragged_paged_attention_reference, write_kv_reference

__all__ = [
    "BACKEND_NAMES",
    "ragged_paged_attention",
    "ragged_paged_attention_reference",
    "register_backend",
    "resolve_backend",
    "write_kv",
    "write_kv_reference",
]
