"""Coverage sweep of the transformers fallback over transformers' causal-LM architectures.

For each ``model_type`` in ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``: build a tiny config from its config class, save a
random-weight checkpoint, greedy-generate 16 tokens with transformers (eager attention, float32) and with
``jaxrt.Engine(impl="transformers")``, and compare the tokens. Used by ``test_fallback_sweep.py`` (slow) and as a
script that writes docs/fallback_coverage.md::

    python tests/fallback/fallback_sweep.py --out docs/fallback_coverage.md [model_type ...]
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JAXRT_DISABLE_PROGRESS", "1")

NEW_TOKENS = 16
VOCAB = 320
PROMPT_LENGTHS = (6, 13, 37)  # 37 > chunked_prefill_size=32: the longest prompt is prefilled in two chunks
MAX_PARAMS = 20_000_000  # a config the generic shrinking missed would exhaust memory
SLIDING_WINDOW = 12  # where a config has a sliding window, make it shorter than the prompts

BASE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    initializer_range=0.2,  # peaked logits: greedy argmax is not decided by float noise
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
# Mixture-of-experts, MLA and other family knobs, set where the config class has them.
EXTRA = dict(
    num_experts=4,
    num_local_experts=4,
    n_routed_experts=4,
    moe_num_experts=4,
    num_experts_per_tok=2,
    moe_topk=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
    n_shared_experts=1,
    num_shared_experts=1,
    first_k_dense_replace=1,
    n_group=1,
    topk_group=1,
    q_lora_rank=32,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=16,
    qk_head_dim=16,
    global_head_dim=16,
    ffn_hidden_size=128,
    n_inner=128,
    d_ff=128,
    ffn_dim=128,
    max_seq_len=256,
    seq_length=256,
    rotary_dim=8,
    vocab_size_per_layer_input=VOCAB,
    hidden_size_per_layer_input=16,
)
LAYER_PATTERN_FIELDS = ("layer_types", "layers_block_type", "block_types", "activation_sparsity_pattern")
OPTIONAL = {"q_lora_rank", "global_head_dim", "rotary_dim"}  # None = feature off: keep it off
# Per-architecture adjustments the generic shrinking cannot guess.
SPECIAL: dict[str, dict[str, Any]] = {
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]], window_size=SLIDING_WINDOW),
    "lfm2": dict(layer_types=["conv", "full_attention"]),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"]),
    "mamba2": dict(num_heads=8, head_dim=16),
    # hybrids: one recurrent and one attention layer (the defaults put attention past the tiny layer count)
    "bamba": dict(attn_layer_indices=[1]),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1),
    "granitemoehybrid": dict(layer_types=["linear_attention", "full_attention"]),
    "zamba": dict(num_hidden_layers=4),  # two hybrid layers: their shared transformer weights are tied
    # transformers' cached mLSTM step assumes query/key and value heads of one size
    "xlstm": dict(qk_dim_factor=1.0, v_dim_factor=1.0),
    "zaya": dict(num_experts_per_tok=1),
    "reformer": dict(is_decoder=True, axial_pos_shape=[16, 16], axial_pos_embds_dim=[32, 32]),
    "plbart": dict(encoder_attention_heads=4, decoder_attention_heads=4),
    "dbrx": dict(
        attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),  # None crashes transformers
        ffn_config=dict(ffn_hidden_size=128, moe_num_experts=4, moe_top_k=2),
    ),
    "longcat_flash": dict(num_layers=1, expert_ffn_hidden_size=32),
    "gemma3n_text": dict(num_kv_shared_layers=0),
    "cohere_compass_text": dict(
        rope_parameters={
            # mrope_section (halves of head_dim=16 split height/width/time) defaults to head_dim 128's
            "full_attention": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [3, 3, 2]},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [3, 3, 2]},
        }
    ),
    "whisper": dict(encoder_attention_heads=4, decoder_attention_heads=4),
}

# Not text-only decoder-only LMs: listed in the coverage doc, not counted in the target.
_OUT_OF_SCOPE = {
    "encoder (BERT family) used as a decoder": (
        "bert bert-generation big_bird camembert data2vec-text electra ernie megatron-bert rembert roberta "
        "roberta-prelayernorm roc_bert roformer xlm xlm-roberta xlm-roberta-xl xmod"
    ),
    "decoder half of an encoder-decoder model": (
        "bart bigbird_pegasus blenderbot blenderbot-small marian mbart mvp pegasus plbart prophetnet trocr whisper"
    ),
    "speculative-decoding drafter (consumes the target model's hidden states)": (
        "gemma4_assistant gemma4_unified_assistant"
    ),
    "multimodal / audio model (config with vision or audio parts)": (
        "fuyu git got_ocr2 gemma3 gemma3n gemma4 gemma4_unified mllama phi4_multimodal musicgen musicgen_melody "
        "moshi qwen3_5 qwen3_5_moe qwen4_exp llama4"
    ),
}
NOT_TEXT_DECODER: dict[str, str] = {t: why for why, types in _OUT_OF_SCOPE.items() for t in types.split()}
NOT_TEXT_DECODER["xlnet"] = "permutation LM with two-stream attention, not a causal decoder"


# Text-only decoders that passed in the sweep recorded in docs/fallback_coverage.md (regressions fail the slow test).
EXPECTED_PASS: frozenset[str] = frozenset(
    {
        "afmoe",
        "apertus",
        "arcee",
        "aria_text",
        "axk1",
        "bamba",
        "biogpt",
        "bitnet",
        "bloom",
        "codegen",
        "cohere",
        "cohere2",
        "cohere2_moe",
        "cohere_compass_text",
        "ctrl",
        "cwm",
        "dbrx",
        "deepseek_v2",
        "deepseek_v3",
        "diffllama",
        "dots1",
        "emu3",
        "ernie4_5",
        "ernie4_5_moe",
        "exaone4",
        "exaone_moe",
        "falcon",
        "falcon_h1",
        "falcon_mamba",
        "flex_olmo",
        "gemma",
        "gemma2",
        "gemma3_text",
        "gemma3n_text",
        "gemma4_text",
        "gemma4_unified_text",
        "glm",
        "glm4",
        "glm4_moe",
        "glm4_moe_lite",
        "gpt-sw3",
        "gpt2",
        "gpt_bigcode",
        "gpt_neo",
        "gpt_neox",
        "gpt_neox_japanese",
        "gpt_oss",
        "gptj",
        "granite",
        "granite_swa",
        "granitemoe",
        "granitemoe_swa",
        "granitemoehybrid",
        "granitemoeshared",
        "helium",
        "hrm_text",
        "hunyuan_v1_dense",
        "hunyuan_v1_moe",
        "hy_v3",
        "hyperclovax",
        "jais2",
        "jamba",
        "jetmoe",
        "kimi_linear",
        "laguna",
        "lfm2",
        "lfm2_moe",
        "llama",
        "llama4_text",
        "longcat_flash",
        "mamba",
        "mamba2",
        "mellum",
        "mimo_v2_flash",
        "minicpm3",
        "minimax",
        "minimax_m2",
        "minimax_m3_vl_text",
        "ministral",
        "ministral3",
        "mistral",
        "mixtral",
        "modernbert-decoder",
        "mpt",
        "nanochat",
        "nemotron",
        "nemotron_h",
        "olmo",
        "olmo2",
        "olmo3",
        "olmo_hybrid",
        "olmoe",
        "openai-gpt",
        "opt",
        "persimmon",
        "phi",
        "phi3",
        "phimoe",
        "qwen2",
        "qwen2_moe",
        "qwen3",
        "qwen3_5_moe_text",
        "qwen3_5_text",
        "qwen3_moe",
        "qwen3_next",
        "recurrent_gemma",
        "rwkv",
        "seed_oss",
        "smollm3",
        "solar_open",
        "stablelm",
        "starcoder2",
        "vaultgemma",
        "xglm",
        "xlstm",
        "youtu",
        "zamba",
        "zamba2",
        "zaya",
    }
)


# Text-only decoders with recurrent / state-space / convolutional layers (per-request state in jaxrt's state
# slots, see docs/fallback.md "Recurrent and state-space layers").
STATE_TYPES: frozenset[str] = frozenset(
    [
        "bamba",
        "falcon_h1",
        "falcon_mamba",
        "granitemoehybrid",
        "inkling_text",
        "jamba",
        "kimi_linear",
        "lfm2",
        "lfm2_moe",
        "mamba",
        "mamba2",
        "minimax",
        "nemotron_h",
        "olmo_hybrid",
        "qwen3_5_moe_text",
        "qwen3_5_text",
        "qwen3_next",
        "recurrent_gemma",
        "rwkv",
        "xlstm",
        "zamba",
        "zamba2",
        "zaya",
    ]
)


def causal_lm_types() -> dict[str, str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return dict(sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()))


def _tiny_kwargs(cls: type, want: dict[str, Any], forced: dict[str, Any]) -> dict[str, Any]:
    """Constructor kwargs of config class ``cls`` with ``want`` applied where ``cls`` has the field.

    Family knobs (EXTRA) are only set where the class's default is not None; nested ``sub_configs`` are shrunk
    the same way (passed as dicts)."""
    from transformers import PretrainedConfig

    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    amap = dict(getattr(cls, "attribute_map", {}) or {})
    defaults = cls()
    kwargs: dict[str, Any] = {}
    for key, value in want.items():
        name = key if key in fields else amap.get(key)
        if name is None or name not in fields or name in kwargs:
            continue
        if key in OPTIONAL and getattr(defaults, name, None) is None and key not in forced:
            continue  # a feature the family leaves off by default
        kwargs[name] = value
    if "qk_rope_head_dim" in kwargs and "kv_lora_rank" in kwargs:  # MLA: per-head K/V, rotary part = head_dim
        if "head_dim" in kwargs:
            kwargs["head_dim"] = kwargs["qk_rope_head_dim"]
        if "num_key_value_heads" in kwargs:
            kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
    layers = kwargs.get(amap.get("num_hidden_layers", "num_hidden_layers"))
    for name in LAYER_PATTERN_FIELDS:
        name = name if name in fields else amap.get(name)
        pattern = getattr(defaults, name, None) if name in fields else None
        if layers and isinstance(pattern, (list, tuple)) and pattern and name not in kwargs:
            # keep one layer of each kind (sliding + full, mamba + attention, ...) in the tiny model
            kinds = list(dict.fromkeys(pattern))
            kwargs[name] = [kinds[i % len(kinds)] for i in range(layers)]
    sw = getattr(defaults, "sliding_window", None)
    if "sliding_window" in fields and isinstance(sw, int) and sw > 0:
        kwargs.setdefault("sliding_window", SLIDING_WINDOW)
    for name, sub in (getattr(cls, "sub_configs", None) or {}).items():
        if (
            name in fields
            and name not in kwargs
            and isinstance(sub, type)
            and issubclass(sub, PretrainedConfig)
        ):
            kwargs[name] = _tiny_kwargs(sub, want, forced)
    return kwargs


def tiny_config(model_type: str, **overrides: Any):
    """The config class of ``model_type`` with tiny sizes, set only where the class has the field."""
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    forced = {**SPECIAL.get(model_type, {}), **overrides}
    want = {**BASE, **EXTRA, **forced}
    cfg = cls(**_tiny_kwargs(cls, want, forced))
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(cfg, name, want[name])
    cfg.architectures = [causal_lm_types()[model_type]]
    return cfg


def num_params(config: Any) -> int:
    """Parameter count of the model ``config`` builds, instantiated on the meta device (no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def save_random_model(config: Any, out: Path, seed: int = 0) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.numel() > 1 and bool((p == p.flatten()[0]).all()):
                # constant init (zero routers, unit norms): break ties that would make argmax/top-k arbitrary
                p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(out)
    config.save_pretrained(out)
    return out


def prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, n).tolist() for n in PROMPT_LENGTHS]


def hf_greedy_ids(
    path: Path, prompt_ids: list[list[int]], trust_remote_code: bool = False
) -> list[list[int]]:
    """transformers' greedy generate (eager attention, float32), one prompt at a time, eos suppressed."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", trust_remote_code=trust_remote_code
    ).eval()
    outs = []
    for ids in prompt_ids:
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]),
                do_sample=False,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                pad_token_id=0,
            )
        outs.append(out[0, len(ids) :].tolist())
    return outs


def jaxrt_greedy_ids(
    path: Path, prompt_ids: list[list[int]], trust_remote_code: bool = False
) -> list[list[int]]:
    import jaxrt

    with jaxrt.Engine(
        model_path=str(path),
        impl="transformers",
        dtype="float32",
        chunked_prefill_size=32,
        max_running_requests=8,
        num_pages=256,
        context_length=128,
        skip_tokenizer_init=True,
        skip_warmup=True,
        trust_remote_code=trust_remote_code,
    ) as llm:
        outs = llm.generate(
            input_ids=prompt_ids,
            sampling_params={"temperature": 0, "max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS},
        )
    return [o["output_ids"] for o in outs]


def _short(e: BaseException) -> str:
    from jaxrt.converters.fallback import FallbackError

    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    kind = "FallbackError" if isinstance(e, FallbackError) else type(e).__name__
    return f"{kind}: {msg[:300]}"


def run_one(model_type: str, workdir: Path) -> dict[str, Any]:
    """Build, generate both ways, compare. Returns ``{model_type, status, reason, seconds}``."""
    t0 = time.perf_counter()
    res: dict[str, Any] = {"model_type": model_type, "architecture": causal_lm_types()[model_type]}
    path = workdir / model_type
    stage = "config"
    try:
        cfg = tiny_config(model_type)
        size = num_params(cfg)
        if size > MAX_PARAMS:
            raise ValueError(f"could not shrink the config: {size / 1e6:.0f}M parameters")
        stage = "transformers"
        save_random_model(cfg, path)
        ids = prompts(VOCAB)
        stage = "jaxrt"  # first: a model the fallback refuses is "refused" whatever transformers does with it
        got = jaxrt_greedy_ids(path, ids)
        stage = "transformers"
        expected = hf_greedy_ids(path, ids)
        if got == expected:
            res.update(status="pass", reason="")
        else:
            diverge = [
                next((i for i, (a, b) in enumerate(zip(g, e, strict=True)) if a != b), None)
                for g, e in zip(got, expected, strict=True)
            ]
            res.update(status="fail", reason=f"tokens differ (first mismatch per prompt: {diverge})")
    except Exception as e:  # noqa: BLE001 - every failure is a sweep result
        from jaxrt.converters.fallback import FallbackError

        status = "unsupported" if isinstance(e, FallbackError) and stage == "jaxrt" else f"error-{stage}"
        res.update(status=status, reason=_short(e), traceback=traceback.format_exc(limit=-6))
    finally:
        shutil.rmtree(path, ignore_errors=True)
        gc.collect()
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return res


# (category, substring of the reason) for the coverage summary, first match wins
CATEGORIES = (
    ("recurrent / state-space / convolutional layers without an adapter", "recurrent"),
    ("recurrent / state-space / convolutional layers without an adapter", "convolutions"),
    ("attention bias the paged kernel cannot apply", "passes tensor argument"),
    ("attention not through the attention interface", "never called the attention interface"),
    ("attention not through the attention interface", "fixed table keyed by attn_implementation"),
    ("attention not through the attention interface", "_supports_attention_backend=False"),
    ("layers drop **kwargs before the attention call", "without the jaxrt step context"),
    ("data-dependent Python in the forward (MoE loops, .cpu())", "data-dependent"),
    ("sparse-attention indexer (DSA: top-k keys per query)", "sparse-attention indexer"),
    ("layer-made attention mask / bias", "attention mask / bias of its own"),
    ("non-causal attention", "non-causal"),
    ("private / compressed KV cache in the layer", "concatenated a cache"),
    ("torchax op gap", "'View' object"),
    ("tiny config not buildable by the sweep", "error-config"),
    ("transformers reference failed on the tiny config", "error-transformers"),
    ("wrong tokens", "fail"),
)


def category(r: dict[str, Any]) -> str:
    if r["status"] == "pass":
        return "pass"
    for name, needle in CATEGORIES:
        if needle in r["reason"] or needle == r["status"]:
            return name
    return "other"


def render(results: list[dict[str, Any]]) -> str:
    """docs/fallback_coverage.md from sweep results."""
    from collections import Counter

    import jax
    import torch
    import transformers

    in_scope = [r for r in results if r["model_type"] not in NOT_TEXT_DECODER]
    out_scope = [r for r in results if r["model_type"] in NOT_TEXT_DECODER]
    passed = [r for r in in_scope if r["status"] == "pass"]
    stateful = [r for r in in_scope if r["model_type"] in STATE_TYPES]
    stateful_passed = [r for r in stateful if r["status"] == "pass"]
    attention_only = len(in_scope) - len(stateful)
    lines = [
        "# Transformers fallback coverage",
        "",
        f"Sweep of `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` (transformers {transformers.__version__}, torch "
        f"{torch.__version__}, jax {jax.__version__}, CPU): each architecture built tiny from its config class "
        f"(`tests/fallback/fallback_sweep.py`), random weights, greedy {NEW_TOKENS} tokens for "
        f"{len(PROMPT_LENGTHS)} prompts of {', '.join(map(str, PROMPT_LENGTHS))} tokens, batched, through "
        '`jaxrt.Engine(impl="transformers")` (chunked prefill of 32, paged KV, radix cache; recurrent state in '
        "per-request slots) compared with transformers `generate` (eager attention, float32). Regenerate with "
        "`python tests/fallback/fallback_sweep.py --out docs/fallback_coverage.md`.",
        "",
        f"- **Text-only decoder architectures: {len(passed)} / {len(in_scope)} pass "
        f"({100 * len(passed) / max(1, len(in_scope)):.0f}%).**",
        f"- Of the {attention_only} whose layers are all attention: "
        f"{len(passed) - len(stateful_passed)} / {attention_only} pass "
        f"({100 * (len(passed) - len(stateful_passed)) / max(1, attention_only):.0f}%).",
        f"- Of the {len(stateful)} with recurrent / state-space / convolutional layers (state kept in per-request "
        f"slots): {len(stateful_passed)} / {len(stateful)} pass "
        f"({100 * len(stateful_passed) / max(1, len(stateful)):.0f}%).",
        "- No architecture produced tokens different from transformers: every one that does not pass is "
        "refused at build time with a `FallbackError` saying why, or could not be built tiny by the sweep.",
        "",
        "| why not passing | architectures |",
        "|---|---|",
    ]
    counts = Counter(category(r) for r in in_scope if r["status"] != "pass")
    for name, n in counts.most_common():
        lines.append(f"| {name} | {n} |")
    lines.append("")
    groups = [
        ("Passing", passed),
        ("Refused with a clear error (FallbackError)", [r for r in in_scope if r["status"] == "unsupported"]),
        ("Not verified / failing", [r for r in in_scope if r["status"] not in ("pass", "unsupported")]),
    ]
    for title, rows in groups:
        lines += [f"## {title} ({len(rows)})", ""]
        if title == "Passing":
            lines += [", ".join(f"`{r['model_type']}`" for r in rows), ""]
            continue
        lines += ["| model_type | class | status | why |", "|---|---|---|---|"]
        for r in rows:
            why = r["reason"].replace("|", "\\|")
            lines.append(f"| `{r['model_type']}` | {r['architecture']} | {r['status']} | {why} |")
        lines.append("")
    lines += [
        f"## Not text-only decoders ({len(out_scope)}; not counted)",
        "",
        "| model_type | class | why out of scope | sweep result |",
        "|---|---|---|---|",
    ]
    for r in out_scope:
        lines.append(
            f"| `{r['model_type']}` | {r['architecture']} | {NOT_TEXT_DECODER[r['model_type']]} | {r['status']} |"
        )
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    import argparse
    import logging

    logging.disable(logging.WARNING)
    ap = argparse.ArgumentParser()
    ap.add_argument("model_types", nargs="*")
    ap.add_argument("--out", help="write the markdown report here")
    ap.add_argument("--jsonl", default="/tmp/jaxrt_fallback_sweep.jsonl", help="results, one line per type")
    ap.add_argument("--resume", action="store_true", help="skip types already in --jsonl")
    ap.add_argument(
        "--merge", nargs="+", help="render --out from these result files (later ones win); no run"
    )
    args = ap.parse_args(argv)
    if args.merge:
        merged: dict[str, dict] = {}
        for path in args.merge:
            with open(path) as fh:
                merged.update((r["model_type"], r) for r in map(json.loads, fh))
        Path(args.out).write_text(render([merged[t] for t in causal_lm_types() if t in merged]))
        return 0
    types = args.model_types or list(causal_lm_types())
    done: dict[str, dict] = {}
    if args.resume and os.path.exists(args.jsonl):
        with open(args.jsonl) as fh:
            for line in fh:
                r = json.loads(line)
                done[r["model_type"]] = r
    work = Path(tempfile.mkdtemp(prefix="jaxrt_sweep_"))
    with open(args.jsonl, "a" if args.resume else "w") as fh:
        for t in types:
            if t in done:
                continue
            r = run_one(t, work)
            done[t] = r
            fh.write(json.dumps(r) + "\n")
            fh.flush()
            print(f"{t:28s} {r['status']:18s} {r['seconds']:6.1f}s {r['reason'][:150]}", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    results = [done[t] for t in causal_lm_types() if t in done]
    if args.out:
        Path(args.out).write_text(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
