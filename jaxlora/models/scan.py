"""Identical decoder layers run as one scanned body over stacked parameters.

A Python loop over the layers traces, lowers and compiles every layer again: the compile time of a
train step grew faster than depth (experiments/results/compile.md). `jax.lax.scan` compiles one layer
and runs it ``num_layers`` times, over parameters stacked along a leading layer axis.

Two forms of the same model:

- per layer (what users, files and the adapter APIs see): ``model.layers`` is an ``nnx.List`` of
  layers, paths ``model.layers.3.self_attn.q_proj``;
- stacked (an execution form): ``model.layers`` is a `StackedLayers`, one layer module whose every
  variable has a leading ``[num_layers]`` axis, a 4-bit weight included (one `QuantizedTensor` per
  projection whose leaves carry the layer axis while its ``shape`` stays one layer's).

`stack_layers` converts a model in place, outside jit, variable by variable: the per-layer arrays of
one variable are stacked and then released, so memory peaks at about one projection type's worth
above the model, and no second copy of the frozen weights exists afterwards. (Stacking inside the
jitted step instead would copy every frozen weight at every step.) `unstack_layers` converts back
into the same per-layer module objects. The trainer runs on the stacked form and converts at its
boundaries: checkpoints and adapters are written per layer (`LayerStacking.per_layer`).

Layers stack only when they are identical in structure: same modules, same static attributes (LoRA
rank, scaling, adapter names, dropout), same variable types, shapes and dtypes, and no variable shared
between layers. LoRA injection with ``layers_to_transform``, ``rank_pattern`` / ``alpha_pattern``
across layers, or different adapter sets makes layers differ; the model then keeps the loop and
`stack_layers` says why (a warning, once per reason).

Inside the scan body each layer is rebuilt from its slice of the stacked state (``nnx.merge``), so the
4-bit weights are dequantized per layer, in the body, by `jaxlora.nn.linear4bit.quantized_matmul`
(whose backward re-dequantizes; the quantized slices it keeps as residuals are forwarded from the
stacked input by JAX's scan, not stacked again). Gradient checkpointing is a remat policy on the body
(``jax.checkpoint``, nothing saved but the layer's inputs). Dropout RNG streams are per layer
(``nnx.Dropout`` forks its own), stacked like weights; the body returns the advanced streams, so a
scanned model draws the same masks as the loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
import weakref

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlora.models.llama_config import LlamaConfig
from jaxlora.models.recompute import recomputed_call

STACKED_KEY = "stacked_layer"
"""Attribute of `StackedLayers` holding the stacked layer; in state paths it stands where the layer index stood."""


class ScanFallbackWarning(UserWarning):
    """The decoder layers differ in structure, so they run in a Python loop instead of one scanned body."""


class StackedLayersError(TypeError):
    """A per-layer operation on layers that are stacked for scanning."""


def _no_weight_copies(primitive, *_, **__) -> bool:
    """The remat policy without gradient checkpointing: keep every intermediate except transposes and casts.

    A scan stacks what the body keeps for the backward pass into ``[num_layers, ...]`` arrays. The
    float32 product ``x @ W.T`` keeps ``W.T``, and a bfloat16 compute dtype keeps ``W`` cast to
    bfloat16: stacked, a copy of every frozen weight (XLA temporary memory of a 4-layer step, hidden
    256: 87 MiB of float32 weights took 87 MiB more; in the loop XLA folds the transpose into the
    matmul). Recomputing transposes and casts in the backward pass keeps ``W`` itself, which JAX passes
    through from the stacked input uncopied; both are cheap next to the matmuls they feed.
    """
    return primitive not in (jax.lax.transpose_p, jax.lax.convert_element_type_p)


class StackedLayers(nnx.Module):
    """``num_layers`` identical layers as one layer module whose variables have a leading ``[num_layers]`` axis.

    ``layers(x, *args, remat=False)`` runs ``x, _ = layer_i(x, *args)`` for every layer i in order, as
    one `jax.lax.scan`; ``args`` are the same for every layer. ``remat`` recomputes the body in the
    backward pass. Built by `stack_layers`; per-layer access (``layers[3]``, iteration) is refused:
    convert back with `unstack_layers` (`layer_at` gives a layer's slice inside a computation).
    """

    def __init__(self, layer: nnx.Module, num_layers: int):
        setattr(self, STACKED_KEY, layer)
        self.num_layers = num_layers

    @property
    def layer(self) -> nnx.Module:
        return getattr(self, STACKED_KEY)

    def __call__(self, x: jax.Array, *args, remat: bool = False, **static) -> jax.Array:
        graphdef, rng_state, weights = nnx.split(self.layer, nnx.RngState, ...)

        def body(x, per_layer):
            rng, w = per_layer
            layer = nnx.merge(graphdef, rng, w)
            x, _ = layer(x, *args, **static)
            return x, nnx.state(layer, nnx.RngState)

        # Gradient checkpointing keeps only the body's inputs (the hidden states and the layer's slice of the
        # stacks). prevent_cse=False: the scan's loop already keeps XLA from merging the recomputation with
        # the forward pass (JAX's advice for checkpointed scan bodies).
        policy = jax.checkpoint_policies.nothing_saveable if remat else _no_weight_copies
        body = jax.checkpoint(body, prevent_cse=False, policy=policy)
        x, new_rng = jax.lax.scan(body, x, (rng_state, weights))
        nnx.update(self.layer, new_rng)  # the dropout streams advance as they do in the loop
        return x

    def with_cache(self, x: jax.Array, keys: jax.Array, values: jax.Array, start: jax.Array, *args, **static):
        """``(x, keys, values)`` after every layer in order, ``x, (k, v) = layer_i(x, *args, (keys[i], values[i],
        start), **static)``, as one scan: the decoding form (no gradients). ``keys`` / ``values``:
        ``[num_layers, ...]`` stacked caches, carried through the scan; each layer's new positions (the
        ``x.shape[1]`` rows from ``start`` on axis 1 of its slice) are written into them in place, so a decoding
        step does not copy the whole cache out as the scan's stacked output would. Dropout streams are not
        advanced (decoding runs in eval mode, where nothing draws from them; the decode loop traces this
        inside a ``lax.while_loop``, where the module's state cannot be updated)."""
        graphdef, rng_state, weights = nnx.split(self.layer, nnx.RngState, ...)
        rows = x.shape[1]

        def body(carry, per_layer):
            x, keys, values = carry
            rng, w, index = per_layer
            layer = nnx.merge(graphdef, rng, w)
            own = (jax.lax.dynamic_index_in_dim(keys, index, keepdims=False),
                   jax.lax.dynamic_index_in_dim(values, index, keepdims=False), start)
            x, written = layer(x, *args, own, **static)
            new_k, new_v = (jax.lax.dynamic_slice_in_dim(a, start, rows, axis=1)[None] for a in written)
            zero = jnp.zeros((), jnp.int32)
            keys = jax.lax.dynamic_update_slice(keys, new_k, (index, zero, start, zero))
            values = jax.lax.dynamic_update_slice(values, new_v, (index, zero, start, zero))
            return (x, keys, values), None

        index = jnp.arange(self.num_layers, dtype=jnp.int32)
        (x, keys, values), _ = jax.lax.scan(body, (x, keys, values), (rng_state, weights, index))
        return x, keys, values

    def layer_at(self, index: int) -> nnx.Module:
        """Layer ``index`` as a module of its own (slices of the stacked variables: inside jit, not copies kept)."""
        graphdef, state = nnx.split(self.layer)
        return nnx.merge(graphdef, jax.tree.map(lambda a: a[index], state))

    def _refuse(self, *_):
        raise StackedLayersError(f"the {self.num_layers} decoder layers are stacked for scanning (an execution form of "
                                 "the trainer); per-layer access needs jaxlora.models.scan.unstack_layers(model) first")

    __getitem__ = __iter__ = _refuse


def run_layers(layers, x: jax.Array, *args, remat: bool = False, **static) -> jax.Array:
    """``x`` through every layer in order, ``x, _ = layer(x, *args, **static)``: one scan over `StackedLayers`,
    a Python loop over an ``nnx.List`` (`jaxlora.models.recompute.recomputed_call` per layer when ``remat``:
    ``nnx.remat``'s recomputation is scheduled early by XLA's CPU compiler). ``static``: keyword
    arguments that are not arrays (e.g. the attention implementation), closed over rather than traced."""
    if isinstance(layers, StackedLayers):
        return layers(x, *args, remat=remat, **static)
    for layer in layers:
        if remat:
            x, _ = recomputed_call(layer, x, *args, **static)
        else:
            x, _ = layer(x, *args, **static)
    return x


def each_layer(layers) -> list[nnx.Module]:
    """The layers as separate modules (per-layer slices of `StackedLayers`, inside a computation)."""
    if isinstance(layers, StackedLayers):
        return [layers.layer_at(i) for i in range(layers.num_layers)]
    return list(layers)


# -- which models stack ------------------------------------------------------------------------------


def _decoder(model: nnx.Module) -> tuple[tuple, nnx.Module]:
    """``(path, module)`` of the module holding the decoder layers (``LlamaModel``: ``.layers``)."""
    for path, node in nnx.iter_graph(model):
        if isinstance(getattr(node, "config", None), LlamaConfig) and hasattr(node, "model"):
            return (*path, "model"), node.model
    raise TypeError(f"{type(model).__name__} holds no module with a LlamaConfig `.config` (a LlamaForCausalLM)")


def _static_attributes(module: nnx.Module) -> dict:
    return {k: v for k, v in vars(module).items()
            if not k.startswith("_pytree__") and not isinstance(v, (nnx.Module, nnx.Variable, nnx.Pytree))}


def _describe(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _kind(variable: nnx.Variable) -> tuple:
    """Type, tree structure (a `QuantizedTensor`'s metadata included) and leaf shapes/dtypes of a variable."""
    leaves, structure = jax.tree.flatten(variable.get_value())
    return type(variable).__name__, structure, tuple((jnp.shape(x), jnp.result_type(x)) for x in leaves)


def _difference(first: nnx.Module, other: nnx.Module) -> str | None:
    """Where ``other`` differs in structure from ``first`` (a module path and what differs), or None."""
    def modules(layer):
        return {".".join(map(str, p)): n for p, n in nnx.iter_graph(layer) if isinstance(n, nnx.Module)}

    a, b = modules(first), modules(other)
    for path in sorted(set(a) | set(b)):
        where = path or "the layer"
        if path not in a or path not in b:
            present, missing = ("the other", "layer 0") if path not in a else ("layer 0", "the other")
            return f"{where} exists in {present} but not in {missing}"
        if type(a[path]) is not type(b[path]):
            return f"{where} is {type(a[path]).__name__} vs {type(b[path]).__name__}"
        static_a, static_b = _static_attributes(a[path]), _static_attributes(b[path])
        for key in sorted(set(static_a) | set(static_b)):
            if static_a.get(key) != static_b.get(key):
                return f"{where}.{key} is {_describe(static_a.get(key))} vs {_describe(static_b.get(key))}"
    flat_a, flat_b = nnx.to_flat_state(nnx.state(first)), nnx.to_flat_state(nnx.state(other))
    for (path_a, var_a), (path_b, var_b) in zip(flat_a, flat_b):
        kind_a, kind_b = (path_a, *_kind(var_a)), (path_b, *_kind(var_b))
        if kind_a != kind_b:
            return f"{'.'.join(map(str, path_a))} is {_describe(kind_a[1:])} vs {_describe(kind_b[1:])}"
    if len(flat_a) != len(flat_b) or nnx.graphdef(first) != nnx.graphdef(other):
        return "their graph definitions differ"
    return None


def why_not_stackable(layers) -> str | None:
    """Why ``layers`` (an ``nnx.List`` of layers) cannot run as one scanned body, or None when they can."""
    layers = list(layers)
    if len(layers) < 2:
        return f"{len(layers)} layer(s)"
    owner: dict[int, int] = {}
    for i, layer in enumerate(layers):
        if i > 0:
            difference = _difference(layers[0], layer)
            if difference is not None:
                return f"layer {i} differs from layer 0: {difference}"
        for path, variable in nnx.to_flat_state(nnx.state(layer)):
            if owner.setdefault(id(variable), i) != i:
                return f"layer {i} shares {'.'.join(map(str, path))} with layer {owner[id(variable)]}"
    return None


# -- converting in place -----------------------------------------------------------------------------

_PER_LAYER: "weakref.WeakKeyDictionary[StackedLayers, tuple]" = weakref.WeakKeyDictionary()
"""StackedLayers made by `stack_layers` -> (the per-layer nnx.List it replaced, layer graphdef then)."""
_REPORTED: set[str] = set()


def _in_place_of(reference: jax.Array, compute):
    """``compute()`` on arrays in device memory, put where ``reference`` lives.

    An eager ``jnp.stack`` or slice of arrays in another memory (an optimizer state offloaded to
    pinned_host) gave arrays whose sharding said pinned_host while their buffers were in device memory,
    which the compiled step refused (XLA aborted)."""
    sharding = getattr(reference, "sharding", None)
    kind = getattr(sharding, "memory_kind", None)
    if kind is None or kind == "device":
        return compute(lambda a: a)
    to_device = sharding.with_memory_kind("device")
    return jax.device_put(compute(lambda a: jax.device_put(a, to_device)), sharding)


def _stack(arrays: list) -> jax.Array:
    return _in_place_of(arrays[0], lambda on_device: jnp.stack([on_device(a) for a in arrays]))


def _take(a: jax.Array, index: int) -> jax.Array:
    if isinstance(a, jax.ShapeDtypeStruct):  # a placeholder's shape without the layer axis
        return jax.ShapeDtypeStruct(a.shape[1:], a.dtype)
    return _in_place_of(a, lambda on_device: on_device(a)[index])


def _placeholder(value):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), value)


def _layer_slice(value, index: int):
    """Layer ``index`` of a stacked value."""
    return jax.tree.map(lambda a: _take(a, index), value)


def _flat_variables(module: nnx.Module) -> list:
    return nnx.to_flat_state(nnx.state(module))


def stack_layers(model: nnx.Module, *, warn: bool = True) -> str | None:
    """Convert ``model``'s decoder layers to the stacked form in place; returns None when done, else the
    reason they stay a loop (also warned once per reason as a `ScanFallbackWarning` when ``warn``).

    Variable by variable, the per-layer arrays are stacked on the device they live on and then
    released from the per-layer modules (which are kept, with shape placeholders, for `unstack_layers`).
    """
    _, decoder = _decoder(model)
    layers = decoder.layers
    if isinstance(layers, StackedLayers):
        return None
    reason = why_not_stackable(layers)
    if reason is not None:
        if warn and reason not in _REPORTED:
            _REPORTED.add(reason)
            warnings.warn(f"decoder layers run in a Python loop, not one scanned body: {reason}", ScanFallbackWarning,
                          stacklevel=2)
        return reason
    per_layer = [_flat_variables(layer) for layer in layers]
    graphdef = nnx.graphdef(layers[0])
    stacked = []
    for position, (path, _) in enumerate(per_layer[0]):
        variables = [flat[position][1] for flat in per_layer]
        value = jax.tree.map(lambda *xs: _stack(xs), *[v.get_value() for v in variables])
        stacked.append((path, variables[0].replace(value)))
        for variable in variables:
            variable.set_value(_placeholder(variable.get_value()))
    stack = StackedLayers(nnx.merge(graphdef, nnx.from_flat_state(stacked)), len(per_layer))
    _PER_LAYER[stack] = (layers, graphdef)
    decoder.layers = stack
    return None


def unstack_layers(model: nnx.Module) -> None:
    """Convert ``model``'s decoder layers back to the per-layer form in place (a no-op if they are per layer).

    The layers go back into the module objects that `stack_layers` replaced (when the structure did not
    change meanwhile), each variable sliced out of its stack and the stack released before the next.
    """
    _, decoder = _decoder(model)
    stack = decoder.layers
    if not isinstance(stack, StackedLayers):
        return
    graphdef = nnx.graphdef(stack.layer)
    layers, old_graphdef = _PER_LAYER.pop(stack, (None, None))
    if layers is None or old_graphdef != graphdef:
        layers = nnx.List([nnx.merge(graphdef, _placeholder(nnx.state(stack.layer))) for _ in range(stack.num_layers)])
    per_layer = [_flat_variables(layer) for layer in layers]
    for position, (_, variable) in enumerate(_flat_variables(stack.layer)):
        value = variable.get_value()
        for i, flat in enumerate(per_layer):
            flat[position][1].set_value(_layer_slice(value, i))
        variable.set_value(_placeholder(value))
    decoder.layers = layers


def per_layer_view(model: nnx.Module, keep=nnx.LoRAParam) -> nnx.Module:
    """A per-layer copy of a stacked ``model`` holding only its ``keep`` variables (sliced out of their
    stacks; every other variable a shape placeholder), e.g. for writing the adapter of a stacked model
    without converting (and copying) its frozen weights. ``model`` itself is unchanged."""
    graphdef, kept, others = nnx.split(model, keep, ...)
    view = nnx.merge(graphdef, jax.tree.map(lambda a: a, kept), _placeholder(others))  # new variables
    unstack_layers(view)
    return view


@contextlib.contextmanager
def stacked(model: nnx.Module, *, warn: bool = True):
    """``with stacked(model) as reason:`` the model in stacked form inside (reason None), per layer again
    afterwards, however the block ends; ``reason`` says why it stayed a loop otherwise."""
    reason = stack_layers(model, warn=warn)
    try:
        yield reason
    finally:
        if reason is None:
            unstack_layers(model)


# -- states of the stacked form, per layer at the boundaries --------------------------------------------


@dataclasses.dataclass(frozen=True)
class LayerStacking:
    """How states of a stacked model map to the per-layer form's paths (``...layers.<STACKED_KEY>.x`` with a
    leading layer axis <-> ``...layers.<i>.x``), for any pytree that holds `nnx.State` s of the model
    (trainable parameters, optimizer moments, RNG state)."""

    prefix: tuple
    """Path of the ``layers`` attribute from the model's root."""
    num_layers: int

    @classmethod
    def of(cls, model: nnx.Module) -> "LayerStacking | None":
        """The stacking of ``model`` (None when its layers are per layer)."""
        path, decoder = _decoder(model)
        if not isinstance(decoder.layers, StackedLayers):
            return None
        return cls((*path, "layers"), decoder.layers.num_layers)

    def per_layer(self, tree):
        """``tree`` with every State in per-layer form (slices: new arrays, in their stacks' sharding)."""
        return _map_states(self._unstack_state, tree)

    def stacked(self, tree):
        """``tree`` (per-layer form) with every State in stacked form (new stacked arrays)."""
        return _map_states(self._stack_state, tree)

    def _split(self, path):
        n = len(self.prefix)
        if tuple(path[:n]) == self.prefix and len(path) > n:
            return path[n], tuple(path[n + 1:])
        return None, None

    def _unstack_state(self, state: nnx.State) -> nnx.State:
        flat = []
        for path, leaf in nnx.to_flat_state(state):
            key, rest = self._split(path)
            if key != STACKED_KEY:
                flat.append((path, leaf))
                continue
            flat.extend(((*self.prefix, i, *rest), _layer_slice(leaf, i)) for i in range(self.num_layers))
        return nnx.from_flat_state(flat)

    def _stack_state(self, state: nnx.State) -> nnx.State:
        flat, groups = [], {}
        for path, leaf in nnx.to_flat_state(state):
            key, rest = self._split(path)
            if not isinstance(key, int):
                flat.append((path, leaf))
                continue
            if rest not in groups:
                groups[rest] = [None] * self.num_layers
                flat.append(((*self.prefix, STACKED_KEY, *rest), groups[rest]))
            groups[rest][key] = leaf
        return nnx.from_flat_state([(path, jax.tree.map(lambda *xs: _stack(xs), *leaf) if isinstance(leaf, list) else leaf)
                                    for path, leaf in flat])


def _map_states(fn, tree):
    return jax.tree.map(lambda x: fn(x) if isinstance(x, nnx.State) else x, tree,
                        is_leaf=lambda x: isinstance(x, nnx.State))


__all__ = ["LayerStacking", "STACKED_KEY", "ScanFallbackWarning", "StackedLayers", "StackedLayersError", "each_layer",
           "per_layer_view", "run_layers", "stack_layers", "stacked", "unstack_layers", "why_not_stackable"]
