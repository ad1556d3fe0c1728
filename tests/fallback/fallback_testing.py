"""Fixtures for the transformers-fallback tests: tiny random checkpoints, a small BPE tokenizer, remote code."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JAXRT_DISABLE_PROGRESS", "1")

import pytest  # noqa: E402

REMOTE_CODE = Path(__file__).parent / "remote_code"
TOKENIZER_TEXTS = [
    "The capital of France is Paris.",
    "Once upon a time, there was a little fox who lived in the forest.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10",
    "jaxrt serves transformers models with a paged KV cache and a radix tree.",
]


def save_bpe_tokenizer(out: Path, vocab_size: int = 320) -> None:
    """A byte-level BPE trained on a few strings (ids < ``vocab_size``): <pad>=0, <s>=1, </s>=2, <unk>=3."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TOKENIZER_TEXTS, trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    assert len(hf) <= vocab_size
    hf.save_pretrained(out)


def make_checkpoint(out: Path, model_type: str, tokenizer: bool = False, **overrides) -> str:
    """Tiny random ``model_type`` checkpoint (see fallback_sweep.tiny_config) in ``out``."""
    from fallback_sweep import save_random_model, tiny_config

    save_random_model(tiny_config(model_type, **overrides), out)
    if tokenizer:
        save_bpe_tokenizer(out)
    return str(out)


def make_remote_code_checkpoint(out: Path, attention_mode: str = "interface") -> str:
    """A hub-style repo with its own config + modeling files (``auto_map``), random weights, a tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    for f in ("configuration_tinydec.py", "modeling_tinydec.py"):
        shutil.copy(REMOTE_CODE / f, out / f)
    config = {
        "model_type": "tinydec",
        "architectures": ["TinyDecForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_tinydec.TinyDecConfig",
            "AutoModelForCausalLM": "modeling_tinydec.TinyDecForCausalLM",
        },
        "attention_mode": attention_mode,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "tie_word_embeddings": True,
    }
    (out / "config.json").write_text(json.dumps(config))
    cfg = AutoConfig.from_pretrained(out, trust_remote_code=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, trust_remote_code=True, dtype=torch.float32).save_pretrained(out)
    save_bpe_tokenizer(out)
    return str(out)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> str:
    return make_checkpoint(tmp_path_factory.mktemp("fb_llama"), "llama", tokenizer=True)


@pytest.fixture(scope="session")
def remote_code_dir(tmp_path_factory) -> str:
    return make_remote_code_checkpoint(tmp_path_factory.mktemp("fb_remote"))
