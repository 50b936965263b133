"""A small resumable LoRA training run, for the kill-and-resume test.

    python tests/train/scripts/resumable_run.py RUN_DIR STEPS [--sleep-after STEP]

Trains a tiny random Llama with LoRA for STEPS steps on batches determined by (seed, step), saving a
checkpoint after every step and appending "step loss" lines (float hex, exact) to RUN_DIR/losses.txt.
If RUN_DIR has a checkpoint it resumes from the latest one. --sleep-after makes it stop and wait
after that step's checkpoint, so that a test can kill it there with SIGKILL.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxlora  # noqa: E402
from jaxlora.models import LlamaConfig, LlamaForCausalLM  # noqa: E402
from jaxlora.train.checkpointing import TrainCheckpointer  # noqa: E402
from jaxlora.train.optim import OptimizerConfig, make_optimizer  # noqa: E402
from jaxlora.train.step import make_train_step, split_trainable  # noqa: E402
from flax import nnx  # noqa: E402

CONFIG = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2)


def batch_for(seed: int, step: int):
    rng = np.random.default_rng([seed, step])
    ids = rng.integers(0, 97, size=(1, 4, 16))  # [accum=1, batch, seq]
    return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.ones_like(ids), "labels": jnp.asarray(ids)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("steps", type=int)
    parser.add_argument("--sleep-after", type=int, default=None)
    args = parser.parse_args()
    args.run_dir.mkdir(parents=True, exist_ok=True)

    model = LlamaForCausalLM(CONFIG, rngs=nnx.Rngs(0))
    peft_model = jaxlora.get_peft_model(model, jaxlora.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                                                  target_modules="all-linear"), rngs=nnx.Rngs(params=1, dropout=2))
    peft_model.train()  # dropout on: its RNG state must be checkpointed too
    tx = make_optimizer(OptimizerConfig(learning_rate=1e-2, lr_scheduler_type="cosine", warmup_steps=2), args.steps)
    graphdef, trainable, rest = split_trainable(peft_model)
    opt_state = tx.init(trainable)
    step_fn = make_train_step(graphdef, tx)
    checkpointer = TrainCheckpointer(args.run_dir / "checkpoints", keep=2)
    start = 0
    if checkpointer.latest_step() is not None:
        state, meta = checkpointer.restore(None, {"trainable": trainable, "opt_state": opt_state, "rest": rest})
        trainable, opt_state, rest = state["trainable"], state["opt_state"], state["rest"]
        start = meta["step"]
    with open(args.run_dir / "losses.txt", "a") as log:
        for step in range(start, args.steps):
            trainable, rest, opt_state, metrics = step_fn(trainable, rest, opt_state, batch_for(7, step))
            checkpointer.save(step + 1, {"trainable": trainable, "opt_state": opt_state, "rest": rest}, {"step": step + 1})
            log.write(f"{step + 1} {float(metrics['loss']).hex()}\n")
            log.flush()
            os.fsync(log.fileno())
            if args.sleep_after == step + 1:
                print("READY", flush=True)
                time.sleep(600)
    checkpointer.close()


if __name__ == "__main__":
    main()
