"""Model load time and peak host memory: safetensors vs an Orbax converted checkpoint (vs GGUF).

Each load runs in a fresh Python process (imports excluded from the timings; the OS page cache is warm after
the first repeat, which is what a restart sees). Reported per mode: ``params_s`` (reading the weights into
device arrays, what the converted checkpoint saves), ``total_s`` (config + abstract model + params),
``peak_rss_mib`` (process high-water mark) and ``rss_delta_mib`` (its growth during the load), plus the
one-off ``convert_s`` of ``jaxrt convert``. For safetensors and GGUF the loader's own breakdown of the fastest
run (``converters.loader.last_load_info``: seconds reading, dispatching transfers and transforms, compiling,
waiting; tensors, bytes, programs, peak bytes in flight) is printed and recorded as ``load_info``. The
converted-params cache is never used (``JAXRT_CONVERTED_CACHE=0``, ``use_cache=False``).

    python benchmarks/bench_load.py --random-model llama-3.2-1b        # 1B bf16 on the GPU
    python benchmarks/bench_load.py --default-model                     # SmolLM2-135M: safetensors, Orbax, GGUF
    python benchmarks/bench_load.py --smoke                             # tiny CPU run that checks the script
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import add_model_args, append_jsonl, device_name, ensure_checkpoint, print_block


def _status_mib(*keys: str) -> dict[str, float]:
    out = dict.fromkeys(keys, float("nan"))
    try:
        with open("/proc/self/status") as f:
            for line in f:
                k = line.split(":")[0]
                if k in out:
                    out[k] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return out


class _PeakSampler(threading.Thread):
    """Samples anonymous and file-backed RSS every few ms: the kernel's high-water mark counts the
    checkpoint's mmap-ed pages (page cache, reclaimable) together with real copies."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = {"RssAnon": 0.0, "RssFile": 0.0}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for k, v in _status_mib("RssAnon", "RssFile").items():
                self.peak[k] = max(self.peak[k], v)
            time.sleep(0.005)


def _preimport() -> None:
    """Imports and backend start-up are not part of loading: pay for them before the clock starts."""
    import jax
    import orbax.checkpoint  # noqa: F401
    import torch  # noqa: F401  (GGUF loading uses transformers' torch-side name maps)
    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: F401

    import jaxrt.converters.loader  # noqa: F401

    jax.devices()


def worker(mode: str, path: str, dtype: str) -> None:
    """One load in this process; prints a JSON record."""
    os.environ["JAXRT_CONVERTED_CACHE"] = "0"  # measure the source itself, never the automatic cache
    _preimport()
    import jax

    from jaxrt.converters import loader

    base = _status_mib("VmRSS", "RssAnon", "RssFile")
    sampler = _PeakSampler()
    sampler.start()
    t0 = time.perf_counter()
    cfg = loader.native_model_config(loader.load_hf_config(path))
    t1 = time.perf_counter()
    _, abstract_state = loader.abstract_model(cfg, dtype, "reference")
    t2 = time.perf_counter()
    state = loader.load_params(cfg, path, abstract_state, dtype, use_cache=False)
    jax.block_until_ready(jax.tree.leaves(state))
    t3 = time.perf_counter()
    sampler.stop.set()
    sampler.join()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    print(
        "RESULT "
        + json.dumps(
            {
                "mode": mode,
                "source": loader.last_load_info.get("source"),
                "config_s": t1 - t0,
                "abstract_s": t2 - t1,
                "params_s": t3 - t2,
                "total_s": t3 - t0,
                "peak_rss_mib": peak,
                "rss_delta_mib": peak - base["VmRSS"],
                "anon_delta_mib": sampler.peak["RssAnon"] - base["RssAnon"],
                "file_delta_mib": sampler.peak["RssFile"] - base["RssFile"],
                "params_mib": n_bytes / 2**20,
                "load_info": {
                    k: v for k, v in loader.last_load_info.items() if isinstance(v, (int, float, str))
                },
            }
        ),
        flush=True,
    )


def run_worker(mode: str, path: str, dtype: str) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", mode, path, dtype],
        capture_output=True,
        text=True,
        cwd=str(Path(__file__).parent),  # not the repo root: its kernels/ folder shadows a pip package name
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{mode} load failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:5])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument(
        "--default-model", action="store_true", help="jaxrt's default model (SmolLM2-135M), + GGUF"
    )
    p.add_argument("--gguf-path", default=None, help="also time this .gguf file")
    p.add_argument("--dtype", default=None, help="compute dtype (default: float32 on CPU, else bfloat16)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--work-dir", default=None, help="where the converted checkpoint goes (default: a temp dir)"
    )
    p.add_argument("--output-file", default=None)
    p.add_argument("--smoke", action="store_true", help="tiny CPU run that checks the script works")
    args = p.parse_args()
    if args.smoke:
        args.random_model, args.random_dtype, args.repeats = "tiny", "float32", 1

    import jax

    gguf = args.gguf_path
    if args.default_model:
        from jaxrt.default_model import DEFAULT_MODEL_NAME, default_model_path, gguf_path

        path, gguf = default_model_path(), gguf or str(gguf_path())
        model_name = DEFAULT_MODEL_NAME
    else:
        path = ensure_checkpoint(args)
        model_name = args.model_path or args.random_model
    dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")

    from jaxrt.converters.checkpoint import convert_checkpoint

    _preimport()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="jaxrt-bench-load-"))
    converted = work / f"converted-{dtype}"
    if converted.exists():
        shutil.rmtree(converted)
    t0 = time.perf_counter()
    convert_checkpoint(path, converted, dtype=dtype)
    convert_s = time.perf_counter() - t0
    sources = {"safetensors": path, "orbax": str(converted)}
    if gguf:
        gdir = work / "gguf"
        gdir.mkdir(exist_ok=True)
        link = gdir / Path(gguf).name
        if not link.exists():
            link.symlink_to(Path(gguf).resolve())
        sources["gguf"] = str(gdir)

    results = {}
    for _ in range(args.repeats):  # interleaved, so that background load hits every mode alike
        for mode, src in sources.items():
            results.setdefault(mode, []).append(run_worker(mode, src, dtype))
    rows = [("Model", model_name), ("Device", device_name()), ("Compute dtype", dtype)]
    rows.append(("jaxrt convert (once) (s)", convert_s))
    for mode, runs in results.items():
        best = min(runs, key=lambda r: r["params_s"])
        rec = {
            "bench": "load",
            "model": model_name,
            "device": device_name(),
            "dtype": dtype,
            "mode": mode,
            "repeats": len(runs),
            "params_s_min": best["params_s"],
            "params_s_median": statistics.median(r["params_s"] for r in runs),
            "total_s_min": min(r["total_s"] for r in runs),
            "abstract_s_min": min(r["abstract_s"] for r in runs),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
            "rss_delta_mib": max(r["rss_delta_mib"] for r in runs),
            "anon_delta_mib": max(r["anon_delta_mib"] for r in runs),
            "file_delta_mib": max(r["file_delta_mib"] for r in runs),
            "params_mib": best["params_mib"],
            "convert_s": convert_s,
            "load_info": best["load_info"],  # the loader's own breakdown of the fastest run
        }
        append_jsonl(args.output_file, rec)
        rows += [
            (
                f"{mode}: params load min / median (s)",
                f"{rec['params_s_min']:.2f} / {rec['params_s_median']:.2f}",
            ),
            (f"{mode}: total incl. abstract model (s)", rec["total_s_min"]),
            (f"{mode}: peak RSS / growth (MiB)", f"{rec['peak_rss_mib']:.0f} / {rec['rss_delta_mib']:.0f}"),
            (
                f"{mode}: peak growth anon / file-backed (MiB)",
                f"{rec['anon_delta_mib']:.0f} / {rec['file_delta_mib']:.0f}",
            ),
        ]
        info = best["load_info"]
        if "wait_s" in info:  # safetensors / GGUF: where the fastest load's time went
            rows.append(
                (
                    f"{mode}: read / dispatch (compile) / wait (s)",
                    f"{info['read_s']:.2f} / {info['dispatch_s']:.2f} ({info['compile_s']:.2f}) / "
                    f"{info['wait_s']:.2f}",
                )
            )
            rows.append(
                (
                    f"{mode}: tensors / MiB / programs / peak in flight MiB",
                    f"{info['tensors']} / {info['bytes'] / 2**20:.0f} / {info['programs']} / "
                    f"{info['peak_inflight_bytes'] / 2**20:.0f}",
                )
            )
    rows.append(("Params size (MiB)", next(iter(results.values()))[0]["params_mib"]))
    print_block("Load Benchmark Result", rows)
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
