"""The README's main job: `jaxrt generate` with the default model, in a fresh process."""

from __future__ import annotations

import json
import re
import subprocess
import sys


def test_cli_generate_default_model_mentions_paris(default_model_dir):
    cmd = [
        sys.executable,
        "-m",
        "jaxrt.cli",
        "generate",
        "The capital of France is",
        "--max-new-tokens",
        "20",
        "--json",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert "Paris" in out["text"]
    assert out["meta_info"]["completion_tokens"] <= 20


def test_cli_chat_stream_and_bad_flag(default_model_dir):
    cmd = [
        sys.executable,
        "-m",
        "jaxrt.cli",
        "generate",
        "What is the capital of France?",
        "--chat",
        "--stream",
        "--max-new-tokens",
        "16",
        "--chunked-prefill-size",
        "64",
        "--regex",
        "(The capital of France is )?(Paris|London|Rome)\\.?",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.fullmatch(r"(The capital of France is )?(Paris|London|Rome)\.?", proc.stdout.strip()), (
        proc.stdout
    )
    assert "Paris" in proc.stdout
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxrt.cli",
            "generate",
            "x",
            "--temperature",
            "-1",
            "--chunked-prefill-size",
            "64",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert bad.returncode == 2 and "temperature" in bad.stderr
    for flags, field in (
        (["--regex", "(["], "sampling_params.regex"),
        (["--logit-bias", "{1:"], "logit_bias"),
        (["--quantization", "int4"], "--quantization"),
    ):
        bad = subprocess.run(
            [sys.executable, "-m", "jaxrt.cli", "generate", "x", *flags],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert bad.returncode == 2 and field in bad.stderr, bad.stderr[-2000:]  # before loading the model


def test_engine_flags_reach_the_engine_kwargs():
    import argparse

    from jaxrt.cli import add_engine_args, engine_kwargs

    p = argparse.ArgumentParser()
    add_engine_args(p)
    assert engine_kwargs(p.parse_args(["--quantization", "fp8"]))["quantization"] == "fp8"
    assert engine_kwargs(p.parse_args([]))["quantization"] is None
