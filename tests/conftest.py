"""Shared fixtures: tiny random checkpoints built from transformers configs, and the default model."""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JAXRT_DISABLE_PROGRESS", "1")

import pytest  # noqa: E402
from jaxrt_testing import make_tiny_llama  # noqa: E402


@pytest.fixture(scope="session")
def default_model_dir() -> str:
    from jaxrt.default_model import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, default_model_dir) -> str:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), tokenizer_from=default_model_dir)
