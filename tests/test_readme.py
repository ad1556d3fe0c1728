"""The README's Python Engine example runs as written (with the default model)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_engine_example_runs(default_model_dir, capsys):
    block = next(b for b in python_blocks() if "jaxrt.Engine()" in b)
    exec(compile(block, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "Paris" in out


def test_readme_commands_are_the_contract():
    text = README.read_text()
    assert 'pip install -e . && jaxrt generate "The capital of France is" --max-new-tokens 20' in text
    assert 'pip install -e ".[test]" && python -m pytest -q' in text
