"""The tokenizer wrapper: its direct decode is transformers' decode, and incremental decoding adds up."""

from __future__ import annotations

import numpy as np
import pytest

from jaxrt.tokenizer import IncrementalDetokenizer, Tokenizer


@pytest.fixture(scope="module")
def tok(default_model_dir) -> Tokenizer:
    return Tokenizer(default_model_dir)


def test_direct_decode_is_transformers_decode(tok):
    assert tok._backend_decode is not None  # the default model's tokenizer takes the direct path
    rng = np.random.default_rng(0)
    special = sorted(tok.hf.all_special_ids)
    for n in (0, 1, 7, 200):
        ids = rng.integers(0, len(tok.hf), n).tolist() + special[: n % 3]
        for skip in (True, False):
            want = tok.hf.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
            assert tok.decode(ids, skip) == want


def test_incremental_deltas_add_up_to_the_whole(tok):
    ids = tok.encode("Grüße aus Zürich: 東京 🚀 and plain ASCII, twice. " * 3)
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.step(ids[: k + 1]) for k in range(len(ids))]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == detok.text == tok.decode(ids)
    calls = []
    decode = tok.decode
    tok.decode = lambda *a: calls.append(a) or decode(*a)
    try:
        assert detok.step(ids) == "" and not calls  # nothing new: no decoding at all
    finally:
        del tok.decode
