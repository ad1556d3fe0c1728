"""Plot benchmark JSONL records (from bench_one_batch / bench_offline / bench_hf / bench_serving) into one PNG.

    python benchmarks/plot_results.py benchmarks/results/h100-2026-11-27.jsonl -o benchmarks/results/h100-2026-11-27.png

Top left: decode step time against batch size at one context length (jaxrt device and engine time, the
bandwidth floor, and the transformers peer's ms/step when its records are present). Top right: offline output
tokens/s per run (jaxrt, and the peer's modes when present). With bench_serving records, a second row:
median time per output token and median time to first token against the offered request rate (Poisson
arrivals; "all" = every request at once), one line per server (``--label``), peers together.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("files", nargs="+")
    p.add_argument("-o", "--output", default="results.png")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument(
        "--serving-labels", default=None, help="comma-separated bench_serving labels to plot (default: all)"
    )
    args = p.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(line) for f in args.files for line in Path(f).read_text().splitlines() if line.strip()]
    serving = [r for r in recs if r["bench"] == "serving" and not r.get("max_concurrency") and r["completed"]]
    if args.serving_labels:
        keep = args.serving_labels.split(",")
        serving = [r for r in serving if r.get("label", r["backend"]) in keep]
    if serving:  # one workload per plot: the most common request count
        n = Counter(r["num_prompts"] for r in serving).most_common(1)[0][0]
        serving = [r for r in serving if r["num_prompts"] == n]
    if serving:
        fig, ((ax1, ax2), (ax3, ax4)) = plt.subplots(2, 2, figsize=(12, 9))
        plot_serving(serving, ax3, ax4)
    else:
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


def plot_serving(recs: list[dict], ax_tpot, ax_ttft) -> None:
    """Median TPOT and TTFT against the offered request rate, one line per server label."""
    finite = [float(r["request_rate"]) for r in recs if float(r["request_rate"]) != float("inf")]
    at_once = 2 * max(finite) if finite else 1.0  # where "every request at once" sits on the x axis
    by_label = defaultdict(list)
    for r in recs:
        rate = float(r["request_rate"])
        by_label[r.get("label", r["backend"])].append((at_once if rate == float("inf") else rate, r))
    for label, rows in sorted(by_label.items()):
        rows.sort(key=lambda x: x[0])
        x = [rate for rate, _ in rows]
        ax_tpot.plot(
            x, [r.get("median_tpot_ms", r["mean_tpot_ms"]) for _, r in rows], marker="o", label=label
        )
        ax_ttft.plot(x, [r["median_ttft_ms"] for _, r in rows], marker="o", label=label)
    ticks = sorted(set(finite)) + [at_once]
    for ax, what in ((ax_tpot, "median TPOT (ms)"), (ax_ttft, "median TTFT (ms)")):
        ax.set(xscale="log", yscale="log", xlabel="request rate (req/s, Poisson)", ylabel=what)
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks[:-1]] + ["all"])
        ax.minorticks_off()
        ax.legend(fontsize=8)
    n = recs[0]["num_prompts"]
    ax_tpot.set_title(f"Latency against load: time per output token ({n} requests per point)")
    ax_ttft.set_title("Latency against load: time to first token")


if __name__ == "__main__":
    main()
