"""Gemma, Gemma 2 and Gemma 3 (text).

Gemma: embeddings scaled by sqrt(hidden), GeGLU, the (1 + w) RMSNorm, tied embeddings.
Gemma 2: plus pre/post norms around attention and MLP, attention and final logit soft-capping, alternating
sliding-window layers and ``query_pre_attn_scalar`` (from the config).
Gemma 3: Gemma 2's layout plus per-head q/k norm, local and global rope bases and its sliding-window pattern;
like transformers, it does not soft-cap attention logits.
"""

from __future__ import annotations

from jaxrt.models.layers import DecoderForCausalLM, Family

_GEMMA = dict(norm_offset=1.0, norm_scale_f32=True, embed_scale_sqrt_hidden=True)


class GemmaForCausalLM(DecoderForCausalLM):
    family = Family(**_GEMMA)


class Gemma2ForCausalLM(DecoderForCausalLM):
    family = Family(**_GEMMA, norm_placement="sandwich")


class Gemma3ForCausalLM(DecoderForCausalLM):
    family = Family(**_GEMMA, norm_placement="sandwich", qk_norm="head", attn_soft_cap=False)
