"""The transformers (PyTorch) peer on the same prompts and weights as bench_offline / bench_one_batch.

Modes: ``eager`` (``generate``, dynamic cache, static batch), ``static`` (``cache_implementation="static"``:
transformers compiles the decode step with torch.compile), ``cb`` (``generate_batch``, continuous batching).

    python benchmarks/bench_hf.py --random-model llama-3.2-1b --modes eager,static,cb --batch-sizes 1,64
"""

from __future__ import annotations

import argparse
import time

from common import PRESETS, add_model_args, append_jsonl, ensure_checkpoint, print_block, random_requests


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    add_model_args(p)
    p.add_argument("--modes", default="eager,static,cb")
    p.add_argument("--batch-sizes", default="1,64")
    p.add_argument("--num-prompts", type=int, default=256, help="requests for the continuous-batching mode")
    p.add_argument("--random-input-len", type=int, default=128)
    p.add_argument("--random-output-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--output-file", default=None)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    if args.smoke:
        args.random_model, args.random_dtype = "tiny", "float32"
        args.modes, args.batch_sizes, args.num_prompts = "eager", "2", 3  # cb costs ~20 s of set-up on CPU
        args.random_input_len, args.random_output_len = 8, 4

    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    path = ensure_checkpoint(args)
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    name = torch.cuda.get_device_name() if cuda else "cpu"
    model = (
        AutoModelForCausalLM.from_pretrained(
            path, dtype=getattr(torch, args.random_dtype), attn_implementation="sdpa"
        )
        .to(dev)
        .eval()
    )
    vocab = model.config.vocab_size if args.model_path else PRESETS[args.random_model]["vocab_size"]
    n_out = args.random_output_len

    def sync():
        if cuda:
            torch.cuda.synchronize()

    rows = []
    for mode in args.modes.split(","):
        if mode == "cb":
            reqs = random_requests(args.num_prompts, args.random_input_len, n_out, 1.0, vocab, args.seed)
            gc = GenerationConfig(max_new_tokens=n_out, do_sample=False, eos_token_id=-1, pad_token_id=0)
            model.generate_batch(inputs=[r[0] for r in reqs[:2]], generation_config=gc, progress_bar=False)
            sync()
            t = time.perf_counter()
            res = model.generate_batch(inputs=[r[0] for r in reqs], generation_config=gc, progress_bar=False)
            sync()
            dur = time.perf_counter() - t
            toks = sum(len(r.generated_tokens) for r in res.values())
            if len(res) != len(reqs) or toks != len(reqs) * n_out:
                print(f"warning: generate_batch returned {len(res)} results, {toks} tokens")
            rows.append((f"cb {args.num_prompts} req", f"{toks / dur:.0f} output tok/s ({dur:.2f} s)"))
            append_jsonl(
                args.output_file,
                {
                    "bench": "hf",
                    "mode": "cb",
                    "device": name,
                    "num_prompts": args.num_prompts,
                    "output_throughput": toks / dur,
                    "duration_s": dur,
                },
            )
            continue
        for b in [int(x) for x in args.batch_sizes.split(",")]:
            reqs = random_requests(b, args.random_input_len, n_out, 1.0, vocab, args.seed)
            ids = torch.tensor([r[0] for r in reqs], device=dev)
            kw = dict(
                do_sample=False,
                max_new_tokens=n_out,
                min_new_tokens=n_out,
                pad_token_id=0,
                attention_mask=torch.ones_like(ids),
            )
            if mode == "static":
                kw["cache_implementation"] = "static"
            t = time.perf_counter()
            with torch.no_grad():
                model.generate(ids, **kw)  # warm-up (and compile for static)
            sync()
            warm = time.perf_counter() - t
            t = time.perf_counter()
            with torch.no_grad():
                model.generate(ids, **kw)
            sync()
            dur = time.perf_counter() - t
            rows.append(
                (
                    f"{mode} B={b}",
                    f"{b * n_out / dur:.0f} output tok/s  {dur / n_out * 1e3:.2f} ms/step  (warm-up {warm:.1f} s)",
                )
            )
            append_jsonl(
                args.output_file,
                {
                    "bench": "hf",
                    "mode": mode,
                    "device": name,
                    "batch": b,
                    "output_throughput": b * n_out / dur,
                    "ms_per_step": dur / n_out * 1e3,
                    "warmup_s": warm,
                },
            )
    print_block("transformers peer", [("Device", name), ("torch", torch.__version__), *rows])


if __name__ == "__main__":
    main()
