"""OLMo 2: norms on the outputs of attention and MLP (no input norm), RMSNorm over the whole q and k
projections before the head split."""

from __future__ import annotations

from jaxrt.models.layers import DecoderForCausalLM, Family


class Olmo2ForCausalLM(DecoderForCausalLM):
    family = Family(qk_norm="full", norm_placement="post", norm_scale_f32=True)
