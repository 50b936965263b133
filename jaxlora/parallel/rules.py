"""Which mesh axes each weight is split over: one table of rules (data), applied to a model's state.

A rule maps a variable path (dotted, e.g. ``model.layers.3.self_attn.q_proj.base.weight``) to the mesh
axes of the weight's dimensions, for a ``[out, in]`` projection weight or a ``[vocab, hidden]`` table:

- q/k/v/gate/up: column parallel, ``out`` on ``tensor``, ``in`` on ``fsdp``;
- o/down: row parallel, ``out`` on ``fsdp``, ``in`` on ``tensor``;
- embed_tokens and lm_head (and their trainable copies): ``vocab`` on ``tensor``, ``hidden`` on ``fsdp``;
- LoRA A / B (and DoRA magnitudes), norms, biases, RNG state: replicated. LoRA weights are r x d: on
  SmolLM2 at r=16 all of them are 0.5 % of the frozen weights. Replicated, their forward needs no
  all-gather and their optimizer state is as small; the cost is a gradient all-reduce of that size.

The first rule whose pattern is found in the path wins; a path no rule matches is replicated. Layers
stacked for scanning (`jaxlora.models.scan`) keep their leading layer axis unsplit.

4-bit weights (`jaxlora.quant.QuantizedTensor`): the packed codes and the block scales (or their 8-bit
codes) are flat arrays in row-major ``[out, in]`` order, so splitting them into equal contiguous parts
splits the weight's rows; both are split over every mesh axis of the weight's rule together (out axis
first), so each device holds ``1 / (fsdp x tensor)`` of the bytes and only whole quantization blocks.
The double-quantization scales (``nested_absmax``, ``offset``) are replicated. A weight whose blocks
cannot be split evenly (a partial last block, or a block count that the axes do not divide) is
replicated, with a warning; it is never split mid-block.

A dense dimension that an axis does not divide is left unsplit on that axis (with a warning).
"""

from __future__ import annotations

import math
import re
import warnings

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlora.parallel.mesh import replicated
from jaxlora.quant import QuantizedTensor

COLUMN = ("tensor", "fsdp")
ROW = ("fsdp", "tensor")

RULES: tuple[tuple[str, tuple[str | None, ...] | None], ...] = (
    (r"(^|\.)lora_(A|B|embedding_A|embedding_B|magnitude_vector)(\.|$)", None),
    (r"(^|\.)(embed_tokens|lm_head)(\.[\w.]+)?\.weight$", COLUMN),
    (r"(^|\.)(q_proj|k_proj|v_proj|gate_proj|up_proj)(\.base)?\.weight$", COLUMN),
    (r"(^|\.)(o_proj|down_proj)(\.base)?\.weight$", ROW),
)
"""``(pattern, axes)``: ``axes`` per dimension of the (unstacked) weight, None for replicated."""


class ShardingWarning(UserWarning):
    """A weight that the rules would split is kept (partly) whole: its shape does not divide."""


def variable_path(path) -> str:
    """A pytree key path of an nnx state as a dotted module path (``a.b.3.weight``)."""
    names = []
    for key in path:
        name = getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))
        if name != "value":
            names.append(str(name))
    return ".".join(names)


def rule_for(path: str, rules=RULES):
    """The axes of the first rule matching ``path`` (None: replicated)."""
    for pattern, axes in rules:
        if re.search(pattern, path):
            return axes
    return None


def _dense_spec(path, shape, axes, mesh, notes) -> PartitionSpec:
    lead = len(shape) - len(axes)  # a stacked layer axis comes first and stays whole
    if lead < 0:
        notes.append(f"{path}: shape {tuple(shape)} has fewer dimensions than its rule {axes}: replicated")
        return PartitionSpec()
    spec = [None] * lead
    for dim, axis in zip(shape[lead:], axes):
        if axis is not None and mesh.shape[axis] > 1 and dim % mesh.shape[axis]:
            notes.append(f"{path}: dimension {dim} of {tuple(shape)} is not a multiple of {axis}={mesh.shape[axis]}: "
                         f"not split on {axis}")
            axis = None
        spec.append(axis if axis is not None and mesh.shape[axis] > 1 else None)
    return PartitionSpec(*spec)


def _quantized_shardings(path, q: QuantizedTensor, axes, mesh, notes) -> QuantizedTensor:
    used = tuple(a for a in (axes or ()) if a is not None and mesh.shape[a] > 1)
    parts = math.prod(mesh.shape[a] for a in used)
    lead = q.packed.ndim - 1  # stacked layers: [layers, n/2]
    flat = PartitionSpec()
    if used:
        n = math.prod(q.shape)
        if n % q.blocksize or q.nblocks % parts:
            notes.append(f"{path}: {tuple(q.shape)} in {q.nblocks} blocks of {q.blocksize}"
                         f"{' (a partial last block)' if n % q.blocksize else ''} does not split into {parts} "
                         f"parts of whole blocks over {'x'.join(used)}: replicated")
        else:
            flat = PartitionSpec(*([None] * lead), used if len(used) > 1 else used[0])
    split = NamedSharding(mesh, flat)
    nested = None if q.nested_absmax is None else replicated(mesh)
    offset = None if q.offset is None else replicated(mesh)
    return QuantizedTensor(split, split, nested, offset, shape=q.shape, dtype=q.dtype, blocksize=q.blocksize,
                           quant_type=q.quant_type)


def state_shardings(state, mesh: Mesh, rules=RULES, *, warn: bool = True):
    """The `NamedSharding` tree of ``state`` (an nnx state, or any pytree of arrays and `QuantizedTensor` s)."""
    notes: list[str] = []

    def sharding(path, leaf):
        name = variable_path(path)
        axes = rule_for(name, rules)
        if isinstance(leaf, QuantizedTensor):
            return _quantized_shardings(name, leaf, axes, mesh, notes)
        shape = np.shape(leaf)
        spec = PartitionSpec() if axes is None else _dense_spec(name, shape, axes, mesh, notes)
        return NamedSharding(mesh, spec)

    shardings = jax.tree_util.tree_map_with_path(sharding, state, is_leaf=lambda x: isinstance(x, QuantizedTensor))
    if notes and warn:
        warnings.warn("kept whole on the mesh " + dict(mesh.shape).__repr__() + ":\n  " + "\n  ".join(notes),
                      ShardingWarning, stacklevel=2)
    return shardings


def shard_model(model: nnx.Module, mesh: Mesh, rules=RULES) -> None:
    """Place ``model``'s variables on ``mesh`` by ``rules``, in place (the unsharded arrays are released
    as their variables take the sharded ones)."""
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, state_shardings(state, mesh, rules)))


__all__ = ["COLUMN", "ROW", "RULES", "ShardingWarning", "rule_for", "shard_model", "state_shardings",
           "variable_path"]
