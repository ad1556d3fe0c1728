"""Qwen2 / Qwen2.5 (bias on q/k/v, none on o) and Qwen3 (per-head q/k RMSNorm); optional sliding-window layers."""

from __future__ import annotations

from jaxrt.models.layers import DecoderForCausalLM, Family


class Qwen2ForCausalLM(DecoderForCausalLM):
    family = Family(qkv_bias=True, o_bias=False)


class Qwen3ForCausalLM(DecoderForCausalLM):
    family = Family(qk_norm="head")
