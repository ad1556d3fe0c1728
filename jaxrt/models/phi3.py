"""Phi-3 / Phi-3.5 / Phi-4-mini: Llama layout whose checkpoints carry qkv_proj and gate_up_proj fused already
(the layout jaxrt keeps for every family, see ``converters.weights.PHI3_WEIGHT_MAP``), partial rotary and
LongRoPE scaling, optional sliding window."""

from __future__ import annotations

from jaxrt.models.layers import DecoderForCausalLM, Family


class Phi3ForCausalLM(DecoderForCausalLM):
    family = Family(qkv_bias=False, o_bias=False)
