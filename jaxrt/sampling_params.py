"""SGLang-style sampling parameters, validated at the edge."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

MAX_TOP_LOGPROBS = 20
# OpenAI's limit on logit_bias entries; each takes one slot of the sampler's token history.
MAX_LOGIT_BIAS = 300
# The output constraints (SGLang's names), at most one per request: see jaxrt.grammar.
CONSTRAINTS = ("regex", "json_schema", "ebnf")


@dataclass
class SamplingParams:
    """Per-request sampling controls, with SGLang's key names.

    ``temperature == 0`` is greedy; ``top_k == -1`` keeps the whole vocabulary. Build from a user dict with
    :meth:`from_dict`, which rejects unknown keys with a ``ValueError`` naming them.
    """

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True  # accepted for SGLang clients; fast tokenizers ignore it
    n: int = 1
    seed: int | None = None
    return_logprob: bool = False
    top_logprobs_num: int = 0
    # With return_logprob: the prompt position from which the prompt's own tokens get log-probabilities too
    # (``meta_info.input_token_logprobs``; the first prompt token has none). -1: output tokens only (SGLang's).
    logprob_start_len: int = -1
    # Token id -> additive bias on its logit before penalties and sampling, in [-100, 100] (OpenAI's; -100
    # bans a token, 100 all but forces it). Keys may be ints or decimal strings (JSON objects).
    logit_bias: dict[int, float] | None = None
    # Constrained decoding (at most one): the output must match a regular expression, a JSON schema (a JSON
    # string; a dict is accepted and serialised), or an EBNF grammar (GBNF / Lark syntax). See jaxrt.grammar.
    regex: str | None = None
    json_schema: str | None = None
    ebnf: str | None = None

    @classmethod
    def from_dict(cls, params: dict[str, Any] | SamplingParams | None) -> SamplingParams:
        if params is None:
            return cls()
        if isinstance(params, SamplingParams):
            return dataclasses.replace(params)
        if not isinstance(params, dict):
            raise ValueError(f"sampling_params must be a dict, got {type(params).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"unknown sampling_params key(s): {', '.join(unknown)}")
        values = {k: v for k, v in params.items() if v is not None}
        if isinstance(values.get("stop"), str):
            values["stop"] = [values["stop"]]
        if isinstance(values.get("logit_bias"), dict):
            values["logit_bias"] = _token_keys(values["logit_bias"])
        if isinstance(values.get("json_schema"), dict):
            values["json_schema"] = json.dumps(values["json_schema"])
        out = cls(**values)
        out.validate()
        return out

    def validate(self, vocab_size: int | None = None) -> None:
        def bad(name: str, why: str) -> None:
            raise ValueError(f"sampling_params.{name} {why}, got {getattr(self, name)!r}")

        ints = ("max_new_tokens", "min_new_tokens", "top_k", "n", "top_logprobs_num", "logprob_start_len")
        for name in ints:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                bad(name, "must be an integer")
        floats = (
            "temperature",
            "top_p",
            "min_p",
            "repetition_penalty",
            "frequency_penalty",
            "presence_penalty",
        )
        for name in floats:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                bad(name, "must be a number")
        if self.max_new_tokens < 0:
            bad("max_new_tokens", "must be >= 0")
        if self.min_new_tokens < 0:
            bad("min_new_tokens", "must be >= 0")
        if self.temperature < 0:
            bad("temperature", "must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", "must be in (0, 1]")
        if self.top_k == 0 or self.top_k < -1:
            bad("top_k", "must be -1 (disabled) or >= 1")
        if not 0.0 <= self.min_p <= 1.0:
            bad("min_p", "must be in [0, 1]")
        if self.repetition_penalty <= 0:
            bad("repetition_penalty", "must be > 0")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            bad("frequency_penalty", "must be in [-2, 2]")
        if not -2.0 <= self.presence_penalty <= 2.0:
            bad("presence_penalty", "must be in [-2, 2]")
        if self.n < 1:
            bad("n", "must be >= 1")
        if not 0 <= self.top_logprobs_num <= MAX_TOP_LOGPROBS:
            bad("top_logprobs_num", f"must be in [0, {MAX_TOP_LOGPROBS}]")
        if self.logprob_start_len < -1:
            bad("logprob_start_len", "must be -1 (output tokens only) or >= 0")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", "must be a non-empty string or a list of non-empty strings")
        if not isinstance(self.stop_token_ids, list) or not all(
            isinstance(t, int) and t >= 0 for t in self.stop_token_ids
        ):
            bad("stop_token_ids", "must be a list of non-negative integers")
        if vocab_size is not None and any(t >= vocab_size for t in self.stop_token_ids):
            bad("stop_token_ids", f"must be < vocab size {vocab_size}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            bad("seed", "must be an integer")
        if self.logit_bias is not None:
            lb = self.logit_bias
            if not isinstance(lb, dict) or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in lb
            ):
                bad("logit_bias", "must map non-negative integer token ids to numbers")
            if not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and -100 <= v <= 100
                for v in lb.values()
            ):
                bad("logit_bias", "values must be numbers in [-100, 100]")
            if len(lb) > MAX_LOGIT_BIAS:
                raise ValueError(
                    f"sampling_params.logit_bias may have at most {MAX_LOGIT_BIAS} entries, got {len(lb)}"
                )
            if vocab_size is not None and any(t >= vocab_size for t in lb):
                bad("logit_bias", f"token ids must be < vocab size {vocab_size}")
        constraints = [k for k in CONSTRAINTS if getattr(self, k) is not None]
        for name in constraints:
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                bad(name, "must be a non-empty string")
        if len(constraints) > 1:
            raise ValueError(
                f"sampling_params.{constraints[1]}: at most one of regex, json_schema and ebnf may be set, "
                f"got {', '.join(constraints)}"
            )

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    @property
    def bias_items(self) -> list[tuple[int, float]]:
        """``logit_bias`` as (token id, bias) pairs, zero biases left out."""
        return [(t, float(b)) for t, b in sorted((self.logit_bias or {}).items()) if b != 0]

    @property
    def constraint(self) -> tuple[str, str] | None:
        """(kind, text) of the output constraint (``regex`` / ``json_schema`` / ``ebnf``), if any."""
        for kind in CONSTRAINTS:
            text = getattr(self, kind)
            if text is not None:
                return kind, text
        return None

    @property
    def uses_history(self) -> bool:
        """Whether the sampler needs this request's row of the token history: penalties read its tokens,
        and a logit bias takes one entry per biased token."""
        return self.uses_penalties or any(b != 0 for b in (self.logit_bias or {}).values())


def _token_keys(bias: dict) -> dict:
    """JSON object keys are strings: decimal token ids become ints (anything else is left for ``validate``)."""
    out = {}
    for k, v in bias.items():
        if isinstance(k, str) and k.strip().lstrip("-").isdigit():
            k = int(k)
        out[k] = v
    return out
