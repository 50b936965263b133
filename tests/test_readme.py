"""The README's API tour runs as written (its first Python block, the HF -> jaxlora -> PEFT path)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("peft")

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_tour_runs(tmp_path, monkeypatch, capsys):
    block = python_blocks()[0].replace("/tmp/my-adapter", str(tmp_path / "my-adapter"))
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - the README is ours
    assert "trainable params:" in capsys.readouterr().out
    assert namespace["logits"].shape == (1, 6, 49152)
    assert (tmp_path / "my-adapter" / "adapter_model.safetensors").exists()
    assert type(namespace["hf_model"]).__name__.startswith("PeftModel")


def test_layer_tour_runs():
    namespace: dict = {}
    exec(compile(python_blocks()[1], str(README), "exec"), namespace)  # noqa: S102
    assert abs(namespace["q"].bits_per_parameter - 4.127) < 1e-3
