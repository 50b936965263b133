"""`get_peft_model` and `PeftModel`: named LoRA adapters injected into a jaxlora model, PEFT's interface.

`get_peft_model(model, config)` replaces every targeted linear layer of a jaxlora model (dense
`Linear` or 4-bit `Linear4bit`) by a `LoraLinear` around it, chosen by PEFT's matching rules
(`jaxlora.adapters.matching`, formats.md A.2, A.6, A.10), and each ``modules_to_save`` module by a
`ModulesToSaveWrapper` holding the frozen original and the adapter's trainable copy. Module names are
the paths inside the model, which for `LlamaForCausalLM` are transformers'
(``model.layers.0.self_attn.q_proj``).

What trains is selected by type: the active adapter's LoRA weights and modules_to_save copy are
``nnx.LoRAParam`` (the copy as its subclass `ModulesToSaveParam`); the base, the originals of
modules_to_save and every inactive adapter are plain ``nnx.Param`` or quantized weights. Use
``nnx.Optimizer(peft_model, tx, wrt=nnx.LoRAParam)``.
"""

from __future__ import annotations

import contextlib

from flax import nnx

from jaxlora.adapters.config import AdapterError, LoraConfig
from jaxlora.adapters.matching import (OUTPUT_LAYER_NAMES, modules_to_save_names, named_modules, rank_and_alpha,
                                       target_names)
from jaxlora.adapters.modules_to_save import ModulesToSaveParam, ModulesToSaveWrapper, retype
from jaxlora.adapters.tied import (INPUT_EMBEDDING, OUTPUT_LAYER, pending_output_layer, restore_tie, settle_after_merge,
                                   ties_embeddings, untie_output)
from jaxlora.models.llama import count_parameters
from jaxlora.nn import Linear4bit, LoraLinear


def set_submodule(root: nnx.Module, name: str, module: nnx.Module) -> None:
    """Replace the submodule at dotted path ``name`` (e.g. ``model.layers.0.mlp.up_proj``) with ``module``."""
    *parents, last = name.split(".")
    node = get_submodule(root, ".".join(parents)) if parents else root
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


def _modules_to_save(model: nnx.Module, config: LoraConfig, lora_names: list[str]) -> list[str]:
    """The modules_to_save paths of ``config``, checked (AdapterError) before anything changes."""
    names = modules_to_save_names(model, config.modules_to_save, tuple(pending_output_layer(model)))
    for name in names:
        if any(name == t or t.startswith(name + ".") for t in lora_names):
            raise AdapterError(f"modules_to_save selects {name}, which target_modules also gives LoRA; "
                               "a module is one or the other")
        if ties_embeddings(model) and name in (INPUT_EMBEDDING, OUTPUT_LAYER) and config.ensure_weight_tying:
            raise AdapterError(f"modules_to_save {name} with ensure_weight_tying=True on a model with tied embeddings: "
                               "PEFT then ties both to one copy; jaxlora does not implement that (without it each side "
                               "keeps its own module, as in PEFT)")
        module = get_submodule(model, name)
        if module is None or isinstance(module, ModulesToSaveWrapper):  # None: the tied lm_head, made as a dense Linear
            continue
        everything = nnx.to_flat_state(nnx.state(module))
        frozen = nnx.to_flat_state(nnx.state(module, nnx.Param))
        if len(everything) != len(frozen) or any(isinstance(v, nnx.LoRAParam) for _, v in frozen):
            kinds = sorted({type(v).__name__ for _, v in everything})
            raise AdapterError(f"modules_to_save selects {name} ({type(module).__name__}, variables {kinds}): only modules "
                               "of dense parameters (nnx.Param) can be trained in full")
    return names


def inject_adapter(model: nnx.Module, config: LoraConfig, adapter_name: str, rngs: nnx.Rngs, *,
                   active: bool = True) -> list[str]:
    """Add adapter ``adapter_name`` to ``model`` in place: LoRA on every targeted layer, a copy of every
    modules_to_save module. Nothing changes when the config does not fit (AdapterError). Returns the
    LoRA layers' names."""
    names = target_names(model, config)
    save_names = _modules_to_save(model, config, names)
    for name in names:
        layer = get_submodule(model, name)
        r, alpha = rank_and_alpha(config, name)
        kwargs = dict(r=r, lora_alpha=alpha, lora_dropout=config.lora_dropout, use_rslora=config.use_rslora,
                      use_dora=config.use_dora, init_lora_weights=config.init_lora_weights, lora_bias=config.lora_bias,
                      rngs=rngs)
        if isinstance(layer, LoraLinear):
            layer.add_adapter(adapter_name, **kwargs)
        else:
            set_submodule(model, name, LoraLinear(layer, adapter_name=adapter_name, **kwargs))
    for name in save_names:
        module = get_submodule(model, name)
        if isinstance(module, ModulesToSaveWrapper):
            module.add_adapter(adapter_name)
            continue
        if name in (INPUT_EMBEDDING, OUTPUT_LAYER):
            untie_output(model)  # each side of a tie keeps its own module (jaxlora.adapters.tied)
            module = get_submodule(model, name)
        set_submodule(model, name, ModulesToSaveWrapper(module, adapter_name, active=active))
    return names


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
        return {n: m for n, m in named_modules(self.base_model).items() if isinstance(m, LoraLinear)}

    def modules_to_save(self) -> dict[str, ModulesToSaveWrapper]:
        """Module name (relative to the base model) -> `ModulesToSaveWrapper`."""
        return {n: m for n, m in named_modules(self.base_model).items() if isinstance(m, ModulesToSaveWrapper)}

    def add_adapter(self, adapter_name: str, config: LoraConfig, *, rngs: nnx.Rngs | None = None) -> None:
        """Add adapter ``adapter_name``; as in PEFT it is not activated (and does not train) until `set_adapter`."""
        if adapter_name in self.peft_config:
            raise AdapterError(f"adapter {adapter_name!r} already exists; adapters: {list(self.peft_config)}")
        inject_adapter(self.base_model, config, adapter_name, rngs or nnx.Rngs(params=0, dropout=1),
                       active=adapter_name == self.active_adapter)
        self.peft_config = {**self.peft_config, adapter_name: config}
        self._activate(self.active_adapter)

    def _activate(self, adapter_name: str) -> None:
        for layer in self.lora_layers().values():
            layer.set_adapter(adapter_name, allow_missing=True)
        for wrapper in self.modules_to_save().values():
            wrapper.set_adapter(adapter_name)

    def set_adapter(self, adapter_name: str) -> None:
        """Run (and train) adapter ``adapter_name`` in every layer that has it; the others run their base."""
        if adapter_name not in self.peft_config:
            raise AdapterError(f"adapter {adapter_name!r} not found; adapters: {list(self.peft_config)}")
        self._activate(adapter_name)
        self.active_adapter = adapter_name

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove adapter ``adapter_name`` (its LoRA weights and modules_to_save copies)."""
        if adapter_name not in self.peft_config:
            raise AdapterError(f"adapter {adapter_name!r} not found; adapters: {list(self.peft_config)}")
        if adapter_name == self.active_adapter:
            raise AdapterError(f"adapter {adapter_name!r} is active; set_adapter() to another one first")
        for layer in self.lora_layers().values():
            if adapter_name in layer.lora_A:
                layer.delete_adapter(adapter_name)
        for name, wrapper in self.modules_to_save().items():
            if adapter_name in wrapper.modules_to_save:
                wrapper.delete_adapter(adapter_name)
                if not wrapper.adapter_names:  # no adapter trains this module any more
                    set_submodule(self.base_model, name, wrapper.original_module)
                    restore_tie(self.base_model)
        self.peft_config = {k: v for k, v in self.peft_config.items() if k != adapter_name}

    @contextlib.contextmanager
    def disable_adapter(self):
        """Context in which the model runs without any adapter (the base model's outputs)."""
        layers = list(self.lora_layers().values()) + list(self.modules_to_save().values())
        for layer in layers:
            layer.disable_adapters = True
        try:
            yield self
        finally:
            for layer in layers:
                layer.disable_adapters = False

    # -- counting ------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, all)`` element counts, as PEFT: trainable = the active adapter's LoRA weights and
        modules_to_save copy; all = every parameter once (base, originals, every adapter and copy).
        A 4-bit weight counts as its number of elements."""
        return count_parameters(self, nnx.LoRAParam), _frozen_parameter_count(self)

    def print_trainable_parameters(self) -> None:
        """Print PEFT's line: ``trainable params: N || all params: M || trainable%: P``."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # -- merging -------------------------------------------------------------------------------
    def merge_and_unload(self, *, requantize: bool = False) -> nnx.Module:
        """The base model with the active adapter folded into each layer and the adapters removed.

        Dense bases: ``W + s B A`` (DoRA: rescaled rows; lora_bias: ``b + s b_B``) in the base's dtype.
        4-bit bases are dequantized and merged, and stay in full precision (their original dtype)
        unless ``requantize=True``, which quantizes the merged weight again with the same settings
        (what PEFT does with bitsandbytes; it adds a second quantization error). A modules_to_save
        module becomes the active adapter's copy (the original where that adapter has none), with
        plain parameters. With tied embeddings and a copy of either side, the other side keeps the
        original, as in PEFT: the model comes back untied (``lm_head`` set,
        ``config.tie_word_embeddings`` False). This ``PeftModel`` must not be used afterwards.
        """
        model = self.base_model
        for name, layer in self.lora_layers().items():
            if layer.active_adapter in layer.lora_A:
                layer.merge(requantize=requantize)
            set_submodule(model, name, layer.base)
        for name, wrapper in self.modules_to_save().items():
            kept = wrapper.active_module()
            retype(kept, nnx.Param)
            set_submodule(model, name, kept)
        settle_after_merge(model)
        return model


def _frozen_parameter_count(model: nnx.Module) -> int:
    """Every parameter once (shared ones once), a 4-bit weight as its number of elements."""
    total = count_parameters(model, nnx.Param)
    for _, node in nnx.iter_graph(model):
        if isinstance(node, Linear4bit):
            total += node.quantized.size
    return total


def planned_parameter_counts(model: nnx.Module, config: LoraConfig) -> tuple[int, int]:
    """``(trainable, all)`` that ``get_peft_model(model, config).get_nb_trainable_parameters()`` gives,
    computed from the same matching without creating the adapters: ``model`` may be abstract
    (``nnx.eval_shape``), which is how the pre-flight report counts a 70B model without its weights.

    Per LoRA layer ``r * (in + out)`` (r from rank_pattern), plus ``out`` for a DoRA magnitude and
    ``out`` for a lora_bias; per modules_to_save module one copy of its parameters. ``model`` must
    not carry adapters yet.

    Raises:
      AdapterError: as `get_peft_model` would.
    """
    if any(isinstance(m, (LoraLinear, ModulesToSaveWrapper)) for m in named_modules(model).values()):
        raise AdapterError("planned_parameter_counts needs a model without adapters")
    names = target_names(model, config)
    save_names = _modules_to_save(model, config, names)
    trainable = 0
    for name in names:
        layer = get_submodule(model, name)
        r, _ = rank_and_alpha(config, name)
        trainable += r * (layer.in_features + layer.out_features) + layer.out_features * (config.use_dora + config.lora_bias)
    for name in save_names:  # a pending tied lm_head is a copy of the embedding's weight
        module = get_submodule(model, name) if name not in pending_output_layer(model) else get_submodule(model, INPUT_EMBEDDING)
        trainable += count_parameters(module, nnx.Param)
    return trainable, _frozen_parameter_count(model) + trainable


def get_peft_model(model: nnx.Module, config: LoraConfig, adapter_name: str = "default", *,
                   rngs: nnx.Rngs | None = None) -> PeftModel:
    """Inject LoRA into ``model`` (in place) as PEFT's ``get_peft_model`` does and wrap it.

    Args:
      model: a jaxlora model, e.g. `LlamaForCausalLM` (dense or 4-bit).
      config: the `LoraConfig`.
      adapter_name: name of the adapter (default "default").
      rngs: random streams for A/B initialisation (``params``) and dropout (``dropout``).

    Raises:
      AdapterError: a target that matches no module (the message lists the available ones), or a
        modules_to_save entry that selects nothing or cannot be copied.
    """
    return PeftModel(model, config, adapter_name, rngs=rngs or nnx.Rngs(params=0, dropout=1))


def merge_and_unload(peft_model: PeftModel, *, requantize: bool = False) -> nnx.Module:
    """`PeftModel.merge_and_unload` as a function."""
    return peft_model.merge_and_unload(requantize=requantize)


__all__ = ["AdapterError", "LoraConfig", "ModulesToSaveParam", "ModulesToSaveWrapper", "OUTPUT_LAYER_NAMES",
           "PeftModel", "get_peft_model", "get_submodule", "merge_and_unload",
           "planned_parameter_counts", "set_submodule", "target_names"]
