"""``jaxrt`` command line: ``generate``, ``serve`` and ``convert``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from jaxrt.config import QUANTIZATION_METHODS


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Engine flags with SGLang's names (shared by ``generate`` and the server)."""
    p.add_argument(
        "--model-path",
        default=None,
        help="checkpoint directory or cached hub id (default: SmolLM2-135M-Instruct)",
    )
    p.add_argument("--impl", default="auto", choices=["auto", "native", "transformers"])
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument(
        "--quantization",
        default=None,
        choices=list(QUANTIZATION_METHODS),
        help="fp8: the decoder layers' projection weights in float8_e4m3fn with a scale per output channel, "
        "activations quantized per token (native models)",
    )
    p.add_argument("--context-length", type=int, default=None)
    p.add_argument("--mem-fraction-static", type=float, default=0.85)
    p.add_argument("--max-running-requests", type=int, default=None)
    p.add_argument("--chunked-prefill-size", type=int, default=None)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--num-pages", type=int, default=None, help="explicit KV pool size in pages")
    p.add_argument("--disable-radix-cache", action="store_true")
    p.add_argument(
        "--num-continuous-decode-steps",
        type=int,
        default=None,
        help="decode steps per dispatch when all running requests decode (default: 4 on GPU/TPU, 1 on CPU)",
    )
    p.add_argument(
        "--stream-interval",
        type=int,
        default=1,
        help="output tokens between a stream's chunks: larger values cost the server less per token at high "
        "concurrency, smaller ones stream more smoothly",
    )
    p.add_argument(
        "--attention-backend", default=None, choices=["auto", "reference", "pallas_gpu", "pallas_tpu"]
    )
    p.add_argument(
        "--disable-background-compile",
        action="store_true",
        help="compile every step program before serving (default on GPU/TPU: serve once the programs that "
        "fit any batch are compiled, the rest compile in the background)",
    )
    p.add_argument("--random-seed", type=int, default=0)
    p.add_argument("--log-level", default="warning")


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model_path": args.model_path,
        "impl": args.impl,
        "dtype": args.dtype,
        "trust_remote_code": args.trust_remote_code,
        "quantization": args.quantization,
        "context_length": args.context_length,
        "mem_fraction_static": args.mem_fraction_static,
        "max_running_requests": args.max_running_requests,
        "chunked_prefill_size": args.chunked_prefill_size,
        "page_size": args.page_size,
        "num_pages": args.num_pages,
        "disable_radix_cache": args.disable_radix_cache,
        "num_continuous_decode_steps": args.num_continuous_decode_steps,
        "stream_interval": args.stream_interval,
        "attention_backend": args.attention_backend,
        "random_seed": args.random_seed,
        "background_compile": False if args.disable_background_compile else None,
    }


def sampling_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """``jaxrt generate``'s flags as SGLang sampling params (a ValueError for a --logit-bias that is not JSON)."""
    params: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature}
    for name in ("top_p", "top_k", "seed", "regex", "json_schema", "ebnf"):
        if getattr(args, name) is not None:
            params[name] = getattr(args, name)
    if args.logit_bias is not None:
        try:
            params["logit_bias"] = json.loads(args.logit_bias)
        except ValueError as e:
            raise ValueError(f"sampling_params.logit_bias: --logit-bias is not JSON: {e}") from None
    return params


def _generate(args: argparse.Namespace) -> int:
    from jaxrt.engine import Engine
    from jaxrt.sampling_params import SamplingParams

    params = sampling_from_args(args)
    sp = SamplingParams.from_dict(params)  # fail before loading anything
    if sp.constraint is not None:
        from jaxrt.grammar import compile_grammar

        compile_grammar(*sp.constraint)
    with Engine(**engine_kwargs(args)) as llm:
        if args.chat:
            ids = llm.tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}])
            kwargs: dict[str, Any] = {"input_ids": ids}
        else:
            kwargs = {"prompt": args.prompt}
        if args.stream:
            printed = 0
            for out in llm.generate(sampling_params=params, stream=True, **kwargs):
                if not args.json:
                    print(out["text"][printed:], end="", flush=True)
                    printed = len(out["text"])
            if not args.json:
                print()
                return 0
        else:
            out = llm.generate(sampling_params=params, **kwargs)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(out["text"])
    return 0


def _convert(args: argparse.Namespace) -> int:
    if args.src is None:
        from jaxrt.default_model import default_model_path

        print(default_model_path())
        return 0
    try:
        from jaxrt.converters.checkpoint import convert_checkpoint
    except ImportError:
        print("converting to an Orbax checkpoint is not available in this build", file=sys.stderr)
        return 2
    convert_checkpoint(args.src, args.dst, dtype=args.dtype)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxrt", description="Serve transformers causal LMs from JAX.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text for one prompt")
    g.add_argument("prompt")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--regex", default=None, help="constrain the output to match this regular expression")
    g.add_argument(
        "--json-schema", default=None, help="constrain the output to this JSON schema (a JSON string)"
    )
    g.add_argument("--ebnf", default=None, help="constrain the output to this EBNF (GBNF / Lark) grammar")
    g.add_argument(
        "--logit-bias", default=None, help="token id -> bias in [-100, 100], as JSON: '{\"1234\": -100}'"
    )
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    g.add_argument("--stream", action="store_true")
    g.add_argument("--json", action="store_true", help="print the whole SGLang-style result as JSON")
    add_engine_args(g)

    sub.add_parser(
        "serve", help="start the HTTP server (same flags as python -m jaxrt.launch_server)", add_help=False
    )

    c = sub.add_parser("convert", help="convert a checkpoint once (no SRC: prepare the default model)")
    c.add_argument("src", nargs="?")
    c.add_argument("dst", nargs="?")
    c.add_argument("--dtype", default=None)

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "serve":
        from jaxrt.launch_server import main as serve_main

        return serve_main(argv[1:])
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(args, "log_level", "warning").upper())
    if args.command == "generate":
        try:
            return _generate(args)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return _convert(args)


if __name__ == "__main__":
    sys.exit(main())
