"""PEFT adapter files <-> jaxlora adapters (formats.md A), with safetensors' numpy API (no torch).

``adapter_config.json`` is written with every key PEFT 0.21 writes (sorted, indent 2) and
``adapter_model.safetensors`` with PEFT's key names: ``base_model.model.<module>.lora_A.weight``
``[r, in]``, ``lora_B.weight`` ``[out, r]``, ``lora_B.bias`` ``[out]`` (lora_bias),
``lora_magnitude_vector`` ``[out]`` (DoRA), and the saved adapter's own copy of each modules_to_save
module under the module's plain parameter names (``base_model.model.lm_head.weight``; the original is
not saved), all float32 unless stored otherwise. Reading is strict: an option that changes the
numbers and that jaxlora does not implement (`jaxlora.adapters.config`), a tensor that matches no
module, a targeted module without weights, or a shape mismatch is an error naming the key and the
shapes.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlora.atomic import atomic_write, atomic_write_json
from jaxlora.adapters.config import AdapterError, LoraConfig
from jaxlora.peft import PeftModel, get_peft_model

PREFIX = "base_model.model."
PEFT_VERSION = "0.21.2"
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


class AdapterFileError(ValueError):
    """An adapter directory that is missing, malformed, or does not fit the model."""


CONFIG_ONLY_KEYS = ("peft_type", "auto_mapping", "peft_version", "runtime_config")
"""PEFT config keys that are not `LoraConfig` fields: checked (peft_type, auto_mapping) or metadata."""


def adapter_config_dict(config: LoraConfig, target_modules, base_model_class: str = "LlamaForCausalLM") -> dict:
    """The 41 keys of PEFT's adapter_config.json (formats.md A.2) for ``config``."""
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(LoraConfig)}
    return {
        **values, "target_modules": target_modules, "alpha_pattern": dict(config.alpha_pattern),
        "rank_pattern": dict(config.rank_pattern), "inference_mode": True, "peft_type": "LORA",
        "peft_version": PEFT_VERSION, "auto_mapping": None if config.task_type else {
            "base_model_class": base_model_class, "parent_library": "transformers.models.llama.modeling_llama"},
    }


def adapter_tensors(peft_model: PeftModel, adapter_name: str) -> dict[str, np.ndarray]:
    """PEFT's on-disk tensors of adapter ``adapter_name`` (adapter name stripped, formats.md A.4)."""
    tensors: dict[str, np.ndarray] = {}
    for name, layer in peft_model.lora_layers().items():
        if adapter_name not in layer.lora_A:
            continue
        tensors[f"{PREFIX}{name}.lora_A.weight"] = np.asarray(layer.lora_A[adapter_name].get_value())
        tensors[f"{PREFIX}{name}.lora_B.weight"] = np.asarray(layer.lora_B[adapter_name].get_value())
        if adapter_name in layer.lora_B_bias:
            tensors[f"{PREFIX}{name}.lora_B.bias"] = np.asarray(layer.lora_B_bias[adapter_name].get_value())
        if adapter_name in layer.lora_magnitude_vector:
            tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = np.asarray(layer.lora_magnitude_vector[adapter_name].get_value())
    for name, path, variable in _copies(peft_model, adapter_name):
        tensors[f"{PREFIX}{name}.{path}"] = np.asarray(variable.get_value())
    return tensors


def _copies(peft_model: PeftModel, adapter_name: str):
    """``(module name, parameter path, variable)`` of adapter ``adapter_name``'s modules_to_save copies."""
    for name, wrapper in peft_model.modules_to_save().items():
        if adapter_name in wrapper.modules_to_save:
            for path, variable in nnx.to_flat_state(nnx.state(wrapper.modules_to_save[adapter_name], nnx.Param)):
                yield name, ".".join(map(str, path)), variable


def save_peft_adapter(peft_model: PeftModel, out_dir, *, adapter_name: str | None = None,
                      base_model_name_or_path: str | None = None) -> Path:
    """Write adapter ``adapter_name`` (default: the active one) as a PEFT adapter directory.

    ``PeftModel.from_pretrained(transformers_model, out_dir)`` loads it with no missing or
    unexpected keys. Each file is written to a temporary name and renamed (weights first, config
    last, so a directory with a config always has its weights).
    """
    from safetensors.numpy import save

    name = adapter_name or peft_model.active_adapter
    if name not in peft_model.peft_config:
        raise AdapterFileError(f"adapter {name!r} not found; adapters: {list(peft_model.peft_config)}")
    config = peft_model.peft_config[name]
    if base_model_name_or_path is not None:
        config = config.replace(base_model_name_or_path=base_model_name_or_path)
    targets = config.target_modules
    if isinstance(targets, str) and targets.lower() == "all-linear":  # PEFT saves the expanded set of full module paths
        targets = sorted(n for n, layer in peft_model.lora_layers().items() if name in layer.lora_A)
    tensors = adapter_tensors(peft_model, name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / WEIGHTS_NAME, save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata={"format": "pt"}))
    atomic_write_json(out / CONFIG_NAME, adapter_config_dict(config, targets), indent=2, sort_keys=True)
    return out


def read_adapter_config(adapter_dir) -> LoraConfig:
    """Parse a PEFT ``adapter_config.json`` into a `LoraConfig` (strict about what jaxlora cannot honour)."""
    path = Path(adapter_dir) / CONFIG_NAME
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise AdapterFileError(f"{path}: not found (is {adapter_dir} a PEFT adapter directory?)") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFileError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(raw, dict) or raw.get("peft_type") != "LORA":
        raise AdapterFileError(f"{path}: peft_type is {raw.get('peft_type') if isinstance(raw, dict) else raw!r}; expected 'LORA'")
    auto = raw.get("auto_mapping") or {}
    if auto.get("base_model_class") not in (None, "LlamaForCausalLM"):
        raise AdapterFileError(f"{path}: the adapter was made for {auto['base_model_class']}, not LlamaForCausalLM")
    fields = {f.name for f in dataclasses.fields(LoraConfig)}
    # Keys of a newer PEFT: harmless at their empty default, otherwise they may change the numbers.
    unknown = {k: v for k, v in raw.items() if k not in fields and k not in CONFIG_ONLY_KEYS and v not in (None, False, {}, [])}
    if unknown:
        raise AdapterFileError(f"{path}: options jaxlora does not know (from a newer PEFT?): {unknown}; they may change "
                               "the numbers, so the adapter is not loaded as plain LoRA")
    try:
        return LoraConfig(**{k: v for k, v in raw.items() if k in fields})
    except (AdapterError, TypeError, ValueError) as err:
        raise AdapterFileError(f"{path}: {err}") from err


def load_peft_adapter(model, adapter_dir, *, adapter_name: str = "default") -> PeftModel:
    """Load a PEFT LoRA adapter into a jaxlora model, injecting the layers if needed.

    Args:
      model: a jaxlora model (e.g. `LlamaForCausalLM`, dense or 4-bit) or a `PeftModel` (the adapter
        is added under ``adapter_name``, which becomes active).
      adapter_dir: directory with adapter_config.json and adapter_model.safetensors.

    Returns:
      The `PeftModel` with the adapter's exact weights.

    Raises:
      AdapterFileError naming the file, key, module and shapes.
    """
    from safetensors import safe_open

    directory = Path(adapter_dir)
    config = read_adapter_config(directory)
    weights_path = directory / WEIGHTS_NAME
    if not weights_path.exists():
        raise AdapterFileError(f"{weights_path}: not found")
    try:
        handle = safe_open(str(weights_path), framework="numpy")
        keys = set(handle.keys())
    except Exception as err:
        raise AdapterFileError(f"{weights_path}: cannot be read as safetensors ({err})") from err
    rngs = nnx.Rngs(params=0, dropout=1)
    try:  # injection checks everything before it changes the model
        if isinstance(model, PeftModel):
            model.add_adapter(adapter_name, config, rngs=rngs)
            peft_model = model
        else:
            peft_model = get_peft_model(model, config, adapter_name, rngs=rngs)
    except AdapterError as err:
        raise AdapterFileError(f"{directory / CONFIG_NAME}: {err}") from err
    expected = adapter_tensors(peft_model, adapter_name)
    unexpected = sorted(keys - set(expected))
    if unexpected:
        raise AdapterFileError(f"{weights_path}: tensors that match no module of the model: {unexpected[:5]}")
    missing = sorted(set(expected) - keys)
    if missing:
        raise AdapterFileError(f"{weights_path}: no weights for targeted modules: {missing[:5]}")
    values = {}
    for key, current in expected.items():
        try:
            array = handle.get_tensor(key)
        except Exception as err:
            raise AdapterFileError(f"{weights_path}: tensor '{key}' cannot be read ({err})") from err
        if tuple(array.shape) != tuple(current.shape):
            raise AdapterFileError(f"{weights_path}: '{key}' has shape {tuple(array.shape)}; the model needs {tuple(current.shape)}")
        values[key] = array
    _assign(peft_model, adapter_name, values)
    peft_model.set_adapter(adapter_name)
    return peft_model


def _assign(peft_model: PeftModel, adapter_name: str, values: dict[str, np.ndarray]) -> None:
    for name, layer in peft_model.lora_layers().items():
        if adapter_name not in layer.lora_A:
            continue
        dtype = layer.lora_dtype
        layer.lora_A[adapter_name].set_value(jnp.asarray(values[f"{PREFIX}{name}.lora_A.weight"], dtype))
        layer.lora_B[adapter_name].set_value(jnp.asarray(values[f"{PREFIX}{name}.lora_B.weight"], dtype))
        if adapter_name in layer.lora_B_bias:
            layer.lora_B_bias[adapter_name].set_value(jnp.asarray(values[f"{PREFIX}{name}.lora_B.bias"], dtype))
        if adapter_name in layer.lora_magnitude_vector:
            layer.lora_magnitude_vector[adapter_name].set_value(jnp.asarray(values[f"{PREFIX}{name}.lora_magnitude_vector"], dtype))
    for name, path, variable in _copies(peft_model, adapter_name):
        variable.set_value(jnp.asarray(values[f"{PREFIX}{name}.{path}"], variable.get_value().dtype))
