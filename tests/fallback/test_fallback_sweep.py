"""Slow: every transformers causal-LM architecture, built tiny, through the fallback vs transformers generate.

Per architecture: the fallback either produces exactly transformers' greedy tokens or refuses the model with a
FallbackError at build time — never different tokens, never an unexplained crash. Architectures listed in
``EXPECTED_PASS`` (the text-only decoders that passed when docs/fallback_coverage.md was written) must pass.
"""

from __future__ import annotations

import pytest
from fallback_sweep import EXPECTED_PASS, causal_lm_types, run_one


@pytest.mark.slow
@pytest.mark.parametrize("model_type", list(causal_lm_types()))
def test_architecture(model_type, tmp_path):
    r = run_one(model_type, tmp_path)
    assert r["status"] != "fail", f"{model_type}: wrong tokens instead of a clear error: {r['reason']}"
    assert r["status"] != "error-jaxrt", f"{model_type}: unclear error from the fallback: {r['reason']}"
    if model_type in EXPECTED_PASS:
        assert r["status"] == "pass", f"{model_type}: {r['status']}: {r['reason']}"
