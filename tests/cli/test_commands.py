"""The ``jaxlora`` command on a tiny random Llama with SmolLM2's tokenizer: every subcommand runs, its
output agrees with transformers / PEFT where there is a reference, and user mistakes end in one
``jaxlora: error:`` line with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from jaxlora.cli import main
from jaxlora.cli.memory import ModelShape, estimate_memory
from tests.helpers import assert_rel_close

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

CONFIG = """\
[model]
path = "{model}"
[lora]
r = 8
lora_alpha = 16
target_modules = "all-linear"
[data]
train_file = "{data}"
max_seq_length = 64
[optim]
learning_rate = 5e-2
warmup_steps = 1
[run]
output_dir = "{out}"
max_steps = 3
batch_size = 4
save_every = 3
log_every = 1
"""


def write_config(tmp_path: Path, model_dir: Path, **replace) -> Path:
    data = tmp_path / "train.jsonl"
    with open(data, "w") as f:
        for word in ["red", "green", "blue", "cyan"] * 3:
            f.write(json.dumps({"instruction": f"Say the color {word}.", "output": f"Color: {word}."}) + "\n")
    text = CONFIG.format(model=model_dir, data=data, out=tmp_path / "run")
    for old, new in replace.items():
        text = text.replace(old, new)
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("jaxlora: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, tmp_path_factory):
    """A 3-step LoRA run made with ``jaxlora train`` (lr high enough that the adapter is far from zero)."""
    tmp = tmp_path_factory.mktemp("cli-run")
    config = write_config(tmp, tiny_model_dir)
    assert main(["train", str(config)]) == 0
    return tmp / "run"


@pytest.mark.parametrize("command", ["train", "generate", "export", "memory", "quickstart"])
def test_help(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: jaxlora {command}" in capsys.readouterr().out


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "jaxlora"
    assert script.exists(), f"{script}: the console script is missing; pip install -e . creates it"
    done = subprocess.run([script, "memory", "--model", "7b", "--method", "qlora"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "weights" in done.stdout and "GiB" in done.stdout


def test_memory_prints_the_estimate(capsys):
    code, out, _ = run_cli(capsys, "memory", "--model", "13b", "--method", "lora", "--rank", "64", "--seq", "1024",
                           "--grad-ckpt")
    assert code == 0
    estimate = estimate_memory(ModelShape.preset("13b"), method="lora", rank=64, seq=1024, grad_ckpt=True,
                               dtype="bfloat16", platform="gpu")
    printed = {line.split()[0]: float(line.split()[1]) for line in out.splitlines()[1:] if line.strip().endswith("GiB")}
    assert printed["total"] == pytest.approx(estimate.total() / 2**30, abs=1e-3)
    assert printed["weights"] == pytest.approx(estimate.weights / 2**30, abs=1e-3)


def test_memory_errors(capsys, tmp_path):
    assert_one_line_error(*run_cli(capsys, "memory", "--model", "11q", "--method", "lora")[::2], "11q")
    assert_one_line_error(*run_cli(capsys, "memory", "--model", "7b", "--method", "lora", "--targets", "q_proj,wq")[::2],
                          "wq")


def test_train_dry_run_reports_share_memory_and_warnings(capsys, tmp_path, tiny_model_dir):
    from jaxlora import LoraConfig, get_peft_model
    from jaxlora.cli.preflight import PRESETS
    from torch_bridge import load_llama

    config = write_config(tmp_path, tiny_model_dir, **{"learning_rate = 5e-2": "learning_rate = 2e-5",
                                                        "r = 8\nlora_alpha = 16\ntarget_modules = \"all-linear\"\n": ""})
    code, _, err = run_cli(capsys, "train", config, "--preset", "qv", "--set", "lora.lora_alpha=16",
                           "--set", "data.template=\"chatml\"", "--dry-run")
    assert code == 0
    expected = get_peft_model(load_llama(tiny_model_dir), LoraConfig(**PRESETS["qv"])).get_nb_trainable_parameters()
    assert f"trainable params: {expected[0]:,d} || all params: {expected[1]:,d}" in err
    assert "memory estimate" in err and "memory available" in err
    assert "learning_rate=2e-05 is a full-fine-tuning rate" in err
    assert "lora_alpha == r == 16" in err
    assert "has a chat template but data.template = 'chatml'" in err
    assert not (tmp_path / "run").exists()


def test_train_errors(capsys, tmp_path, tiny_model_dir):
    config = write_config(tmp_path, tiny_model_dir)
    assert_one_line_error(*run_cli(capsys, "train", config, "--set", "run.bach_size=2", "--dry-run")[::2],
                          "run.bach_size")
    assert_one_line_error(*run_cli(capsys, "train", config, "--preset", "everything", "--dry-run")[::2], "everything")
    assert_one_line_error(*run_cli(capsys, "train", tmp_path / "missing.toml")[::2], "missing.toml")
    assert_one_line_error(*run_cli(capsys, "train", config, "--set", f"model.path=\"{tmp_path}\"")[::2], str(tmp_path))


def test_resuming_on_another_base_is_one_line_error(capsys, tmp_path, tiny_model_dir, trained_run):
    """A run directory whose checkpoint was trained on the dense base, resumed with a 4-bit base."""
    import shutil

    shutil.copytree(trained_run / "checkpoints", tmp_path / "run" / "checkpoints")
    config = write_config(tmp_path, tiny_model_dir)
    code, _, err = run_cli(capsys, "train", config, "--set", 'model.quantize="nf4"')
    report, _, error = err.rstrip().rpartition("\n")  # the pre-flight report comes first, then the error
    assert report.startswith("trainable params") and "Traceback" not in err
    assert_one_line_error(code, error, "differs from it", 'load.quantize: recorded null, now "nf4"',
                          "start a new run.output_dir")


def test_train_writes_a_peft_adapter(trained_run):
    assert (trained_run / "adapter" / "adapter_model.safetensors").is_file()
    metrics = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3]


def hf_greedy(model, codec, prompt: str, new: int) -> str:
    ids = torch.tensor([codec.encode_prompt(prompt)])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                             eos_token_id=list(codec.stop_ids), pad_token_id=codec.pad_id)
    tokens = out[0, ids.shape[1]:].tolist()
    tokens = tokens[:next((i for i, t in enumerate(tokens) if t in codec.stop_ids), len(tokens))]
    return codec.decode(tokens)


def test_generate_matches_transformers_and_peft(capsys, tiny_model_dir, trained_run):
    from jaxlora.data.prompting import PromptCodec

    codec = PromptCodec(tiny_model_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    code, out, _ = run_cli(capsys, "generate", "--model", tiny_model_dir, "--prompt", "Say the color red.",
                           "--max-new-tokens", 8)
    assert code == 0 and out == hf_greedy(hf, codec, "Say the color red.", 8) + "\n"

    with_adapter = peft.PeftModel.from_pretrained(hf, trained_run / "adapter").eval()
    expected = hf_greedy(with_adapter, codec, "Say the color red.", 8) + "\n"
    for form in ([], ["--no-scan-layers"]):  # one scanned body (the default) or the loop
        code, out, _ = run_cli(capsys, "generate", "--model", tiny_model_dir, "--adapter", trained_run / "adapter",
                               "--prompt", "Say the color red.", "--max-new-tokens", 8, *form)
        assert code == 0 and out == expected, form


def test_generate_sampling_is_seeded(capsys, tiny_model_dir):
    argv = ["generate", "--model", tiny_model_dir, "--prompt", "Say the color red.", "--max-new-tokens", 6, "--sample",
            "--temperature", "1.5", "--top-k", "50", "--top-p", "0.9"]
    first, second = run_cli(capsys, *argv, "--seed", 1), run_cli(capsys, *argv, "--seed", 1)
    assert first[0] == 0 and first[1] == second[1]


def test_generate_errors(capsys, tmp_path, tiny_model_dir):
    assert_one_line_error(*run_cli(capsys, "generate", "--model", tmp_path / "nope", "--prompt", "x")[::2], "nope")
    assert_one_line_error(*run_cli(capsys, "generate", "--model", tiny_model_dir, "--adapter", tmp_path,
                                   "--prompt", "x")[::2], str(tmp_path))
    assert_one_line_error(*run_cli(capsys, "generate", "--model", tiny_model_dir, "--prompt", "x",
                                   "--sample", "--top-p", "1.5")[::2], "top_p")


def test_export_peft_merged_and_bnb(capsys, tmp_path, tiny_model_dir, trained_run):
    from safetensors.numpy import load_file

    from torch_bridge import load_llama

    assert run_cli(capsys, "export", trained_run, "--peft", tmp_path / "peft")[0] == 0
    ours, original = (load_file(d / "adapter_model.safetensors") for d in (tmp_path / "peft", trained_run / "adapter"))
    assert ours.keys() == original.keys() and all(np.array_equal(ours[k], original[k]) for k in ours)

    assert run_cli(capsys, "export", trained_run, "--merged", tmp_path / "merged")[0] == 0
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 2]])
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        expected = peft.PeftModel.from_pretrained(hf, trained_run / "adapter").eval()(ids).logits.numpy()
        merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)(ids).logits.numpy()
    # Summation order only (merged float32 weights vs the adapter applied at run time): a bound relative
    # to the logits' scale, ~sqrt(K) 2^-24 per layer (tests/models/test_llama.py).
    assert_rel_close(merged, expected, 1e-5, "merged export vs PEFT")
    assert (tmp_path / "merged" / "tokenizer.json").is_file()

    assert run_cli(capsys, "export", trained_run, "--bnb-4bit", tmp_path / "nf4")[0] == 0
    config = json.loads((tmp_path / "nf4" / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    # The stored 4-bit model is the merged model quantized: same logits as jaxlora quantizing the merge itself.
    stored = load_llama(tmp_path / "nf4")
    requantized = load_llama(tmp_path / "merged", quantize="nf4")
    np.testing.assert_array_equal(np.asarray(stored(jnp.asarray(ids.numpy()))),
                                  np.asarray(requantized(jnp.asarray(ids.numpy()))))


def test_export_merged_in_another_dtype_and_shards(capsys, tmp_path, tiny_model_dir, trained_run):
    from safetensors.numpy import load_file

    assert run_cli(capsys, "export", trained_run, "--merged", tmp_path / "f32", "--max-shard-size", "2MB")[0] == 0
    assert run_cli(capsys, "export", trained_run, "--merged", tmp_path / "bf16", "--dtype", "bfloat16")[0] == 0
    index = json.loads((tmp_path / "f32" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    as_f32 = {}
    for name in set(index["weight_map"].values()):
        as_f32.update(load_file(tmp_path / "f32" / name))
    as_bf16 = load_file(tmp_path / "bf16" / "model.safetensors")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert as_bf16.keys() == as_f32.keys()
    for key, value in as_f32.items():  # one rounding of the float32 export
        assert as_bf16[key].tobytes() == value.astype(as_bf16[key].dtype).tobytes() and as_bf16[key].dtype.name == "bfloat16", key


def test_export_errors(capsys, tmp_path, trained_run):
    assert_one_line_error(*run_cli(capsys, "export", tmp_path / "none", "--peft", tmp_path / "o")[::2], "none")
    assert_one_line_error(*run_cli(capsys, "export", trained_run, "--peft", tmp_path / "a",
                                   "--merged", tmp_path / "b")[::2], "exactly one")
    assert_one_line_error(*run_cli(capsys, "export", tmp_path, "--merged", tmp_path / "b")[::2], "adapter_config.json")
    assert_one_line_error(*run_cli(capsys, "export", trained_run, "--merged", tmp_path / "b", "--max-shard-size", "5 apples")[::2],
                          "5 apples")
    assert_one_line_error(*run_cli(capsys, "export", trained_run, "--peft", tmp_path / "c", "--dtype", "float16")[::2],
                          "dtype applies to merged exports")
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
