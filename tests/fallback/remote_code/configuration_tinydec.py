"""Config of the remote-code test model (see modeling_tinydec.py)."""

from __future__ import annotations

from transformers import PretrainedConfig


class TinyDecConfig(PretrainedConfig):
    model_type = "tinydec"

    def __init__(
        self,
        vocab_size: int = 320,
        hidden_size: int = 64,
        intermediate_size: int = 128,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        num_key_value_heads: int = 2,
        max_position_embeddings: int = 256,
        rope_theta: float = 10000.0,
        initializer_range: float = 0.2,
        attention_mode: str = "interface",
        **kwargs,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.initializer_range = initializer_range
        self.attention_mode = attention_mode
        super().__init__(**kwargs)
