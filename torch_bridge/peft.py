"""PEFT adapter files <-> jaxlora adapters (formats.md A), with safetensors' numpy API (no torch).

``adapter_config.json`` is written with every key PEFT 0.21 writes (sorted, indent 2) and
``adapter_model.safetensors`` with PEFT's key names: ``base_model.model.<module>.lora_A.weight``
``[r, in]``, ``lora_B.weight`` ``[out, r]``, ``lora_magnitude_vector`` ``[out]`` (DoRA), and the full
parameters of modules_to_save (``base_model.model.lm_head.weight``), all float32 unless stored
otherwise. Reading is strict: a tensor that matches no module, a targeted module without weights,
or a shape mismatch is an error naming the key and the shapes.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlora.atomic import atomic_write, atomic_write_json
from jaxlora.peft import LoraConfig, ModulesToSaveParam, PeftModel, get_peft_model, target_names

PREFIX = "base_model.model."
PEFT_VERSION = "0.21.2"
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


class AdapterFileError(ValueError):
    """An adapter directory that is missing, malformed, or does not fit the model."""


def adapter_config_dict(config: LoraConfig, target_modules, base_model_class: str = "LlamaForCausalLM") -> dict:
    """The 41 keys of PEFT's adapter_config.json (formats.md A.2) for ``config``."""
    return {
        "alora_invocation_tokens": None, "alpha_pattern": dict(config.alpha_pattern), "arrow_config": None,
        "auto_mapping": None if config.task_type else {
            "base_model_class": base_model_class, "parent_library": "transformers.models.llama.modeling_llama"},
        "base_model_name_or_path": config.base_model_name_or_path, "bias": config.bias, "corda_config": None,
        "ensure_weight_tying": False, "eva_config": None, "exclude_modules": config.exclude_modules,
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": config.init_lora_weights,
        "kasa_config": None, "layer_replication": None, "layers_pattern": config.layers_pattern,
        "layers_to_transform": config.layers_to_transform, "loftq_config": {}, "lora_alpha": config.lora_alpha,
        "lora_bias": False, "lora_dropout": config.lora_dropout, "lora_ga_config": None, "megatron_config": None,
        "megatron_core": "megatron.core", "modules_to_save": config.modules_to_save, "monteclora_config": None,
        "peft_type": "LORA", "peft_version": PEFT_VERSION, "qalora_group_size": 16, "r": config.r,
        "rank_pattern": dict(config.rank_pattern), "revision": None, "target_modules": target_modules,
        "target_parameters": None, "task_type": config.task_type, "trainable_token_indices": None,
        "use_bdlora": None, "use_dora": config.use_dora, "use_qalora": False, "use_rslora": config.use_rslora,
        "velora_config": None,
    }


def adapter_tensors(peft_model: PeftModel, adapter_name: str) -> dict[str, np.ndarray]:
    """PEFT's on-disk tensors of adapter ``adapter_name`` (adapter name stripped, formats.md A.4)."""
    tensors: dict[str, np.ndarray] = {}
    for name, layer in peft_model.lora_layers().items():
        if adapter_name not in layer.lora_A:
            continue
        tensors[f"{PREFIX}{name}.lora_A.weight"] = np.asarray(layer.lora_A[adapter_name].get_value())
        tensors[f"{PREFIX}{name}.lora_B.weight"] = np.asarray(layer.lora_B[adapter_name].get_value())
        if adapter_name in layer.lora_magnitude_vector:
            tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = np.asarray(layer.lora_magnitude_vector[adapter_name].get_value())
    for path, variable in nnx.to_flat_state(nnx.state(peft_model.base_model, ModulesToSaveParam)):
        tensors[PREFIX + ".".join(map(str, path))] = np.asarray(variable.get_value())
    return tensors


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
        config = LoraConfig(**{**config.__dict__, "base_model_name_or_path": base_model_name_or_path})
    targets = config.target_modules
    if targets == "all-linear":  # PEFT saves the expanded set of full module paths
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
    unsupported = {k: raw.get(k) for k in ("fan_in_fan_out", "lora_bias", "use_qalora") if raw.get(k)}
    unsupported.update({k: raw[k] for k in ("layer_replication", "target_parameters", "trainable_token_indices") if raw.get(k)})
    if raw.get("bias", "none") != "none":
        unsupported["bias"] = raw["bias"]
    if unsupported:
        raise AdapterFileError(f"{path}: options jaxlora does not implement: {unsupported}")
    fields = {f for f in LoraConfig.__dataclass_fields__}
    kwargs = {k: v for k, v in raw.items() if k in fields}
    try:
        return LoraConfig(**kwargs)
    except (TypeError, ValueError) as err:
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
    base = model.base_model if isinstance(model, PeftModel) else model
    try:
        target_names(base, config)
    except ValueError as err:
        raise AdapterFileError(f"{directory / CONFIG_NAME}: {err}") from err
    rngs = nnx.Rngs(params=0, dropout=1)
    if isinstance(model, PeftModel):
        model.add_adapter(adapter_name, config, rngs=rngs)
        peft_model = model
    else:
        peft_model = get_peft_model(model, config, adapter_name, rngs=rngs)
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
        if adapter_name in layer.lora_magnitude_vector:
            layer.lora_magnitude_vector[adapter_name].set_value(jnp.asarray(values[f"{PREFIX}{name}.lora_magnitude_vector"], dtype))
    for path, variable in nnx.to_flat_state(nnx.state(peft_model.base_model, ModulesToSaveParam)):
        key = PREFIX + ".".join(map(str, path))
        variable.set_value(jnp.asarray(values[key], variable.get_value().dtype))
