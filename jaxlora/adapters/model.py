"""Adapters with PEFT's names: `LoraConfig`, `get_peft_model`, `PeftModel` (named adapters, merge/unload).

`get_peft_model(model, config)` replaces every targeted linear layer of a jaxlora model (dense
`Linear` or 4-bit `Linear4bit`) by a `LoraLinear` around it, following PEFT's matching rules
(formats.md A.2, A.6, A.10): ``target_modules`` as exact names or suffixes, a regex string (full
match), or ``"all-linear"`` (every linear layer except the output layer); ``layers_to_transform``;
``rank_pattern`` / ``alpha_pattern``; ``modules_to_save``. Module names are the paths inside the
model, which for `LlamaForCausalLM` are transformers' (``model.layers.0.self_attn.q_proj``).

What trains is selected by type: LoRA weights and modules_to_save parameters are ``nnx.LoRAParam``
(the latter as its subclass `ModulesToSaveParam`), everything else is a plain ``nnx.Param`` or a
quantized weight. Use ``nnx.Optimizer(peft_model, tx, wrt=nnx.LoRAParam)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re

from flax import nnx

from jaxlora.models.llama import count_parameters
from jaxlora.nn import Linear, Linear4bit, LoraLinear

# PEFT's per-architecture default targets (transformers' Llama): q_proj and v_proj.
DEFAULT_TARGETS = ("q_proj", "v_proj")
OUTPUT_LAYER_NAMES = ("lm_head",)


class AdapterError(ValueError):
    """An adapter configuration that cannot be applied to the model."""


class ModulesToSaveParam(nnx.LoRAParam):
    """A parameter of a ``modules_to_save`` module: trained and saved in full with the adapter."""


@dataclasses.dataclass
class LoraConfig:
    """PEFT's ``LoraConfig`` fields (same names and defaults) that jaxlora implements."""

    r: int = 8
    """Rank of the update."""
    lora_alpha: float = 8
    """Scaling numerator: scaling = lora_alpha / r (or / sqrt(r) with use_rslora)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input."""
    target_modules: list[str] | str | None = None
    """Names or suffixes, a regex (full match), "all-linear", or None for the architecture default (q_proj, v_proj)."""
    exclude_modules: list[str] | str | None = None
    """Modules never targeted (same matching rules)."""
    layers_to_transform: int | list[int] | None = None
    """Only these decoder layer indices."""
    layers_pattern: str | list[str] | None = None
    """Name of the layer list in module paths (default "layers")."""
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    """{pattern: r} overrides, first match wins: re.match(r"(.*\\.)?(" + pattern + r")$", name)."""
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)
    """{pattern: lora_alpha} overrides, same matching."""
    use_rslora: bool = False
    """Scaling lora_alpha / sqrt(r)."""
    use_dora: bool = False
    """Weight-decomposed LoRA (a trainable magnitude per output row)."""
    init_lora_weights: bool | str = True
    """True (B = 0), "gaussian" (A ~ N(0, 1/r), B = 0) or False (B random: not a no-op)."""
    bias: str = "none"
    """Only "none" is supported (no bias is trained)."""
    modules_to_save: list[str] | None = None
    """Modules trained in full and saved with the adapter (e.g. ["lm_head"])."""
    task_type: str | None = None
    """PEFT task type (e.g. "CAUSAL_LM"); informational."""
    base_model_name_or_path: str | None = None
    """Where the base model came from; written to adapter_config.json."""

    def __post_init__(self):
        if self.bias != "none":
            raise AdapterError(f"bias={self.bias!r} is not supported; jaxlora trains no biases (bias='none')")
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise AdapterError("layers_to_transform cannot be used when target_modules is a str (as in PEFT)")

    def rank_and_alpha(self, name: str) -> tuple[int, float]:
        """``(r, lora_alpha)`` for module ``name`` after rank_pattern / alpha_pattern (formats.md A.6)."""
        return _first_pattern(self.rank_pattern, name, self.r), _first_pattern(self.alpha_pattern, name, self.lora_alpha)


def _first_pattern(patterns: dict, name: str, default):
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return default


def _matches(spec: list[str] | str | None, name: str) -> bool:
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def _layer_index(name: str, layers_pattern) -> int | None:
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else (layers_pattern or ["layers"])
    for pattern in patterns:
        match = re.search(rf"(?:^|\.){pattern}\.(\d+)(?:\.|$)", name)
        if match:
            return int(match.group(1))
    return None


def _path_name(path) -> str:
    return ".".join(str(p) for p in path)


def linear_modules(model: nnx.Module) -> dict[str, nnx.Module]:
    """Name -> linear layer (`Linear`, `Linear4bit`, or an already wrapped `LoraLinear`), outermost only."""
    found: dict[str, nnx.Module] = {}
    for path, node in nnx.iter_graph(model):
        name = _path_name(path)
        if isinstance(node, (Linear, Linear4bit, LoraLinear)) and not any(name.startswith(n + ".") for n in found):
            found[name] = node
    return found


def target_names(model: nnx.Module, config: LoraConfig) -> list[str]:
    """The module names that ``config`` targets in ``model`` (PEFT's rules), in model order."""
    candidates = linear_modules(model)
    targets = config.target_modules if config.target_modules is not None else list(DEFAULT_TARGETS)
    chosen = []
    for name in candidates:
        if targets == "all-linear":
            hit = name.split(".")[-1] not in OUTPUT_LAYER_NAMES
        else:
            hit = _matches(targets, name)
        if not hit or _matches(config.exclude_modules, name):
            continue
        if config.layers_to_transform is not None:
            index = _layer_index(name, config.layers_pattern)
            if index is None or index not in config.layers_to_transform:
                continue
        chosen.append(name)
    if not chosen:
        raise AdapterError(
            f"target_modules {targets!r} (layers_to_transform={config.layers_to_transform}) match no linear layer "
            f"of the model; available: {sorted({n.split('.')[-1] for n in candidates})} e.g. {list(candidates)[:4]}"
        )
    return chosen


def set_submodule(root: nnx.Module, name: str, module: nnx.Module) -> None:
    """Replace the submodule at dotted path ``name`` (e.g. ``model.layers.0.mlp.up_proj``) with ``module``."""
    *parents, last = name.split(".")
    node = root
    for part in parents:
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    if last.isdigit():
        node[int(last)] = module
    else:
        setattr(node, last, module)


def get_submodule(root: nnx.Module, name: str):
    """The submodule at dotted path ``name``."""
    node = root
    for part in name.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


def inject_adapter(model: nnx.Module, config: LoraConfig, adapter_name: str, rngs: nnx.Rngs) -> list[str]:
    """Add adapter ``adapter_name`` to every targeted layer of ``model`` (in place); returns their names."""
    names = target_names(model, config)
    for name in names:
        layer = get_submodule(model, name)
        r, alpha = config.rank_and_alpha(name)
        kwargs = dict(r=r, lora_alpha=alpha, lora_dropout=config.lora_dropout, use_rslora=config.use_rslora,
                      use_dora=config.use_dora, init_lora_weights=config.init_lora_weights, rngs=rngs)
        if isinstance(layer, LoraLinear):
            layer.add_adapter(adapter_name, **kwargs)
        else:
            set_submodule(model, name, LoraLinear(layer, adapter_name=adapter_name, **kwargs))
    for module_name in config.modules_to_save or []:
        _mark_modules_to_save(model, module_name)
    return names


def _mark_modules_to_save(model: nnx.Module, module_name: str) -> None:
    pattern = re.compile(rf"(^|.*\.){re.escape(module_name)}($|\..*)")
    hits = 0
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = _path_name(path)
        if pattern.match(name) and not isinstance(variable, nnx.LoRAParam):
            owner = get_submodule(model, _path_name(path[:-1]))
            setattr(owner, str(path[-1]), ModulesToSaveParam(variable.get_value()))
            hits += 1
    if hits == 0:
        raise AdapterError(f"modules_to_save entry {module_name!r} matches no parameter of the model")


class PeftModel(nnx.Module):
    """A model with LoRA adapters: PEFT's ``PeftModel`` interface over a jaxlora model.

    ``peft_model(input_ids, attention_mask)`` runs the wrapped model (``base_model``) with the
    active adapter. Adapter configs are in ``peft_config[name]``.
    """

    def __init__(self, model: nnx.Module, config: LoraConfig, adapter_name: str = "default", *, rngs: nnx.Rngs):
        self.base_model = model
        self.peft_config: dict[str, LoraConfig] = {}
        self.active_adapter = adapter_name
        self.add_adapter(adapter_name, config, rngs=rngs)

    def __call__(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    # -- adapters ------------------------------------------------------------------------------
    def lora_layers(self) -> dict[str, LoraLinear]:
        """Module name (relative to the base model) -> `LoraLinear`."""
        return {n: m for n, m in linear_modules(self.base_model).items() if isinstance(m, LoraLinear)}

    def add_adapter(self, adapter_name: str, config: LoraConfig, *, rngs: nnx.Rngs | None = None) -> None:
        if adapter_name in self.peft_config:
            raise AdapterError(f"adapter {adapter_name!r} already exists; adapters: {list(self.peft_config)}")
        inject_adapter(self.base_model, config, adapter_name, rngs or nnx.Rngs(params=0, dropout=1))
        self.peft_config = {**self.peft_config, adapter_name: config}
        # As in PEFT, adding an adapter does not activate it: layers keep running the active one.
        for layer in self.lora_layers().values():
            layer.set_adapter(self.active_adapter, allow_missing=True)

    def set_adapter(self, adapter_name: str) -> None:
        """Run (and train) adapter ``adapter_name`` in every layer that has it."""
        if adapter_name not in self.peft_config:
            raise AdapterError(f"adapter {adapter_name!r} not found; adapters: {list(self.peft_config)}")
        for layer in self.lora_layers().values():
            layer.set_adapter(adapter_name, allow_missing=True)
        self.active_adapter = adapter_name

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise AdapterError(f"adapter {adapter_name!r} not found; adapters: {list(self.peft_config)}")
        if adapter_name == self.active_adapter:
            raise AdapterError(f"adapter {adapter_name!r} is active; set_adapter() to another one first")
        for layer in self.lora_layers().values():
            if adapter_name in layer.lora_A:
                layer.delete_adapter(adapter_name)
        self.peft_config = {k: v for k, v in self.peft_config.items() if k != adapter_name}

    @contextlib.contextmanager
    def disable_adapter(self):
        """Context in which the model runs without any adapter (the base model's outputs)."""
        layers = list(self.lora_layers().values())
        for layer in layers:
            layer.disable_adapters = True
        try:
            yield self
        finally:
            for layer in layers:
                layer.disable_adapters = False

    # -- counting ------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, all)`` element counts; a 4-bit weight counts as its number of elements."""
        trainable = count_parameters(self, nnx.LoRAParam)
        total = count_parameters(self, nnx.Param)
        for _, node in nnx.iter_graph(self):
            if isinstance(node, Linear4bit):
                total += node.quantized.size
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Print PEFT's line: ``trainable params: N || all params: M || trainable%: P``."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # -- merging -------------------------------------------------------------------------------
    def merge_and_unload(self, *, requantize: bool = False) -> nnx.Module:
        """The base model with the active adapter folded into each layer and the adapters removed.

        Dense bases: ``W + s B A`` (DoRA: rescaled rows) in the base's dtype. 4-bit bases are
        dequantized and merged, and stay in full precision (their original dtype) unless
        ``requantize=True``, which quantizes the merged weight again with the same settings (what
        PEFT does with bitsandbytes; it adds a second quantization error). modules_to_save
        parameters become ordinary parameters. This ``PeftModel`` must not be used afterwards.
        """
        model = self.base_model
        for name, layer in self.lora_layers().items():
            if layer.active_adapter in layer.lora_A:
                layer.merge(requantize=requantize)
            set_submodule(model, name, layer.base)
        for path, variable in nnx.to_flat_state(nnx.state(model, ModulesToSaveParam)):
            owner = get_submodule(model, _path_name(path[:-1]))
            setattr(owner, str(path[-1]), nnx.Param(variable.get_value()))
        return model


def get_peft_model(model: nnx.Module, config: LoraConfig, adapter_name: str = "default", *,
                   rngs: nnx.Rngs | None = None) -> PeftModel:
    """Inject LoRA into ``model`` (in place) as PEFT's ``get_peft_model`` does and wrap it.

    Args:
      model: a jaxlora model, e.g. `LlamaForCausalLM` (dense or 4-bit).
      config: the `LoraConfig`.
      adapter_name: name of the adapter (default "default").
      rngs: random streams for A/B initialisation (``params``) and dropout (``dropout``).

    Raises:
      AdapterError: a target that matches no module (the message lists the available ones).
    """
    return PeftModel(model, config, adapter_name, rngs=rngs or nnx.Rngs(params=0, dropout=1))


def merge_and_unload(peft_model: PeftModel, *, requantize: bool = False) -> nnx.Module:
    """`PeftModel.merge_and_unload` as a function."""
    return peft_model.merge_and_unload(requantize=requantize)


__all__ = ["AdapterError", "LoraConfig", "ModulesToSaveParam", "PeftModel", "get_peft_model", "merge_and_unload",
           "target_names", "get_submodule", "set_submodule"]
