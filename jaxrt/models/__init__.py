"""Native model families, keyed by the checkpoint's ``architectures[0]``.

Every class has the same contract: ``Model(cfg, *, dtype, rngs, attention_backend=..., interpret=...)`` and
``model(batch, kv_caches) -> (logits [num_seqs, vocab] f32, kv_caches)``. A family is a ``Family`` of
structural switches (``jaxrt.models.layers``) plus a weight map (``jaxrt.converters.weights.WEIGHT_MAPS``).
"""

from __future__ import annotations

from flax import nnx

from jaxrt.models.gemma import Gemma2ForCausalLM, Gemma3ForCausalLM, GemmaForCausalLM
from jaxrt.models.layers import DecoderForCausalLM, Family
from jaxrt.models.llama import GraniteForCausalLM, LlamaForCausalLM, MistralForCausalLM
from jaxrt.models.olmo2 import Olmo2ForCausalLM
from jaxrt.models.phi3 import Phi3ForCausalLM
from jaxrt.models.qwen import Qwen2ForCausalLM, Qwen3ForCausalLM

MODEL_REGISTRY: dict[str, type[nnx.Module]] = {
    cls.__name__: cls
    for cls in (
        LlamaForCausalLM,
        MistralForCausalLM,
        GraniteForCausalLM,
        Qwen2ForCausalLM,
        Qwen3ForCausalLM,
        GemmaForCausalLM,
        Gemma2ForCausalLM,
        Gemma3ForCausalLM,
        Phi3ForCausalLM,
        Olmo2ForCausalLM,
    )
}


def supported_architectures() -> list[str]:
    return sorted(MODEL_REGISTRY)


def get_model_class(architecture: str) -> type[nnx.Module]:
    try:
        return MODEL_REGISTRY[architecture]
    except KeyError:
        raise ValueError(
            f"no native jaxrt port for architecture {architecture!r}; native architectures: "
            f"{', '.join(supported_architectures())} (use impl='auto' or impl='transformers' for the fallback)"
        ) from None


__all__ = [
    "MODEL_REGISTRY",
    "DecoderForCausalLM",
    "Family",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "GemmaForCausalLM",
    "GraniteForCausalLM",
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Olmo2ForCausalLM",
    "Phi3ForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "get_model_class",
    "supported_architectures",
]
