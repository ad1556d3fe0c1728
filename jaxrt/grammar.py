"""Constrained decoding: SGLang's ``regex`` / ``json_schema`` / ``ebnf`` sampling parameters (and the OpenAI
API's ``response_format``), through llguidance.

Each constrained request holds a matcher on the host. Before a step that samples its next token, the batch
asks the matcher for the tokens the grammar allows there, as a bitmask of ``ceil(vocab / 32)`` int32 words
(``SamplingBatch.allowed``; bit ``t % 32`` of word ``t // 32`` is token ``t``), and the sampler sets every
other logit to -inf before the greedy choice or the draw. The sampled token goes back to the matcher when the
step's outputs are read (``OutputProcessor``); a grammar that can take no further token ends the request
("stop"). Constrained requests need their previous token on the host before the next step is built, so
while one runs, steps do not overlap and take one decode step per dispatch (as penalties do).
"""

from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np

from jaxrt.sampling_params import CONSTRAINTS


def compile_grammar(kind: str, text: str) -> str:
    """The llguidance grammar of one of SGLang's constraint kinds; a ``ValueError`` naming
    ``sampling_params.<kind>`` when it is not valid."""
    import llguidance

    if kind not in CONSTRAINTS:
        raise ValueError(f"constraint kind must be one of {CONSTRAINTS}, got {kind!r}")
    if kind == "json_schema":
        try:
            json.loads(text)
        except ValueError as e:
            raise ValueError(f"sampling_params.json_schema is not valid JSON: {e}") from None
    try:
        grammar = llguidance.grammar_from(kind, text)
        error = llguidance.LLMatcher.validate_grammar(grammar)
    except ValueError as e:
        error = str(e)
    if error:
        raise ValueError(f"sampling_params.{kind} is not a valid {kind}: {error.strip()}")
    return grammar


class GrammarTokenizer:
    """llguidance's view of a model's tokenizer (built once, on first use: ~0.4 s for a 49k vocabulary) and
    the matchers made with it."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int, eos_ids: list[int]) -> None:
        self._hf = hf_tokenizer
        self.vocab_size = vocab_size
        self._eos = sorted(eos_ids)
        self._lock = threading.Lock()
        self._ll = None

    def _tokenizer(self):
        import llguidance

        with self._lock:
            if self._ll is None:
                self._ll = llguidance.LLTokenizer(
                    _byte_level_json(self._hf), n_vocab=self.vocab_size, eos_token=self._eos or None
                )
            return self._ll

    def matcher(self, grammar: str) -> Matcher:
        import llguidance

        return Matcher(llguidance.LLMatcher(self._tokenizer(), grammar))


class Matcher:
    """One request's grammar state."""

    def __init__(self, matcher: Any) -> None:
        self._m = matcher

    def fill(self, bitmask: np.ndarray, row: int) -> None:
        """Row ``row`` of ``bitmask`` ([rows, words] int32) := the tokens allowed next."""
        from llguidance.numpy import fill_next_token_bitmask

        fill_next_token_bitmask(self._m, bitmask, row)

    def consume(self, token: int) -> str | None:
        """Advance by a sampled token. Returns None while the grammar goes on, "done" once it can take no
        further token, or an error message (a token it did not allow)."""
        if not self._m.consume_token(int(token)) or self._m.is_error():
            return self._m.get_error() or f"token {token} is not allowed by the grammar"
        return "done" if self._m.is_stopped() else None


def _byte_level_json(hf_tokenizer: Any) -> str:
    """The tokenizer's JSON for llguidance. A byte-level BPE tokenizer converted from GGUF (the default model's)
    carries a decoder chain (byte fallback, fuse, "▁" -> " ", byte level) that llguidance does not read as
    byte-level, and then maps token bytes wrongly; its byte-level step alone is the same decoding for such
    a vocabulary, so that step is what llguidance gets."""
    spec = json.loads(hf_tokenizer.backend_tokenizer.to_str())
    decoder = spec.get("decoder") or {}
    if decoder.get("type") == "Sequence":
        level = [d for d in decoder.get("decoders", []) if d.get("type") == "ByteLevel"]
        if level:
            spec["decoder"] = level[0]
    spec["padding"] = spec["truncation"] = None
    return json.dumps(spec)
