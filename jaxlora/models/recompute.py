"""Gradient checkpointing whose recomputation cannot run before the backward pass needs it.

    y = recomputed_call(layer, x, *args)     # = layer(x, *args); the backward pass runs layer again

``nnx.remat`` (``jax.checkpoint``) keeps a recomputation in its place with an optimization barrier
over the recomputation's inputs and the incoming cotangent. XLA's CPU compiler expands that barrier
before it schedules, and its scheduler then starts each layer's recomputation as soon as the layer's
saved input exists, long before the gradient arrives: every layer's activations are alive again at
the start of the backward pass and checkpointing saves almost nothing (experiments/results/memory.md:
XLA's temporary bytes with checkpointing 0.96-1.04x those without, on SmolLM2-135M).

Here the backward rule is written out (a custom VJP): the forward pass keeps only the layer's inputs
and state; the backward pass multiplies the saved input by ``1 + 0 * g[0]`` (``g``: the cotangent of
the layer's output) and runs the layer again from that. The factor is an exact 1.0 for a finite
``g[0]``, so the numbers are those of the forward pass, but the recomputation now depends on data
that exists only once the layers above have been differentiated: no scheduler can hoist it, and
common-subexpression elimination cannot merge it with the forward pass (the same device as
`jaxlora.nn.linear4bit` uses for dequantization: `jaxlora.nn.ordering`). A non-finite ``g[0]`` makes every gradient NaN,
which the trainer reports as a non-finite step.

Module state: the layer is split into its state (parameters, 4-bit weights, dropout RNG counters)
and passed through as a pytree; the RNG counters that the forward pass advances are returned and
written back, and the recomputation starts from the saved (old) counters, so dropout draws the same
masks. Integer and boolean leaves get float0 cotangents.
"""

from __future__ import annotations

import jax
from flax import nnx

from jaxlora.nn.ordering import one_after


def recomputed_call(module: nnx.Module, x: jax.Array, *args, **static):
    """``module(x, *args, **static)``, with ``module``'s activations recomputed in the backward pass.

    ``module(x, *args)`` must return a pytree of arrays; ``x`` is a floating-point array (the layer's
    input, what ties the recomputation to the cotangent); ``args`` any pytrees (None included);
    ``static`` keyword arguments that are not arrays (closed over, e.g. the attention implementation).
    """
    graphdef, state = nnx.split(module)

    def run(state, x, args):
        # copy: the forward pass advances the RNG counters in place, and the custom VJP's residual must
        # stay the state before the call, which the recomputation starts from.
        inner = nnx.merge(graphdef, state, copy=True)
        out = inner(x, *args, **static)
        return out, nnx.state(inner, nnx.RngState)

    out, new_state = _checkpointed(run, state, x, args)
    nnx.update(module, new_state)
    return out


def _checkpointed(run, state, x, args):
    @jax.custom_vjp
    def call(state, x, args):
        return run(state, x, args)

    def forward(state, x, args):
        return run(state, x, args), (state, x, args)

    def backward(saved, cotangents):
        state, x, args = saved
        tie = one_after(cotangents[0])
        _, vjp = jax.vjp(run, state, x * tie.astype(x.dtype), args)
        return vjp(cotangents)

    call.defvjp(forward, backward)
    return call(state, x, args)


__all__ = ["recomputed_call"]
