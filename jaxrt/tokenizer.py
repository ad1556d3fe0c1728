"""Text <-> token ids with the checkpoint's own tokenizer and chat template; UTF-8-safe incremental decoding."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

# transformers' lazy imports are not thread-safe: two threads loading a tokenizer at once (a data-parallel
# handle setting up its replicas) saw "cannot import name 'AutoTokenizer'" in one of them.
_LOAD_LOCK = threading.Lock()


class Tokenizer:
    def __init__(
        self, model_path: str, trust_remote_code: bool = False, chat_template: str | None = None
    ) -> None:
        with _LOAD_LOCK:
            from transformers import AutoTokenizer

            self.hf = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        if chat_template is not None:
            self.hf.chat_template = chat_template
        self.eos_token_ids: set[int] = set()
        if self.hf.eos_token_id is not None:
            self.eos_token_ids.add(int(self.hf.eos_token_id))
        self._backend_decode = _backend_decoder(self.hf)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=True))

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs
    ) -> list[int]:
        if not getattr(self.hf, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template; pass one with chat_template=")
        text = self.hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
        )
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if self._backend_decode is not None:
            return self._backend_decode(ids, skip_special_tokens=skip_special_tokens)
        return self.hf.decode(
            ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return self.hf.convert_ids_to_tokens(ids)


def _backend_decoder(hf: Any):
    """The Rust tokenizer's own ``decode`` where it is what ``hf.decode(..., clean_up_tokenization_spaces=
    False)`` runs anyway (a tokenizers-backed class that does not override ``_decode``), else None. Streams
    decode twice per chunk per request, and transformers' Python wrapper around this call (argument
    conversion, batching checks) cost several times the decode itself."""
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # pragma: no cover - older transformers
        return None
    if not isinstance(hf, TokenizersBackend) or type(hf)._decode is not TokenizersBackend._decode:
        return None
    return hf.backend_tokenizer.decode


@dataclass
class IncrementalDetokenizer:
    """Turns a growing list of output ids into text deltas; never emits half a UTF-8 character.

    Decodes a short window ``ids[prefix_offset:]`` and emits what goes past ``ids[prefix_offset:read_offset]``,
    so the cost per token stays constant.
    """

    tokenizer: Tokenizer
    skip_special_tokens: bool = True
    prefix_offset: int = 0
    read_offset: int = 0
    text: str = ""

    def step(self, ids: list[int]) -> str:
        # Nothing new since the last delta (a stop-string stream's chunk was decoded token by token already).
        if self.read_offset >= len(ids):
            return ""
        prefix = self.tokenizer.decode(ids[self.prefix_offset : self.read_offset], self.skip_special_tokens)
        full = self.tokenizer.decode(ids[self.prefix_offset :], self.skip_special_tokens)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(ids)
            self.text += delta
            return delta
        return ""
