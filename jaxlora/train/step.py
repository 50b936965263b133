"""The jitted training step: causal-LM loss, gradients of the trainable parameters only, optional
gradient accumulation and host-offloaded optimizer state.

Loss (HF's convention): ``labels`` are the input ids with -100 where no loss is taken; position t
predicts label t+1; the loss is the sum of token cross-entropies divided by the number of counted
tokens over the *whole* accumulated batch (like transformers' Trainer with ``num_items_in_batch``), so
4 micro-batches of 1 give the same update as one batch of 4.

Parameters are split with ``nnx.split(model, wrt, ...)``: ``wrt`` (default ``nnx.LoRAParam``: LoRA
weights and modules_to_save) is what trains; everything else (frozen weights, quantized weights,
dropout RNG state) is passed through. Full fine-tuning uses ``wrt=nnx.Param``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxlora.train.data import IGNORE_INDEX
from jaxlora.train.optim import offloaded_update


def token_cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(sum of -log p(label), number of counted tokens)`` with HF's shift: logits[:, t] predicts labels[:, t+1].

    logits ``[b, s, vocab]`` (float32), labels ``[b, s]`` int with IGNORE_INDEX for positions without loss.
    """
    logits = logits[:, :-1].astype(jnp.float32)
    targets = labels[:, 1:]
    counted = targets != IGNORE_INDEX
    safe = jnp.where(counted, targets, 0)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(counted, log_z - picked, 0.0)), jnp.sum(counted).astype(jnp.float32)


def _forward_loss(model, batch):
    logits = model(batch["input_ids"], batch.get("attention_mask"),
                   position_ids=batch.get("position_ids"), segment_ids=batch.get("segment_ids"))
    return token_cross_entropy(logits, batch["labels"])


def make_train_step(graphdef, tx: optax.GradientTransformation, *, wrt=nnx.LoRAParam, offload: bool = False):
    """``step(trainable, rest, opt_state, micro_batches) -> (trainable, rest, opt_state, metrics)``.

    Args:
      graphdef: the model structure from `split_trainable` (closed over: it holds unhashable configs).
      tx: the optax transformation (`jaxlora.train.optim.make_optimizer`).
      wrt: the variable filter that was split off as ``trainable`` (`split_trainable`).
      offload: ``opt_state`` lives in host memory (`jaxlora.train.optim.to_memory`).

    ``micro_batches``: dict of arrays with a leading accumulation axis ``[accum, batch, seq]``. The
    gradient is the sum over micro-batches of d(token loss sum), divided by the total token count.
    ``metrics``: loss (mean token loss), tokens, grad_norm (before clipping). ``trainable`` and
    ``opt_state`` are donated: use the returned ones.
    """

    def step(trainable, rest, opt_state, micro_batches):
        def loss_sum(trainable, rest, batch):
            model = nnx.merge(graphdef, trainable, rest)
            total, count = _forward_loss(model, batch)
            _, _, new_rest = nnx.split(model, wrt, ...)  # dropout RNG counters advance
            return total, (count, new_rest)

        # ``rest`` is differentiated too (and its gradient dropped; XLA removes that computation): nnx only
        # lets the dropout RNG counters in ``rest`` advance when they are traced at this level.
        grad_fn = jax.value_and_grad(loss_sum, argnums=(0, 1), has_aux=True, allow_int=True)

        def accumulate(carry, batch):
            grads_sum, loss_total, tokens, rest = carry
            (total, (count, rest)), (grads, _) = grad_fn(trainable, rest, batch)
            return (jax.tree.map(jnp.add, grads_sum, grads), loss_total + total, tokens + count, rest), None

        zeros = jax.tree.map(jnp.zeros_like, trainable)
        (grads_sum, loss_total, tokens, rest), _ = jax.lax.scan(
            accumulate, (zeros, jnp.float32(0.0), jnp.float32(0.0), rest), micro_batches)
        denominator = jnp.maximum(tokens, 1.0)
        grads = jax.tree.map(lambda g: g / denominator, grads_sum)
        if offload:
            updates, opt_state = offloaded_update(tx, grads, opt_state, trainable)
        else:
            updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        metrics = {"loss": loss_total / denominator, "tokens": tokens, "grad_norm": optax.tree.norm(grads)}
        return trainable, rest, opt_state, metrics

    return jax.jit(step, donate_argnums=(0, 2))


def split_trainable(model: nnx.Module, wrt=nnx.LoRAParam):
    """``(graphdef, trainable, rest)`` for `make_train_step`: ``wrt`` variables, and everything else."""
    return nnx.split(model, wrt, ...)


def make_eval_step(graphdef):
    """``eval_step(trainable, rest, batch) -> (token loss sum, token count)``, jitted."""
    return jax.jit(lambda trainable, rest, batch: _forward_loss(nnx.merge(graphdef, trainable, rest), batch))


def evaluate_loss(eval_step, trainable, rest, batches) -> dict[str, float]:
    """Mean token loss and perplexity over ``batches`` (dicts of ``[batch, seq]`` arrays)."""
    total = tokens = 0.0
    for batch in batches:
        s, c = eval_step(trainable, rest, batch)
        total += float(s)
        tokens += float(c)
    loss = total / max(tokens, 1.0)
    return {"eval_loss": loss, "eval_perplexity": float(jnp.exp(loss)), "eval_tokens": tokens}
