"""The training recipe: ``train(config)`` = setup, the loop, checkpoints, the adapter at the end.

    jaxlora.train.trainer.train(load_config("run.toml"))

One step: a jitted `make_train_step` on ``[accumulation, batch, seq]`` micro-batches (token-sum loss,
gradients of the trainable parameters only, AdamW). Around it:

- progress on stderr (step, loss, tokens/s, ETA) and metrics as JSON lines in ``metrics.jsonl``;
- evaluation every ``run.eval_every`` steps (or each epoch): eval loss and perplexity; the adapter
  with the best eval loss is kept apart in ``best_adapter/`` (like load_best_model_at_end);
- evaluation at the last step too (a run shorter than an epoch still gets its eval loss and best_adapter/);
- orbax checkpoints every ``run.save_every`` steps holding what trains, not the model: trainable
  parameters, optimizer state, dropout RNG state, step and data position (a function of (seed, step),
  recorded too), best eval loss, and a fingerprint of the base model (`jaxlora.train.fingerprint`).
  An existing run directory resumes from its latest checkpoint: the base is loaded again from
  ``model.path`` and must match the fingerprint (`BaseModelMismatchError` otherwise), the data must
  put the step at the recorded position (`TrainingError` otherwise), and a resumed run reproduces an
  uninterrupted one bit for bit;
- SIGINT finishes the current step, saves a checkpoint and returns; a NaN/Inf loss or gradient stops
  the run with `TrainingError` before anything is saved, so the last good checkpoint stays the latest;
- however the loop ends (an error, KeyboardInterrupt), the model it was given holds the last good
  trainable values (the donated step inputs are never left behind in it);
- at the end: the PEFT adapter in ``adapter/`` (full fine-tuning: the HF checkpoint in ``model/``),
  ``summary.json`` and ``loss.png``.

With ``model.scan_layers`` (the default) identical decoder layers run as one scanned body: the model is
converted in place to its stacked form for the run, without a second copy of its weights, and back
to per-layer form at the end however the run ends; checkpoints and best_adapter/ are written per
layer meanwhile, so files are the same as with the loop (`jaxlora.models.scan`).

Memory levers (see the configs): ``model.quantize`` (4-bit base weights, ~4.1 bits/param),
``model.gradient_checkpointing`` (recompute each layer: ~1 extra forward), ``optim.offload_optimizer_state``
(AdamW moments in host memory: 8 bytes/trainable param off the accelerator, two copies per step),
``run.batch_size`` x ``run.gradient_accumulation_steps`` (same effective batch, smaller activations).

File formats (HF checkpoints, PEFT adapters) come from ``torch_bridge``'s torch-free modules.
"""

from __future__ import annotations

import json
import math
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxlora.atomic import atomic_write_json
from jaxlora.data.sft import SFTTokenizer, batches, load_eval_data, load_sft_data, steps_per_epoch
from jaxlora.models.scan import LayerStacking, per_layer_view, stack_layers, unstack_layers
from jaxlora.parallel import (is_main_process, make_mesh, place_batch, place_optimizer_state, shard_model, start_processes,
                              step_shardings)
from jaxlora.parallel.placement import check_batch_split
from jaxlora.peft import get_peft_model
from jaxlora.train.checkpointing import TrainCheckpointer
from jaxlora.train.config import TrainConfig
from jaxlora.train.fingerprint import BaseModelMismatchError, base_fingerprint, check_fingerprint, load_settings
from jaxlora.train.optim import learning_rate_schedule, make_optimizer, to_memory
from jaxlora.train.step import evaluate_loss, make_eval_step, make_train_step


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. a non-finite loss); the last good checkpoint is left intact."""


class ModelPathError(ValueError):
    """A model path that is not a Hugging Face model directory (it has no config.json)."""


def resolve_model_path(path: str) -> Path:
    """The HF model directory `path`, or for "smollm2" the cached SmolLM2-135M-Instruct checkpoint.

    A missing cache is filled by ``python -m torch_bridge.smollm2`` in a child process: the conversion
    needs transformers and torch, which this process never imports. Raises `ModelPathError` if the
    directory has no config.json, `TrainingError` if the SmolLM2 fetch fails.
    """
    if path == "smollm2":
        target = _smollm2_path()
    else:
        target = Path(path)
    if not (target / "config.json").is_file():
        raise ModelPathError(f"{path}: not a Hugging Face model directory (no config.json in {target})")
    return target


def _smollm2_path() -> Path:
    from torch_bridge.smollm2 import MODEL_DIRNAME, default_cache_dir, is_complete

    target = default_cache_dir() / MODEL_DIRNAME
    if not is_complete(target):
        print(f"fetching SmolLM2-135M-Instruct into {target} (once)", file=sys.stderr)
        done = subprocess.run([sys.executable, "-m", "torch_bridge.smollm2"], stdout=subprocess.PIPE, text=True)
        if done.returncode != 0 or not is_complete(target):
            raise TrainingError(f"could not fetch SmolLM2-135M-Instruct (python -m torch_bridge.smollm2 exited with "
                                f"{done.returncode}; it needs the torch extra: pip install -e '.[torch]')")
    return target


def setup(config: TrainConfig):
    """Model (with adapters), tokenizer and datasets."""
    from torch_bridge import load_llama

    model_dir = resolve_model_path(config.model.path)
    tokenizer = SFTTokenizer(model_dir)
    # With an eval_file, train_file is not split (DataSection refuses eval_fraction / eval_size beside it).
    train_data, eval_data, report = load_sft_data(config.data.train_file, tokenizer, config.data.pipeline())
    print(f"training data: {report}", file=sys.stderr)
    if config.data.eval_file:
        eval_data, eval_report = load_eval_data(config.data.eval_file, tokenizer, config.data.pipeline())
        print(f"eval data: {eval_report}", file=sys.stderr)
    elif eval_data is not None:
        print(f"eval data: the {report.held_out} records held out of {report.path}", file=sys.stderr)
    model = load_llama(model_dir, dtype=config.model.dtype, quantize=config.model.quantize,
                       double_quant=config.model.double_quant, blocksize=config.model.blocksize,
                       compute_dtype=config.model.compute_dtype)
    model.gradient_checkpointing = config.model.gradient_checkpointing
    if config.run.full_finetune:
        return model, nnx.Param, train_data, eval_data, model_dir
    peft_model = get_peft_model(model, config.lora, rngs=nnx.Rngs(params=config.run.seed, dropout=config.run.seed + 1))
    return peft_model, nnx.LoRAParam, train_data, eval_data, model_dir


def _write_json(path: Path, data) -> None:
    atomic_write_json(path, data, indent=2, default=str)


def _plot(metrics_path: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean token cross-entropy)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def skip_nonfinite_updates(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """``inner``, except that a step whose gradients are not all finite changes nothing.

    Such a step returns zero updates and the optimizer state it was given, so the parameters it
    returns are its inputs. The jitted step donates those inputs; the trainer stops at a non-finite
    step, and this is what lets it hand back the last good values without keeping a copy of them.
    One ``lax.cond`` around the whole update: a per-leaf select between the new and the old state
    (hundreds of leaves) made XLA's CPU compilation of the SmolLM2 step 5x slower (46 s -> 257 s).
    A finite step's results are ``inner``'s values unchanged.
    """

    def update(grads, state, params=None):
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))

        def skip(grads, state, params):
            return jax.tree.map(jnp.zeros_like, grads), state

        return jax.lax.cond(finite, inner.update, skip, grads, state, params)

    return optax.GradientTransformation(inner.init, update)


def data_position(step: int, steps_per_epoch: int, rows_per_step: int, train_rows: int, seed: int) -> dict[str, int]:
    """Where in the data step ``step`` starts: ``batches(rows, rows_per_step, seed=seed, epoch=epoch,
    start_step=start_step)``, with what that depends on (the row order is a function of seed and epoch)."""
    return {"epoch": step // steps_per_epoch, "start_step": step % steps_per_epoch, "steps_per_epoch": steps_per_epoch,
            "rows_per_step": rows_per_step, "train_rows": train_rows, "data_seed": seed}


def _restore(checkpointer: TrainCheckpointer, like: dict, fingerprint: dict, position_of) -> tuple[dict, dict]:
    """The latest checkpoint's state and meta, after checking its base fingerprint and data position."""
    step = checkpointer.latest_step()
    where = str(checkpointer.directory / str(step))
    meta = checkpointer.read_meta(step)
    if "base" not in meta:
        raise TrainingError(f"{where}: no base model fingerprint (a checkpoint of an earlier jaxlora, which held the "
                            f"whole model); it cannot be resumed: start a new run.output_dir")
    check_fingerprint(meta["base"], fingerprint, checkpoint=where)
    position = position_of(step)
    recorded = {key: meta.get(key) for key in position}
    if recorded != position:
        raise TrainingError(f"{where}: recorded data position {recorded}, but with the current training data and batch "
                            f"settings step {step} is at {position}: resuming would skip or repeat records. Use the "
                            f"data, data.seed and run.batch_size / gradient_accumulation_steps of the checkpoint, or "
                            f"start a new run.output_dir")
    return checkpointer.restore(step, like)


def _data_summary(train_data, eval_data) -> dict:
    """Where the records went (the datasets' `DataReport`s) and the rows of each set."""
    train_report = train_data.report
    eval_report = None if eval_data is None else eval_data.report
    return {"train_file": None if train_report is None else train_report.as_dict(),
            "eval_file": None if eval_report is None or eval_report is train_report else eval_report.as_dict(),
            "train_rows": len(train_data), "eval_rows": 0 if eval_data is None else len(eval_data)}


def train(config: TrainConfig, prepared: tuple | None = None) -> dict:
    """Run (or resume) the training described by ``config``; returns the run summary.

    `prepared` is what `setup(config)` returns, for a caller that already holds the model (it is
    trained in place: afterwards it carries the trained adapter; if training raises, the adapter
    values of the last good step).
    """
    from torch_bridge import save_peft_adapter

    start_processes(config.parallel)  # several processes: join the run before any device is touched
    mesh = training_mesh(config)
    main = is_main_process()
    run_dir = Path(config.run.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    model, wrt, train_data, eval_data, model_dir = prepared if prepared is not None else setup(config)
    if config.model.scan_layers:  # converted in place for the run, back before the files (module docstring)
        stack_layers(model)  # layers that LoRA made different stay a loop, with a warning saying why
    try:
        if mesh is not None:
            if main:
                print(f"mesh: {' x '.join(f'{k} {v}' for k, v in mesh.shape.items())} over {mesh.size} "
                      f"{mesh.devices.flat[0].platform} devices in {jax.process_count()} process(es)", file=sys.stderr)
            shard_model(model, mesh)  # in place: the model's arrays become the sharded ones
        run, started = _run(config, run_dir, model, wrt, train_data, eval_data, model_dir, mesh)
    finally:
        unstack_layers(model)

    if main:  # process 0 writes the files
        if wrt is not nnx.Param:
            save_peft_adapter(model, run_dir / "adapter", base_model_name_or_path=str(model_dir))
        else:  # full fine-tuning: the whole model, as an HF checkpoint
            from torch_bridge import save_llama

            save_llama(model, run_dir / "model", overwrite=True)
        _plot(run_dir / "metrics.jsonl", run_dir / "loss.png")
    summary = {
        "config": json.loads(json.dumps(config, default=lambda o: o.__dict__)),
        "data": _data_summary(train_data, eval_data), **run, "wall_seconds": time.time() - started,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if main:
        _write_json(run_dir / "summary.json", summary)
    return summary


def training_mesh(config: TrainConfig):
    """The device mesh of ``config.parallel`` over ``jax.devices()``, or None on one device (the arrays stay
    where they are). Raises `MeshConfigError` when the axis sizes do not fit the devices or the batch."""
    mesh = make_mesh(config.parallel)
    if mesh.size == 1:
        return None
    check_batch_split(config.run.batch_size, mesh, f"run.batch_size = {config.run.batch_size}")
    return mesh


def _run(config: TrainConfig, run_dir: Path, model, wrt, train_data, eval_data, model_dir, mesh=None) -> tuple[dict, float]:
    """The training loop of `train` on ``model`` (stacked or per layer): the summary's figures of the run
    and the time its clock started."""
    from torch_bridge import save_peft_adapter

    stacking = LayerStacking.of(model)  # None: per layer; else checkpoints and adapters convert at the boundary
    main = is_main_process()  # process 0 logs and writes the adapters
    per_layer = stacking.per_layer if stacking is not None else (lambda tree: tree)
    rows_per_step = config.run.batch_size * config.run.gradient_accumulation_steps
    per_epoch = steps_per_epoch(train_data, rows_per_step)
    total = config.run.max_steps if config.run.max_steps > 0 else math.ceil(config.run.num_epochs * per_epoch)
    tx = skip_nonfinite_updates(make_optimizer(config.optim, total))
    schedule = learning_rate_schedule(config.optim, total)

    def position_of(step):
        return data_position(step, per_epoch, rows_per_step, len(train_data), config.data.seed)

    model.eval()
    eval_graphdef = nnx.split(model, wrt, ...)[0]
    model.train()
    graphdef, trainable, rest = nnx.split(model, wrt, ...)
    opt_state = tx.init(trainable)
    if mesh is not None:  # the moments sharded like their parameters (ZeRO)
        opt_state = place_optimizer_state(tx, opt_state, trainable, mesh)
    if config.optim.offload_optimizer_state:
        opt_state = to_memory(opt_state, "pinned_host")
    step_fn = make_train_step(graphdef, tx, wrt=wrt, offload=config.optim.offload_optimizer_state,
                              out_shardings=None if mesh is None else step_shardings(trainable, rest, opt_state, mesh))
    eval_step = make_eval_step(eval_graphdef)
    model_config = config.model
    fingerprint = base_fingerprint(model_dir, load_settings(model_config.dtype, model_config.quantize,
                                                            model_config.double_quant, model_config.blocksize))
    checkpointer = TrainCheckpointer(run_dir / "checkpoints", keep=config.run.keep_checkpoints)

    start, best = 0, math.inf
    if checkpointer.latest_step() is not None:
        # Only what trains is in the checkpoint: the frozen weights in `rest` are the base loaded again
        # (its fingerprint checked), the dropout RNG state in it comes from the checkpoint.
        like = per_layer({"trainable": trainable, "opt_state": opt_state, "rng": nnx.split_state(rest, nnx.RngState, ...)[0]})
        state, meta = _restore(checkpointer, like, fingerprint, position_of)
        state = stacking.stacked(state) if stacking is not None else state
        trainable, opt_state, rest = state["trainable"], state["opt_state"], nnx.merge_state(rest, state["rng"])
        start, best = meta["step"], meta["best_eval_loss"] if meta["best_eval_loss"] is not None else math.inf
        print(f"resuming from step {start}", file=sys.stderr)

    interrupted = []
    previous_handler = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
    metrics_path = run_dir / "metrics.jsonl"
    t0, tokens_seen, last_loss, eval_loss = time.time(), 0.0, math.nan, None

    def save(step):
        state = per_layer({"trainable": trainable, "opt_state": opt_state, "rng": nnx.split_state(rest, nnx.RngState, ...)[0]})
        meta = {"step": step, **position_of(step), "best_eval_loss": None if math.isinf(best) else best,
                "base": fingerprint}
        checkpointer.save(step, state, meta)

    def run_eval(step):
        nonlocal best, eval_loss
        if eval_data is None:
            return
        result = evaluate_loss(eval_step, trainable, rest,
                               batches(eval_data, config.run.batch_size, seed=0, epoch=0, shuffle=False))
        eval_loss = result["eval_loss"]
        log.write(json.dumps({"step": step, **result}) + "\n")
        if eval_loss < best:
            best = eval_loss
            if wrt is not nnx.Param:
                nnx.update(model, trainable)
                # Every process slices (over several processes that is a computation on all their devices).
                adapter_model = per_layer_view(model, wrt) if stacking is not None else model
                if main:
                    save_peft_adapter(adapter_model, run_dir / "best_adapter", base_model_name_or_path=str(model_dir))

    try:
        with open(metrics_path if main else os.devnull, "a") as log:  # process 0 logs
            iterator, epoch = None, None
            for step in range(start, total):
                if epoch != step // per_epoch or iterator is None:
                    epoch = step // per_epoch
                    iterator = batches(train_data, rows_per_step, seed=config.data.seed, epoch=epoch, start_step=step % per_epoch)
                batch = next(iterator)
                micro = {k: v.reshape(config.run.gradient_accumulation_steps, config.run.batch_size, -1) for k, v in batch.items()}
                micro = micro if mesh is None else place_batch(micro, mesh)
                trainable, rest, opt_state, metrics = step_fn(trainable, rest, opt_state, micro)
                last_loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
                if not (math.isfinite(last_loss) and math.isfinite(grad_norm)):
                    raise TrainingError(f"loss is {last_loss} (gradient norm {grad_norm}) at step {step + 1}; stopping "
                                        f"(a step with non-finite gradients changes nothing). The latest checkpoint "
                                        f"(step {checkpointer.latest_step()}) in {checkpointer.directory} is intact.")
                tokens_seen += float(metrics["tokens"])
                done = step + 1
                rate = tokens_seen / max(time.time() - t0, 1e-9)
                eta = (total - done) * (time.time() - t0) / max(done - start, 1)
                if main:
                    print(f"\rstep {done}/{total}  loss {last_loss:.4f}  {rate:,.0f} tok/s  ETA {eta:,.0f}s", end="", file=sys.stderr)
                if done % config.run.log_every == 0 or done == total:
                    log.write(json.dumps({"step": done, "epoch": epoch, "loss": last_loss, "grad_norm": grad_norm,
                                          "learning_rate": float(schedule(step)),
                                          "tokens_per_second": rate}) + "\n")
                    log.flush()
                epoch_end = done % per_epoch == 0
                eval_due = (done % config.run.eval_every == 0) if config.run.eval_every else epoch_end
                if eval_due or done == total:  # the last step always evaluates (a run shorter than eval_every too)
                    run_eval(done)
                if done % config.run.save_every == 0 or done == total or interrupted:
                    save(done)
                if interrupted:
                    print(f"\ninterrupted: checkpoint saved at step {done}", file=sys.stderr)
                    break
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        checkpointer.close()
        # The step donates `trainable` and `opt_state`: from the first step on, the model's own trainable
        # arrays are deleted and `trainable` holds the live values. However the loop ends (done, an error,
        # KeyboardInterrupt), those values go back into the model, so a caller's `prepared` model stays
        # usable. A non-finite step returns its inputs (`skip_nonfinite_updates`), so after a NaN stop
        # these are the last good values. Copying the model's arrays before the first step instead would
        # keep a second copy of every trainable parameter for the whole run (all weights with full
        # fine-tuning). Not covered: XLA failing while it executes a step whose inputs it already took.
        nnx.update(model, trainable, nnx.split_state(rest, nnx.RngState, ...)[0])
        # The model holds every value now; without these references (kept alive by a traceback too) the
        # conversion back to per-layer form frees each stacked array as it goes.
        trainable = rest = opt_state = None
    print(file=sys.stderr)
    return {"steps": checkpointer.latest_step(), "total_steps": total, "interrupted": bool(interrupted),
            "final_loss": last_loss, "final_eval_loss": eval_loss, "best_eval_loss": None if math.isinf(best) else best}, t0


__all__ = ["BaseModelMismatchError", "ModelPathError", "TrainingError", "data_position", "resolve_model_path",
           "skip_nonfinite_updates", "train", "training_mesh"]
