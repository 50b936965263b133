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

import ctypes
import ctypes.util
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxlora.nn.matmul import dot
from jaxlora.data.sft import IGNORE_INDEX
from jaxlora.train.optim import offloaded_update


def shifted_targets(labels: jax.Array) -> jax.Array:
    """HF's shift: the target of position t is ``labels[:, t+1]``; the last position gets IGNORE_INDEX.

    Shifting the small int labels instead of slicing the logits keeps ``[b, s, vocab]`` arrays whole
    (slicing off the last position copied the float32 logits once more per step).
    """
    pad = jnp.full((labels.shape[0], 1), IGNORE_INDEX, labels.dtype)
    return jnp.concatenate([labels[:, 1:], pad], axis=1)


def token_cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(sum of -log p(label), number of counted tokens)`` with HF's shift: logits[:, t] predicts labels[:, t+1].

    logits ``[b, s, vocab]`` (float32), labels ``[b, s]`` int with IGNORE_INDEX for positions without loss.
    """
    targets = shifted_targets(labels)
    counted = targets != IGNORE_INDEX
    loss, _ = _token_losses(logits.astype(jnp.float32), jnp.where(counted, targets, 0), counted)
    return jnp.sum(loss), jnp.sum(counted).astype(jnp.float32)


def _token_losses(logits, safe_targets, counted):
    """Per-token ``-log p(target)`` (0 where not counted) and ``log Z``, for float32 logits ``[..., vocab]``."""
    log_z = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, safe_targets[..., None], axis=-1)[..., 0]
    return jnp.where(counted, log_z - picked, 0.0), log_z


LOSS_CHUNK_TOKENS = 256
"""Tokens per chunk of the output layer + cross-entropy (`chunked_cross_entropy`)."""


def _chunks(hidden, targets, chunk):
    """Flatten to tokens, pad to a multiple of ``chunk`` (padding is not counted), split into chunks."""
    n, dim = hidden.shape[0] * hidden.shape[1], hidden.shape[2]
    n_chunks = -(-n // chunk)
    pad = n_chunks * chunk - n
    h = jnp.pad(hidden.reshape(n, dim), ((0, pad), (0, 0))).reshape(n_chunks, chunk, dim)
    t = jnp.pad(targets.reshape(n), (0, pad), constant_values=IGNORE_INDEX).reshape(n_chunks, chunk)
    return h, t


def _loss_dtype(dtype) -> jnp.dtype:
    """float32 for 16- and 32-bit hidden states; float64 stays float64 (finite-difference checks)."""
    return jnp.promote_types(dtype, jnp.float32)


def _chunk_logits(h, weight):
    return dot(h, weight.astype(h.dtype), (-1, 1)).astype(_loss_dtype(h.dtype))


def _chunk_softmax_grad(h, weight, t):
    """d(sum of counted token losses)/d(logits) of one chunk: ``softmax - onehot`` on counted tokens."""
    counted = t != IGNORE_INDEX
    logits = _chunk_logits(h, weight)
    loss, log_z = _token_losses(logits, jnp.where(counted, t, 0), counted)
    probs = jnp.exp(logits - log_z[:, None])
    onehot = jnp.arange(logits.shape[-1], dtype=t.dtype)[None, :] == t[:, None]
    grad = jnp.where(counted[:, None], probs - onehot.astype(probs.dtype), 0.0)
    return jnp.sum(loss), grad.astype(h.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def chunked_cross_entropy(hidden: jax.Array, weight: jax.Array, targets: jax.Array, chunk: int = LOSS_CHUNK_TOKENS) -> jax.Array:
    """``sum over counted tokens of -log softmax(hidden W^T)[target]``, ``chunk`` tokens at a time.

    hidden ``[b, s, dim]`` (compute dtype), weight ``[vocab, dim]``, targets ``[b, s]`` int (already
    shifted; IGNORE_INDEX = not counted). Equals `token_cross_entropy` of the model's logits, but
    the float32 ``[b, s, vocab]`` logits never exist at once: only ``[chunk, vocab]`` at a time
    (SmolLM2, 4x256 tokens: 192 MiB of logits, and as much again for their gradient, become 24 MiB
    pieces). The gradient for ``hidden`` is computed during the forward pass, where each chunk's
    logits are at hand, so the logits are computed once as without chunking; the gradient for
    ``weight`` (full fine-tuning, or a trained lm_head) recomputes them in the backward pass, and
    when nothing asks for it XLA drops that work.
    """
    h, t = _chunks(hidden, targets, chunk)

    def body(total, xs):
        hc, tc = xs
        counted = tc != IGNORE_INDEX
        loss, _ = _token_losses(_chunk_logits(hc, weight), jnp.where(counted, tc, 0), counted)
        return total + jnp.sum(loss), None

    total, _ = jax.lax.scan(body, jnp.zeros((), _loss_dtype(hidden.dtype)), (h, t))
    return total


def _chunked_cross_entropy_fwd(hidden, weight, targets, chunk):
    h, t = _chunks(hidden, targets, chunk)

    def body(total, xs):
        hc, tc = xs
        loss, grad_logits = _chunk_softmax_grad(hc, weight, tc)
        return total + loss, dot(grad_logits, weight.astype(hc.dtype), (-1, 0))

    total, grad_h = jax.lax.scan(body, jnp.zeros((), _loss_dtype(hidden.dtype)), (h, t))
    return total, (grad_h, h, t, weight, jnp.zeros(hidden.shape[:2] + (0,), hidden.dtype))


def _chunked_cross_entropy_bwd(chunk, residuals, g):
    grad_h, h, t, weight, shape_marker = residuals
    shape = shape_marker.shape[:2] + h.shape[2:]
    n = shape[0] * shape[1]
    grad_hidden = (grad_h.reshape(-1, shape[2])[:n] * g.astype(grad_h.dtype)).reshape(shape).astype(shape_marker.dtype)

    def body(grad_w, xs):
        hc, tc = xs
        _, grad_logits = _chunk_softmax_grad(hc, weight, tc)
        return grad_w + dot(grad_logits, hc, (0, 0)).astype(grad_w.dtype), None

    grad_w, _ = jax.lax.scan(body, jnp.zeros(weight.shape, _loss_dtype(h.dtype)), (h, t))
    return grad_hidden, (grad_w * g).astype(weight.dtype), np.zeros(shape[:2], jax.dtypes.float0)


chunked_cross_entropy.defvjp(_chunked_cross_entropy_fwd, _chunked_cross_entropy_bwd)


def _forward_loss(model, batch):
    """(token loss sum, token count) of a model (or a PeftModel around it) on one batch."""
    llama = getattr(model, "base_model", model)
    kwargs = dict(position_ids=batch.get("position_ids"), segment_ids=batch.get("segment_ids"))
    weight = llama.output_weight() if hasattr(llama, "output_weight") else None
    if weight is None:
        return token_cross_entropy(model(batch["input_ids"], batch.get("attention_mask"), **kwargs), batch["labels"])
    hidden, _ = llama.hidden_states(batch["input_ids"], batch.get("attention_mask"), **kwargs)
    targets = shifted_targets(batch["labels"])
    count = jnp.sum(targets != IGNORE_INDEX).astype(jnp.float32)
    return chunked_cross_entropy(hidden, weight, targets), count


def compiler_options() -> dict[str, str] | None:
    """XLA options for the compiled training step on the current backend (None: XLA's defaults).

    None everywhere now. XLA's memory-optimized CPU scheduler (``xla_cpu_scheduler_type:
    CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED``) was used while gradient checkpointing was ``nnx.remat``,
    whose recomputation the default scheduler ran long before its gradient arrived. Checkpointed
    layers now recompute behind a data dependency on the cotangent (`jaxlora.models.recompute`), and
    with that the memory-optimized scheduler is the worse one: it kept most of each layer's
    activations alive anyway (XLA's temporary bytes of the QLoRA step per added decoder layer, hidden
    512, 512 tokens, bf16: 16.5 MiB with it, 1.0 MiB with the default; float32 dense LoRA: 27.7 vs
    13.6 MiB; without checkpointing 41.7 MiB either way; experiments/results/big_model.md).
    """
    return None


def make_train_step(graphdef, tx: optax.GradientTransformation, *, wrt=nnx.LoRAParam, offload: bool = False,
                    out_shardings=None):
    """``step(trainable, rest, opt_state, micro_batches) -> (trainable, rest, opt_state, metrics)``.

    Args:
      graphdef: the model structure from `split_trainable` (closed over: it holds unhashable configs).
      tx: the optax transformation (`jaxlora.train.optim.make_optimizer`).
      wrt: the variable filter that was split off as ``trainable`` (`split_trainable`).
      offload: ``opt_state`` lives in host memory (`jaxlora.train.optim.to_memory`).
      out_shardings: on a device mesh, ``(trainable, rng_state, opt_state, metrics)`` shardings of the
        results (`jaxlora.parallel.step_shardings`): the inputs' own, so every step reuses one program
        and the donated buffers; None: the compiler's choice (one device).

    ``micro_batches``: dict of arrays with a leading accumulation axis ``[accum, batch, seq]``. The
    gradient is the sum over micro-batches of d(token loss sum), divided by the total token count.
    ``metrics``: loss (mean token loss), tokens, grad_norm (before clipping). ``trainable`` and
    ``opt_state`` are donated: use the returned ones.

    Only the dropout RNG state of ``rest`` changes; the compiled program returns just that part and
    ``rest`` is rebuilt around it outside (returning all of ``rest`` made XLA write a copy of every
    frozen weight each step: 538 MB for SmolLM2-135M in float32, with two extra copies alive at once).
    ``step.lower(...)`` / ``.compile()`` work as for a jitted function and keep this signature.
    """

    def step(trainable, rest, opt_state, micro_batches):
        rng_state, frozen = nnx.split_state(rest, nnx.RngState, ...)

        def loss_sum(trainable, rng_state, frozen, batch):
            model = nnx.merge(graphdef, trainable, rng_state, frozen)
            total, count = _forward_loss(model, batch)
            _, _, new_rng_state, _ = nnx.split(model, wrt, nnx.RngState, ...)  # dropout RNG counters advance
            return total, (count, new_rng_state)

        # The RNG state and the frozen variables are differentiated too (their gradients are dropped; XLA
        # removes that computation): nnx only lets the dropout RNG counters advance, and only lets nnx.remat
        # (gradient checkpointing) rebuild the layers, when all variables are traced at this level.
        grad_fn = jax.value_and_grad(loss_sum, argnums=(0, 1, 2), has_aux=True, allow_int=True)

        def accumulate(carry, batch):
            grads_sum, loss_total, tokens, rng_state = carry
            (total, (count, rng_state)), (grads, _, _) = grad_fn(trainable, rng_state, frozen, batch)
            return (jax.tree.map(jnp.add, grads_sum, grads), loss_total + total, tokens + count, rng_state), None

        zeros = jax.tree.map(jnp.zeros_like, trainable)
        (grads_sum, loss_total, tokens, rng_state), _ = jax.lax.scan(
            accumulate, (zeros, jnp.float32(0.0), jnp.float32(0.0), rng_state), micro_batches)
        denominator = jnp.maximum(tokens, 1.0)
        grads = jax.tree.map(lambda g: g / denominator, grads_sum)
        if offload:
            updates, opt_state = offloaded_update(tx, grads, opt_state, trainable)
        else:
            updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        metrics = {"loss": loss_total / denominator, "tokens": tokens, "grad_norm": optax.tree.norm(grads)}
        return trainable, rng_state, opt_state, metrics

    return _TrainStep(jax.jit(step, donate_argnums=(0, 2), compiler_options=compiler_options(),
                              out_shardings=out_shardings))


def _with_rng_state(fn):
    """Wrap a compiled step that returns ``(trainable, rng_state, ...)`` to return ``(trainable, rest, ...)``."""

    def call(trainable, rest, opt_state, micro_batches):
        trainable, rng_state, opt_state, metrics = fn(trainable, rest, opt_state, micro_batches)
        return trainable, nnx.merge_state(rest, rng_state), opt_state, metrics

    return call


def _signature(args) -> tuple:
    leaves, treedef = jax.tree.flatten(args)
    return treedef, tuple((getattr(x, "shape", None), getattr(x, "dtype", None), getattr(x, "sharding", None))
                          for x in leaves)


def release_free_memory() -> None:
    """Return the C heap's free memory to the operating system (glibc's ``malloc_trim``; a no-op elsewhere).

    XLA compiles on the calling thread and runs on worker threads, whose allocations come from other
    glibc arenas: the compiler's freed working memory (600 MB for the 30-layer SmolLM2 step) stayed
    resident next to the step's own buffers and raised the peak RSS of training by ~300 MB
    (experiments/results/train.md).
    """
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _TrainStep:
    """The jitted step, called with and returning the whole ``rest`` (see `make_train_step`).

    The first call compiles explicitly and calls `release_free_memory` before running; later calls
    with the same argument shapes run that executable, others go through ``jax.jit`` as usual.
    """

    def __init__(self, jitted):
        self.jitted = jitted
        self._call = _with_rng_state(jitted)
        self._first = None

    def __call__(self, trainable, rest, opt_state, micro_batches):
        args = (trainable, rest, opt_state, micro_batches)
        if self._first is None:
            compiled = self.jitted.lower(*args).compile()
            release_free_memory()
            self._first = (_signature(args), _with_rng_state(compiled))
        if _signature(args) == self._first[0]:
            return self._first[1](*args)
        return self._call(*args)

    def lower(self, *args, **kwargs):
        return _Staged(self.jitted.lower(*args, **kwargs))


class _Staged:
    """A lowered or compiled step: ``compile()`` and calls keep the whole-``rest`` signature; anything
    else (``memory_analysis``, ``as_text``, ...) is the underlying jax object's."""

    def __init__(self, staged):
        self.staged = staged

    def compile(self, *args, **kwargs):
        return _Staged(self.staged.compile(*args, **kwargs))

    def __call__(self, trainable, rest, opt_state, micro_batches):
        return _with_rng_state(self.staged)(trainable, rest, opt_state, micro_batches)

    def __getattr__(self, name):
        return getattr(self.staged, name)


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
