"""``modules_to_save``: whole modules trained with an adapter, one copy per adapter (PEFT's
``ModulesToSaveWrapper``).

The wrapper takes the place of the module in the model. It keeps the original, frozen and untouched
(``original_module``), and one copy per adapter (``modules_to_save[adapter]``) made from the original
when the adapter is added. A call runs the active adapter's copy; the original runs when adapters are
disabled or when the active adapter has no copy here. The active copy's parameters are
`ModulesToSaveParam` (an ``nnx.LoRAParam``: what trains); every other copy and the original hold
plain ``nnx.Param`` (frozen), as PEFT sets ``requires_grad`` on the active copy only.

Attributes read through the wrapper (``wrapper.weight``) are those of the module a call runs, as PEFT's
``__getattr__``. A copy is a new tensor: whatever shared the original parameter keeps the original
(PEFT's tied output layer keeps the original embedding; `jaxlora.adapters.model` gives a tied
jaxlora model an explicit output layer sharing the original's weight for that).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx


class ModulesToSaveParam(nnx.LoRAParam):
    """A parameter of the active adapter's modules_to_save copy: trained, and saved in full with it."""


def copy_module(module: nnx.Module, variable_type) -> nnx.Module:
    """A deep copy of ``module`` whose parameters are new arrays of type ``variable_type``.

    New buffers, not shared ones: the trainer donates what trains, which must never free the original.
    """
    copy = nnx.clone(module)
    for path, variable in nnx.to_flat_state(nnx.state(copy, nnx.Param)):
        _set_variable(copy, path, variable_type(jnp.array(variable.get_value(), copy=True)))
    return copy


def retype(module: nnx.Module, variable_type) -> None:
    """Give every parameter of ``module`` the type ``variable_type`` (same arrays)."""
    for path, variable in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        if type(variable) is not variable_type:
            _set_variable(module, path, variable_type(variable.get_value()))


def _set_variable(root: nnx.Module, path, variable) -> None:
    owner = root
    for part in path[:-1]:
        owner = owner[part] if isinstance(owner, (nnx.List, nnx.Dict)) else getattr(owner, part)
    if isinstance(owner, (nnx.List, nnx.Dict)):
        owner[path[-1]] = variable
    else:
        setattr(owner, path[-1], variable)


class ModulesToSaveWrapper(nnx.Module):
    """A module trained in full per adapter (PEFT's ``ModulesToSaveWrapper``).

    Args:
      module: the original module (its parameters must be dense ``nnx.Param``); kept frozen.
      adapter_name: the first adapter, which gets a copy.
      active: whether that adapter is the active one (else the original runs until `set_adapter`).
    """

    def __init__(self, module: nnx.Module, adapter_name: str, *, active: bool = True):
        self.original_module = module
        self.modules_to_save = nnx.Dict()
        self.active_adapter: str | None = None
        self.disable_adapters = False
        self.add_adapter(adapter_name)
        if active:
            self.set_adapter(adapter_name)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save.keys())

    def add_adapter(self, adapter_name: str) -> None:
        """A frozen copy of the original for ``adapter_name`` (trainable once that adapter is active)."""
        if adapter_name in self.modules_to_save:
            raise ValueError(f"adapter {adapter_name!r} already has a modules_to_save copy here")
        self.modules_to_save[adapter_name] = copy_module(self.original_module, nnx.Param)

    def set_adapter(self, adapter_name: str | None) -> None:
        """Run (and train) ``adapter_name``'s copy; the original runs if it has none here (or None)."""
        for name, module in self.modules_to_save.items():
            retype(module, ModulesToSaveParam if name == adapter_name else nnx.Param)
        self.active_adapter = adapter_name if adapter_name in self.modules_to_save else None

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name == self.active_adapter:
            self.set_adapter(None)
        del self.modules_to_save[adapter_name]

    def active_module(self) -> nnx.Module:
        """The module a call runs: the active copy, or the original (disabled, or no copy for the adapter)."""
        if self.disable_adapters or self.active_adapter is None:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def __call__(self, *args, **kwargs):
        return self.active_module()(*args, **kwargs)

    def __getattr__(self, name: str):
        # Only reached when normal lookup fails: attributes of the module that runs (module docstring).
        if "original_module" not in self.__dict__ or name.startswith("_"):
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")
        return getattr(self.active_module(), name)


__all__ = ["ModulesToSaveParam", "ModulesToSaveWrapper", "copy_module", "retype"]
