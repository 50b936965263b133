"""The trainer end to end on a tiny random Llama with SmolLM2's tokenizer: loss falls, files appear,
the adapter loads in PEFT; SIGINT saves and exits; a NaN loss stops with the last checkpoint intact;
checkpoints hold what trains and refuse another base; a run shorter than an epoch evaluates at its end;
a failed run leaves the model it was given usable, with the last good adapter values."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxlora.train.config import config_from_dict
from jaxlora.train.trainer import TrainingError, train

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def write_data(path: Path, n: int = 24):
    rng = np.random.default_rng(0)
    words = ["red", "green", "blue", "cyan", "gold", "gray"]
    with open(path, "w") as f:
        for _ in range(n):
            word = words[rng.integers(len(words))]
            f.write(json.dumps({"instruction": f"Say the color {word}.", "output": f"Color: {word}."}) + "\n")


def make_config(model_dir, tmp_path, *, model=None, lora=None, data=None, optim=None, **run):
    write_data(tmp_path / "train.jsonl")
    return config_from_dict({
        "model": {"path": str(model_dir), **(model or {})},
        "lora": {"r": 16, "lora_alpha": 32, "target_modules": "all-linear", **(lora or {})},
        "data": data or {"train_file": str(tmp_path / "train.jsonl"), "max_seq_length": 64, "eval_size": 4},
        "optim": {"learning_rate": 5e-2, "warmup_steps": 2, "lr_scheduler_type": "cosine", **(optim or {})},
        "run": {"output_dir": str(tmp_path / "run"), "max_steps": 30, "batch_size": 4, "gradient_accumulation_steps": 2,
                "eval_every": 10, "save_every": 10, "log_every": 5, **run},
    })


def test_training_run_end_to_end(tiny_model_dir, tmp_path):
    import peft

    summary = train(make_config(tiny_model_dir, tmp_path))
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert losses[-1] < 0.75 * losses[0], losses
    assert len(evals) == 3 and evals[-1] < evals[0]
    assert summary["steps"] == 30 and summary["best_eval_loss"] == min(evals)
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "best_adapter/adapter_config.json",
                 "loss.png", "summary.json"):
        assert (run / name).exists(), name
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft.PeftModel.from_pretrained(base, run / "adapter")


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_model_dir, tmp_path):
    config = make_config(tiny_model_dir, tmp_path, save_every=2, eval_every=100)
    train(config)  # 30 good steps
    from jaxlora.train.checkpointing import TrainCheckpointer

    bad = config_from_dict({**json.loads(json.dumps(config, default=lambda o: o.__dict__)),
                            "optim": {"learning_rate": 1e30, "warmup_steps": 0, "lr_scheduler_type": "constant"},
                            "run": {**config.run.__dict__, "max_steps": 40, "save_every": 2, "eval_every": 100}})
    with pytest.raises(TrainingError, match="loss is (nan|inf)"):
        train(bad)
    assert TrainCheckpointer(tmp_path / "run" / "checkpoints").latest_step() == 30


def test_sigint_saves_a_checkpoint_and_exits_cleanly(tiny_model_dir, tmp_path):
    config = make_config(tiny_model_dir, tmp_path, max_steps=400, save_every=1000, eval_every=1000)
    config_path = tmp_path / "run.json"
    config_path.write_text(json.dumps(config, default=lambda o: o.__dict__))
    code = ("import json, sys; from jaxlora.train.config import config_from_dict; from jaxlora.train.trainer import train; "
            "train(config_from_dict(json.load(open(sys.argv[1]))))")
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-c", code, str(config_path)], cwd=repo, stderr=subprocess.PIPE)
    seen = b""
    deadline = time.time() + 300
    while b"step 5/" not in seen and time.time() < deadline:
        chunk = proc.stderr.read1(4096)
        if not chunk:
            break
        seen += chunk
    assert b"step 5/" in seen, seen[-2000:]
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=300)[1]
    assert proc.returncode == 0, (seen + rest)[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["interrupted"] and 5 <= summary["steps"] < 400
    from jaxlora.train.checkpointing import TrainCheckpointer

    assert TrainCheckpointer(tmp_path / "run" / "checkpoints").latest_step() == summary["steps"]


def _losses_by_step(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            out[row["step"]] = row["loss"]  # a step logged again after a resume: the later line wins
    return out


def test_trainer_killed_with_sigkill_resumes_bit_for_bit(tiny_model_dir, tmp_path):
    repo = Path(__file__).resolve().parents[2]
    code = ("import json, sys; from jaxlora.train.config import config_from_dict; from jaxlora.train.trainer import train; "
            "train(config_from_dict(json.load(open(sys.argv[1]))))")

    def config_file(name):
        config = make_config(tiny_model_dir, tmp_path / name, max_steps=12, save_every=1, eval_every=100, log_every=1)
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(config, default=lambda o: o.__dict__))
        return path

    (tmp_path / "straight").mkdir()
    (tmp_path / "killed").mkdir()
    straight = subprocess.run([sys.executable, "-c", code, str(config_file("straight"))], cwd=repo, capture_output=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-2000:]
    proc = subprocess.Popen([sys.executable, "-c", code, str(config_file("killed"))], cwd=repo, stderr=subprocess.PIPE)
    seen = b""
    while b"step 6/" not in seen:
        chunk = proc.stderr.read1(4096)
        assert chunk, seen[-2000:]
        seen += chunk
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    resumed = subprocess.run([sys.executable, "-c", code, str(tmp_path / "killed.json")], cwd=repo, capture_output=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert b"resuming from step" in resumed.stderr
    expected, got = _losses_by_step(tmp_path / "straight" / "run"), _losses_by_step(tmp_path / "killed" / "run")
    assert sorted(got) == sorted(expected) == list(range(1, 13))
    assert got == expected  # floats from the same bits: identical


def test_scanned_and_looped_training_agree_file_for_file(tiny_model_dir, tmp_path):
    """The trainer runs the identical layers as one scanned body (model.scan_layers, the default): the same
    losses, adapters and checkpoint entries (per layer) as with the loop, dropout included; the model it
    was given comes back per layer."""
    from flax import nnx
    from safetensors.numpy import load_file

    from jaxlora.train.trainer import setup

    runs = {}
    for scan in (True, False):
        (tmp_path / str(scan)).mkdir()
        config = make_config(tiny_model_dir, tmp_path / str(scan), model={"scan_layers": scan}, lora={"lora_dropout": 0.1},
                             max_steps=4, eval_every=2, save_every=2, log_every=1)
        prepared = setup(config)
        train(config, prepared)
        assert isinstance(prepared[0].base_model.model.layers, nnx.List)
        run = tmp_path / str(scan) / "run"
        runs[scan] = (_losses_by_step(run), load_file(str(run / "adapter" / "adapter_model.safetensors")),
                      load_file(str(run / "best_adapter" / "adapter_model.safetensors")),
                      checkpoint_arrays(run / "checkpoints" / "4"))
    (losses, adapter, best, arrays), (loop_losses, loop_adapter, loop_best, loop_arrays) = runs[True], runs[False]
    assert sorted(losses) == sorted(loop_losses) == [1, 2, 3, 4]
    assert all(losses[k] == pytest.approx(loop_losses[k], rel=1e-5) for k in losses)
    assert arrays == loop_arrays  # the same entries, shapes and dtypes: layer by layer
    for got, expected in ((adapter, loop_adapter), (best, loop_best)):
        assert sorted(got) == sorted(expected)
        for key in expected:  # AdamW after 4 steps: a few float32 roundings apart, relative to each tensor's scale
            assert np.max(np.abs(got[key] - expected[key])) <= 1e-4 * np.max(np.abs(expected[key])), key


def test_full_finetuning_writes_the_model(tiny_model_dir, tmp_path):
    summary = train(make_config(tiny_model_dir, tmp_path, max_steps=6, full_finetune=True, eval_every=100))
    assert summary["steps"] == 6
    assert (tmp_path / "run" / "model" / "model.safetensors").exists() and not (tmp_path / "run" / "adapter").exists()
    losses = _losses_by_step(tmp_path / "run")  # logged every 5 steps and at the last
    assert sorted(losses) == [5, 6] and losses[6] < losses[5]
    assert summary["final_eval_loss"] is not None  # evaluated at the last step
    assert not (tmp_path / "run" / "best_adapter").exists()  # a full fine-tune has no adapter to keep apart


def checkpoint_arrays(step_dir: Path) -> dict[tuple, tuple]:
    """``{path: (shape, dtype)}`` of every array orbax wrote under ``step_dir/state`` (from its metadata)."""
    import jax
    import orbax.checkpoint as ocp

    metadata = ocp.StandardCheckpointer().metadata(step_dir / "state")
    tree = getattr(metadata, "item_metadata", metadata)
    leaves = jax.tree_util.tree_flatten_with_path(dict(tree), is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))[0]
    return {tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path): (tuple(leaf.shape), np.dtype(leaf.dtype))
            for path, leaf in leaves}


def split_model(model):
    """``(trainable, rng state, frozen)`` states of a PeftModel."""
    from flax import nnx

    _, trainable, rest = nnx.split(model, nnx.LoRAParam, ...)
    rng, frozen = nnx.split_state(rest, nnx.RngState, ...)
    return trainable, rng, frozen


def test_checkpoints_hold_what_trains_and_resume_refuses_another_base(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """A QLoRA run's checkpoint holds the LoRA weights, their AdamW moments, the dropout RNG and a base
    fingerprint: no frozen weight (neither the 4-bit projections nor the float32 embedding and norms) is
    written, handed to save/restore, or read back; the AdamW moments, kept in pinned_host memory, are
    restored there; a resume against a changed base raises naming both."""
    import shutil

    import jax
    from safetensors.numpy import load_file, save_file

    from jaxlora.train import trainer
    from jaxlora.train.checkpointing import TrainCheckpointer
    from jaxlora.train.fingerprint import BaseModelMismatchError, base_fingerprint, load_settings

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    nf4 = {"quantize": "nf4", "double_quant": True, "blocksize": 64}

    def config_for(max_steps, **model):
        return make_config(base, tmp_path, model={**nf4, **model}, lora={"lora_dropout": 0.1},
                           optim={"offload_optimizer_state": True}, max_steps=max_steps, save_every=1, eval_every=100)

    handed, restored = [], []  # every leaf given to the checkpointer; what restore returned
    for name in ("save", "restore"):
        original = getattr(TrainCheckpointer, name)

        def spy(self, step, tree, *rest, _original=original):
            handed.extend(jax.tree.leaves(tree))
            out = _original(self, step, tree, *rest)
            restored.append(out)
            return out

        monkeypatch.setattr(TrainCheckpointer, name, spy)

    config = config_for(2)
    prepared = trainer.setup(config)
    trainable, rng, frozen = split_model(prepared[0])
    frozen_leaves = jax.tree.leaves(frozen)
    frozen_bytes = sum(x.nbytes for x in frozen_leaves)
    trainable_bytes = sum(x.nbytes for x in jax.tree.leaves(trainable))
    assert any(x.dtype == np.uint8 for x in frozen_leaves)  # the 4-bit weights are among them
    assert jax.tree.leaves(rng)  # dropout: its RNG state is checkpointed
    trainer.train(config, prepared)
    assert handed and not any(leaf is frozen_leaf for leaf in handed for frozen_leaf in frozen_leaves)

    step_dir = tmp_path / "run" / "checkpoints" / "2"
    arrays = checkpoint_arrays(step_dir)
    assert {path[0] for path in arrays} == {"trainable", "opt_state", "rng"}
    lora_paths = {path[1:] for path in arrays if path[0] == "trainable"}
    assert lora_paths and all({"lora_A", "lora_B"} & set(path) for path in lora_paths)
    assert len(lora_paths) == len(jax.tree.leaves(trainable))
    array_bytes = sum(int(np.prod(shape)) * dtype.itemsize for shape, dtype in arrays.values())
    # the LoRA weights and two AdamW moments, plus a few scalars (step counts) and the dropout RNG keys/counters
    assert 3 * trainable_bytes <= array_bytes <= 3 * trainable_bytes + 64 * len(jax.tree.leaves(rng)) + 1024
    disk = sum(p.stat().st_size for p in step_dir.rglob("*") if p.is_file())
    assert disk < frozen_bytes / 4, (disk, frozen_bytes)
    meta = TrainCheckpointer(tmp_path / "run" / "checkpoints").read_meta(2)
    assert {k: meta[k] for k in ("step", "epoch", "start_step", "steps_per_epoch", "rows_per_step", "train_rows",
                                 "data_seed")} == {"step": 2, "epoch": 0, "start_step": 2, "steps_per_epoch": 3,
                                                   "rows_per_step": 8, "train_rows": 20, "data_seed": 0}
    assert meta["base"] == json.loads(json.dumps(base_fingerprint(base, load_settings("float32", "nf4", True, 64))))

    # Resuming reloads the base and restores only what trains (no frozen leaf is handed to restore).
    handed.clear()
    config = config_for(4)
    prepared = trainer.setup(config)
    frozen_leaves = jax.tree.leaves(split_model(prepared[0])[2])
    assert trainer.train(config, prepared)["steps"] == 4
    assert "resuming from step 2" in capsys.readouterr().err
    assert handed and not any(leaf is frozen_leaf for leaf in handed for frozen_leaf in frozen_leaves)
    (state, meta), = [out for out in restored if out is not None]
    assert meta["step"] == 2 and {leaf.sharding.memory_kind for leaf in jax.tree.leaves(state["opt_state"])} == {"pinned_host"}

    # Other training data: step 4 would start elsewhere in it.
    config = config_for(6)
    write_data(tmp_path / "train.jsonl", n=40)
    with pytest.raises(TrainingError, match=r"recorded data position .*'train_rows': 20.* at .*'train_rows': 36"):
        trainer.train(config)
    write_data(tmp_path / "train.jsonl")
    # Another load setting: the frozen weights would differ.
    with pytest.raises(BaseModelMismatchError, match=r'load\.quantize: recorded "nf4", now null') as caught:
        trainer.train(config_for(6, quantize=None))
    assert caught.value.recorded["load"]["quantize"] == "nf4" and caught.value.current["load"]["quantize"] is None
    assert str(step_dir.parent / "4") in str(caught.value)
    # A tensor rewritten in place: same names, shapes and dtypes, other values.
    weights = load_file(str(base / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"] + 1.0
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(BaseModelMismatchError) as caught:
        trainer.train(config_for(6))
    message = str(caught.value)
    assert f"trained on the base model at {base}, but the base model at {base} differs" in message
    assert "files[model.safetensors].tensors.model.norm.weight: recorded" in message
    assert TrainCheckpointer(tmp_path / "run" / "checkpoints").latest_step() == 4


def test_a_checkpoint_without_a_base_fingerprint_is_refused(tiny_model_dir, tmp_path):
    """A checkpoint of an earlier jaxlora (the whole model, no fingerprint) cannot be checked: refused, untouched."""
    from jaxlora.train.checkpointing import TrainCheckpointer

    config = make_config(tiny_model_dir, tmp_path, max_steps=2)
    old = TrainCheckpointer(tmp_path / "run" / "checkpoints")
    old.save(1, {"trainable": {"w": np.zeros(3, np.float32)}, "rest": {"w": np.ones(3, np.float32)}}, {"step": 1})
    old.close()
    with pytest.raises(TrainingError, match=r"checkpoints/1: no base model fingerprint .* start a new run.output_dir"):
        train(config)
    assert TrainCheckpointer(tmp_path / "run" / "checkpoints").all_steps() == [1]


def test_a_run_shorter_than_an_epoch_evaluates_at_its_end_on_the_whole_eval_file(tiny_model_dir, tmp_path, capsys):
    """eval_file: the whole file is the eval set and train_file is not split; the run (2 steps of a
    3-step epoch, eval once per epoch) still evaluates at its last step and writes best_adapter/."""
    write_data(tmp_path / "eval.jsonl", n=6)
    data = {"train_file": str(tmp_path / "train.jsonl"), "eval_file": str(tmp_path / "eval.jsonl"), "max_seq_length": 64}
    summary = train(make_config(tiny_model_dir, tmp_path, data=data, max_steps=2, eval_every=0, save_every=100))
    run = tmp_path / "run"
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "eval_loss" in line]
    assert [row["step"] for row in evals] == [2]
    assert summary["best_eval_loss"] == summary["final_eval_loss"] == evals[0]["eval_loss"]
    assert (run / "best_adapter" / "adapter_model.safetensors").exists()
    assert summary["data"]["train_file"]["records"] == 24 and summary["data"]["train_file"]["held_out"] == 0
    assert summary["data"]["train_file"]["examples"] == {"train": 24}
    assert summary["data"]["eval_file"]["path"] == str(tmp_path / "eval.jsonl")
    assert summary["data"]["eval_file"]["examples"] == {"eval": 6} and summary["data"]["eval_rows"] == 6
    err = capsys.readouterr().err
    assert f"training data: 24 records -> 24 train examples in 24 rows; {tmp_path / 'train.jsonl'}" in err
    assert f"eval data: 6 records -> 6 eval examples in 6 rows; {tmp_path / 'eval.jsonl'}" in err


@pytest.mark.parametrize("failure", ["nan_loss", "bad_batch", "keyboard_interrupt"])
def test_a_failed_run_leaves_the_model_usable_with_the_last_good_adapter(tiny_model_dir, tmp_path, monkeypatch, failure):
    """train() donates the trainable arrays to the jitted step; whatever stops it at step 4 (a NaN loss,
    an exception from a bad batch, KeyboardInterrupt), the model it was handed holds live arrays with the
    values the last good step returned, and runs."""
    import jax
    import jax.numpy as jnp

    from jaxlora.models.scan import LayerStacking
    from jaxlora.train import trainer

    config = make_config(tiny_model_dir, tmp_path, max_steps=6, save_every=100, eval_every=100)
    prepared = trainer.setup(config)
    model = prepared[0]
    returned = []  # (loss, numpy copy of the trainable values) of every step

    real_make_train_step = trainer.make_train_step

    def spying_make_train_step(*args, **kwargs):
        step = real_make_train_step(*args, **kwargs)

        def call(trainable, rest, opt_state, micro):
            if failure == "nan_loss" and len(returned) == 3:  # NaN norms and embeddings: a NaN loss and gradients
                rest = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan) if jnp.issubdtype(x.dtype, jnp.floating) else x, rest)
            out = step(trainable, rest, opt_state, micro)
            stacking = LayerStacking.of(model)  # the trainer runs the layers stacked (jaxlora.models.scan)
            values = out[0] if stacking is None else stacking.per_layer(out[0])
            returned.append((float(out[3]["loss"]), jax.tree.map(np.array, values)))
            return out

        return call

    real_batches = trainer.batches
    served = []

    def failing_batches(*args, **kwargs):
        for batch in real_batches(*args, **kwargs):
            if len(served) == 3 and failure == "bad_batch":
                batch = {k: v for k, v in batch.items() if k != "labels"}
            if len(served) == 3 and failure == "keyboard_interrupt":
                raise KeyboardInterrupt
            served.append(1)
            yield batch

    monkeypatch.setattr(trainer, "make_train_step", spying_make_train_step)
    monkeypatch.setattr(trainer, "batches", failing_batches)
    expected = {"nan_loss": (TrainingError, "loss is nan"), "bad_batch": (KeyError, "labels"),
                "keyboard_interrupt": (KeyboardInterrupt, None)}[failure]
    with pytest.raises(expected[0], match=expected[1]):
        trainer.train(config, prepared)

    assert len(returned) == (4 if failure == "nan_loss" else 3)
    assert all(np.isfinite(loss) for loss, _ in returned[:3])
    last_good = returned[2][1]
    if failure == "nan_loss":  # the NaN step changed nothing: it returned the last good values again
        assert np.isnan(returned[3][0])
        jax.tree.map(np.testing.assert_array_equal, returned[3][1], last_good)
    trainable = split_model(model)[0]
    leaves = jax.tree.leaves(trainable)
    assert not any(x.is_deleted() for x in leaves)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, trainable), last_good)
    assert any(np.abs(x).max() > 0 for path, x in jax.tree_util.tree_flatten_with_path(last_good)[0]
               if "lora_B" in jax.tree_util.keystr(path))  # trained values (lora_B starts at zero)
    ids = jnp.asarray(np.arange(1, 17, dtype=np.int32)[None, :])
    logits = model(ids, jnp.ones_like(ids))
    assert logits.shape == (1, 16, 49152) and bool(jnp.all(jnp.isfinite(logits)))


def test_skip_nonfinite_updates_changes_nothing_on_a_nonfinite_gradient():
    import jax
    import jax.numpy as jnp
    import optax

    from jaxlora.train.trainer import skip_nonfinite_updates

    inner = optax.adamw(0.1, weight_decay=0.01)
    guarded = skip_nonfinite_updates(inner)
    params = {"a": jnp.array([1.0, -2.0, 3.0]), "b": jnp.array([[0.5]])}
    state, reference_state = guarded.init(params), inner.init(params)
    grads = {"a": jnp.array([0.1, 0.2, -0.3]), "b": jnp.array([[1.0]])}
    updates, state = jax.jit(guarded.update)(grads, state, params)
    expected_updates, reference_state = jax.jit(inner.update)(grads, reference_state, params)
    jax.tree.map(np.testing.assert_array_equal, (updates, state), (expected_updates, reference_state))  # bit for bit
    for bad in (jnp.nan, jnp.inf, -jnp.inf):
        poisoned = {"a": grads["a"].at[1].set(bad), "b": grads["b"]}
        skipped, kept = jax.jit(guarded.update)(poisoned, state, params)
        jax.tree.map(np.testing.assert_array_equal, kept, state)
        assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(skipped))
