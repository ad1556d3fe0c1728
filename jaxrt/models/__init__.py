"""Native model families, keyed by the checkpoint's ``architectures[0]``."""

from __future__ import annotations

from flax import nnx

from jaxrt.models.llama import LlamaForCausalLM

MODEL_REGISTRY: dict[str, type[nnx.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
}


def get_model_class(architecture: str) -> type[nnx.Module]:
    try:
        return MODEL_REGISTRY[architecture]
    except KeyError:
        raise ValueError(
            f"no native jaxrt port for architecture {architecture!r}; native architectures: "
            f"{', '.join(sorted(MODEL_REGISTRY))} (use impl='auto' or impl='transformers' for the fallback)"
        ) from None


__all__ = ["MODEL_REGISTRY", "LlamaForCausalLM", "get_model_class"]
