"""The measured stages of experiments/big_model.py after the checkpoint is written, each run in its own
process by ``big_model.py --stage NAME`` (run that script; this module holds what one child process
measures): the NF4 load, QLoRA training with the trainer's step, generation, the streamed merged
export (jaxlora), the same fine-tune with transformers + bitsandbytes + PEFT, and `jaxlora memory`."""

from __future__ import annotations

import subprocess
import sys
import time

from big_model import (ROOT, SEED, TARGETS, adapter_dir, cache_dir, child_env, disk_bytes, hwm_gib, llama_config,
                       reset_peak, rss_gib, work_dir)

def load_nf4(opts):
    """The checkpoint as a QLoRA base: bf16 dense parts, NF4 + double quantization projections."""
    from torch_bridge import load_llama

    return load_llama(cache_dir(opts.shape), dtype="bfloat16", quantize="nf4", compute_dtype=opts.compute)


def storage_bytes(model) -> dict:
    """Bytes of the loaded arrays: 4-bit projections (codes + constants) and the dense rest."""
    import jax
    from flax import nnx

    from jaxlora.nn.linear4bit import QuantizedWeight

    quantized = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, QuantizedWeight)))
    dense = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    return {"quantized_bytes": int(quantized), "dense_bytes": int(dense)}


def stage_load(opts) -> dict:
    start = time.perf_counter()
    model = load_nf4(opts)
    return {"load_s": time.perf_counter() - start, **storage_bytes(model), "rss_after_gib": rss_gib()}


def lora_config(rank: int):
    from jaxlora.peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=TARGETS)


def random_batch(opts, vocab: int):
    """One micro-batch ``[accumulation=1, batch=1, seq]`` of seeded random tokens (same ids as the peft stage)."""
    import numpy as np

    ids = np.random.default_rng(SEED).integers(0, vocab, (1, 1, opts.seq), dtype=np.int32)
    return {"input_ids": ids, "labels": ids}


def stage_train(opts) -> dict:
    import jax
    import numpy as np
    from flax import nnx

    from jaxlora.peft import get_peft_model
    from jaxlora.train.optim import OptimizerConfig, make_optimizer
    from jaxlora.train.step import make_train_step, split_trainable
    from jaxlora.train.trainer import skip_nonfinite_updates
    from torch_bridge import save_peft_adapter

    t0 = time.perf_counter()
    model = load_nf4(opts)
    load_s, rss_loaded, peak_load = time.perf_counter() - t0, rss_gib(), hwm_gib()
    model.gradient_checkpointing = True
    peft_model = get_peft_model(model, lora_config(opts.rank), rngs=nnx.Rngs(params=SEED, dropout=SEED + 1))
    graphdef, trainable, rest = split_trainable(peft_model, nnx.LoRAParam)
    trainable_params = sum(int(x.size) for x in jax.tree.leaves(trainable))
    # As jaxlora.train.trainer.train builds it: skip_nonfinite_updates(make_optimizer(config.optim, total)).
    tx = skip_nonfinite_updates(make_optimizer(OptimizerConfig(learning_rate=2e-4, lr_scheduler_type="constant"),
                                               opts.steps))
    opt_state = tx.init(trainable)
    step = make_train_step(graphdef, tx, wrt=nnx.LoRAParam)
    batch = {k: jax.numpy.asarray(v) for k, v in random_batch(opts, model.config.vocab_size).items()}

    compile_events = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **kw: compile_events.append(secs) if event.startswith("/jax/core/compile/") else None)
    times, losses, grad_norms, peaks = [], [], [], []
    peak_setup = hwm_gib()  # load, LoRA injection, optimizer state
    for _ in range(opts.steps):
        reset_peak()
        start = time.perf_counter()
        # The first call traces, lowers and compiles (the trainer's path: _TrainStep), then runs.
        trainable, rest, opt_state, metrics = step(trainable, rest, opt_state, batch)
        losses.append(float(metrics["loss"]))
        grad_norms.append(float(metrics["grad_norm"]))
        times.append(time.perf_counter() - start)
        peaks.append(hwm_gib())
        print(f"step {len(times)}: {times[-1]:.1f} s loss {losses[-1]:.4f} peak RSS in the step {peaks[-1]:.2f} GiB",
              file=sys.stderr, flush=True)
    compile_s = sum(compile_events)
    rss_after = rss_gib()
    temp_bytes = None
    if opts.memory_analysis:  # one more compilation: after the measured steps
        temp_bytes = int(step.lower(trainable, rest, opt_state, batch).compile().memory_analysis().temp_size_in_bytes)
    nnx.update(peft_model, trainable)
    t1 = time.perf_counter()
    save_peft_adapter(peft_model, adapter_dir(opts), base_model_name_or_path=str(cache_dir(opts.shape)))
    adapter_s = time.perf_counter() - t1
    return {"load_s": load_s, "rss_loaded_gib": rss_loaded, "peak_load_gib": peak_load, "peak_setup_gib": peak_setup,
            "peak_gib": max(peak_setup, *peaks), "compile_s": compile_s,
            "first_step_s": times[0], "step_s": times[1:], "peak_step_gib": peaks, "rss_after_steps_gib": rss_after,
            "xla_temp_bytes": temp_bytes, "loss": losses, "grad_norm": grad_norms,
            "loss_finite": bool(np.all(np.isfinite(losses))), "trainable": trainable_params, "adapter_save_s": adapter_s,
            "adapter_bytes": disk_bytes(adapter_dir(opts)), **storage_bytes(model)}


def stage_generate(opts) -> dict:
    import numpy as np

    from jaxlora.generate import GenerationConfig, Generator
    from torch_bridge import load_peft_adapter

    t0 = time.perf_counter()
    model = load_peft_adapter(load_nf4(opts), adapter_dir(opts))
    load_s = time.perf_counter() - t0
    prompt = np.random.default_rng(SEED + 1).integers(3, model.base_model.config.vocab_size, 16).tolist()
    generator = Generator(model)
    t0 = time.perf_counter()
    tokens = generator([prompt], GenerationConfig(max_new_tokens=16))[0]
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = generator([prompt], GenerationConfig(max_new_tokens=16))[0]
    return {"load_s": load_s, "first_call_s": first_s, "second_call_s": time.perf_counter() - t0, "tokens": tokens,
            "deterministic": tokens == again}


def stage_export(opts) -> dict:
    from torch_bridge.merged_checkpoint import write_merged_checkpoint

    out = work_dir(opts) / f"merged-r{opts.rank}-{opts.compute}"
    t0 = time.perf_counter()
    write_merged_checkpoint(cache_dir(opts.shape), adapter_dir(opts), out, dtype="bfloat16",
                            max_shard_size=opts.max_shard_size, overwrite=True)
    result = {"export_s": time.perf_counter() - t0, "merged_bytes": disk_bytes(out),
              "shards": len(list(out.glob("*.safetensors")))}
    if not opts.keep_merged:
        import shutil

        shutil.rmtree(out)
    return result


# ---------------------------------------------------------------- peft: transformers + bitsandbytes + PEFT


def stage_peft(opts) -> dict:
    import numpy as np
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    torch.manual_seed(SEED)
    compute = getattr(torch, opts.compute)
    quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute)
    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(cache_dir(opts.shape), dtype=torch.bfloat16,
                                                              quantization_config=quantization, device_map="cpu")
    load_s, rss_loaded = time.perf_counter() - t0, rss_gib()
    linear4bit = sum(type(m).__name__ == "Linear4bit" for m in model.modules())
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    rss_prepared = rss_gib()
    model = get_peft_model(model, LoraConfig(r=opts.rank, lora_alpha=2 * opts.rank, lora_dropout=0.0,
                                             target_modules=TARGETS, task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
    ids = torch.from_numpy(random_batch(opts, model.config.vocab_size)["input_ids"][0].astype(np.int64))
    times, losses, hwm = [], [], []
    peak_setup = hwm_gib()  # loading (quantization while loading), k-bit preparation, LoRA injection
    for _ in range(opts.steps):
        reset_peak()
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        times.append(time.perf_counter() - start)
        hwm.append(hwm_gib())
        print(f"step {len(times)}: {times[-1]:.1f} s loss {losses[-1]:.4f} peak RSS in the step {hwm[-1]:.2f} GiB",
              file=sys.stderr, flush=True)
    return {"load_s": load_s, "rss_loaded_gib": rss_loaded, "rss_prepared_gib": rss_prepared, "linear4bit": linear4bit,
            "peak_setup_gib": peak_setup, "peak_gib": max(peak_setup, *hwm), "first_step_s": times[0],
            "step_s": times[1:], "loss": losses, "loss_finite": bool(np.all(np.isfinite(losses))),
            "peak_step_gib": hwm, "trainable": sum(p.numel() for p in params),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "bitsandbytes": __import__("bitsandbytes").__version__,
            "peft": __import__("peft").__version__}


def stage_memory(opts) -> dict:
    """`jaxlora memory` as a user runs it, for the train stage's setting, on CPU."""
    argv = [sys.executable, "-c", "import sys; from jaxlora.cli import main; sys.exit(main())", "memory", "--model", str(cache_dir(opts.shape)),
            "--method", "qlora", "--rank", str(opts.rank), "--targets", ",".join(TARGETS), "--batch", "1",
            "--seq", str(opts.seq), "--grad-ckpt", "--dtype", "bfloat16", "--compute-dtype", opts.compute,
            "--platform", "cpu"]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=child_env())
    from jaxlora.cli.memory import ModelShape, estimate_memory

    estimate = estimate_memory(ModelShape.from_config(llama_config(opts.shape)), method="qlora", rank=opts.rank,
                               targets=TARGETS, batch=1, seq=opts.seq, grad_ckpt=True, dtype="bfloat16",
                               compute_dtype=opts.compute, platform="cpu")
    return {"command": "jaxlora " + " ".join(argv[3:]), "exit": done.returncode, "stdout": done.stdout, "stderr": done.stderr[-2000:],
            "estimate_gib": {name: gib for name, gib in estimate.rows()}}
