"""Plot benchmark JSONL records (from bench_one_batch / bench_offline / bench_hf) into one PNG.

    python benchmarks/plot_results.py benchmarks/results/h100-2026-11-27.jsonl -o benchmarks/results/h100-2026-11-27.png

Left: decode step time against batch size at one context length (jaxrt device and engine time, the bandwidth
floor, and the transformers peer's ms/step when its records are present). Right: offline output tokens/s per
run (jaxrt, and the peer's modes when present).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("files", nargs="+")
    p.add_argument("-o", "--output", default="results.png")
    p.add_argument("--context", type=int, default=1024)
    args = p.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(line) for f in args.files for line in Path(f).read_text().splitlines() if line.strip()]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))

    decode = defaultdict(list)
    for r in recs:
        if r["bench"] == "one_batch_decode" and r["context"] == args.context:
            decode[(r["attention_backend"], r["commit"])].append(r)
    for (backend, commit), rows in sorted(decode.items()):
        rows.sort(key=lambda r: r["batch"])
        b = [r["batch"] for r in rows]
        ax1.plot(b, [r["device_ms"] for r in rows], marker="o", label=f"jaxrt device ({backend}, {commit})")
        ax1.plot(
            b, [r["engine_ms"] for r in rows], marker=".", ls="--", label=f"jaxrt engine, sync ({backend})"
        )
    floor = {r["batch"]: r["floor_ms"] for rows in decode.values() for r in rows}
    if floor:
        ax1.plot(sorted(floor), [floor[k] for k in sorted(floor)], color="k", ls=":", label="bandwidth floor")
    peer = [r for r in recs if r["bench"] == "hf" and "ms_per_step" in r]
    for mode in sorted({r["mode"] for r in peer}):
        rows = sorted((r for r in peer if r["mode"] == mode), key=lambda r: r["batch"])
        ax1.plot(
            [r["batch"] for r in rows],
            [r["ms_per_step"] for r in rows],
            marker="s",
            label=f"transformers {mode}",
        )
    ax1.set(
        xscale="log",
        yscale="log",
        xlabel="batch size",
        ylabel="ms per decode step",
        title=f"Decode step, context {args.context}",
    )
    ax1.legend(fontsize=7)

    bars = [
        (
            f"jaxrt {r['model'].rstrip('/').split('/')[-1][:28]} ({r.get('impl', 'native')})\n{r['commit']}",
            r["output_throughput"],
        )
        for r in recs
        if r["bench"] == "offline" and not r.get("shared_prefix_len")
    ]
    bars += [
        (f"transformers {r['mode']}" + (f" B={r['batch']}" if r.get("batch") else ""), r["output_throughput"])
        for r in recs
        if r["bench"] == "hf"
    ]
    ax2.barh([b[0] for b in bars], [b[1] for b in bars])
    ax2.set(xlabel="output tokens/s", title="Offline throughput, 256 x (128 -> 256)")
    ax2.tick_params(axis="y", labelsize=7)
    fig.suptitle(recs[0].get("device", "") if recs else "")
    fig.tight_layout()
    fig.savefig(args.output, dpi=110)
    print(args.output)


if __name__ == "__main__":
    main()
