"""A small decoder-only LM shipped as hub-style remote code (``auto_map``) for the fallback tests.

``config.attention_mode`` picks how its attention layers behave:
- ``"interface"``: the transformers way, attention through ``ALL_ATTENTION_FUNCTIONS`` with ``**kwargs`` passed on;
- ``"manual"``: attention computed in the layer itself (never calls the interface);
- ``"drop_kwargs"``: calls the interface but does not forward ``**kwargs``;
- ``"layer_drops_kwargs"``: the decoder layer calls its attention module without ``**kwargs``.
``"manual"`` must make jaxrt's fallback refuse the model with a clear error; the others must run.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

try:  # when loaded as remote code the config sits next to this file
    from .configuration_tinydec import TinyDecConfig
except ImportError:  # pragma: no cover - imported directly
    from configuration_tinydec import TinyDecConfig


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def eager_attention(module, query, key, value, attention_mask, scaling, **kwargs):
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    else:
        q, k = scores.shape[-2:]
        causal = torch.ones(q, k, dtype=torch.bool, device=scores.device).tril(k - q)
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


class TinyDecAttention(nn.Module):
    def __init__(self, config: TinyDecConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.qkv = nn.Linear(config.hidden_size, (self.num_heads + 2 * self.num_kv_heads) * self.head_dim)
        self.out = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, hidden, cos, sin, attention_mask, past_key_values=None, **kwargs):
        b, t, _ = hidden.shape
        q, k, v = self.qkv(hidden).split(
            [
                self.num_heads * self.head_dim,
                self.num_kv_heads * self.head_dim,
                self.num_kv_heads * self.head_dim,
            ],
            dim=-1,
        )
        q = q.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        mode = self.config.attention_mode
        if mode == "manual":
            out, _ = eager_attention(self, q, k, v, attention_mask, self.scaling)
        else:
            fn = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention)
            if mode == "drop_kwargs":
                out, _ = fn(self, q, k, v, attention_mask, scaling=self.scaling)
            else:
                out, _ = fn(self, q, k, v, attention_mask, scaling=self.scaling, **kwargs)
        return self.out(out.reshape(b, t, -1))


class TinyDecLayer(nn.Module):
    def __init__(self, config: TinyDecConfig, layer_idx: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size)
        self.attn = TinyDecAttention(config, layer_idx)
        self.norm2 = nn.LayerNorm(config.hidden_size)
        self.mlp = nn.Sequential(
            nn.Linear(config.hidden_size, config.intermediate_size),
            nn.GELU(),
            nn.Linear(config.intermediate_size, config.hidden_size),
        )

    def forward(self, hidden, cos, sin, attention_mask, past_key_values=None, **kwargs):
        if self.attn.config.attention_mode == "layer_drops_kwargs":
            kwargs = {}
        hidden = hidden + self.attn(self.norm1(hidden), cos, sin, attention_mask, past_key_values, **kwargs)
        return hidden + self.mlp(self.norm2(hidden))


class TinyDecPreTrainedModel(PreTrainedModel):
    config_class = TinyDecConfig
    base_model_prefix = "model"
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.normal_(module.bias, std=std)
        if isinstance(module, TinyDecModel):
            # transformers 5 builds models on meta and fills non-persistent buffers through _init_weights
            module.inv_freq.copy_(module.rope_inv_freq())


class TinyDecModel(TinyDecPreTrainedModel):
    def __init__(self, config: TinyDecConfig) -> None:
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(TinyDecLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size)
        self.register_buffer("inv_freq", self.rope_inv_freq(), persistent=False)
        self.post_init()

    def rope_inv_freq(self) -> torch.Tensor:
        head_dim = self.config.hidden_size // self.config.num_attention_heads
        exponent = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
        return 1.0 / (self.config.rope_theta**exponent)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        use_cache=None,
        **kwargs,
    ):
        hidden = self.embed(input_ids)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if position_ids is None:
            start = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = (torch.arange(hidden.shape[1], device=hidden.device) + start)[None]
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            position_ids=position_ids,
        )
        freqs = position_ids[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[:, None].to(hidden.dtype), emb.sin()[:, None].to(hidden.dtype)
        for layer in self.layers:
            hidden = layer(hidden, cos, sin, mask, past_key_values, **kwargs)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden), past_key_values=past_key_values)


class TinyDecForCausalLM(TinyDecPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed.weight"}

    def __init__(self, config: TinyDecConfig) -> None:
        super().__init__(config)
        self.model = TinyDecModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        use_cache=None,
        logits_to_keep=0,
        **kwargs,
    ):
        out = self.model(input_ids, attention_mask, position_ids, past_key_values, use_cache, **kwargs)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(out.last_hidden_state[:, keep, :])
        return CausalLMOutputWithPast(logits=logits, past_key_values=out.past_key_values)
