"""Llama-style decoders: Llama 2/3 (SmolLM), Mistral (sliding window), Granite (muP multipliers).

They share transformers' Llama layout: pre-norm RMSNorm, rotate-half rope, SwiGLU MLP. Mistral's window and
Granite's embedding/residual/attention/logit multipliers are read from the config (``ModelConfig``).
"""

from __future__ import annotations

from jaxrt.models.layers import DecoderForCausalLM, Family


class LlamaForCausalLM(DecoderForCausalLM):
    family = Family()


class MistralForCausalLM(DecoderForCausalLM):
    family = Family()


class GraniteForCausalLM(DecoderForCausalLM):
    family = Family()
